"""QED, the QEMU Enhanced Disk format (docs/interop/qed_spec.txt): a
little-endian header in the first cluster(s), the backing file name inside
them, an L1 table of ``table_size`` clusters naming L2 tables of the same
size, whose entries name data clusters (0: unallocated, 1: reads as zeros).
There are no reference counts: space is taken at the end of the file, and a
cluster nothing names is a leak.

Invariants kept on writing (qemu-img check counts violations): table and
cluster offsets are cluster-aligned, inside the file and past the L1 table;
while tables change the header's need-check flag is set (a crash leaves it
set, and the next writable open or ``check -r`` checks and clears it).

Modules, each depending only on those above it (``core.tablemap`` holds the
tables):

- ``layout``:   the header (``core.layout``), constants, limits, ``sniff``,
                ``inspect_untrusted``, ``header_problems`` (no I/O)
- ``state``:    ``QedState``, what the modules below share about one image
- ``header``:   open (read and validate), header write-back, the need-check
                flag and the backing file name
- ``clusters``: the data path: status, reads, writes, zeros
- ``pack``:     moving clusters down into unused space (compact, shrink,
                ``check -r leaks``)
- ``create``, ``resize``, ``compact``, ``check``: one operation each
- ``backend``:  ``QedBackend``, the ImageBackend that ties them together"""

"""QCOW version 1, QEMU's first copy-on-write format (block/qcow.c) as QEMU
and Xen's tapdisk write it: a big-endian 48-byte header, the backing file
name, an L1 table sized by the disk size naming L2 tables of ``2^l2_bits``
entries, whose entries name data clusters (0: unallocated; bit 63: a
zlib-compressed cluster, raw deflate with a 4 KiB window, its byte count in
the bits below 63 and above ``63 - cluster_bits``).  Tapdisk adds an
extended header (magic "XEN\\xfb") with an L1 checksum and, in its older
images, a little-endian L1 table.  AES-encrypted images are refused.
There are no reference counts and no zero clusters.

Invariants kept on writing: plain clusters and L2 tables are
cluster-aligned at the end of the file, written before the entries naming
them (data flushed, then L2 tables, flushed, then the L1 table); a
tapdisk image's L1 table goes big-endian with its flag before vdtool changes
it, and its checksum follows the table.

Modules, each depending only on those above it (``core.tablemap`` holds the
tables):

- ``layout``:   the header and tapdisk's extended header (``core.layout``),
                constants, limits, ``sniff``, ``inspect_untrusted``,
                ``header_problems`` (no I/O)
- ``state``:    ``QcowState``, what the modules below share about one image
- ``header``:   open (read and validate), tapdisk's header, the backing name
- ``clusters``: the data path: status, reads, writes, compressed clusters
- ``create``, ``resize``, ``compact``, ``check``: one operation each
- ``backend``:  ``QcowBackend``, the ImageBackend that ties them together"""

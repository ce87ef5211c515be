"""VDI, VirtualBox's native format: normal (dynamic), fixed, undo and
differencing images, header versions 0 and 1.1 (with and without the LCHS
geometry of "1.1+").

Layout: a 72-byte pre-header (text, signature, version), the header, the
block map (one little-endian u32 per block: a data index, FREE or ZERO) and
the data blocks, each ``cbBlockExtra + cbBlock`` bytes, stored in allocation
order from ``offData``.  A differencing image names its parent only by UUID
(uuidLinkage) and the parent's modification UUID at the time it was linked.

Invariants kept on writing (qemu-img check counts violations as
corruptions): every allocated entry is below cBlocksAllocated, no two entries
share a data block, and cBlocksAllocated equals the number of allocated
entries -- a released block is filled by moving the last one into it.

Modules, each depending only on those above it:

- ``layout``:   the pre-header and headers v0, 1.1 and 1.1+ (``core.layout``,
                VirtualBox's field names), constants and limits, and pure
                functions: ``sniff``, ``probe_score``, ``image_uuid``,
                ``inspect_untrusted``, header decoding and validation, the
                parent-name hint (no I/O; importing it loads nothing else)
- ``blockmap``: ``BlockMap``, the map in memory, and the scans that cost
                per allocated entry, not per entry (memcmp, translate, SWAR)
- ``state``:    ``VdiState``, what every module below shares about one open
                image, and the facts derived from it
- ``load``:     open: read and validate the header, the hint and the map
- ``metadata``: writing back map entries and header in order, allocating a
                block, closing holes left by released blocks
- ``parent``:   the parent link (uuidLinkage, uuidParentModify, the hint)
- ``create``, ``resize``, ``compact``, ``check``: one operation each
- ``backend``:  ``VdiBackend``, the ImageBackend that ties them together"""

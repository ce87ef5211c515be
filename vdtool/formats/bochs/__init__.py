"""Bochs redolog images, read-only: "Growing" disks (what ``bximage
-imgmode=growing`` makes) and the "Undoable"/"Volatile" journals Bochs keeps
over a flat base image, header versions 1 and 2.

Layout: a 512-byte header (magic, type "Redolog", subtype, version, header
size, catalog entries, bitmap bytes, extent bytes, [v2: timestamp], disk
size), the catalog (one little-endian u32 per extent: the extent's index in
the file, or 0xFFFFFFFF when absent), then the extents in allocation order,
each a sector-rounded bitmap (one bit per sector, least significant bit
first: set when the sector is in the file) followed by its sectors.  A
sector whose bit is clear reads as zeros in a Growing disk and as the base
image in a journal.

Modules, each depending only on those above it:

- ``layout``:  the header (``core.layout``), constants and limits, ``sniff``,
               ``header_problems``, ``inspect_untrusted`` (no I/O)
- ``state``:   ``BochsState``, the open image's header, catalog and bitmap cache
- ``load``:    open: the header and catalog read and validated
- ``extents``: block status, host offsets and reads through catalog and bitmaps
- ``backend``: ``BochsBackend``, the read-only ImageBackend"""

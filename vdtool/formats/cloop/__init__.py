"""cloop (compressed loop) images, read-only: the V2.0 format that
create_compressed_fs of cloop-utils writes (and the Linux cloop module and
QEMU read), every block a zlib stream.

Layout: a 128-byte shell-script preamble ("#!/bin/sh", "#V2.0 Format", a
modprobe/mount line), the big-endian block size and block count, then
count + 1 big-endian u64 offsets (block i is the bytes from offset i up to
offset i + 1), then the compressed blocks.  The disk is count whole blocks
(the last one padded with zeros by the maker).  Later formats (V3.0, V4.0:
other compressors, the index at the end) are recognised and refused by
name.

Modules, each depending only on those above it:

- ``layout``:  the header (``core.layout``), constants and limits, ``sniff``,
               the preamble's version, ``header_problems`` (no I/O)
- ``state``:   ``CloopState``, the open image's header, offsets and block cache
- ``load``:    open: the header and offset table read and validated
- ``blocks``:  reads: a block inflated (the last one cached), block status
- ``backend``: ``CloopBackend``, the read-only ImageBackend"""

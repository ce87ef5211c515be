"""QCOW2 images: QEMU's copy-on-write format, versions 2 (compat 0.10) and 3 (compat 1.1).

Read (normal, zero, compressed and extended-L2 clusters, internal snapshots
parsed), write (copy-on-write against the parent, zero flags, compressed
clusters, COW of clusters shared with internal snapshots), create laid out as
qemu-img 7.2 does, resize, check/repair and compact.  Compressed clusters are
zlib (compression_type 0) or zstd (1, incompatible feature bit 3), both as
qemu-img 7.2 writes them.

The modules, lowest first (each imports only modules above it):

- ``layout``: the on-disk structures (header, extensions, snapshot table
  entries, bitmap directory, table entry flags), limits, and pure functions:
  header validation, ``sniff`` and ``inspect_untrusted`` for the core.
- ``codec``: compressed cluster payloads: zlib and zstd compression and
  decompression (the zstd binding imported on first use).
- ``state``: ``Qcow2State``, the fields every piece shares (header values,
  tables, caches, dirty sets, allocation hints), the metadata overlap index
  and the header field writes.
- ``snapshot``: the internal snapshot table (read, listed for info).
- ``snapedit``: internal snapshots created, applied and deleted (the refcounts
  and OFLAG_COPIED flags that go with them, crash-safe order).
- ``refcount``: refcount blocks and table: codec, cache, allocation,
  free-space search, table growth, deferred frees.
- ``header``: reading and validating the header into the state at open;
  the full header rewrite of set_parent and create.
- ``cluster``: the L1/L2 mapping: L2 cache, lookup and status of guest
  offsets, reading, compressed cluster descriptors, L2 tables made
  writable (copy-on-write of tables shared with snapshots), L1 growth and
  the ordered metadata flush.
- ``write``: guest writes (copy-on-write of clusters shared with snapshots
  or partly written over a parent), zero/discard, compressed clusters.
- ``resize``: growing and shrinking, cutting the file to what is used.
- ``check``: check and repair (refcounts rebuilt from all metadata).
- ``compact``: releasing zero clusters and moving clusters down.
- ``create``: creation options and the layout of a new image.
- ``backend``: ``Qcow2Backend``, the ImageBackend contract over the pieces.
"""

"""DMG, Apple's disk image (UDIF), read-only.

Layout: the data fork (the disk's chunks, raw or compressed) from the start
of the file, a property list (XML) or a classic resource fork naming the
partitions, and the 512-byte ``koly`` trailer at the end that says where
each lies and how many sectors the disk has.  Each partition (a ``blkx``
resource) is a ``mish`` block: a header and a table of chunks, each one run
of sectors stored raw, as zeros, or compressed (zlib for UDZO, bzip2 for
UDBZ, ADC for UDCO, LZFSE for ULFO).

Nothing read from the file is trusted: the property list is parsed with
entity declarations refused and its size capped, chunk counts, sector
counts and compressed lengths are capped before anything is allocated,
every chunk must lie inside the data fork and inside the disk, and no two
chunks may cover the same sector.

Modules, each depending only on those above it:

- ``layout``:  the koly trailer, the mish header and chunk entries
               (``core.layout``, Apple's field names), chunk types and limits,
               ``sniff``, ``inspect_untrusted`` (no I/O)
- ``plist``:   the partitions' mish blocks from the XML property list or the
               binary resource fork
- ``chunks``:  ``ChunkTable``: every partition's chunks, checked and sorted
- ``decode``:  one chunk's bytes: zlib, bzip2, ADC (``adc``), LZFSE
- ``adc``:     Apple Data Compression, decoding only
- ``backend``: ``DmgBackend``, the read-only ImageBackend"""

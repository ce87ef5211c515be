"""VHDX (MS-VHDX), Hyper-V's format: fixed, dynamic and differencing images,
logical sectors of 512 or 4096 bytes, payload blocks of 1 to 256 MiB.

Layout: a 1 MiB header section (file identifier, two 4 KiB headers at 64
and 128 KiB, two region tables at 192 and 256 KiB), then objects placed
by the region table (the BAT and the metadata region) and by the header
(the log), and the payload blocks and sector bitmap blocks the BAT points
to, all on 1 MiB boundaries.  The valid header with the higher sequence
number is the current one; headers, region tables and log entries carry a
CRC-32C.

Invariants kept on writing: the data a BAT entry points to is on disk
before the entry; every BAT, sector bitmap and metadata change goes
through the log; the header is updated by writing the non-current one.

Modules, each depending only on those above it:

- ``crc``:      CRC-32C (google_crc32c, or a table of our own)
- ``layout``:   the structures (``core.layout``, MS-VHDX's field names),
                GUIDs, constants, BAT entry bits; pure header, region table
                and ``--untrusted`` functions (no I/O)
- ``state``:    ``VhdxState``, what the modules below share
- ``headers``:  the file identifier, the two headers, the header update
- ``log``:      the log: active sequence, replay, read-through, writing
- ``regions``:  the region tables and their problems
- ``parent``:   the parent locator (keys, names, linkage)
- ``metadata``: the metadata table and items; a new metadata region
- ``bat``:      the BAT and the data path (states, sector bitmaps, writes)
- ``load``:     open: everything above in order
- ``create``, ``resize``, ``compact``, ``check``, ``reparent``: one operation each
- ``backend``:  ``VhdxBackend``"""

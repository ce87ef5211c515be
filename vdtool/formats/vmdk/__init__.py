"""VMDK: VMware's virtual disk format, a text descriptor and one or more
extents (sparse KDMV files, flat files, zero extents).

Modules, each depending only on those above it:

- ``layout``: the on-disk structures (sparse extent header, stream
  markers), flags and limits; header checks without I/O; ``sniff``,
  ``probe_score`` and ``inspect_untrusted`` for probing and --untrusted.
- ``descriptor``: the text descriptor (parse, edit in place, render), CIDs,
  geometry and extent file names.
- ``tablescan``: which grain tables may hold entries, found without
  reading every one.
- ``sparse``: sparse extents: directories, grain tables, reads, writes.
- ``stream``: writing streamOptimized images in one pass.
- ``flat``: FLAT/VMFS and ZERO extents.
- ``disk``: ``Disk``, the descriptor, extents and files of one opened
  image (the state the modules below share), and reading an image into it.
- ``create``, ``resize``, ``compact``, ``check``: the whole-image
  operations, on a Disk.
- ``backend``: ``VmdkBackend``, the ImageBackend the registry loads."""

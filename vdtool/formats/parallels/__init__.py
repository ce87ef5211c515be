"""Parallels, the expanding disk image of Parallels Desktop and OpenVZ
(QEMU's docs/interop/parallels.txt): the bare image file (the ``.hds`` file
inside a ``.hdd`` bundle), and the bundle itself (a folder whose
``DiskDescriptor.xml`` names its images and their snapshot tree).

Layout: a 64-byte little-endian header, the BAT right after it (one u32
per cluster: 0 for a cluster that reads as zeros, else where the cluster
starts: in sectors for ``WithoutFreeSpace`` images, in clusters for
``WithouFreSpacExt`` ones) and the data area from ``data_off``.  The
``inuse`` field holds 0x746F6E59 while a writer has the image open; a
file left with it set was not closed cleanly: it opens read-only until
``check -r leaks`` (or ``all``) clears the flag.

Invariants kept on writing (check counts violations as corruptions):
every BAT entry points inside the data area and the file, at a cluster
boundary, and no two entries share a cluster; clusters lie packed from the
data offset: a released cluster is filled by moving the last one into it.

Modules, each depending only on those above it:

- ``layout``:   the header (``core.layout``, QEMU's field names), constants
                and limits, pure functions: ``sniff``, header validation,
                geometry, ``inspect_untrusted`` (no I/O)
- ``state``:    ``ParallelsState``, what every module below shares about one
                open image, and the BAT scan
- ``load``:     open: read and validate the header and the BAT
- ``metadata``: writing back BAT entries and header in order, allocating a
                cluster, closing holes released clusters leave
- ``create``, ``resize``, ``compact``, ``check``: one operation each
- ``descriptor``: a bundle's DiskDescriptor.xml parsed (safely) into storages
                and the snapshot chain; a new one rendered, sizes rewritten
- ``bundle``:   ``BundleBackend``: a bundle read as one image through its
                chain; one storage with one image is written through it
- ``backend``:  ``ParallelsBackend``, the ImageBackend that ties them together
                (its ``open`` hands a bundle folder to ``bundle``)"""

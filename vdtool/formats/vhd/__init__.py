"""VHD images (Connectix / Microsoft Virtual PC, Hyper-V, Azure): fixed,
dynamic and differencing disks, per Microsoft's "Virtual Hard Disk Image
Format Specification" 1.0.  All integers are big-endian.

- fixed:        data (current size bytes), footer
- dynamic/diff: footer copy, dynamic disk header, BAT, [parent locator data],
                blocks (sector bitmap padded to 512 bytes, then block data), footer

Modules, each depending only on those above it:

- ``layout``:   the footer, dynamic disk header and parent locator entry
                (``core.layout``), constants, checksum, CHS geometry, time
                stamps, the disk-size rule, pure validation, ``sniff`` and
                ``inspect_untrusted`` (no I/O; importing it loads nothing else)
- ``locators``: parent locators: platform codes W2ru/W2ku/Wi2r/Wi2k/Mac/MacX
                decoded to paths, paths encoded for new locators
- ``state``:    ``VhdState``, what every module below shares about one open image
- ``metadata``: the sector bitmap cache and the write-back of bitmaps, BAT,
                header and footer (``flush``)
- ``space``:    where blocks live: allocate, release, move out of the way,
                trim the end; which BAT entries are usable
- ``load``:     open: read and validate footer, header, BAT and locators
- ``blocks``:   the data path: block_status, read, write, write_zeroes
- ``create``, ``resize``, ``compact``, ``parent`` (set_parent), ``check``:
                one operation each
- ``backend``:  ``VhdBackend``, the ImageBackend that ties them together

The choices worth knowing (which size is the disk's size, creator
application, sector bitmaps, write-back order, --force, broken BAT entries)
are in ``backend``'s docstring."""

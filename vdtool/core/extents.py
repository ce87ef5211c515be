"""Host-file runs for ``map_extent``: where allocated data lies in a file
region that may have holes (flat VMDK extents, fixed VDI and VHD disks,
QEMU reports such holes as data that reads as zeros)."""

from __future__ import annotations

from vdtool.core.backend import MapExtent, Status


def flat_extent(file, host: int, length: int) -> MapExtent:
    """The run at ``host`` in ``file``, at most ``length`` bytes: DATA with
    ``zero`` set over a hole of the file (or past its end), plain DATA
    over written bytes; the offset is ``host``."""
    data = file.next_data(host)
    if data > host:
        return MapExtent(Status.DATA, max(1, min(data - host, length)), host, zero=True, file=file.path)
    hole = file.next_hole(host)
    return MapExtent(Status.DATA, max(1, min(hole - host, length)), host, file=file.path)

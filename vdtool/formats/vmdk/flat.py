"""VMDK extents without tables: FLAT and VMFS (the disk's bytes in a file
from an offset on) and ZERO (no file; reads as zeros).

Every extent kind (these, ``sparse.SparseExtent``) offers the backend the
same members: ``kind`` (the descriptor's type), ``compressed``, ``file``
and ``path`` (None for ZERO), ``capacity`` (sectors), ``size`` (bytes),
``block_status``, ``readinto``, ``write``, ``write_zeroes`` and
``flush_metadata``, all with offsets relative to the extent's start."""

from __future__ import annotations

from vdtool.core.backend import MapExtent, Status
from vdtool.core.bytesutil import zeros
from vdtool.core.extents import flat_extent
from vdtool.core.errors import NotSupported
from vdtool.formats.vmdk.layout import SECTOR


class FlatExtent:
    """Raw data in a file from ``file_offset`` on (FLAT and VMFS extents)."""

    kind = "FLAT"
    compressed = False

    def __init__(self, file, file_offset: int, size: int, etype: str = "FLAT"):
        self.file = file
        self.path = file.path
        self.file_offset = file_offset
        self.capacity = size // SECTOR
        self.kind = etype

    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self.size)
        if offset >= end:
            return Status.ZERO, length
        fo = self.file_offset
        data = self.file.next_data(fo + offset) - fo
        if data > offset:
            return Status.ZERO, min(data, end) - offset
        hole = self.file.next_hole(fo + offset) - fo
        return Status.DATA, max(1, min(hole, end) - offset)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """Data at its place in the file; holes are data reading as zeros
        (as QEMU reports flat extents)."""
        return flat_extent(self.file, self.file_offset + offset, min(length, self.size - offset))

    def readinto(self, offset: int, mv) -> None:
        self.file.readinto(self.file_offset + offset, mv)

    def write(self, offset: int, mv, parent_read) -> None:
        self.file.pwrite(self.file_offset + offset, mv)

    def write_zeroes(self, offset: int, length: int, has_parent: bool, parent_read) -> None:
        start = self.file_offset + offset
        if not has_parent and self.file.punch_hole(start, length):
            return
        self.file.write_zeroes(start, length)

    def flush_metadata(self, sync: bool = True) -> None:
        pass


class ZeroExtent:
    kind = "ZERO"
    compressed = False

    def __init__(self, size: int):
        self.capacity = size // SECTOR
        self.file = None
        self.path = None

    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def block_status(self, offset: int, length: int) -> tuple:
        return Status.ZERO, length

    def map_extent(self, offset: int, length: int) -> MapExtent:
        return MapExtent(Status.ZERO, length)

    def readinto(self, offset: int, mv) -> None:
        mv[:] = zeros(len(mv))

    def write(self, offset, mv, parent_read) -> None:
        raise NotSupported("writing into a ZERO extent", "vmdk")

    def write_zeroes(self, offset, length, has_parent, parent_read) -> None:
        pass

    def flush_metadata(self, sync: bool = True) -> None:
        pass

"""``QcowState``: what every module of the package shares about one open
QCOW (version 1) image."""

from __future__ import annotations

from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.core.tablemap import TableMap
from vdtool.formats.qcow.layout import QCOW_OFLAG_COMPRESSED


class QcowState:
    """One open QCOW image.

    ``file``, ``path``  the ImageFile and its name
    ``hdr``             the header record (layout.HEADER)
    ``xen``             tapdisk's extended header record, None without one
    ``tables``          the L1 table and the L2 cache (core.tablemap)
    ``backing_name``    the backing file name, None without one
    ``cs``              the cluster size (1 << cluster_bits)
    ``cache``           (offset, data) of the last compressed cluster read"""

    __slots__ = ("file", "path", "hdr", "xen", "tables", "backing_name", "cs", "cache")

    def __init__(self, file: ImageFile, hdr: Record, xen: Record | None, tables: TableMap,
                 backing_name: str | None):
        self.file = file
        self.path: str = file.path
        self.hdr = hdr
        self.xen = xen
        self.tables = tables
        self.backing_name = backing_name
        self.cs: int = 1 << hdr.cluster_bits
        self.cache: tuple = (-1, b"")

    @property
    def virtual_size(self) -> int:
        return self.hdr.size

    def compressed(self, e: int) -> tuple:
        """(offset, size) of a compressed cluster's entry."""
        shift = 63 - self.hdr.cluster_bits
        return e & ((1 << shift) - 1), (e >> shift) & (self.cs - 1)

    def compressed_entry(self, offset: int, size: int) -> int:
        return QCOW_OFLAG_COMPRESSED | (size << (63 - self.hdr.cluster_bits)) | offset

    def data_problem(self, e: int) -> str | None:
        """Why an entry cannot be read (None: it can)."""
        end = max(self.tables.file_size, self.tables.end)
        if e & QCOW_OFLAG_COMPRESSED:
            off, size = self.compressed(e)
            if not size or off + size > end:
                return f"names compressed data ({size} bytes at {off}) past the end of the file (file size {end})"
            return None
        if e < self.tables.min_offset:
            return f"lies inside the header or L1 table (below {self.tables.min_offset})"
        if e >= end:
            return f"lies past the end of the file (file size {end})"
        return None

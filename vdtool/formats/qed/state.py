"""``QedState``: what every module of the package shares about one open QED
image."""

from __future__ import annotations

from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.core.tablemap import TableMap
from vdtool.formats.qed.layout import QED_F_BACKING_FILE, QED_F_BACKING_FORMAT_NO_PROBE


class QedState:
    """One open QED image.

    ``file``, ``path``  the ImageFile and its name
    ``hdr``             the header record (layout.HEADER), as last written
    ``tables``          the L1 table and the L2 cache (core.tablemap)
    ``backing_name``    the backing file name, None without one
    ``cs``              the cluster size
    ``data_start``      the first offset after the L1 table (where nothing
                        below may be a data cluster or an L2 table)
    ``need_check_ours`` this session set the need-check flag (cleared on a
                        clean flush)"""

    __slots__ = ("file", "path", "hdr", "tables", "backing_name", "cs", "data_start", "need_check_ours")

    def __init__(self, file: ImageFile, hdr: Record, tables: TableMap, backing_name: str | None):
        self.file = file
        self.path: str = file.path
        self.hdr = hdr
        self.tables = tables
        self.backing_name = backing_name
        self.cs: int = hdr.cluster_size
        self.data_start: int = hdr.l1_table_offset + hdr.table_size * hdr.cluster_size
        self.need_check_ours = False

    @property
    def has_backing(self) -> bool:
        return bool(self.hdr.features & QED_F_BACKING_FILE)

    @property
    def backing_raw(self) -> bool:
        return bool(self.hdr.features & QED_F_BACKING_FORMAT_NO_PROBE)

    @property
    def virtual_size(self) -> int:
        return self.hdr.image_size

    def data_problem(self, e: int) -> str | None:
        """Why an L2 entry's data cluster offset cannot be used (None: it can)."""
        if e % self.cs:
            return f"is not aligned to the cluster size {self.cs}"
        if e < self.data_start:
            return f"lies inside the header or L1 table (below {self.data_start})"
        if e >= max(self.tables.file_size, self.tables.end):
            return f"lies past the end of the file (file size {self.tables.file_size})"
        return None

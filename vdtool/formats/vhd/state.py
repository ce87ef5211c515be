"""``VhdState``: what the modules of the VHD backend share about one open
image.  The loader fills it in, the data path, the metadata write-back and
the operations read and change it; nothing else holds VHD metadata."""

from __future__ import annotations

from array import array
from collections import OrderedDict

from vdtool.core.bytesutil import U32, align_up
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vhd.layout import (DEFAULT_BLOCK, FOOTER_SIZE, HEADER_SIZE, SECTOR, TYPE_DIFF, TYPE_DYNAMIC,
                                       TYPE_FIXED, UNUSED, bitmap_bytes)


class VhdState:
    """One open VHD image (a plain class with slots: a dataclass costs
    about a millisecond of start-up to build).

    The footer and what it decides: ``footer`` (layout.FOOTER, as it will
    be written), ``disk_type``, ``size`` (the disk's size, layout.disk_size),
    ``data_end`` (where the footer at the end starts: for a fixed disk the
    end of its data; for a dynamic one, after a flush, equal to
    next_free), ``problems`` ((kind, message) found at open, reported by
    check and info; kinds: footer-checksum, footer-missing, footer-copy,
    header-checksum); ``force``: open accepts wrong checksums (--force,
    and check).

    Dynamic and differencing disks: ``header_offset``, ``table_offset``,
    ``max_table_entries``, ``bat`` (block -> sector of its bitmap, or
    UNUSED), ``block`` (block size in bytes), ``spb`` (sectors per block),
    ``bitmap_size`` (bytes of a block's sector bitmap), ``slot`` (bitmap
    and data: what a block takes in the file), ``full_mask`` (a sector
    bitmap, as ``metadata.bits`` returns it, with every sector set),
    ``locators`` (locators.Locator), ``parent_uid``, ``parent_ts``,
    ``parent_name`` (the header's Parent Unicode Name), ``bad`` (block ->
    why its BAT entry cannot be used), ``next_free`` (where the next block
    goes, and the footer after a flush).

    Write-back cache (metadata.flush writes it out): ``bitmaps`` (block ->
    bytearray, least recently used first), ``bm_dirty`` (blocks whose
    bitmap is to be written), ``bat_dirty`` (BAT sectors, entry // 128, to
    be written), ``data_dirty`` (data written since the last flush),
    ``footer_dirty``, ``header_dirty``."""

    __slots__ = ("file", "force", "footer", "disk_type", "size", "data_end", "problems", "header_offset",
                 "table_offset", "max_table_entries", "bat", "block", "spb", "bitmap_size", "slot", "full_mask",
                 "locators", "parent_uid", "parent_ts", "parent_name", "bad", "next_free", "bitmaps", "bm_dirty",
                 "bat_dirty", "data_dirty", "footer_dirty", "header_dirty")

    def __init__(self, file: ImageFile, force: bool = False):
        self.file = file
        self.force = force
        self.footer: Record | None = None
        self.disk_type: int = TYPE_FIXED
        self.size: int = 0
        self.data_end: int = 0
        self.problems: list = []
        self.header_offset: int = 0
        self.table_offset: int = 0
        self.max_table_entries: int = 0
        self.bat: array = array(U32)
        self.block: int = DEFAULT_BLOCK
        self.spb: int = DEFAULT_BLOCK // SECTOR
        self.bitmap_size: int = SECTOR
        self.slot: int = DEFAULT_BLOCK + SECTOR
        self.full_mask: int = 0
        self.locators: list = []
        self.parent_uid: bytes = bytes(16)
        self.parent_ts: int = 0
        self.parent_name: str = ""
        self.bad: dict = {}
        self.next_free: int = 0
        self.bitmaps: OrderedDict = OrderedDict()
        self.bm_dirty: set = set()
        self.bat_dirty: set = set()
        self.data_dirty: bool = False
        self.footer_dirty: bool = False
        self.header_dirty: bool = False

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def dynamic(self) -> bool:
        """Dynamic or differencing: has a header and a BAT."""
        return self.disk_type in (TYPE_DYNAMIC, TYPE_DIFF)

    def set_block(self, bs: int) -> None:
        self.block = bs
        self.spb = bs // SECTOR
        self.bitmap_size = bitmap_bytes(bs)
        self.slot = self.bitmap_size + bs
        self.full_mask = (1 << self.spb) - 1

    def allocated_count(self) -> int:
        """Blocks the BAT points at (usable or not)."""
        return len(self.bat) - self.bat.count(UNUSED)

    def meta_ranges(self) -> list:
        """(start, end, what) of every metadata structure inside the file."""
        out = [(0, FOOTER_SIZE, "footer copy"),
               (self.header_offset, self.header_offset + HEADER_SIZE, "dynamic disk header"),
               (self.table_offset, self.table_offset + align_up(self.max_table_entries * 4, SECTOR), "BAT")]
        for loc in self.locators:
            out.append((loc.offset, loc.offset + loc.length, f"parent locator {loc.name}"))
        return out

    def meta_end(self) -> int:
        return align_up(max(e for _, e, _ in self.meta_ranges()), SECTOR)

"""``VhdState``: what the modules of the VHD backend share about one open
image.  The loader fills it in, the data path, the metadata write-back and
the operations read and change it; nothing else holds VHD metadata."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from vdtool.core.bytesutil import U32, align_up
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vhd.layout import (DEFAULT_BLOCK, FOOTER_SIZE, HEADER_SIZE, SECTOR, TYPE_DIFF, TYPE_DYNAMIC,
                                       TYPE_FIXED, UNUSED, bitmap_bytes)


@dataclass(slots=True, eq=False)
class VhdState:
    file: ImageFile
    force: bool = False  # open accepts wrong checksums (--force, and check)

    # -- the footer and what it decides
    footer: Optional[Record] = None  # layout.FOOTER, as it will be written
    disk_type: int = TYPE_FIXED
    size: int = 0  # the disk's size (layout.disk_size)
    # Where the footer at the end starts: for a fixed disk the end of its
    # data; for a dynamic one, after a flush, equal to next_free.
    data_end: int = 0
    # (kind, message) found at open, reported by check and info; kinds:
    # footer-checksum, footer-missing, footer-copy, header-checksum
    problems: list = field(default_factory=list)

    # -- dynamic and differencing disks
    header_offset: int = 0
    table_offset: int = 0
    max_table_entries: int = 0
    bat: array = field(default_factory=lambda: array(U32))  # block -> sector of its bitmap, or UNUSED
    block: int = DEFAULT_BLOCK  # block size in bytes
    spb: int = DEFAULT_BLOCK // SECTOR  # sectors per block
    bitmap_size: int = SECTOR  # bytes of a block's sector bitmap
    slot: int = DEFAULT_BLOCK + SECTOR  # bitmap and data: what a block takes in the file
    full_mask: int = 0  # a sector bitmap (as ``metadata.bits`` returns it) with every sector set
    locators: list = field(default_factory=list)  # locators.Locator
    parent_uid: bytes = bytes(16)
    parent_ts: int = 0
    parent_name: str = ""  # the header's Parent Unicode Name
    bad: dict = field(default_factory=dict)  # block -> why its BAT entry cannot be used
    next_free: int = 0  # where the next block goes (and the footer after a flush)

    # -- write-back cache (metadata.flush writes it out)
    bitmaps: OrderedDict = field(default_factory=OrderedDict)  # block -> bytearray, least recently used first
    bm_dirty: set = field(default_factory=set)  # blocks whose bitmap is to be written
    bat_dirty: set = field(default_factory=set)  # BAT sectors (entry // 128) to be written
    data_dirty: bool = False  # data written since the last flush
    footer_dirty: bool = False
    header_dirty: bool = False

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

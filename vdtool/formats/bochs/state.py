"""``BochsState``: what the package's modules share about one open Bochs
redolog image."""

from __future__ import annotations

from array import array

from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.bochs.layout import SECTOR, cstr, data_offset, extent_blocks, extent_span


class BochsState:
    """One open Bochs image.

    ``file``, ``path``  the ImageFile and its name
    ``hdr``             the header, a layout.HEADER record (version 1 decoded into it)
    ``subtype``         b"Growing", b"Undoable" or b"Volatile"
    ``catalog``         array of u32, ``hdr.catalog`` entries
    ``fsize``           the file size at open: extents past it were refused
    ``size``            the virtual size (whole sectors of ``hdr.disk``)
    ``extent``          bytes per extent; ``spe``: sectors per extent
    ``first``           where extent index 0 starts; ``span``: bytes per extent in the file
    ``bitmap_bytes``    the bitmap bytes that hold a bit per sector (the rest is padding)
    ``bitmap_cache``    (extent index, bitmap bytes) of the last bitmap read"""

    __slots__ = ("file", "path", "hdr", "subtype", "catalog", "fsize", "size", "extent", "spe", "first", "span",
                 "bitmap_skip", "bitmap_bytes", "bitmap_cache")

    def __init__(self, file: ImageFile, hdr: Record, catalog: array, fsize: int):
        self.file = file
        self.path: str = file.path
        self.hdr = hdr
        self.subtype: bytes = cstr(hdr.subtype)
        self.catalog = catalog
        self.fsize = fsize
        self.size = hdr.disk // SECTOR * SECTOR  # as QEMU: whole sectors
        self.extent = hdr.extent
        self.spe = hdr.extent // SECTOR
        self.first = data_offset(hdr)
        self.span = extent_span(hdr)
        self.bitmap_skip = SECTOR * extent_blocks(hdr.bitmap)  # an extent's sectors follow its bitmap sectors
        self.bitmap_bytes = -(-self.spe // 8)
        self.bitmap_cache: tuple = (-1, b"")

    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    def extent_start(self, index: int) -> int:
        """Where the extent stored at ``index`` (a catalog value) starts: its bitmap."""
        return self.first + index * self.span

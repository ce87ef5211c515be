"""``CloopState``: what the package's modules share about one open cloop image."""

from __future__ import annotations

from array import array

from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record


class CloopState:
    """One open cloop image.

    ``file``, ``path``  the ImageFile and its name
    ``hdr``             the header, a layout.HEADER record
    ``offsets``         array of u64: block i is the bytes offsets[i] .. offsets[i + 1]
    ``block``           the block size; ``size``: the virtual size (num_blocks whole blocks)
    ``cache``           (block number, its data) of the last block inflated"""

    __slots__ = ("file", "path", "hdr", "offsets", "block", "size", "cache")

    def __init__(self, file: ImageFile, hdr: Record, offsets: array):
        self.file = file
        self.path: str = file.path
        self.hdr = hdr
        self.offsets = offsets
        self.block: int = hdr.block_size
        self.size: int = hdr.num_blocks * hdr.block_size
        self.cache: tuple = (-1, b"")

    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

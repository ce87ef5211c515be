"""``VdiState``: what every module of the package shares about one open VDI
image, and the facts derived from it (where a block lives, whether the
image is a differencing one, which map entries are inconsistent)."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up
from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vdi.blockmap import BlockMap
from vdtool.formats.vdi.layout import (NULL_UUID, VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_UNDO,
                                       blocks_in_file, is_v1)


class VdiState:
    """One open VDI image.

    ``file``, ``path``  the ImageFile and its name
    ``version``         u32Version of the pre-header
    ``hdr``             the header: a HEADER1PLUS record whatever the version
                        (layout.decode_header); changed in memory, written
                        back by metadata.sync when ``hdr_dirty``
    ``map``             the block map (BlockMap), ``hdr.cBlocks`` entries
    ``dirty``           indices of map entries changed since the last sync
    ``hdr_dirty``       the header changed since the last sync
    ``modified``        the modification UUID was renewed in this session
                        (or must not be: defer_identity_change, a new image)
    ``fsize``           the file size when last looked at: entries past it
                        are refused at open
    ``problems``        inconsistent map entries from the last scan, as
                        BlockMap.scan words them; None: not scanned yet
                        (a check open scans once, in the check)
    ``hint``            the parent's name where vdtool recorded one (a
                        parent without a UUID), and ``hint_synthetic``:
                        uuidLinkage was made up for it"""

    __slots__ = ("file", "path", "version", "hdr", "map", "dirty", "hdr_dirty", "modified", "fsize", "problems",
                 "hint", "hint_synthetic")

    def __init__(self, file: ImageFile, version: int, hdr: Record, bmap: BlockMap, fsize: int):
        self.file = file
        self.path: str = file.path
        self.version = version
        self.hdr = hdr
        self.map = bmap
        self.dirty: set = set()
        self.hdr_dirty = False
        self.modified = False
        self.fsize = fsize
        self.problems: list | None = []
        self.hint: str | None = None
        self.hint_synthetic = False

    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    # -- derived facts ----------------------------------------------------------------------------
    @property
    def v1(self) -> bool:
        return is_v1(self.version)

    @property
    def total(self) -> int:
        """Bytes a data block takes in the file."""
        return self.hdr.cbBlockExtra + self.hdr.cbBlock

    @property
    def shift(self) -> int:
        return self.hdr.cbBlock.bit_length() - 1

    @property
    def virtual_size(self) -> int:
        # QEMU rounds a size that is not whole sectors up; VirtualBox down.
        return align_up(self.hdr.cbDisk, 512)

    @property
    def fixed(self) -> bool:
        return self.hdr.u32Type == VDI_IMAGE_TYPE_FIXED

    @property
    def is_diff(self) -> bool:
        return self.hdr.u32Type in (VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_UNDO) and (
            self.hdr.uuidLinkage != NULL_UUID or self.hint is not None)

    def block_pos(self, idx: int) -> int:
        """Where data block ``idx`` starts (its extra bytes first)."""
        return self.hdr.offData + idx * self.total

    def data_pos(self, b: int, e: int) -> int:
        """Where the data of virtual block ``b``, stored in data block ``e``, starts."""
        if e >= self.hdr.cBlocks:
            raise self.corrupt(f"block map entry {b} points to data block {e}, past the end of the image")
        return self.hdr.offData + e * self.total + self.hdr.cbBlockExtra

    # -- consistency of the map ---------------------------------------------------------------------
    def scan_map(self, lenient: bool, progress: Progress = NO_PROGRESS) -> tuple:
        """Entries past the file are refused at open (reading them would give
        whatever lies there); a wrong count or shared blocks only stop writing
        until ``check -r all`` repairs them (``problems``).  Returns
        (allocated entries, fragmented ones)."""
        hdr = self.hdr
        limit = blocks_in_file(self.fsize, hdr.offData, self.total)
        problems, count, frag = self.map.scan(hdr.cBlocksAllocated, limit, hdr.cBlocks, stop_at_eof=not lenient,
                                              progress=progress)
        if not lenient and problems and problems[-1][0] == "eof":
            _, i, e = problems[-1]
            raise self.corrupt(f"block map entry {i} points to data block {e}, past the end of the file "
                               f"(room for {limit} blocks)")
        self.problems = problems
        return count, frag

    def map_problems(self) -> list:
        if self.problems is None:
            self.scan_map(lenient=True)
        return self.problems

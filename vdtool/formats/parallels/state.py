"""``ParallelsState``: what every module of the package shares about one
open Parallels image, and the scan of its BAT (which entries point outside
the data area or at a cluster another entry uses)."""

from __future__ import annotations

from array import array

from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.parallels.layout import INUSE_MAGIC, SECTOR, cluster_size, data_start, entry_unit, is_v2, sectors


class ParallelsState:
    """One open Parallels image.

    ``file``, ``path``  the ImageFile and its name
    ``hdr``             the header record; written back by metadata.sync
                        when ``hdr_dirty``
    ``bat``             the BAT as a host-order array of u32
    ``dirty``           indices of BAT entries changed since the last sync
    ``unclean``         the image was found with the in-use flag set (a
                        writer did not close it); kept set on disk until a
                        repair clears it
    ``fsize``           the file size when last looked at
    ``data_end``        where the next cluster goes: past the data start and
                        every allocated cluster
    ``problems``        BAT entries that stop writing, as ``scan`` words
                        them: (kind, index, other); None: not scanned yet"""

    __slots__ = ("file", "path", "hdr", "bat", "dirty", "hdr_dirty", "unclean", "fsize", "data_end", "problems")

    def __init__(self, file: ImageFile, hdr: Record, bat: array, fsize: int):
        self.file = file
        self.path: str = file.path
        self.hdr = hdr
        self.bat = bat
        self.dirty: set = set()
        self.hdr_dirty = False
        self.unclean = hdr.inuse == INUSE_MAGIC
        self.fsize = fsize
        self.data_end = 0
        self.problems: list | None = None

    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    # -- derived facts ----------------------------------------------------------------------------
    @property
    def v2(self) -> bool:
        return is_v2(self.hdr)

    @property
    def cluster(self) -> int:
        return cluster_size(self.hdr)

    @property
    def unit(self) -> int:
        return entry_unit(self.hdr)

    @property
    def data_start(self) -> int:
        return data_start(self.hdr)

    @property
    def virtual_size(self) -> int:
        return sectors(self.hdr) * SECTOR

    def host(self, i: int) -> int:
        """Where cluster ``i`` lies in the file (0: not allocated)."""
        return self.bat[i] * self.unit

    def entry_for(self, pos: int) -> int:
        """The BAT entry value for a cluster at file offset ``pos``."""
        return pos // self.unit

    # -- the BAT scan -----------------------------------------------------------------------------
    def scan(self) -> tuple:
        """Look at every entry once.  Returns (allocated, fragmented, highest
        cluster start or -1); sets ``problems`` (entries outside the data
        area or the file, off a cluster boundary, or sharing a cluster) and
        ``data_end``."""
        start, cs, unit, fsize = self.data_start, self.cluster, self.unit, self.fsize
        seen: dict = {}
        problems = []
        allocated = frag = 0
        high = -1
        prev = 0
        for i, e in enumerate(self.bat):
            if not e:
                prev = 0
                continue
            off = e * unit
            if off < start or off >= fsize or (off - start) % cs:
                problems.append(("outside" if off < start or off >= fsize else "misaligned", i, off))
                prev = 0
                continue
            if e in seen:
                problems.append(("dup", i, seen[e]))
            else:
                seen[e] = i
            allocated += 1
            if prev and prev + cs != off:
                frag += 1
            prev = off
            high = max(high, off)
        self.problems = problems
        self.data_end = max(start, high + cs if high >= 0 else start)
        return allocated, frag, high

    def map_problems(self) -> list:
        if self.problems is None:
            self.scan()
        return self.problems

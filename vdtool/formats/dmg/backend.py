"""``DmgBackend``: the read-only ImageBackend for DMG (UDIF) images.  The
open reads the koly trailer, the partitions' mish blocks (plist) and builds
the chunk table (chunks); reads decode one chunk at a time (decode), the
last few kept."""

from __future__ import annotations

import struct
from collections import OrderedDict

from vdtool.core.backend import Cap, ImageBackend, MapExtent, Status
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.formats.dmg.chunks import ChunkTable, add_partition, sort_and_check
from vdtool.formats.dmg.decode import decode
from vdtool.formats.dmg.layout import (KOLY, MAX_RSRC, MAX_SECTORS, MAX_XML, RAW, SECTOR, TYPE_NAMES, ZERO_TYPES,
                                       sniff, trailer_offset)
from vdtool.formats.dmg.plist import parse_rsrc, parse_xml

_CACHE = 4  # decoded chunks kept (a chunk is at most 64 MiB; most are 1 MiB or less)


class DmgBackend(ImageBackend):
    name = "dmg"
    extensions = (".dmg",)
    capabilities = Cap.NONE
    variants = ("udif",)

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.koly = None
        self.sectors = 0
        self.partitions: list = []  # (Partition, mish header)
        self.table = ChunkTable()
        self._cache: OrderedDict = OrderedDict()

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    # == opening ===================================================================================
    def _load_image(self, options: dict) -> None:
        f = self.file
        size = f.size()
        at = trailer_offset(f.pread(max(0, size - 1023), min(size, 1023)), size)
        if at < 0:
            raise FormatError("no UDIF trailer ('koly') at the end of the file", self.path)
        try:
            koly = KOLY.unpack(f.pread_exact(at, KOLY.size, "UDIF trailer"))
        except struct.error as e:
            raise CorruptImageError(f"malformed UDIF trailer ({e})", self.path) from None
        self._check_koly(koly, at)
        self.koly = koly
        self.sectors = koly.SectorCount
        if koly.RsrcForkLength:
            raw = f.pread_exact(koly.RsrcForkOffset, koly.RsrcForkLength, "DMG resource fork")
            parts = parse_rsrc(raw, self.path)
        else:
            parts = parse_xml(f.pread_exact(koly.XMLOffset, koly.XMLLength, "DMG property list"), self.path)
        data_start, data_end = koly.DataForkOffset, koly.DataForkOffset + koly.DataForkLength
        table = ChunkTable()
        for i, p in enumerate(parts):
            hdr = add_partition(table, i, p.name, p.mish, data_start, data_end, self.sectors, self.path)
            self.partitions.append((p, hdr))
        self.table = sort_and_check(table, self.path)

    def _check_koly(self, koly, at: int) -> None:
        def bad(text):
            return CorruptImageError(f"UDIF trailer: {text}", self.path)

        if koly.HeaderSize != KOLY.size:
            raise bad(f"header size {koly.HeaderSize} is not {KOLY.size}")
        if koly.SegmentCount > 1:
            raise UnsupportedFeature(f"segmented DMG images are not supported (segment {koly.SegmentNumber} of "
                                     f"{koly.SegmentCount})", self.path)
        if koly.SectorCount > MAX_SECTORS:
            raise bad(f"sector count {koly.SectorCount} is above the limit of {MAX_SECTORS}")
        if koly.DataForkOffset + koly.DataForkLength > at:
            raise bad(f"the data fork ({koly.DataForkLength} bytes at {koly.DataForkOffset}) runs into the trailer "
                      f"at {at}")
        if koly.RsrcForkLength:
            if koly.RsrcForkLength > MAX_RSRC or koly.RsrcForkOffset + koly.RsrcForkLength > at:
                raise bad(f"the resource fork ({koly.RsrcForkLength} bytes at {koly.RsrcForkOffset}) runs into "
                          f"the trailer at {at} or is above {MAX_RSRC} bytes")
        elif not koly.XMLLength:
            raise bad("neither a property list nor a resource fork is recorded")
        elif koly.XMLLength > MAX_XML or koly.XMLOffset + koly.XMLLength > at:
            raise bad(f"the property list ({koly.XMLLength} bytes at {koly.XMLOffset}) runs into the trailer at "
                      f"{at} or is above {MAX_XML} bytes")

    # == facts =====================================================================================
    @property
    def virtual_size(self) -> int:
        return self.sectors * SECTOR

    @property
    def block_size(self) -> int:
        return SECTOR

    @property
    def variant(self) -> str:
        return "udif"

    def info(self) -> dict:
        kinds: dict = {}
        for t in self.table.type:
            key = TYPE_NAMES.get(t, f"0x{t:08x}")
            kinds[key] = kinds.get(key, 0) + 1
        parts = [{"name": p.name, "id": p.id, "first-sector": h.SectorNumber, "sectors": h.SectorCount}
                 for p, h in self.partitions]
        return {"partitions": parts, "chunks": len(self.table), "chunk-types": kinds,
                "metadata": "resource fork" if self.koly.RsrcForkLength else "property list"}

    # == reading ===================================================================================
    def _piece(self, sector: int, limit: int) -> tuple:
        """(chunk index or -1 for uncovered sectors, sectors of the run up to ``limit``)."""
        t = self.table
        i = t.find(sector)
        if i >= 0:
            return i, min(limit, t.start[i] + t.count[i] - sector)
        nxt = -i - 1
        end = t.start[nxt] if nxt < len(t) else self.sectors
        return -1, min(limit, end - sector)

    def _is_zero(self, i: int) -> bool:
        return i < 0 or self.table.type[i] in ZERO_TYPES

    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return Status.ZERO, max(length, 1)
        sector = offset // SECTOR
        last = -(-end // SECTOR)
        i, n = self._piece(sector, last - sector)
        zero = self._is_zero(i)
        pos = sector + n
        while pos < last:  # neighbouring chunks of the same kind are one run
            j, k = self._piece(pos, last - pos)
            if self._is_zero(j) != zero:
                break
            pos += k
        return (Status.ZERO if zero else Status.DATA), min(pos * SECTOR, end) - offset

    def map_extent(self, offset: int, length: int) -> MapExtent:
        status, n = self.block_status(offset, length)
        if status == Status.DATA:
            i, _ = self._piece(offset // SECTOR, 1)
            if self.table.type[i] == RAW:
                host = self.table.offset[i] + offset - self.table.start[i] * SECTOR
                run = min(n, (self.table.start[i] + self.table.count[i]) * SECTOR - offset)
                return MapExtent(status, run, host)
            return MapExtent(status, n, compressed=True)
        return MapExtent(status, n)

    def _chunk(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        t = self.table
        stored = self.file.pread_exact(t.offset[i], t.length[i], f"DMG chunk at sector {t.start[i]}")
        where = f"chunk at sector {t.start[i]} (partition {t.part[i]})"
        data = decode(t.type[i], stored, t.count[i] * SECTOR, where, self.path)
        self._cache[i] = data
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return data

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        total = len(mv)
        pos = 0
        while pos < total:
            off = offset + pos
            if off >= self.virtual_size:
                mv[pos:] = zeros(total - pos)
                return
            sector, within = divmod(off, SECTOR)
            i, n = self._piece(sector, -(-(total - pos + within) // SECTOR))
            k = min(n * SECTOR - within, total - pos)
            if self._is_zero(i):
                mv[pos:pos + k] = zeros(k)
            else:
                start = (sector - self.table.start[i]) * SECTOR + within
                mv[pos:pos + k] = self._chunk(i)[start:start + k]
            pos += k

    def close(self) -> None:
        self._cache.clear()
        self.file.close()



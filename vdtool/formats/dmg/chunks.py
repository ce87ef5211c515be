"""``ChunkTable``: every partition's chunks as one sorted, checked table
(absolute first sector, sector count, type, file offset, stored length).

Checked before anything is allocated or read: the mish header and its
chunk count against the bytes that hold them, each chunk's sectors against
its partition and the disk, stored chunks against the data fork and the
per-chunk caps, the total count against MAX_CHUNKS; and, once sorted, that
no two chunks cover the same sector (a chunk table that loops or overlaps
is refused)."""

from __future__ import annotations

from array import array
from bisect import bisect_right

from vdtool.core.errors import CorruptImageError
from vdtool.core.layout import Record
from vdtool.formats.dmg.layout import (CHUNK, MAX_CHUNK_BYTES, MAX_CHUNK_SECTORS, MAX_CHUNKS, MISH, MISH_MAGIC,
                                       RAW, SECTOR, SKIPPED_TYPES, ZERO_TYPES, type_name)


class ChunkTable:
    """Chunks sorted by first sector, in parallel arrays; sectors no chunk
    covers read as zeros."""

    __slots__ = ("start", "count", "type", "offset", "length", "part")

    def __init__(self):
        self.start = array("Q")
        self.count = array("Q")
        self.type = array("Q")
        self.offset = array("Q")
        self.length = array("Q")
        self.part = array("I")

    def __len__(self) -> int:
        return len(self.start)

    def find(self, sector: int) -> int:
        """Index of the chunk holding ``sector``, or -(index of the next chunk) - 1."""
        i = bisect_right(self.start, sector) - 1
        if i >= 0 and sector < self.start[i] + self.count[i]:
            return i
        return -(i + 1) - 1


def _chunk_problem(c: Record, first: int, part, data_start: int, data_end: int, disk: int) -> str:
    """Why one chunk entry is refused, or ''."""
    end = first + c.SectorCount
    if c.SectorNumber >= part.SectorCount or c.SectorCount > part.SectorCount - c.SectorNumber:
        return (f"covers sectors {c.SectorNumber}..{c.SectorNumber + c.SectorCount} of a partition of "
                f"{part.SectorCount} sectors")
    if end > disk:
        return f"ends at sector {end}, past the disk's {disk} sectors"
    if c.EntryType in ZERO_TYPES:
        return ""
    if c.SectorCount > MAX_CHUNK_SECTORS or c.CompressedLength > MAX_CHUNK_BYTES:
        return (f"holds {c.SectorCount} sectors in {c.CompressedLength} bytes (at most {MAX_CHUNK_SECTORS} "
                f"sectors and {MAX_CHUNK_BYTES} bytes)")
    if c.EntryType == RAW and c.CompressedLength > c.SectorCount * SECTOR:
        return f"is a raw chunk of {c.SectorCount} sectors stored in {c.CompressedLength} bytes"
    off = data_start + part.DataOffset + c.CompressedOffset
    if off + c.CompressedLength > data_end:
        return (f"is stored at {off}+{c.CompressedLength}, past the data fork's end ({data_end})")
    return ""


def add_partition(table: ChunkTable, index: int, name: str, mish: bytes, data_start: int, data_end: int,
                  disk: int, path: str) -> Record:
    """Append partition ``index``'s chunks; returns its mish header."""
    def bad(text):
        return CorruptImageError(f"partition {index} ({name!r}): {text}", path)

    if len(mish) < MISH.size or mish[:4] != MISH_MAGIC:
        raise bad(f"its blkx data is not a mish block ({len(mish)} bytes, signature {bytes(mish[:4])!r})")
    part = MISH.unpack(mish)
    n = part.NumberOfBlockChunks
    if MISH.size + n * CHUNK.size > len(mish):
        raise bad(f"{n} chunk entries do not fit in its {len(mish)}-byte mish block")
    if len(table) + n > MAX_CHUNKS:
        raise bad(f"the image has more than {MAX_CHUNKS} chunks")
    if part.SectorNumber + part.SectorCount > disk:
        raise bad(f"sectors {part.SectorNumber}+{part.SectorCount} pass the disk's {disk} sectors")
    for k in range(n):
        c = CHUNK.unpack(mish, MISH.size + k * CHUNK.size)
        if c.EntryType in SKIPPED_TYPES or c.SectorCount == 0:
            continue
        first = part.SectorNumber + c.SectorNumber
        why = _chunk_problem(c, first, part, data_start, data_end, disk)
        if why:
            raise bad(f"chunk {k} ({type_name(c.EntryType)}) {why}")
        table.start.append(first)
        table.count.append(c.SectorCount)
        table.type.append(c.EntryType)
        table.offset.append(data_start + part.DataOffset + c.CompressedOffset)
        table.length.append(c.CompressedLength)
        table.part.append(index)
    return part


def sort_and_check(table: ChunkTable, path: str) -> ChunkTable:
    """The table sorted by first sector; overlapping chunks are refused."""
    order = sorted(range(len(table)), key=table.start.__getitem__)
    out = ChunkTable()
    for name in ChunkTable.__slots__:
        src = getattr(table, name)
        setattr(out, name, array(src.typecode, (src[i] for i in order)))
    for i in range(1, len(out)):
        prev_end = out.start[i - 1] + out.count[i - 1]
        if out.start[i] < prev_end:
            raise CorruptImageError(f"DMG chunks overlap: one covers sectors {out.start[i - 1]}..{prev_end}, "
                                    f"another starts at sector {out.start[i]}", path)
    return out

"""The VDI block map in memory, and scanning it without a Python step per
entry.

A 64 TiB image has 2^26 entries.  Runs of one marker are passed over with
memcmp (bytearray.startswith against a run of the marker), whole chunks at a
time.  In a chunk that is not uniform, bytes.translate marks the bytes that
are not 0xff and bytes.find jumps from one marked entry to the next; where
that finds many, the rest of the chunk is sieved with SWAR arithmetic on one
big int (32-bit lanes), which yields a flag byte per entry for bytes.find.
Only the allocated entries then cost Python steps.

No I/O here: the state reads and writes the map's bytes."""

from __future__ import annotations

import operator
import struct
import sys
from array import array
from collections import deque
from itertools import repeat

from vdtool.core.backend import Status
from vdtool.core.bytesutil import U32, le_array, le_bytes
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vdi.layout import VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO

_LITTLE = sys.byteorder == "little"
SCAN = 1 << 14  # entries per chunk
_NOT_FF = bytes([1] * 255 + [0])  # translate table: 1 for every byte value but 0xff
_FIND_STEPS = 64  # entries taken one find at a time before a chunk is sieved whole
_FREE_RUN = memoryview(struct.pack("=I", VDI_IMAGE_BLOCK_FREE) * SCAN)
_ZERO_RUN = memoryview(struct.pack("=I", VDI_IMAGE_BLOCK_ZERO) * SCAN)
_LANE_ALL = (1 << (32 * SCAN)) - 1
_LANE_BIT0 = int.from_bytes(b"\x01\0\0\0" * SCAN, "little")
_LANE_LOW31 = int.from_bytes(b"\xff\xff\xff\x7f" * SCAN, "little")
_LANE_BIT31 = int.from_bytes(b"\0\0\0\x80" * SCAN, "little")
_TOP_BYTE = 3 if _LITTLE else 0  # the byte of a native u32 that holds bit 31
_DATA_WINDOW = 64  # first window when measuring a run of allocated entries
DATA_RUN_CAP = 1 << 13  # a DATA run is reported in pieces of about this many blocks at most


def status_of(e: int) -> Status:
    """What a map entry means for block_status."""
    if e == VDI_IMAGE_BLOCK_FREE:
        return Status.UNALLOCATED
    if e == VDI_IMAGE_BLOCK_ZERO:
        return Status.ZERO
    return Status.DATA


def _frag(prev: int | None, vals: list) -> int:
    """Entries of ``vals`` whose block does not follow the one before (``prev``
    for the first)."""
    n = sum(map(operator.ne, vals[1:], map((1).__add__, vals)))
    return n + (prev is not None and vals[0] != prev + 1)


class MapTally:
    """Allocated entries and fragmented ones (see BlockMap.stats), fed the
    allocated entries chunk by chunk in map order."""

    __slots__ = ("count", "frag", "prev")

    def __init__(self):
        self.count = self.frag = 0
        self.prev: int | None = None

    def add(self, vals: list) -> None:
        self.count += len(vals)
        self.frag += _frag(self.prev, vals)
        self.prev = vals[-1]

    def result(self) -> tuple:
        return self.count, self.frag


def _alloc_flags(seg) -> bytes:
    """One byte per u32 entry of ``seg`` (native order): 0x80 where the entry
    is allocated (below ZERO), 0 where it is a marker."""
    m = len(seg)
    mask = _LANE_ALL if m == 4 * SCAN else (1 << (8 * m)) - 1
    # a lane is zero exactly where the entry is FREE or ZERO: entry | 1 == 0xffffffff
    z = (int.from_bytes(seg, sys.byteorder) | (_LANE_BIT0 & mask)) ^ mask
    low = _LANE_LOW31 & mask
    # per lane: adding 0x7fffffff to the low 31 bits carries into bit 31 unless they are all zero,
    # and never into the next lane; or-ing z keeps bit 31 itself
    nz = (((z & low) + low) | z) & _LANE_BIT31
    return nz.to_bytes(m, sys.byteorder)[_TOP_BYTE::4]


class BlockMap:
    """The map entries as native-order u32s: ``raw``, a bytearray that the
    scans search with bytes methods, and ``mv``, a memoryview of it indexed
    per entry (``mv[b]`` is virtual block b's entry)."""

    __slots__ = ("raw", "mv")

    def __init__(self, raw: bytearray):
        self.raw = raw
        self.mv = memoryview(raw).cast(U32)

    @classmethod
    def from_disk(cls, raw: bytearray) -> "BlockMap":
        """The map from its on-disk (little-endian) bytes, taking ``raw`` over."""
        if not _LITTLE:  # pragma: no cover - big-endian hosts
            raw = bytearray(le_array(raw, U32).tobytes())
        return cls(raw)

    @classmethod
    def all_free(cls, n: int) -> "BlockMap":
        return cls(bytearray(b"\xff") * (4 * n))  # all FREE, without an array and two copies

    @classmethod
    def in_order(cls, n: int) -> "BlockMap":
        """Entry i -> data block i, as a fixed image starts."""
        return cls(bytearray(array(U32, range(n)).tobytes()))

    def __len__(self) -> int:
        return len(self.raw) // 4

    def disk_bytes(self, lo: int, hi: int) -> bytes:
        """Entries [lo, hi) as stored on disk."""
        if _LITTLE:
            return bytes(memoryview(self.raw)[4 * lo:4 * hi])  # one copy, not two
        return le_bytes(array(U32, self.mv[lo:hi]))  # pragma: no cover

    def disk_image(self):
        """All entries as stored on disk: no copy of a big map where the host
        is little-endian."""
        return self.raw if _LITTLE else self.disk_bytes(0, len(self))

    def resize(self, n: int) -> None:
        """Cut the map to ``n`` entries, or extend it with FREE ones."""
        old = len(self)
        self.mv.release()
        if n < old:
            del self.raw[4 * n:]
        else:
            self.raw.extend(b"\xff" * (4 * (n - old)))
        self.mv = memoryview(self.raw).cast(U32)

    def release(self) -> None:
        self.mv.release()

    # -- the allocated entries -----------------------------------------------------------------
    def _chunk_allocated(self, c: int, d: int) -> list:
        """Indices of the allocated entries in [c, d), in order."""
        raw, mv = self.raw, self.mv
        marked = raw[4 * c:4 * d].translate(_NOT_FF)
        idx: list = []
        p = marked.find(1)
        steps = 0
        while p >= 0:
            i = c + (p >> 2)
            if steps == _FIND_STEPS:  # dense: sieve the rest in one go
                flags = _alloc_flags(raw[4 * i:4 * d])
                k = flags.count(0x80)
                if k == d - i:
                    idx.extend(range(i, d))
                elif k:
                    q = flags.find(0x80)
                    while q >= 0:
                        idx.append(i + q)
                        q = flags.find(0x80, q + 1)
                break
            steps += 1
            if mv[i] < VDI_IMAGE_BLOCK_ZERO:
                idx.append(i)
            p = marked.find(1, (i + 1 - c) << 2)
        return idx

    def allocated_chunks(self, lo: int = 0, hi: int | None = None):
        """(indices, entries) of the allocated entries in [lo, hi), one chunk
        at a time in map order (memory stays bounded on a hostile map full of
        entries), never empty; the cost follows their number, not the map's
        size.  Changing entries of a chunk already yielded is safe."""
        hi = len(self) if hi is None else hi
        raw, mv = self.raw, self.mv
        for c in range(lo, hi, SCAN):
            d = min(c + SCAN, hi)
            k = 4 * (d - c)
            if raw.startswith(_FREE_RUN[:k], 4 * c) or raw.startswith(_ZERO_RUN[:k], 4 * c):
                continue
            idx = self._chunk_allocated(c, d)
            if len(idx) == d - c:
                yield idx, mv[c:d].tolist()
            elif idx:
                yield idx, list(map(mv.__getitem__, idx))

    def allocated(self, lo: int = 0, hi: int | None = None) -> tuple:
        """([index], [entry]) of all allocated entries in [lo, hi)."""
        idx: list = []
        vals: list = []
        for i, v in self.allocated_chunks(lo, hi):
            idx.extend(i)
            vals.extend(v)
        return idx, vals

    def allocated_count(self) -> int:
        return sum(len(idx) for idx, _ in self.allocated_chunks())

    def stats(self) -> tuple:
        """(allocated entries, fragmented ones: allocated entries, in map
        order, whose data block does not follow the previous one's)."""
        tally = MapTally()
        for _, vals in self.allocated_chunks():
            tally.add(vals)
        return tally.result()

    def used(self, n: int) -> bytearray:
        """One byte per data block below ``n``: 1 where some entry points at it."""
        seen = bytearray(n)
        for _, vals in self.allocated_chunks():
            for e in vals:
                if e < n:
                    seen[e] = 1
        return seen

    def reverse(self, n: int) -> array:
        """data index -> virtual block (-1: unused) for indices below ``n``."""
        rev = array("q", [-1]) * n
        for idx, vals in self.allocated_chunks():
            for i, e in zip(idx, vals):
                if e < n:
                    rev[e] = i
        return rev

    # -- consistency -----------------------------------------------------------------------------
    def scan(self, n: int, limit: int, cblocks: int, stop_at_eof: bool = False,
             progress: Progress = NO_PROGRESS) -> tuple:
        """(problems, allocated, fragmented) for a map whose image has ``n``
        allocated blocks and room in the file for ``limit``.  A problem is
        ("eof", entry, block): past the file (or the block count), ("count",
        ...): not below ``n``, or ("dup", ...): a block another entry uses
        before.  With ``stop_at_eof`` the scan ends at the first "eof" (the
        caller refuses the image; the counts are then partial)."""
        # The usual case, decided without a Python step per entry: every entry
        # below the count and the file end, none shared.  Any doubt and the
        # exact per-entry pass below decides (and words) what is wrong.
        bound = min(n, limit)
        seen = bytearray(max(n, 0))
        tally = MapTally()
        total = len(self)
        for idx, vals in self.allocated_chunks():
            if max(vals) >= bound or len(set(vals)) != len(vals) or any(map(seen.__getitem__, vals)):
                break
            deque(map(seen.__setitem__, vals, repeat(1)), 0)
            tally.add(vals)
            progress.update(idx[-1] + 1, total)
        else:
            return [], *tally.result()
        return self._exact_scan(n, limit, cblocks, stop_at_eof, progress)

    def _exact_scan(self, n: int, limit: int, cblocks: int, stop_at_eof: bool, progress: Progress) -> tuple:
        problems = []
        seen = bytearray(max(n, 0))
        tally = MapTally()
        total = len(self)
        for idx, vals in self.allocated_chunks():
            tally.add(vals)
            for i, e in zip(idx, vals):
                if e >= limit or e >= cblocks:
                    problems.append(("eof", i, e))
                    if stop_at_eof:
                        return problems, *tally.result()
                elif e >= n:
                    problems.append(("count", i, e))
                elif seen[e]:
                    problems.append(("dup", i, e))
                else:
                    seen[e] = 1
            progress.update(idx[-1] + 1, total)
        return problems, *tally.result()

    # -- runs for block_status -----------------------------------------------------------------
    def marker_run_end(self, lo: int, hi: int, e: int) -> int:
        """First entry in [lo, hi) that is not the marker ``e``, or hi."""
        raw = self.raw
        run = _FREE_RUN if e == VDI_IMAGE_BLOCK_FREE else _ZERO_RUN
        c = lo
        while c < hi:
            d = min(c + SCAN, hi)
            if not raw.startswith(run[:4 * (d - c)], 4 * c):
                # the first d - c entries differ: halve the prefix that is all marker (memcmp each time)
                good, bad = 0, d - c
                while bad - good > 1:
                    mid = (good + bad) // 2
                    if raw.startswith(run[:4 * mid], 4 * c):
                        good = mid
                    else:
                        bad = mid
                return c + good
            c = d
        return hi

    def data_run_end(self, lo: int, hi: int) -> int:
        """First entry in [lo, hi) that is not allocated, or hi; or an earlier
        end after about DATA_RUN_CAP entries.  Callers (convert) cut DATA runs
        into buffer-sized pieces and ask again from each: measuring the whole
        run every time would make a fully allocated map cost quadratic time.
        The windows grow, so a short run costs little."""
        raw = self.raw
        c = lo
        w = _DATA_WINDOW
        while c < hi and c - lo < DATA_RUN_CAP:
            d = min(c + w, hi, lo + DATA_RUN_CAP)
            p = _alloc_flags(raw[4 * c:4 * d]).find(0)
            if p >= 0:
                return c + p
            c = d
            w = min(4 * w, SCAN)
        return c

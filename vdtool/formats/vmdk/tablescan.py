"""Which grain tables of a VMDK sparse extent can hold entries, found
without reading every table (``TableScan``), and the directory's runs of
tables laid out at a fixed stride (``directory_runs``)."""

from __future__ import annotations

import bisect
import functools
from array import array
from itertools import compress as _select

from vdtool.core.bytesutil import ceil_div
from vdtool.formats.vmdk.layout import SECTOR

# A 64 TiB extent has 2M grain tables, nearly all of them holes in the file
# (qemu-img, VMware and VirtualBox lay every table out at create time and
# leave it unwritten).  Reading each to learn it is empty took tens of
# seconds; TableScan asks the file where its data is instead.

SCAN_TABLES = 2048  # tables looked at per step: at most 8 MiB read at once
_SCAN_BLOCK = 32  # tables compared with zeros in one go inside a step
MIN_RUN = 32  # shorter stretches of a directory are not searched for runs


@functools.lru_cache(maxsize=8)
def zero_bytes(n: int) -> bytes:
    """``n`` zero bytes, shared (a split image has thousands of extents).
    Real bytes, not a view of bytesutil's buffer: bytes compare with one
    memcmp, a memoryview item by item (a hundred times slower)."""
    return bytes(n)


def directory_runs(d: array, slot: int) -> list:
    """``d`` cut into stretches, in order: (i0, i1, first, stride) for a run
    of tables at a fixed stride (``d[i] == first + (i - i0) * stride``,
    ``stride >= slot`` sectors: qemu-img, VMware and VirtualBox lay every
    table out back to back, a resize appends another run), (i0, i1, 0, 0)
    for a loose stretch (zero entries, tables in any order)."""
    out: list = []
    todo = [(0, len(d))] if len(d) else []
    while todo:
        lo, hi = todo.pop()
        if hi - lo >= 2:
            first = d[lo]
            stride = d[lo + 1] - first
            # endpoints first; then one C-level compare (a Python loop over 2M entries costs a second)
            if (first and stride >= slot and d[hi - 1] == first + (hi - 1 - lo) * stride
                    and d[lo:hi] == array(d.typecode, range(first, first + (hi - lo) * stride, stride))):
                _add_stretch(out, lo, hi, first, stride)
                continue
        if hi - lo <= MIN_RUN:
            _add_stretch(out, lo, hi, 0, 0)
            continue
        mid = (lo + hi) // 2
        todo.append((mid, hi))
        todo.append((lo, mid))
    # halving leaves a loose stretch where one run ends and the next begins
    # off the halving points: give the runs back what continues them
    res: list = []
    for k, (lo, hi, first, stride) in enumerate(out):
        if not stride:
            if res and res[-1][3]:
                plo, phi, pfirst, pstride = res[-1]
                while lo < hi and d[lo] == pfirst + (lo - plo) * pstride:
                    lo += 1
                res[-1] = (plo, lo, pfirst, pstride)
            if k + 1 < len(out) and out[k + 1][3]:
                nlo, nhi, nfirst, nstride = out[k + 1]
                while hi > lo and d[hi - 1] and d[hi - 1] == nfirst - (nlo - hi + 1) * nstride:
                    hi -= 1
                out[k + 1] = (hi, nhi, nfirst - (nlo - hi) * nstride, nstride)
            if lo == hi:
                continue
        _add_stretch(res, lo, hi, first, stride)
    return res


def _add_stretch(out: list, lo: int, hi: int, first: int, stride: int) -> None:
    if out:
        plo, phi, pfirst, pstride = out[-1]
        if pstride == stride and (not stride or pfirst + (phi - plo) * stride == first):
            out[-1] = (plo, hi, pfirst, pstride)
            return
    out.append((lo, hi, first, stride))


class TableScan:
    """The tables of one directory that may hold entries, in order.  A
    superset: a table it names may still be all zeros, one it skips is all
    zeros (a hole, zeros in the file, or a zero directory entry).

    Where the directory runs at a fixed stride (see ``directory_runs``) the
    tables of the run lie in one area of the file: only the parts of it that
    hold data (SEEK_DATA/SEEK_HOLE, once per data extent) are read, so
    walking an empty 64 TiB extent costs a few lseeks.  Loose stretches are
    read table by table.  Either way tables are looked at SCAN_TABLES at a
    time, when a walk first reaches them, and what was found is kept.

    ``dirty`` is the extent's set of tables changed in memory and not yet in
    the file; ``note`` is told of every table that gains an entry, so what
    is kept stays a superset while the image is written."""

    def __init__(self, file, d: array, step: int, table_bytes: int, dirty):
        self.file = file
        self.d = d
        self.n = len(d)
        self.step = step
        self.slot = step * SECTOR
        self.table_bytes = table_bytes
        self.dirty = dirty
        self.segs = directory_runs(d, step)
        self._seg_starts = [s[0] for s in self.segs]
        self._los: list | None = None  # table ranges [lo, hi) that may hold entries: disjoint, sorted
        self._his: list = []
        self._chunks: dict = {}  # chunk -> sorted array of the table indices in it that may hold entries
        self._noted: dict = {}  # chunk not looked at yet -> tables given entries since the ranges were taken
        self._xchunks: list = []  # sorted: chunks with noted tables (they may lie outside the ranges)

    @property
    def loose_count(self) -> int:
        return sum(i1 - i0 for i0, i1, first, stride in self.segs if not stride)

    def top(self) -> int:
        """The largest entry."""
        top = 0
        for i0, i1, first, stride in self.segs:
            top = max(top, d_max(self.d, i0, i1) if not stride else self.d[i1 - 1])
        return top

    def _ranges(self) -> None:
        los, his = [], []

        def add(lo, hi):
            if his and lo <= his[-1]:
                his[-1] = max(his[-1], hi)
            else:
                los.append(lo)
                his.append(hi)

        f, slot = self.file, self.slot
        for i0, i1, first, stride in self.segs:
            if not stride:
                add(i0, i1)  # every table of a loose stretch is looked at
                continue
            base, sb = first * SECTOR, stride * SECTOR
            end = base + (i1 - i0 - 1) * sb + slot
            pos = base
            while pos < end:
                a = f.next_data(pos)
                if a >= end:
                    break
                b = min(f.next_hole(a), end)
                if b <= a:
                    b = end  # the file changed under us: take the rest as data
                add(i0 + (a - base) // sb, min(i1, i0 + ceil_div(b - base, sb)))
                pos = b
        self._los, self._his = los, his
        # tables changed in memory only: the file does not show them yet
        for ti in self.dirty:
            if 0 <= ti < self.n:
                self._noted.setdefault(ti // SCAN_TABLES, set()).add(ti)
        self._xchunks = sorted(self._noted)

    def note(self, ti: int) -> None:
        """Table ``ti`` gains an entry (it is in ``dirty`` until flushed)."""
        if self._los is None or not 0 <= ti < self.n:
            return  # _ranges() has not run: it will see the table, in the file or in ``dirty``
        c = ti // SCAN_TABLES
        arr = self._chunks.get(c)
        if arr is not None:
            j = bisect.bisect_left(arr, ti)
            if j == len(arr) or arr[j] != ti:
                arr.insert(j, ti)
        else:
            self._noted.setdefault(c, set()).add(ti)
        x = self._xchunks
        j = bisect.bisect_left(x, c)
        if j == len(x) or x[j] != c:
            x.insert(j, c)  # once per chunk: at most n / SCAN_TABLES inserts

    def next_table(self, ti: int, end: int) -> int:
        """The first table at or after ``ti`` (and before ``end``) that may
        hold entries; ``end`` when there is none."""
        if self._los is None:
            self._ranges()
        end = min(end, self.n)
        los, his, xch = self._los, self._his, self._xchunks
        while ti < end:
            # the next table the file has data for, or a noted chunk, whichever comes first
            k = bisect.bisect_right(his, ti)
            nxt = max(ti, los[k]) if k < len(los) else end
            if xch:
                j = bisect.bisect_left(xch, ti // SCAN_TABLES)
                if j < len(xch):
                    nxt = min(nxt, max(ti, xch[j] * SCAN_TABLES))
            ti = nxt
            if ti >= end:
                return end
            c = ti // SCAN_TABLES
            arr = self._chunks.get(c)
            if arr is None:
                arr = self._chunks[c] = self._scan_chunk(c)
            j = bisect.bisect_left(arr, ti)
            if j < len(arr):
                return min(arr[j], end)
            ti = (c + 1) * SCAN_TABLES
        return end

    def _scan_chunk(self, c: int) -> array:
        lo, hi = c * SCAN_TABLES, min(self.n, (c + 1) * SCAN_TABLES)
        found = self._noted.pop(c, set())
        los, his, segs = self._los, self._his, self.segs
        k = bisect.bisect_right(his, lo)
        while k < len(los) and los[k] < hi:
            a, b = max(lo, los[k]), min(hi, his[k])
            j = bisect.bisect_right(self._seg_starts, a) - 1
            while a < b:  # a range may span stretches
                i0, i1, first, stride = segs[j]
                e = min(b, i1)
                if stride and stride <= 2 * self.step:
                    found.update(self._scan_run(a, e, i0, first, stride))
                else:
                    found.update(self._scan_each(a, e))
                a = e
                j += 1
            k += 1
        return array("q", sorted(found))

    def _scan_run(self, a: int, b: int, i0: int, first: int, stride: int) -> list:
        """Tables a..b of a run, in one read (at most SCAN_TABLES strides)."""
        slot, sb = self.slot, stride * SECTOR
        buf = self.file.pread((first + (a - i0) * stride) * SECTOR, (b - a - 1) * sb + slot)
        # tables past the end of the file are not empty: gt() reports them
        out = list(range(a + ceil_div(len(buf), sb), b))
        if buf.count(0) == len(buf):
            return out
        zslot = zero_bytes(slot)
        if sb != slot:
            out += [a + k for k in range(ceil_div(len(buf), sb)) if not buf.startswith(zslot, k * sb)]
            return out
        zblock = zero_bytes(slot * _SCAN_BLOCK)
        bl = len(zblock)
        for off in range(0, len(buf), bl):
            if buf.startswith(zblock, off):
                continue
            for o in range(off, min(off + bl, len(buf)), slot):
                if not buf.startswith(zslot, o):  # a short tail counts as not empty
                    out.append(a + o // slot)
        return out

    def _scan_each(self, a: int, b: int) -> list:
        d, f, tb = self.d, self.file, self.table_bytes
        z = zero_bytes(tb)
        # a short read (past the end of the file) is not empty: gt() reports it
        return [t for t in _select(range(a, b), d[a:b]) if f.pread(d[t] * SECTOR, tb) != z]


def d_max(d: array, i0: int, i1: int) -> int:
    return max(d[i0:i1]) if i1 > i0 else 0

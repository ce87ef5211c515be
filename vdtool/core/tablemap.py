"""Two-level cluster tables without reference counts: an L1 table of a fixed
size naming L2 tables, whose entries name data clusters.  QED and QCOW v1
share this shape (they differ in byte order, table sizes and what an entry
means, which the format's modules decide); this module holds the tables in
memory, loads L2 tables on demand (offsets checked before any read), hands
out space at the end of the file, and writes changed tables back in
crash-safe order: data flushed, then L2 tables, flushed, then the L1 entries
that name new L2 tables."""

from __future__ import annotations

import operator
from array import array
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

from vdtool.core.bytesutil import U64, align_up, be_array, be_bytes, le_array, le_bytes
from vdtool.core.errors import CorruptImageError

_MAX_CACHED = 64  # clean L2 tables kept in memory (dirty ones stay until written)
_MAX_DIRTY = 256  # changed L2 tables held before they are written (bounds memory in a long copy)


def distinct_entries(t: array, lo: int, hi: int, floor: int = 0) -> tuple | None:
    """``(values, least, greatest)`` of table ``t``'s entries above
    ``floor`` (0: the non-zero ones) when they are all distinct and in
    [lo, hi); None otherwise (the caller then walks the table entry by entry
    to name what is wrong).  A check looks at a million entries in a 4 GiB
    image: filter, map and set run at C speed where a Python test per entry
    cost most of a second.  ``values`` is a list or a set; least and
    greatest are None when there are none."""
    vals = list(filter(floor.__lt__, t)) if floor else list(filter(None, t))
    if not vals:
        return vals, None, None
    if all(map(operator.lt, vals, islice(vals, 1, None))):
        least, greatest = vals[0], vals[-1]  # increasing: what writers that append produce
    else:
        s = set(vals)
        if len(s) != len(vals):
            return None  # an entry repeats
        vals, least, greatest = s, min(s), max(s)
    return (vals, least, greatest) if lo <= least and greatest < hi else None


class Claimed:
    """Offsets named so far, to find one named twice.  A table whose
    offsets all lie above every offset claimed before (what writers that
    append produce) is only remembered; the set of all of them is built
    the first time a test needs it."""

    def __init__(self):
        self.top = -1
        self._parts: list = []
        self._all: set | None = None

    def _full(self) -> set:
        if self._all is None:
            self._all = set()
        for part in self._parts:
            self._all.update(part)
        self._parts = []
        return self._all

    def claim_all(self, vals, least: int | None, greatest: int | None) -> bool:
        """Claim the distinct offsets ``vals`` (``least`` and ``greatest``
        their bounds) if none was claimed before; False, and nothing
        claimed, if one was."""
        if least is None:
            return True
        if least <= self.top:
            full = self._full()
            if not full.isdisjoint(vals):
                return False
        self._parts.append(vals)
        self.top = max(self.top, greatest)
        return True

    def __contains__(self, v: int) -> bool:
        return v <= self.top and v in self._full()

    def add(self, v: int) -> None:
        self._parts.append((v,))
        self.top = max(self.top, v)


class TableMap:
    """The L1 table (``l1``, host-order ints) and a cache of L2 tables.

    ``l2_entries`` entries of 8 bytes make one L2 table (``l2_bytes``);
    a table's offset must be a multiple of ``table_align`` and not below
    ``min_offset``; ``little``: the tables' byte order; ``end``: where the
    next allocation goes (the end of the file, or of what is reserved);
    ``on_change``: called before the first table change (QED sets its
    need-check flag there)."""

    def __init__(self, file, *, l1: array, l1_offset: int, l2_entries: int, table_align: int, min_offset: int,
                 little: bool, end: int, what: str = "L2 table"):
        self.file = file
        self.l1 = l1
        self.l1_offset = l1_offset
        self.l2_entries = l2_entries
        self.l2_bytes = l2_entries * 8
        self.table_align = table_align
        self.min_offset = min_offset
        self.little = little
        self.end = end
        self.what = what
        self.file_size = file.size()
        self.cache: "OrderedDict[int, array]" = OrderedDict()
        self.dirty_l2: set = set()
        self.dirty_l1: set = set()
        self.on_change: Callable[[], None] | None = None
        # Raw L1 bytes are written in this order (tapdisk's old images keep
        # their L1 little-endian while the L2 tables are big-endian).
        self.l1_little = little

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, raw) -> array:
        return le_array(raw, U64) if self.little else be_array(raw, U64)

    def encode(self, a: array) -> bytes:
        return le_bytes(a) if self.little else be_bytes(a)

    def encode_l1(self, a: array) -> bytes:
        return le_bytes(a) if self.l1_little else be_bytes(a)

    # -- lookups -------------------------------------------------------------------------------
    def table_problem(self, off: int) -> str | None:
        """Why an L2 table offset cannot be used (None: it can)."""
        if off % self.table_align:
            return f"is not aligned to {self.table_align} bytes"
        if off < self.min_offset:
            return f"lies inside the header or L1 table (below {self.min_offset})"
        if off + self.l2_bytes > max(self.file_size, self.end):
            return f"runs past the end of the file (file size {self.file_size})"
        return None

    def l2(self, i: int) -> array | None:
        """L2 table ``i`` (None when the L1 entry is empty)."""
        off = self.l1[i]
        if not off:
            return None
        t = self.cache.get(off)
        if t is not None:
            self.cache.move_to_end(off)
            return t
        why = self.table_problem(off)
        if why:
            raise CorruptImageError(f"L1 entry {i} names an {self.what} at offset {off} that {why}", self.file.path)
        t = self.decode(self.file.pread_exact(off, self.l2_bytes, self.what))
        self._remember(off, t)
        return t

    def _remember(self, off: int, t: array) -> None:
        self.cache[off] = t
        while len(self.cache) > _MAX_CACHED + len(self.dirty_l2):
            # the oldest clean table goes (a walk over the whole cache per
            # table read was a tenth of a check's time)
            key = next((k for k in self.cache if k not in self.dirty_l2), None)
            if key is None:
                break
            del self.cache[key]

    def entry(self, ci: int) -> int:
        """The L2 entry of cluster ``ci`` (0 where no L2 table exists)."""
        t = self.l2(ci // self.l2_entries)
        return t[ci % self.l2_entries] if t is not None else 0

    def run_end(self, ci: int, stop: int, classify: Callable[[int], object]) -> int:
        """The first cluster in (ci, stop) whose entry classifies differently
        from cluster ``ci``'s (``stop`` if none); a missing L2 table counts
        as entries of 0 and is passed over whole."""
        want = classify(self.entry(ci))
        n = self.l2_entries
        c = ci + 1
        while c < stop:
            i, j = divmod(c, n)
            t = self.l2(i)
            if t is None:
                if classify(0) != want:
                    return c
                c = (i + 1) * n
                continue
            for k in range(j, min(n, stop - i * n)):
                if classify(t[k]) != want:
                    return i * n + k
            c = (i + 1) * n
        return stop

    # -- changes -------------------------------------------------------------------------------
    def changing(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def allocate(self, nbytes: int, align: int) -> int:
        """Space for ``nbytes`` at the end of the file, aligned to ``align``."""
        off = align_up(self.end, align)
        self.end = off + nbytes
        return off

    def set_entry(self, ci: int, value: int) -> None:
        """Set cluster ``ci``'s L2 entry, making an L2 table where there is
        none (written at the next ``flush``)."""
        i, j = divmod(ci, self.l2_entries)
        t = self.l2(i)
        if t is None:
            if not value:
                return
            self.changing()
            off = self.allocate(self.l2_bytes, self.table_align)
            t = array(U64, bytes(self.l2_bytes))
            self.l1[i] = off
            self.dirty_l1.add(i)
            self._remember(off, t)
        if t[j] == value:
            return
        self.changing()
        t[j] = value
        self.dirty_l2.add(self.l1[i])
        if len(self.dirty_l2) > _MAX_DIRTY:
            self.flush()

    def set_l1(self, i: int, off: int) -> None:
        """Point L1 entry ``i`` at ``off`` (0: no table) -- check and compact."""
        self.changing()
        self.l1[i] = off
        self.dirty_l1.add(i)

    def mark_l2_dirty(self, i: int) -> None:
        self.dirty_l2.add(self.l1[i])

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_l2 or self.dirty_l1)

    def flush(self, sync_data: bool = True) -> None:
        """Write changed tables: data first (flushed), then the L2 tables,
        flushed, then the L1 entries that name them."""
        if not self.dirty:
            return
        if sync_data:
            self.file.flush()
        for off in sorted(self.dirty_l2):
            t = self.cache.get(off)
            if t is not None:
                self.file.pwrite(off, self.encode(t))
        self.dirty_l2.clear()
        if self.dirty_l1:
            self.file.flush()
            lo, hi = min(self.dirty_l1), max(self.dirty_l1) + 1
            self.file.pwrite(self.l1_offset + lo * 8, self.encode_l1(self.l1[lo:hi]))
            self.dirty_l1.clear()
        self.file_size = max(self.file_size, self.file.size())

    def forget(self) -> None:
        """Drop the cached L2 tables (after a table moved or was rewritten)."""
        self.cache.clear()
        self.dirty_l2.clear()

"""Checking (and repairing) a VMDK image: descriptor sizes against the
extents, flat extents against their files, and in sparse extents the
grain directories, the redundant copies and every grain table entry."""

from __future__ import annotations

import bisect
import heapq
import os

from vdtool.core.backend import CheckResult
from vdtool.core.bytesutil import ceil_div, le_bytes
from vdtool.core.progress import Progress
from vdtool.core.tablemap import Claimed, distinct_entries
from vdtool.formats.vmdk.disk import Disk
from vdtool.formats.vmdk.flat import FlatExtent
from vdtool.formats.vmdk.layout import GRAIN_MARKER, GTE_ZERO, SECTOR
from vdtool.formats.vmdk.sparse import SparseExtent, table_gtes

_LOOSE_LIMIT = 1 << 16  # more loose entries than this: the entry-by-entry walk
_PROGRESS_EVERY = 1024  # entries between progress reports


def check_disk(disk: Disk, res: CheckResult, repair: str | None, progress: Progress) -> None:
    """Every extent, each a share of ``progress`` by its size.  ``repair``:
    None, "leaks" or "all" (the image is then writable)."""
    res.total_clusters = 0
    res.allocated_clusters = 0
    res.compressed_clusters = 0
    fix = repair == "all"
    desc_changed = False
    lines = disk.extent_lines()
    total = max(1, disk.virtual_size)
    for k, e in enumerate(disk.extents):
        el = lines[k] if k < len(lines) else None
        name = os.path.basename(e.path) if e.path else f"extent {k}"
        if el is not None and el.sectors != e.capacity and isinstance(e, SparseExtent):
            # A sparse extent's size is its header's capacity; resize
            # writes the header, then the descriptor, so an interrupted
            # resize leaves a stale size in the descriptor: harmless, and
            # -r leaks writes the header's size there.
            res.leak(f"descriptor gives extent {name} {el.sectors} sectors, its header {e.capacity} (the "
                     f"header's size is used)")
            if repair:
                el.sectors = e.capacity
                desc_changed = True
                res.leaks_fixed += 1
        if isinstance(e, SparseExtent):
            sub = progress.sub(100 * disk.starts[k] / total, 100 * e.size / total)
            _SparseCheck(e, res, name, repair).run(sub)
            res.image_end_offset = e.file.size()
        elif isinstance(e, FlatExtent):
            _check_flat(e, res, name, fix)
    if desc_changed:
        disk.write_descriptor()


def _check_flat(e: FlatExtent, res: CheckResult, name: str, fix: bool) -> None:
    need = e.file_offset + e.size
    have = e.file.size()
    if have < need:
        res.corrupt(f"flat extent {name} is {have} bytes, shorter than the {need} bytes the descriptor names",
                    repairing=fix)
        if fix:
            e.file.truncate(need)
            res.corruptions_fixed += 1


def _unique(it):
    last = None
    for x in it:
        if x != last:
            yield x
            last = x


def _tables_in_either(a, b, n: int):
    """Table indices either scan says may hold entries, in order."""
    ti = 0
    while True:
        ti = min(a.next_table(ti, n), b.next_table(ti, n))
        if ti >= n:
            return
        yield ti
        ti += 1


class _SparseCheck:
    """One sparse extent's check: grain directories (entries in the file,
    no table shared), the redundant copies (in step with the primary), the
    grain table entries (in range, not into metadata, no grain used twice,
    markers sane).  ``fix`` repairs corruption (repair "all"),
    ``fix_leaks`` leaks (any repair)."""

    def __init__(self, e: SparseExtent, res: CheckResult, name: str, repair: str | None):
        self.e = e
        self.res = res
        self.name = name
        self.fix = repair == "all"
        self.fix_leaks = repair is not None
        self.fs = e.file.size()
        self.total_grains = ceil_div(e.size, e.grain_bytes)
        self.reserved = e.metadata_ranges()  # before any repair moves a table
        self.starts = [a for a, b in self.reserved]

    def run(self, progress: Progress) -> None:
        e = self.e
        self.res.total_clusters += self.total_grains
        few_loose = self._check_directories(progress.sub(0, 10))
        if e.rgd is not None:
            self._check_redundant(few_loose, progress.sub(10, 30))
        self._check_entries(progress.sub(40, 60))
        e.flush_metadata()
        if self.fix_leaks:
            e.reset_scans()  # redundant tables may have been rewritten in place
        if self.fix_leaks and e.unclean and e.writable:
            e.unclean = 0  # the redundant tables are in step again
            e.write_header()

    # -- directories ----------------------------------------------------------------------
    def _dirs(self) -> list:
        e = self.e
        return [(d, what, scan) for d, what, scan in ((e.gd, "grain directory", e.table_scan()),
                                                      (e.rgd, "redundant grain directory", e.rgd_scan()))
                if d is not None]

    def _check_directories(self, progress: Progress) -> bool:
        """Directory entries inside the file, no table shared; whether the
        directories have few loose entries (runs cover the rest)."""
        dirs = self._dirs()
        # Directories in runs of tables at a fixed stride (what qemu-img, VMware
        # and VirtualBox write; a 64 TiB extent has 2M entries) are not walked
        # entry by entry: a run's entries are distinct and increasing, so when
        # the runs (and the few loose entries) cover value ranges apart from
        # each other no table is shared, and those past the end of the file are
        # the tail of a run.
        few_loose = all(scan.loose_count <= _LOOSE_LIMIT for d, what, scan in dirs)
        if few_loose and self._runs_apart(dirs):
            self._entries_past_end(dirs)
        else:
            self._walk_directories(dirs, progress)
        return few_loose

    @staticmethod
    def _runs_apart(dirs: list) -> bool:
        spans = []
        for d, what, scan in dirs:
            for i0, i1, first, stride in scan.segs:
                spans += [(first, d[i1 - 1])] if stride else [(v, v) for v in d[i0:i1] if v]
        spans.sort()
        return all(spans[k][1] < spans[k + 1][0] for k in range(len(spans) - 1))

    def _entries_past_end(self, dirs: list) -> None:
        limit = (self.fs - self.e.gt_sectors * SECTOR) // SECTOR  # v * SECTOR + gtb > fs  <=>  v > limit
        for d, what, scan in dirs:
            for i0, i1, first, stride in scan.segs:
                past = range(bisect.bisect_right(d, limit, i0, i1), i1) if stride else [
                    ti for ti in range(i0, i1) if d[ti] and d[ti] > limit]
                for ti in past:
                    self.res.corrupt(f"{self.name}: {what} entry {ti} points past the end of the file")

    def _walk_directories(self, dirs: list, progress: Progress) -> None:
        res, name, fs = self.res, self.name, self.fs
        gtb = self.e.gt_sectors * SECTOR
        seen = {}
        total = max(1, sum(len(d) for d, what, scan in dirs))
        done = 0
        for d, what, scan in dirs:
            for ti, v in enumerate(d):
                if not ti % _PROGRESS_EVERY:
                    progress.update(done + ti, total)
                if not v:
                    continue
                if v * SECTOR + gtb > fs:
                    res.corrupt(f"{name}: {what} entry {ti} points past the end of the file")
                if v in seen:
                    res.corrupt(f"{name}: {what} entry {ti} and {seen[v]} share the grain table at sector {v}")
                seen[v] = f"{what} entry {ti}"
            done += len(d)

    # -- redundant copies ---------------------------------------------------------------------
    def _pairs(self, few_loose: bool):
        """Directory indices whose primary and redundant tables are compared.
        Inside runs both entries are non-zero and a pair of tables that are
        both empty (holes, or zeros) agrees: only pairs where either side
        may hold entries, and loose entries (which may be zero), are looked at."""
        e = self.e
        n = e.gd_entries
        if not few_loose:
            return range(n)
        gscan, rscan = e.table_scan(), e.rgd_scan()
        loose = sorted({ti for scan in (gscan, rscan) for i0, i1, first, stride in scan.segs if not stride
                        for ti in range(i0, i1)})
        return _unique(heapq.merge(loose, _tables_in_either(gscan, rscan, n)))

    def _check_redundant(self, few_loose: bool, progress: Progress) -> None:
        e, res, name = self.e, self.res, self.name
        n = max(1, e.gd_entries)
        for k, ti in enumerate(self._pairs(few_loose)):
            if not k % _PROGRESS_EVERY:
                progress.update(ti, n)
            a, b = e.gd[ti], e.rgd[ti]
            if (a == 0) != (b == 0):
                if e.unclean and a and not b:
                    # the primary directory is written first: a new table the
                    # redundant directory does not know yet (unclean shutdown)
                    res.leak(f"{name}: redundant grain directory entry {ti} is stale (unclean shutdown)")
                    if self.fix_leaks:
                        self._copy_table_to_redundant(ti)
                        res.leaks_fixed += 1
                    continue
                res.corrupt(f"{name}: grain directory entry {ti} is {a}, redundant entry {b}")
                continue
            if a:
                self._compare_tables(ti, b)

    def _compare_tables(self, ti: int, b: int) -> None:
        e, res, name = self.e, self.res, self.name
        t = le_bytes(e.gt(ti))
        rt = e.file.pread(b * SECTOR, e.gt_bytes)
        if t != rt and e.unclean and e.gd[ti] != b:
            # after an unclean shutdown the redundant copy may lag the
            # primary (written first, see flush_metadata): harmless
            res.leak(f"{name}: redundant grain table {ti} is stale (unclean shutdown)")
            if self.fix_leaks:
                e.file.pwrite(b * SECTOR, t)
                res.leaks_fixed += 1
        elif t != rt:
            res.corrupt(f"{name}: grain table {ti} differs from its redundant copy", repairing=self.fix)
            if self.fix:
                e.file.pwrite(b * SECTOR, t)
                res.corruptions_fixed += 1

    def _copy_table_to_redundant(self, ti: int) -> None:
        """Give redundant directory entry ``ti`` a table of its own, a copy of
        the primary's (after an unclean shutdown left it empty)."""
        e = self.e
        area = e.gt_sectors * SECTOR
        off = e.alloc(area)
        e.file.pwrite(off, le_bytes(e.gt(ti)).ljust(area, b"\0"))
        e.file.flush()
        e.rgd[ti] = off // SECTOR
        e.reset_scans()
        e.write_directories()
        e.file.flush()

    # -- grain table entries ------------------------------------------------------------------
    def _check_entries(self, progress: Progress) -> None:
        e = self.e
        tables = list(e.all_tables())  # repairs change entries: walk copies
        self.owners = {}  # sector -> grain, for entries checked one by one
        self.claimed = Claimed()  # every sector a grain was found at
        self.whole = []  # (base, table) of the tables checked whole
        for k, (base, t) in enumerate(tables):
            if not k % max(1, _PROGRESS_EVERY // e.gtes):
                progress.update(k, len(tables))
            if not self._table_clean(base, t):
                self._check_table(base, t)

    def _table_clean(self, base: int, t) -> bool:
        """Count table ``t``'s grains when none of its entries has a problem
        (in the disk and the file, distinct, on no other grain or
        metadata): whole-table operations, not a test per entry.  False
        (nothing counted) sends the table to the entry-by-entry walk."""
        e = self.e
        if e.compressed or base + len(t) > self.total_grains:
            return False
        clean = distinct_entries(t, 1, ceil_div(self.fs, SECTOR), GTE_ZERO if e.zero_grain else 0)
        if clean is None:
            return False
        vals, least, greatest = clean
        if least is not None and self._overlaps_metadata(least * SECTOR, greatest * SECTOR + e.grain_bytes):
            return False
        if not self.claimed.claim_all(vals, least, greatest):
            return False
        self.whole.append((base, t))
        self.res.allocated_clusters += len(vals)
        return True

    def _overlaps_metadata(self, start: int, end: int) -> bool:
        """Does [start, end) meet a metadata range?  The ranges are sorted
        and disjoint: the last starting at or before ``start`` and the next."""
        j = max(0, bisect.bisect_right(self.starts, start) - 1)
        return any(a < end and start < b for a, b in self.reserved[j:j + 2])

    def _owner(self, v: int) -> int | None:
        """The grain found at sector ``v`` before (None: none was)."""
        g = self.owners.get(v)
        if g is None and v in self.claimed:
            for base, t in self.whole:
                if v in t:
                    return base + t.index(v)
        return g

    def _check_table(self, base: int, t) -> None:
        e, res, name = self.e, self.res, self.name
        skip_zero, total_grains, problem, starts = e.zero_grain, self.total_grains, self._grain_problem, self.starts
        for g, v in table_gtes(base, t):
            if v == GTE_ZERO and skip_zero:
                continue
            if g >= total_grains:
                self._entry_beyond_disk(g)
                continue
            bad = problem(g, v, starts)
            owner = self._owner(v) if bad is None else None
            if bad is None and owner is None:
                self.owners[v] = g
                self.claimed.add(v)
                res.allocated_clusters += 1
                if e.compressed:
                    res.compressed_clusters += 1
            elif bad is None:
                repairing = self.fix and not e.compressed
                res.corrupt(f"{name}: grain {g} and grain {owner} share sector {v}", repairing=repairing)
                if repairing:
                    self._give_own_copy(g, v)
            else:
                res.corrupt(f"{name}: {bad}", repairing=self.fix)
                if self.fix:
                    e.set_gte(g, 0)
                    e.forget_released()
                    res.corruptions_fixed += 1

    def _entry_beyond_disk(self, g: int) -> None:
        # what an interrupted shrink leaves (the header's smaller capacity
        # is written first): out of sight, so a leak
        self.res.leak(f"{self.name}: grain table entry for grain {g} lies beyond the disk's "
                      f"{self.total_grains} grains")
        if self.fix_leaks:
            self.e.set_gte(g, 0)
            self.e.forget_released()
            self.res.leaks_fixed += 1

    def _grain_problem(self, g: int, v: int, starts: list) -> str | None:
        """What is wrong with grain ``g`` at sector ``v``: past the end of
        the file, a bad marker, or overlapping metadata (None if nothing)."""
        e, fs, h = self.e, self.fs, v * SECTOR
        if h >= fs:
            return f"grain {g} at sector {v} points past the end of the file ({fs} bytes)"
        span = e.grain_bytes
        if e.compressed:
            span = SECTOR
            if e.markers:
                marker = GRAIN_MARKER.unpack(e.file.pread(h, GRAIN_MARKER.size).ljust(GRAIN_MARKER.size, b"\0"))
                if marker.lba != g * e.grain:
                    return f"grain {g} at sector {v} has a marker for sector {marker.lba}"
                if marker.size == 0 or h + GRAIN_MARKER.size + marker.size > fs:
                    return f"compressed grain {g} at sector {v} has size {marker.size}, past the end of the file"
                span = GRAIN_MARKER.size + marker.size
        j = bisect.bisect_right(starts, h) - 1
        for a, b in self.reserved[max(0, j):j + 3]:
            if a < h + span and h < b:
                return f"grain {g} at sector {v} overlaps metadata at bytes {a}..{b}"
        return None

    def _give_own_copy(self, g: int, v: int) -> None:
        e = self.e
        data = e.read_grain_raw(v)
        nh = e.alloc(e.grain_bytes)
        e.file.pwrite(nh, data)
        e.file.flush()
        e.set_gte(g, nh // SECTOR)
        e.forget_released()
        self.res.corruptions_fixed += 1

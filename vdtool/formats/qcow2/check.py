"""QCOW2 check and repair.

check rebuilds the refcounts every cluster should have from all metadata
(header, L1/L2 tables of the active image and of each internal snapshot,
data and compressed clusters, snapshot table, bitmaps, refcount table and
blocks) and compares them with the stored ones, as ``qemu-img check`` does:
stored lower than needed is a corruption, higher is a leak.  Work and memory
are bounded by the file's real size, never by counts a header claims.

Plain L2 entries that step by one cluster (what any allocator writes for
sequential data) are judged as runs (``l2_runs``); every other entry goes
through the entry-by-entry rules (``_l2_entry``), which the runs stand for."""

from __future__ import annotations

import sys
from array import array

from vdtool.core.backend import CheckResult
from vdtool.core.bytesutil import be_array, ceil_div
from vdtool.core.errors import VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qcow2 import snapshot
from vdtool.formats.qcow2.layout import (AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY, BITMAPS_EXTENSION,
                                         CHECK_MAX_CLUSTERS, EXT_BITMAPS, INCOMPAT_CORRUPT, L1E_OFFSET_MASK,
                                         L1E_RESERVED, L2E_OFFSET_MASK, L2E_RESERVED, MAX_BITMAPS,
                                         OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
                                         REFT_OFFSET_MASK, SC_ALLOC_ALL, SC_ZERO_ALL)
from vdtool.formats.qcow2.refcount import write_fresh_structures


class _Walk:
    """The in-memory refcount array and the counters of one check."""

    def __init__(self, st, refcounts, clusters, res: CheckResult, nb: int, fsize: int):
        self.st = st
        self.refcounts = refcounts
        self.clusters = clusters
        self.res = res
        self.cs = st.cs
        self.cb = st.cb
        self.fsize = fsize
        self.max = st.rc.max
        self.typecode = st.rc.typecode
        self.ref = array(self.typecode, bytes(nb * array(self.typecode).itemsize))
        self.fixes_l2: dict = {}  # l2 offset -> {index: new entry}
        # l2 offset -> the table's runs (l2_runs), found by the walk and used
        # again by step 4 (a check without repair: the tables stay as read)
        self.runs: dict = {}
        self.runs_left = _RUNS_KEPT
        self._zero_cache = array(self.typecode)
        self.repeat = 1

    def _zeros(self, n: int) -> array:
        z = self._zero_cache
        if len(z) < n:
            z = self._zero_cache = array(self.typecode, bytes(max(n, 2 * len(z)) * self.ref.itemsize))
        return z[:n]

    def corrupt(self, text: str) -> None:
        # QEMU walks an L2 table once for each L1 table that points to it
        # (the active one and the snapshots'), so a fault in a shared table
        # counts, and is reported, that many times; ``repeat`` says how many
        for _ in range(self.repeat):
            self.res.corrupt(text)

    def leak(self, text: str, repairing: bool) -> None:
        if repairing:
            self.res.leaks += 1
            self.res.say("Repairing: " + text)
        else:
            self.res.leak(text)

    def inc(self, offset: int, size: int, mult: int = 1) -> bool:
        if size <= 0:
            return True
        cb = self.cb
        if offset + size - self.fsize > self.cs:
            self.corrupt(f"counting reference for region exceeding the end of the file by one cluster or more: "
                         f"offset {offset:#x} size {size:#x}")
            return False
        ref = self.ref
        last = (offset + size - 1) >> cb
        if last >= len(ref):
            ref.extend(array(self.typecode, bytes((last + 1 - len(ref)) * ref.itemsize)))
        first = offset >> cb
        n = last + 1 - first
        if n > 8 and mult <= self.max:
            # a run of clusters nothing counted yet (the usual case): one
            # C-level compare and one slice store instead of a loop
            zeros = self._zeros(n)
            if ref[first:last + 1] == zeros:
                ref[first:last + 1] = array(self.typecode, (mult,)) * n
                return True
        for k in range(first, last + 1):
            v = ref[k] + mult
            if v > self.max:
                self.corrupt(f"refcount overflow for cluster offset {k << cb:#x}")
                v = self.max
            ref[k] = v
        return True


class _Comparison:
    """What comparing the counted with the stored refcounts found."""

    def __init__(self, rc_corrupt: int, rebuild: bool):
        self.rc_corrupt = rc_corrupt  # refcount corruptions (blocks and clusters)
        self.rc_leaks = 0
        self.rebuild = rebuild  # the refcount structure itself is damaged
        self.missing_block = False  # a cluster needs a count where no block is
        self.highest = 0  # last cluster counted or stored
        self.to_fix: list = []  # (cluster, stored, wanted) to repair


def run_check(st, refcounts, clusters, res: CheckResult, repair, progress: Progress = NO_PROGRESS) -> None:
    """Check (and with ``repair`` 'leaks' or 'all', repair) the image into ``res``."""
    cs = st.cs
    fsize = st.file.size()
    nb = ceil_div(fsize, cs)
    res.total_clusters = ceil_div(st.size, cs)
    res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
    if nb > CHECK_MAX_CLUSTERS:
        res.error(f"image file has {nb} clusters, more than check can count ({CHECK_MAX_CLUSTERS})")
        return
    wk = _Walk(st, refcounts, clusters, res, nb, fsize)
    wk.inc(0, cs)  # header
    _walk_tables(wk, repair, progress.sub(0, 90))
    if st.nb_snapshots:
        wk.inc(st.snapshots_offset, st.snapshots_size)
    _count_bitmaps(wk)
    ref_no_refcounts = array(wk.typecode, wk.ref)  # what a rebuilt refcount structure has to describe
    wk.inc(st.rt_offset, st.rt_clusters * cs)
    before = res.corruptions
    rebuild, bad_rt = _count_refblocks(wk, nb)
    cmp = _compare_refcounts(wk, repair, bad_rt, _Comparison(res.corruptions - before, rebuild))
    _repair_refcounts(wk, repair, cmp, ref_no_refcounts)
    _check_copied(wk, repair == "all")
    res.image_end_offset = (cmp.highest + 1) * cs
    if repair == "all" and st.incompat & INCOMPAT_CORRUPT and res.corruptions <= res.corruptions_fixed \
            and not res.check_errors:
        st.set_incompat(st.incompat & ~INCOMPAT_CORRUPT)


# -- step 1: the L1 and L2 tables -----------------------------------------------------------

def _walk_tables(wk: _Walk, repair, progress: Progress) -> None:
    """Every L1 table: count references to each distinct L2 table, then walk
    each table once (the walk is most of a check's work: progress)."""
    st = wk.st
    l2refs: dict = {}
    active: dict = {}
    budget = wk.fsize  # L1 tables never overlap, so together they fit in the file
    if st.l1_size:
        wk.inc(st.l1_offset, st.l1_size * 8)
        budget -= st.l1_size * 8
    _collect_l2(wk, st.l1, "active", l2refs, active)
    for sn in st.snapshots:
        n = sn["l1_size"]
        if not n:
            continue
        if n * 8 > budget:
            wk.corrupt(f"snapshot {sn['id']!r}: L1 tables of all snapshots together are larger than the file; "
                       f"they must overlap")
            continue
        budget -= n * 8
        wk.inc(sn["l1_table_offset"], n * 8)
        _collect_l2(wk, snapshot.l1_table(st, sn), f"snapshot {sn['id']!r}", l2refs, None)
    tables = sorted(l2refs)
    for k, off in enumerate(tables):
        if not k & 63:
            progress.update(k, len(tables))
        mult = l2refs[off]
        if not wk.inc(off, wk.cs, mult):
            continue
        wk.repeat = mult
        _walk_l2(wk, off, mult, off in active, repair)
        wk.repeat = 1
    progress.update(len(tables), len(tables))


def _collect_l2(wk: _Walk, l1, label: str, l2refs: dict, active) -> None:
    """The L2 tables one L1 table points at, into ``l2refs`` (and ``active``
    for the active table: offset -> L1 index)."""
    cs = wk.cs
    seen = set() if len(l1) <= (1 << 20) else None
    for i, e in enumerate(l1):
        if not e:
            continue
        if e & L1E_RESERVED:
            wk.corrupt(f"found L1 entry with reserved bits set: {e:x} ({label} index {i})")
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        if off & (cs - 1):
            wk.corrupt(f"l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted ({label} index {i})")
            continue
        if off + cs > wk.fsize:
            wk.corrupt(f"l2_offset={off:x}: L2 table is past the end of the file ({label} index {i})")
            continue
        if seen is not None:
            if off in seen:
                wk.corrupt(f"l2_offset={off:x}: L2 table is used twice by the {label} L1 table")
            seen.add(off)
        l2refs[off] = l2refs.get(off, 0) + 1
        if active is not None:
            active[off] = i


# A plain allocated L2 entry: host offset plus at most the COPIED and ZERO
# flags.  Consecutive entries that step by one cluster with the same flags
# (what any allocator writes for sequential data) are judged as one run.
PLAIN_FLAGS = OFLAG_COPIED | OFLAG_ZERO
NOT_PLAIN = ((1 << 64) - 1) & ~(L2E_OFFSET_MASK | PLAIN_FLAGS)

_ORDER = sys.byteorder
_WINDOW = 64  # entries judged first: a short run costs this much, a long one its own length


class _RunFinder:
    """Finds how far an L2 table keeps stepping by one cluster, with C-level
    big-integer arithmetic: the entries of a slice, read as one integer,
    must equal e*ONES + cs*INDEX (no carries cross an 8-byte slot), and
    the XOR with what is there locates the first entry that differs."""

    def __init__(self, n: int):
        self.ones = array("Q", [1]) * n
        self.index = array("Q", range(n))
        self._consts: dict = {}

    def _pair(self, w: int) -> tuple:
        c = self._consts.get(w)
        if c is None:
            c = self._consts[w] = (int.from_bytes(self.ones[:w].tobytes(), _ORDER),
                                   int.from_bytes(self.index[:w].tobytes(), _ORDER))
            if len(self._consts) > 64:
                self._consts.clear()
        return c

    def run(self, raw: bytes, i: int, m: int, e: int, step: int) -> int:
        """How many of the m entries from index i equal e, e+step, e+2*step ..."""
        w = min(m, _WINDOW)
        while True:
            ones, index = self._pair(w)
            d = int.from_bytes(raw[i * 8:(i + w) * 8], _ORDER) ^ (e * ones + step * index)
            if d:
                if _ORDER == "little":
                    return ((d & -d).bit_length() - 1) >> 6
                return w - 1 - ((d.bit_length() - 1) >> 6)
            if w == m:
                return m
            w = m


_finders: dict = {}
_RUNS_KEPT = 1 << 18  # runs kept for step 4 in all (about 20 MiB); tables past that are walked again


def l2_runs(tbl: array, cs: int):
    """(index, length, first entry) runs of a standard (8-byte entry) L2
    table: unallocated runs (entry 0), plain runs (e, e+cs, e+2cs ...), and
    every other entry alone (length 1, judged entry by entry)."""
    n = len(tbl)
    finder = _finders.get(n)
    if finder is None:
        finder = _finders[n] = _RunFinder(n)
    raw = None
    i = 0
    while i < n:
        e = tbl[i]
        if not e:
            run = 1
            if i + 1 < n and not tbl[i + 1]:
                raw = raw or tbl.tobytes()
                run = finder.run(raw, i, n - i, 0, 0)
            yield i, run, 0
            i += run
            continue
        host = e & L2E_OFFSET_MASK
        if e & NOT_PLAIN or not host or host & (cs - 1):
            yield i, 1, e
            i += 1
            continue
        limit = min(n - i, (L2E_OFFSET_MASK - host) // cs + 1)
        run = 1
        if limit > 1 and tbl[i + 1] == e + cs:
            raw = raw or tbl.tobytes()
            run = finder.run(raw, i, limit, e, cs)
        yield i, run, e
        i += run


def _walk_l2(wk: _Walk, off: int, mult: int, is_active: bool, repair) -> None:
    cs = wk.cs
    res = wk.res
    try:
        tbl = wk.clusters.l2_table(off)
    except VdError as ex:
        wk.corrupt(f"l2_offset={off:x}: {ex}")
        return
    w = wk.st.l2_words
    state = [0]  # where the next cluster would be if the image were not fragmented
    fixes: dict = {}
    if w == 1:
        runs = list(l2_runs(tbl, cs))
        if repair is None and len(runs) <= wk.runs_left:
            wk.runs[off] = runs
            wk.runs_left -= len(runs)
        for i, run, e in runs:
            if not e:
                continue
            host = e & L2E_OFFSET_MASK
            if run > 1 and host + run * cs - wk.fsize <= cs:
                if is_active:
                    res.allocated_clusters += run
                    if state[0] and host != state[0]:
                        res.fragmented_clusters += 1
                    state[0] = host + run * cs
                wk.inc(host, run * cs, mult)
                continue
            for idx in range(i, i + run):
                _l2_entry(wk, tbl, idx, 1, mult, is_active, repair, fixes, state)
    else:
        for idx in range(0, len(tbl), w):
            _l2_entry(wk, tbl, idx, w, mult, is_active, repair, fixes, state)
    if fixes:
        wk.fixes_l2[off] = fixes


def _l2_entry(wk: _Walk, tbl: array, idx: int, w: int, mult: int, is_active: bool, repair, fixes: dict,
              state: list) -> None:
    """One L2 entry, every rule checked (what the runs above stand for)."""
    cs = wk.cs
    res = wk.res
    e = tbl[idx]
    bm = tbl[idx + 1] if w == 2 else 0
    if not e and not bm:
        return
    if e & OFLAG_COMPRESSED:
        _compressed_entry(wk, e, idx, mult, is_active, repair, fixes)
        return
    host = e & L2E_OFFSET_MASK
    if e & (L2E_RESERVED if w == 1 else L2E_RESERVED | OFLAG_ZERO):
        wk.corrupt(f"found L2 entry with reserved bits set: {e:x}")
    if w == 2:
        if bm & (bm >> 32) & SC_ALLOC_ALL:
            wk.corrupt(f"offset={host:x}: cluster has subclusters marked both allocated and zero")
        if not host and bm & SC_ALLOC_ALL:
            wk.corrupt("unallocated cluster has a non-zero subcluster allocation bitmap")
    if not host:
        return
    if host & (cs - 1):
        data = (bm & SC_ALLOC_ALL) if w == 2 else not e & OFLAG_ZERO
        if not data and repair == "all":
            res.corrupt(f"offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        repairing=True)
            res.corruptions_fixed += 1
            fixes[idx] = OFLAG_ZERO if w == 1 else 0
            if w == 2:
                fixes[idx + 1] = SC_ZERO_ALL
            return
        wk.corrupt(f"offset={host:x}: {'Data' if data else 'Preallocated'} cluster is not properly aligned; "
                   f"L2 entry corrupted.")
    if is_active:
        res.allocated_clusters += 1
        if state[0] and host != state[0]:
            res.fragmented_clusters += 1
        state[0] = host + cs
    wk.inc(host, cs, mult)  # unaligned: both clusters it touches, as QEMU counts it


def _compressed_entry(wk: _Walk, e: int, idx: int, mult: int, is_active: bool, repair, fixes: dict) -> None:
    if e & OFLAG_COPIED:
        wk.corrupt(f"cluster {e >> wk.cb}: copied flag must never be set for compressed clusters")
        if repair == "all":
            fixes[idx] = e & ~OFLAG_COPIED
    coff, csize = wk.clusters.compressed_extent(e)
    wk.inc(coff & ~511, ((coff & 511) + csize), mult)
    if is_active:
        res = wk.res
        res.allocated_clusters += 1
        res.compressed_clusters += 1
        res.fragmented_clusters += 1  # compressed clusters are fragmented by nature (QEMU's count)


# -- step 2: bitmaps and refcount blocks -----------------------------------------------------

def _count_bitmaps(wk: _Walk) -> None:
    st = wk.st
    if not st.autoclear & AUTOCLEAR_BITMAPS:
        return  # without the autoclear bit the bitmaps are stale and their clusters count as leaks (as QEMU)
    cs = wk.cs
    for etype, data in st.exts:
        if etype != EXT_BITMAPS or len(data) < BITMAPS_EXTENSION.size:
            continue
        ext = BITMAPS_EXTENSION.unpack(data)
        nb_bitmaps, dir_size, dir_off = ext.nb_bitmaps, ext.bitmap_directory_size, ext.bitmap_directory_offset
        if nb_bitmaps > MAX_BITMAPS or dir_off & (cs - 1) or dir_off + dir_size > wk.fsize \
                or dir_size > MAX_BITMAPS * 1024:
            wk.corrupt(f"bitmap directory (offset {dir_off:#x}, size {dir_size}, {nb_bitmaps} bitmaps) is invalid")
            return
        wk.inc(dir_off, dir_size)
        raw = st.file.pread_exact(dir_off, dir_size, "bitmap directory")
        pos = 0
        for _ in range(nb_bitmaps):
            if pos + BITMAP_DIR_ENTRY.size > len(raw):
                wk.corrupt("bitmap directory entry runs past the directory")
                return
            ent = BITMAP_DIR_ENTRY.unpack(raw, pos)
            pos += (BITMAP_DIR_ENTRY.size + ent.extra_data_size + ent.name_size + 7) & ~7
            _count_bitmap_table(wk, ent.bitmap_table_offset, ent.bitmap_table_size)


def _count_bitmap_table(wk: _Walk, tbl_off: int, tbl_size: int) -> None:
    cs = wk.cs
    if tbl_off & (cs - 1) or tbl_off + tbl_size * 8 > wk.fsize:
        wk.corrupt(f"bitmap table at {tbl_off:#x} ({tbl_size} entries) is misaligned or past the end of file")
        return
    wk.inc(tbl_off, tbl_size * 8)
    for e in be_array(wk.st.file.pread_exact(tbl_off, tbl_size * 8, "bitmap table")):
        off = e & L2E_OFFSET_MASK
        if off:
            wk.inc(off, cs)


def _count_refblocks(wk: _Walk, nb: int) -> tuple:
    """Count the refcount blocks; (rebuild needed, bad table indexes)."""
    st = wk.st
    cs, cb = wk.cs, wk.cb
    rebuild = False
    bad_rt = set()
    for rti, e in enumerate(st.rt):
        off = e & REFT_OFFSET_MASK
        if e & ~REFT_OFFSET_MASK:
            wk.corrupt(f"refcount table entry {rti} has reserved bits set")
            rebuild = True
            bad_rt.add(rti)
            continue
        if not off:
            continue
        if off & (cs - 1):
            bad_rt.add(rti)
            wk.corrupt(f"refcount block {rti} is not cluster aligned; refcount table entry corrupted")
            rebuild = True
            continue
        if (off >> cb) >= nb:
            wk.corrupt(f"refcount block {rti} is outside image")
            rebuild = True
            bad_rt.add(rti)
            continue
        wk.inc(off, cs)
        if wk.ref[off >> cb] != 1:
            wk.corrupt(f"refcount block {rti} refcount={wk.ref[off >> cb]} (it overlaps other metadata)")
            rebuild = True
    return rebuild, bad_rt


# -- step 3: counted against stored refcounts, and their repair -------------------------------

def _compare_refcounts(wk: _Walk, repair, bad_rt: set, cmp: _Comparison) -> _Comparison:
    st = wk.st
    res = wk.res
    E = st.rc.entries
    ref = wk.ref
    for rti in range(ceil_div(len(ref), E)):
        base = rti << st.rb_shift
        top = min(len(ref), base + E)
        want = ref[base:top]
        e = st.rt[rti] if rti < len(st.rt) else 0
        off = e & REFT_OFFSET_MASK
        blk = None
        if off and rti not in bad_rt:
            try:
                blk = wk.refcounts.block(off)
            except VdError as ex:
                res.error(f"cannot read refcount block {rti}: {ex}")
                cmp.rebuild = True
        have = blk[0:top - base] if blk is not None else array(wk.typecode, bytes((top - base) * ref.itemsize))
        for arr in (want, have):
            t = arr.tobytes().rstrip(b"\0")
            if t:
                cmp.highest = max(cmp.highest, base + (len(t) - 1) // arr.itemsize)
        if have != want:
            _compare_block(wk, repair, cmp, base, have, want, blk is None)
    return cmp


def _compare_block(wk: _Walk, repair, cmp: _Comparison, base: int, have, want, no_block: bool) -> None:
    for i in range(len(want)):
        s, r = have[i], want[i]
        if s == r:
            continue
        c = base + i
        text = f"cluster {c} refcount={s} reference={r}"
        if s < r:
            fixable = repair == "all"
            if no_block:
                cmp.missing_block = True
            wk.res.corrupt(text, repairing=fixable)
            cmp.rc_corrupt += 1
        else:
            fixable = repair in ("leaks", "all")
            wk.leak(text, fixable)
            cmp.rc_leaks += 1
        if fixable:
            cmp.to_fix.append((c, s, r))


def _repair_refcounts(wk: _Walk, repair, cmp: _Comparison, ref_no_refcounts: array) -> None:
    """Rebuild the refcount structure, or fix single counts, as ``repair`` allows."""
    st = wk.st
    res = wk.res
    if repair == "all" and (cmp.rebuild or cmp.missing_block) and (cmp.rc_corrupt or cmp.rc_leaks):
        res.say("Rebuilding refcount structure")
        _rebuild_refcounts(st, wk.refcounts, ref_no_refcounts)
        res.corruptions_fixed += cmp.rc_corrupt
        res.leaks_fixed += cmp.rc_leaks
        cmp.highest = max(cmp.highest, st.alloc_end - 1)
    elif cmp.to_fix and not (cmp.rebuild and any(s < r for _, s, r in cmp.to_fix)):
        E = st.rc.entries
        for c, s, r in cmp.to_fix:
            off = st.rt[c >> st.rb_shift] & REFT_OFFSET_MASK
            blk = wk.refcounts.block(off)
            blk[c & (E - 1)] = r
            st.rb_dirty.add(off)
            if s < r:
                res.corruptions_fixed += 1
            else:
                res.leaks_fixed += 1
        wk.refcounts.write_blocks()
        st.sync()
    elif cmp.rebuild and repair:
        res.error("need to rebuild refcount structures (run the check with repair 'all')")


def _rebuild_refcounts(st, refcounts, ref: array) -> None:
    """A fresh refcount table and blocks describing ``ref``, written past the
    end of the file and switched to with one header write (the old ones are
    simply no longer counted)."""
    first = max(len(ref), ceil_div(st.file.size(), st.cs), st.alloc_end)
    rt, rt_off, T, end = write_fresh_structures(st, ref, st.rc, first)
    refcounts.switch_table(rt, rt_off, T, end)


# -- step 4: OFLAG_COPIED against the refcounts ------------------------------------------------

def _check_copied(wk: _Walk, fix: bool) -> None:
    """OFLAG_COPIED must be set exactly where the refcount is 1 (active tables)."""
    st = wk.st
    cs, cb = wk.cs, wk.cb
    res = wk.res
    for l1i in range(st.l1_size):
        e = st.l1[l1i]
        off = e & L1E_OFFSET_MASK
        if not off or off & (cs - 1) or off + cs > wk.fsize:
            continue
        try:
            rc = wk.refcounts.get(off >> cb)
            tbl = wk.clusters.l2_table(off)
        except VdError:
            continue
        if (rc == 1) != bool(e & OFLAG_COPIED):
            res.corrupt(f"OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}", repairing=fix)
            if fix:
                st.l1[l1i] = (e | OFLAG_COPIED) if rc == 1 else (e & ~OFLAG_COPIED)
                st.l1_dirty.add(l1i)
                res.corruptions_fixed += 1
        fixes = wk.fixes_l2.pop(off, {})
        _copied_table(wk, tbl, fix, fixes, wk.runs.pop(off, None))
        if fixes and fix:
            for idx, v in fixes.items():
                tbl[idx] = v
            st.l2_dirty.add(off)
    if fix:
        _fix_snapshot_tables(wk)


def _copied_table(wk: _Walk, tbl: array, fix: bool, fixes: dict, runs=None) -> None:
    """The data clusters of one active L2 table (runs whose stored
    refcounts agree with their flag as a whole are passed over); ``runs``:
    the table's l2_runs when the walk kept them."""
    w = wk.st.l2_words
    if w == 1 and not fixes:
        for i, run, le in runs if runs is not None else l2_runs(tbl, wk.cs):
            if not le:
                continue
            if run > 1:
                try:
                    stored = wk.refcounts.stored((le & L2E_OFFSET_MASK) >> wk.cb, run)
                    ones = stored.count(1)
                except VdError:
                    ones = -1  # entry by entry, which reports what it finds
                if ones == (run if le & OFLAG_COPIED else 0):
                    continue
            for idx in range(i, i + run):
                _copied_entry(wk, tbl, idx, fix, fixes)
    else:
        for idx in range(0, len(tbl), w):
            _copied_entry(wk, tbl, idx, fix, fixes)


def _fix_snapshot_tables(wk: _Walk) -> None:
    """Snapshot tables that needed a fix (compressed COPIED flags, unaligned
    preallocation), then everything fixed to disk."""
    st = wk.st
    for off, fixes in wk.fixes_l2.items():
        try:
            tbl = wk.clusters.l2_table(off)
        except VdError:
            continue
        for idx, v in fixes.items():
            tbl[idx] = v
        st.l2_dirty.add(off)
    if st.l2_dirty or st.l1_dirty:
        wk.clusters.flush_metadata()


def _copied_entry(wk: _Walk, tbl: array, idx: int, fix: bool, fixes: dict) -> None:
    le = fixes.get(idx, tbl[idx])
    if le & OFLAG_COMPRESSED:
        return
    host = le & L2E_OFFSET_MASK
    if not host or host & (wk.cs - 1):
        return
    try:
        drc = wk.refcounts.get(host >> wk.cb)
    except VdError:
        return
    if (drc == 1) != bool(le & OFLAG_COPIED):
        wk.res.corrupt(f"OFLAG_COPIED data cluster: l2_entry={le:x} refcount={drc}", repairing=fix)
        if fix:
            fixes[idx] = (le | OFLAG_COPIED) if drc == 1 else (le & ~OFLAG_COPIED)
            wk.res.corruptions_fixed += 1

"""QCOW2 check/repair and compact (the whole-image walks of vdtool.formats.qcow2).

check rebuilds the refcounts every cluster should have from all metadata
(header, L1/L2 tables of the active image and of each internal snapshot,
data and compressed clusters, snapshot table, bitmaps, refcount table and
blocks) and compares them with the stored ones, as ``qemu-img check`` does:
stored lower than needed is a corruption, higher is a leak.  Work and memory
are bounded by the file's real size, never by counts a header claims."""

from __future__ import annotations

import sys
from array import array

from vdtool.core.backend import CheckResult
from vdtool.core.errors import NotSupported, UnsupportedFeature, VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qcow2 import (AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY, BITMAPS_EXT, CHECK_MAX_CLUSTERS,
                                  EXT_BITMAPS, INCOMPAT_CORRUPT, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                                  MAX_BITMAPS, MAX_REFTABLE_BYTES, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
                                  REFT_OFFSET_MASK, REFTABLE_FIELDS, OFS_REFTABLE, SC_ALLOC_ALL, SC_ZERO_ALL,
                                  _be_array, _be_bytes, _ceil_div, _ZERO_CHUNK)

MAX_MESSAGES = 200
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE
COMPACT_BATCH = 4096  # clusters moved between flushes


class _Walk:
    """The in-memory refcount array and the counters of one check."""

    def __init__(self, b, res: CheckResult, nb: int, fsize: int):
        self.b = b
        self.res = res
        self.cs = b._cs
        self.cb = b._cb
        self.fsize = fsize
        self.max = b._rc.max
        self.typecode = b._rc.typecode
        self.ref = array(self.typecode, bytes(nb * array(self.typecode).itemsize))
        self.nmsg = 0
        self.fixes_l2: dict = {}  # l2 offset -> {index: new entry}
        self._zero_cache = array(self.typecode)
        self.repeat = 1

    def _zeros(self, n: int) -> array:
        z = self._zero_cache
        if len(z) < n:
            z = self._zero_cache = array(self.typecode, bytes(max(n, 2 * len(z)) * self.ref.itemsize))
        return z[:n]

    def msg(self, text: str) -> None:
        self.nmsg += 1
        if self.nmsg <= MAX_MESSAGES:
            self.res.messages.append(text)
        elif self.nmsg == MAX_MESSAGES + 1:
            self.res.messages.append("(further messages left out)")

    def corrupt(self, text: str) -> None:
        # QEMU walks an L2 table once for each L1 table that points to it
        # (the active one and the snapshots'), so a fault in a shared table
        # counts, and is reported, that many times; ``repeat`` says how many
        for _ in range(self.repeat):
            self.res.corruptions += 1
            self.msg("ERROR " + text)

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


def run_check(b, res: CheckResult, repair, progress=NO_PROGRESS) -> None:
    cs, cb = b._cs, b._cb
    fsize = b.file.size()
    nb = _ceil_div(fsize, cs)
    res.total_clusters = _ceil_div(b._size, cs)
    res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
    if nb > CHECK_MAX_CLUSTERS:
        res.check_errors += 1
        res.messages.append(f"ERROR image file has {nb} clusters, more than check can count ({CHECK_MAX_CLUSTERS})")
        return
    wk = _Walk(b, res, nb, fsize)
    wk.inc(0, cs)  # header

    # every L1 table: count references to each distinct L2 table, then walk each table once
    l2refs: dict = {}
    active: dict = {}
    budget = fsize  # L1 tables never overlap, so together they fit in the file

    def collect(l1, is_active: bool, label: str) -> None:
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
            if off + cs > fsize:
                wk.corrupt(f"l2_offset={off:x}: L2 table is past the end of the file ({label} index {i})")
                continue
            if seen is not None:
                if off in seen:
                    wk.corrupt(f"l2_offset={off:x}: L2 table is used twice by the {label} L1 table")
                seen.add(off)
            l2refs[off] = l2refs.get(off, 0) + 1
            if is_active:
                active[off] = i

    if b._l1_size:
        wk.inc(b._l1_offset, b._l1_size * 8)
        budget -= b._l1_size * 8
    collect(b._l1, True, "active")
    for sn in b._snapshots:
        n = sn["l1_size"]
        if not n:
            continue
        if n * 8 > budget:
            wk.corrupt(f"snapshot {sn['id']!r}: L1 tables of all snapshots together are larger than the file; "
                       f"they must overlap")
            continue
        budget -= n * 8
        wk.inc(sn["l1_table_offset"], n * 8)
        collect(_be_array(b.file.pread_exact(sn["l1_table_offset"], n * 8, "snapshot L1 table")), False,
                f"snapshot {sn['id']!r}")
    # walking the L2 tables is most of a check's work: report it as it goes
    walk_progress = progress.sub(0, 90)
    tables = sorted(l2refs)
    for k, off in enumerate(tables):
        if not k & 63:
            walk_progress.update(k, len(tables))
        mult = l2refs[off]
        if not wk.inc(off, cs, mult):
            continue
        wk.repeat = mult
        _walk_l2(wk, off, mult, off in active, repair)
        wk.repeat = 1
    walk_progress.update(len(tables), len(tables))

    if b._nb_snapshots:
        wk.inc(b._snapshots_offset, b._snapshots_size)
    _count_bitmaps(wk)
    ref_no_refcounts = array(wk.typecode, wk.ref)  # what a rebuilt refcount structure has to describe
    wk.inc(b._rt_offset, b._rt_clusters * cs)

    # refcount blocks
    rebuild = False
    before_rc = res.corruptions
    shift = b._rb_shift
    bad_rt = set()
    for rti, e in enumerate(b._rt):
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

    # compare with the stored refcounts
    E = b._rc.entries
    ref = wk.ref
    highest = 0
    to_fix = []
    missing_block = False
    rc_corrupt = res.corruptions - before_rc
    rc_leaks = 0
    nblocks = _ceil_div(len(ref), E)
    for rti in range(nblocks):
        base = rti << shift
        top = min(len(ref), base + E)
        want = ref[base:top]
        e = b._rt[rti] if rti < len(b._rt) else 0
        off = e & REFT_OFFSET_MASK
        blk = None
        if off and rti not in bad_rt:
            try:
                blk = b._rb_load(off)
            except VdError as ex:
                wk.msg(f"ERROR cannot read refcount block {rti}: {ex}")
                res.check_errors += 1
                rebuild = True
        have = blk[0:top - base] if blk is not None else array(wk.typecode, bytes((top - base) * ref.itemsize))
        for arr in (want, have):
            t = arr.tobytes().rstrip(b"\0")
            if t:
                highest = max(highest, base + (len(t) - 1) // arr.itemsize)
        if have == want:
            continue
        for i in range(top - base):
            s, r = have[i], want[i]
            if s == r:
                continue
            c = base + i
            if s < r:
                fixable = repair == "all"
                if blk is None:
                    missing_block = True
                wk.res.corruptions += 1
                rc_corrupt += 1
                wk.msg(f"{'Repairing' if fixable else 'ERROR'} cluster {c} refcount={s} reference={r}")
            else:
                fixable = repair in ("leaks", "all")
                wk.res.leaks += 1
                rc_leaks += 1
                wk.msg(f"{'Repairing' if fixable else 'Leaked'} cluster {c} refcount={s} reference={r}")
            if fixable:
                to_fix.append((c, s, r))

    if repair == "all" and (rebuild or missing_block) and (rc_corrupt or rc_leaks):
        wk.msg("Rebuilding refcount structure")
        _rebuild_refcounts(b, ref_no_refcounts)
        res.corruptions_fixed += rc_corrupt
        res.leaks_fixed += rc_leaks
        highest = max(highest, b._alloc_end - 1)
    elif to_fix and not (rebuild and any(s < r for _, s, r in to_fix)):
        for c, s, r in to_fix:
            rti = c >> shift
            off = b._rt[rti] & REFT_OFFSET_MASK
            blk = b._rb_load(off)
            blk[c & (E - 1)] = r
            b._rb_dirty.add(off)
            if s < r:
                res.corruptions_fixed += 1
            else:
                res.leaks_fixed += 1
        b._write_refblocks()
        b._sync()
    elif rebuild and repair:
        res.check_errors += 1
        wk.msg("ERROR need to rebuild refcount structures (run the check with repair 'all')")

    _check_copied(wk, repair == "all")
    res.image_end_offset = (highest + 1) * cs
    if repair == "all" and b._incompat & INCOMPAT_CORRUPT and res.corruptions <= res.corruptions_fixed \
            and not res.check_errors:
        b._set_incompat(b._incompat & ~INCOMPAT_CORRUPT)


# A plain allocated L2 entry: host offset plus at most the COPIED and ZERO
# flags.  Consecutive entries that step by one cluster with the same flags
# (what any allocator writes for sequential data) are judged as one run.
_PLAIN_FLAGS = OFLAG_COPIED | OFLAG_ZERO
_NOT_PLAIN = ((1 << 64) - 1) & ~(L2E_OFFSET_MASK | _PLAIN_FLAGS)


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


def _l2_runs(tbl: array, cs: int):
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
        if e & _NOT_PLAIN or not host or host & (cs - 1):
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
    b = wk.b
    cs = wk.cs
    res = wk.res
    try:
        tbl = b._l2_table(off)
    except VdError as ex:
        wk.corrupt(f"l2_offset={off:x}: {ex}")
        return
    w = b._l2_words
    state = [0]  # where the next cluster would be if the image were not fragmented
    fixes: dict = {}
    if w == 1:
        for i, run, e in _l2_runs(tbl, cs):
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
    b = wk.b
    cs = wk.cs
    res = wk.res
    e = tbl[idx]
    bm = tbl[idx + 1] if w == 2 else 0
    if not e and not bm:
        return
    if e & OFLAG_COMPRESSED:
        if e & OFLAG_COPIED:
            wk.corrupt(f"cluster {e >> wk.cb}: copied flag must never be set for compressed clusters")
            if repair == "all":
                fixes[idx] = e & ~OFLAG_COPIED
        coff, csize = b._compressed_extent(e)
        wk.inc(coff & ~511, ((coff & 511) + csize), mult)
        if is_active:
            res.allocated_clusters += 1
            res.compressed_clusters += 1
            res.fragmented_clusters += 1  # compressed clusters are fragmented by nature (QEMU's count)
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
            wk.res.corruptions += 1
            wk.res.corruptions_fixed += 1
            wk.msg(f"Repairing offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.")
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


def _count_bitmaps(wk: _Walk) -> None:
    b = wk.b
    if not b._autoclear & AUTOCLEAR_BITMAPS:
        return  # without the autoclear bit the bitmaps are stale and their clusters count as leaks (as QEMU)
    cs = wk.cs
    for etype, data in b._exts:
        if etype != EXT_BITMAPS or len(data) < BITMAPS_EXT.size:
            continue
        nb_bitmaps, _, dir_size, dir_off = BITMAPS_EXT.unpack_from(data)
        if nb_bitmaps > MAX_BITMAPS or dir_off & (cs - 1) or dir_off + dir_size > wk.fsize \
                or dir_size > MAX_BITMAPS * 1024:
            wk.corrupt(f"bitmap directory (offset {dir_off:#x}, size {dir_size}, {nb_bitmaps} bitmaps) is invalid")
            return
        wk.inc(dir_off, dir_size)
        raw = b.file.pread_exact(dir_off, dir_size, "bitmap directory")
        pos = 0
        for _ in range(nb_bitmaps):
            if pos + BITMAP_DIR_ENTRY.size > len(raw):
                wk.corrupt("bitmap directory entry runs past the directory")
                return
            tbl_off, tbl_size, _flags, _type, _gran, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(raw, pos)
            pos += (BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
            if tbl_off & (cs - 1) or tbl_off + tbl_size * 8 > wk.fsize:
                wk.corrupt(f"bitmap table at {tbl_off:#x} ({tbl_size} entries) is misaligned or past the end of file")
                continue
            wk.inc(tbl_off, tbl_size * 8)
            for e in _be_array(b.file.pread_exact(tbl_off, tbl_size * 8, "bitmap table")):
                off = e & L2E_OFFSET_MASK
                if off:
                    wk.inc(off, cs)


def _check_copied(wk: _Walk, fix: bool) -> None:
    """OFLAG_COPIED must be set exactly where the refcount is 1 (active tables)."""
    b = wk.b
    cs, cb = wk.cs, wk.cb
    res = wk.res
    w = b._l2_words
    for l1i in range(b._l1_size):
        e = b._l1[l1i]
        off = e & L1E_OFFSET_MASK
        if not off or off & (cs - 1) or off + cs > wk.fsize:
            continue
        try:
            rc = b._rc_get(off >> cb)
            tbl = b._l2_table(off)
        except VdError:
            continue
        if (rc == 1) != bool(e & OFLAG_COPIED):
            res.corruptions += 1
            wk.msg(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} "
                   f"refcount={rc}")
            if fix:
                b._l1[l1i] = (e | OFLAG_COPIED) if rc == 1 else (e & ~OFLAG_COPIED)
                b._l1_dirty.add(l1i)
                res.corruptions_fixed += 1
        fixes = wk.fixes_l2.pop(off, {})
        if w == 1 and not fixes:
            for i, run, le in _l2_runs(tbl, cs):
                if not le:
                    continue
                if run > 1:
                    stored = _stored_refcounts(b, (le & L2E_OFFSET_MASK) >> cb, run)
                    ones = stored.count(1) if stored is not None else -1
                    if ones == (run if le & OFLAG_COPIED else 0):
                        continue
                for idx in range(i, i + run):
                    _copied_entry(wk, tbl, idx, fix, fixes)
        else:
            for idx in range(0, len(tbl), w):
                _copied_entry(wk, tbl, idx, fix, fixes)
        if fixes and fix:
            for idx, v in fixes.items():
                tbl[idx] = v
            b._l2_dirty.add(off)
    if fix:
        # snapshot tables that needed a fix (compressed COPIED flags, unaligned preallocation)
        for off, fixes in wk.fixes_l2.items():
            try:
                tbl = b._l2_table(off)
            except VdError:
                continue
            for idx, v in fixes.items():
                tbl[idx] = v
            b._l2_dirty.add(off)
        if b._l2_dirty or b._l1_dirty:
            b._flush_metadata()


def _copied_entry(wk: _Walk, tbl: array, idx: int, fix: bool, fixes: dict) -> None:
    b = wk.b
    le = fixes.get(idx, tbl[idx])
    if le & OFLAG_COMPRESSED:
        return
    host = le & L2E_OFFSET_MASK
    if not host or host & (wk.cs - 1):
        return
    try:
        drc = b._rc_get(host >> wk.cb)
    except VdError:
        return
    if (drc == 1) != bool(le & OFLAG_COPIED):
        wk.res.corruptions += 1
        wk.msg(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED data cluster: l2_entry={le:x} "
               f"refcount={drc}")
        if fix:
            fixes[idx] = (le | OFLAG_COPIED) if drc == 1 else (le & ~OFLAG_COPIED)
            wk.res.corruptions_fixed += 1


def _stored_refcounts(b, first: int, n: int):
    """The stored refcounts of clusters first..first+n-1 as one array (None
    if a refcount block cannot be read: the caller then goes entry by entry
    and reports what it finds)."""
    E = b._rc.entries
    shift = b._rb_shift
    out = array(b._rc.typecode)
    c, end = first, first + n
    try:
        while c < end:
            rti = c >> shift
            stop = min(end, (rti + 1) << shift)
            off = b._rt[rti] & REFT_OFFSET_MASK if rti < len(b._rt) else 0
            if off:
                out += b._rb_load(off)[c & (E - 1):(c & (E - 1)) + stop - c]
            else:
                out += array(b._rc.typecode, bytes((stop - c) * out.itemsize))
            c = stop
    except VdError:
        return None
    return out


def _rebuild_refcounts(b, ref: array) -> None:
    """A fresh refcount table and blocks describing ``ref``, written past the
    end of the file and switched to with one header write (the old ones are
    simply no longer counted)."""
    cs, cb = b._cs, b._cb
    E = b._rc.entries
    shift = b._rb_shift
    fsize = b.file.size()
    P = max(len(ref), _ceil_div(fsize, cs), b._alloc_end)
    nonzero = set()
    for rti in range(_ceil_div(len(ref), E)):
        seg = ref[rti * E:(rti + 1) * E]
        if seg.count(0) != len(seg):
            nonzero.add(rti)
    B, T = 0, 1
    while True:
        end = P + B + T
        idx = sorted(nonzero | set(range(P >> shift, ((end - 1) >> shift) + 1)))
        nT = max(1, _ceil_div((idx[-1] + 1) * 8, cs))
        if len(idx) == B and nT == T:
            break
        B, T = len(idx), nT
    if T * cs > MAX_REFTABLE_BYTES:
        raise UnsupportedFeature(f"a rebuilt refcount table would need {T * cs} bytes, above the limit of "
                                 f"{MAX_REFTABLE_BYTES}", b.path)
    ref = array(ref.typecode, ref)
    if len(ref) < end:
        ref.extend(array(ref.typecode, bytes((end - len(ref)) * ref.itemsize)))
    for c in range(P, end):
        ref[c] += 1
    rt = array("Q", bytes(T * cs))
    f = b.file
    for k, rti in enumerate(idx):
        boff = (P + k) << cb
        rt[rti] = boff
        seg = ref[rti * E:(rti + 1) * E]
        if len(seg) < E:
            seg.extend(array(ref.typecode, bytes((E - len(seg)) * ref.itemsize)))
        f.pwrite(boff, b._rc.encode(seg))
    rt_off = (P + B) << cb
    f.pwrite(rt_off, _be_bytes(rt))
    b._sync()
    f.pwrite(OFS_REFTABLE, REFTABLE_FIELDS.pack(rt_off, T))
    b._sync()
    b._rt = rt
    b._rt_offset = rt_off
    b._rt_clusters = T
    b._rb_cache.clear()
    b._rb_dirty.clear()
    b._rt_dirty.clear()
    b._meta_index = None
    b._file_size = max(b._file_size, end << cb)
    b._alloc_end = max(b._alloc_end, end)
    b._free_hint = 1


# == compact =========================================================================

def run_compact(b, progress: Progress) -> None:
    if b._nb_snapshots:
        raise NotSupported("compact", "qcow2", b.path, "the image has internal snapshots")
    b._flush_metadata()
    _release_zero_clusters(b, progress.sub(0, 40))
    b._flush_metadata()
    _move_clusters_down(b, progress.sub(40, 55))
    b._flush_metadata()
    res = CheckResult()
    run_check(b, res, "leaks")
    if res.check_errors or res.corruptions:
        raise VdError("compact: the image has inconsistencies (" + "; ".join(res.messages[:3]) +
                      "); run 'vdtool check -r all' first", b.path)
    b._truncate_to_used()
    progress.update(1, 1)


def _release_zero_clusters(b, progress: Progress) -> None:
    """Clusters whose data is all zeros stop being stored: unallocated in a
    standalone image, zero flag in a v3 overlay (a v2 overlay keeps them)."""
    cs, cb = b._cs, b._cb
    w = b._l2_words
    has_backing = bool(b._backing_name)
    if has_backing and b.version < 3:
        return
    zero = memoryview(_ZERO_CHUNK)[:cs] if cs <= len(_ZERO_CHUNK) else bytes(cs)
    chunk = max(1, (4 << 20) >> cb)
    buf = bytearray(chunk << cb)
    mv = memoryview(buf)
    n_l1 = b._l1_size
    for l1i in range(n_l1):
        off = b._l1[l1i] & L1E_OFFSET_MASK
        progress.update(l1i, n_l1)
        if not off:
            continue
        tbl = b._l2_table(off)
        zeros = []
        # runs of host-contiguous allocated clusters, read a few MiB at a time
        idx = 0
        nent = b._l2_entries
        while idx < nent:
            e = tbl[idx * w]
            if e & OFLAG_COMPRESSED:
                try:
                    if b._decompress(e) == zero:
                        zeros.append(idx)
                except (VdError, UnsupportedFeature):
                    pass
                idx += 1
                continue
            host = e & L2E_OFFSET_MASK
            if not host or not e & OFLAG_COPIED:
                idx += 1
                continue
            if w == 1 and e & OFLAG_ZERO:
                zeros.append(idx)  # preallocated zero cluster: drop the preallocation
                idx += 1
                continue
            if w == 2 and tbl[idx * 2 + 1] & SC_ALLOC_ALL != SC_ALLOC_ALL:
                idx += 1
                continue
            j = idx + 1
            while j < nent and j - idx < chunk:
                ej = tbl[j * w]
                if ej & (OFLAG_COMPRESSED | OFLAG_ZERO * (w == 1)) or not ej & OFLAG_COPIED \
                        or (ej & L2E_OFFSET_MASK) != host + ((j - idx) << cb) \
                        or (w == 2 and tbl[j * 2 + 1] & SC_ALLOC_ALL != SC_ALLOC_ALL):
                    break
                j += 1
            b._check_data_cluster(host)
            n = j - idx
            b.file.readinto(host, mv[:n << cb])
            for k in range(n):
                if mv[k << cb:(k + 1) << cb] == zero:
                    zeros.append(idx + k)
            idx = j
        if not zeros:
            continue
        tbl = b._l2_for_write(l1i)
        for idx in zeros:
            e = tbl[idx * w]
            if has_backing:
                tbl[idx * w] = OFLAG_ZERO if w == 1 else 0
                if w == 2:
                    tbl[idx * 2 + 1] = SC_ZERO_ALL
            else:
                tbl[idx * w] = 0
                if w == 2:
                    tbl[idx * 2 + 1] = 0
            b._release_entry(e)
        b._maybe_flush()


def _move_clusters_down(b, progress: Progress) -> None:
    """Fill free clusters low in the file with the highest movable clusters
    (data clusters, L2 tables, refcount blocks).  Each batch: copy, flush,
    repoint, flush, free the old places: a crash leaves old or new, plus leaks."""
    cs, cb = b._cs, b._cb
    w = b._l2_words
    shift = b._rb_shift
    E = b._rc.entries
    used = 0
    for e in b._rt:
        off = e & REFT_OFFSET_MASK
        if off:
            blk = b._rb_load(off)
            used += E - blk.count(0)
    target = used
    owners: dict = {}
    for l1i in range(b._l1_size):
        le = b._l1[l1i]
        off = le & L1E_OFFSET_MASK
        if not off:
            continue
        if not le & OFLAG_COPIED:
            continue  # shared table: never moved (snapshots are refused above; this is a stale flag)
        if off >> cb >= target:
            owners[off >> cb] = (1, l1i, 0)
        tbl = b._l2_table(off)
        for idx in range(0, len(tbl), w):
            e = tbl[idx]
            host = e & L2E_OFFSET_MASK
            if host and not e & OFLAG_COMPRESSED and e & OFLAG_COPIED and host >> cb >= target:
                owners[host >> cb] = (0, l1i, idx)
    for rti, e in enumerate(b._rt):
        off = e & REFT_OFFSET_MASK
        if off and off >> cb >= target:
            owners[off >> cb] = (2, rti, 0)
    if not owners:
        return
    sources = sorted(owners, reverse=True)
    total = len(sources)

    def holes():
        c = 1
        while c < target:
            rti = c >> shift
            off = b._rt[rti] & REFT_OFFSET_MASK if rti < len(b._rt) else 0
            if not off:
                yield c
                c += 1
                continue
            blk = b._rb_load(off)
            try:
                i = blk.index(0, c & (E - 1))
            except ValueError:
                c = (rti + 1) << shift
                continue
            c = (rti << shift) + i
            if c < target:
                yield c
            c += 1

    gen = holes()
    moved = 0
    buf = bytearray(cs)
    for src in sources:
        dst = next(gen, None)
        while dst is not None and b._rc_get(dst) != 0:
            dst = next(gen, None)
        if dst is None or dst >= src:
            break
        kind, a, idx = owners[src]
        src_off, dst_off = src << cb, dst << cb
        b._rc_update(dst, 1, 1)
        if kind == 0:
            tbl = b._l2_for_write(a)
            e = tbl[idx]
            if (e & L2E_OFFSET_MASK) != src_off:
                b._rc_update(dst, 1, -1)
                continue
            b.file.readinto(src_off, buf)
            b.file.pwrite(dst_off, buf)
            b._note_written(dst_off + cs)
            b._data_dirty = True
            tbl[idx] = (e & ~L2E_OFFSET_MASK) | dst_off
        elif kind == 1:
            tbl = b._l2_table(src_off)
            b._l2_cache.pop(src_off, None)
            b._l2_dirty.discard(src_off)
            b._l2_cache[dst_off] = tbl
            b._l2_dirty.add(dst_off)
            b._l1[a] = dst_off | (b._l1[a] & OFLAG_COPIED)
            b._l1_dirty.add(a)
        else:
            blk = b._rb_load(src_off)
            b._rb_cache.pop(src_off, None)
            b._rb_dirty.discard(src_off)
            b._rb_cache[dst_off] = blk
            b._rb_dirty.add(dst_off)
            b._rt[a] = dst_off
            b._rt_dirty.add(a)
        b._meta_index = None
        b._defer_free(src, 1)
        moved += 1
        if moved % COMPACT_BATCH == 0:
            b._flush_metadata()
            progress.update(moved, total)
    b._flush_metadata()
    progress.update(total, total)

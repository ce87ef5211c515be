"""Whole-image VMDK operations: resize, compact, check/repair."""

from __future__ import annotations

import bisect
import heapq
import os
from array import array
from typing import Optional

from vdtool.core.backend import CheckResult, Status
from vdtool.core.errors import NotSupported, ReadOnlyError, UsageError, VdError
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats import _vmdk_sparse as sp
from vdtool.formats._vmdk_descriptor import ExtentLine
from vdtool.formats._vmdk_sparse import GTE_ZERO, SECTOR, SparseExtent, ceil_div, le_u32_bytes


# == resize ===========================================================================

def _sparse_resize(ext: SparseExtent, new_cap: int) -> None:
    ext.flush_metadata()
    gb = ext.grain_bytes
    new_bytes = new_cap * SECTOR
    old_entries = ext.gd_entries
    new_entries = ceil_div(new_bytes, ext.gt_span) if new_cap else 0
    if new_entries > sp.MAX_GD_ENTRIES:
        raise UsageError(f"{ext.path}: {new_bytes} bytes need {new_entries} grain tables, more than "
                         f"{sp.MAX_GD_ENTRIES}")
    if new_cap < ext.capacity:
        old_cap = ext.capacity
        # The header (whose capacity is the extent's size) says so first: a
        # crash while the grains past the new end are dropped then leaves the
        # new size, never the old size with its end half gone.
        ext.capacity = new_cap
        ext.file.pwrite(0, ext.header_bytes())
        ext.file.flush()
        first_gone = ceil_div(new_bytes, gb)
        last = first_gone - 1
        if new_bytes % gb and last >= 0:
            e = ext.gte(last)
            if ext._status_of(e) == Status.DATA:
                # the tail past the new end must read as zeros if the disk grows again
                within = new_bytes - last * gb
                ext.file.pwrite(e * SECTOR + within, bytes(gb - within))
        total_grains = ceil_div(old_cap * SECTOR, gb)
        for g in range(first_gone, min(total_grains, new_entries * ext.gtes)):
            if ext.gte(g):
                ext._set_gte(g, 0)
        ext._released.clear()  # stays referenced-free until compact; no punching of tail grains needed
        ext.flush_metadata()
        ext.gd = ext.gd[:new_entries]
        if ext.rgd is not None:
            ext.rgd = ext.rgd[:new_entries]
        for ti in [t for t in ext._gt_cache if t >= new_entries]:
            del ext._gt_cache[ti]
    elif new_entries > old_entries:
        # The new tables back to back, one run per directory (so they are
        # found empty without reading them), as holes the file is extended
        # over, not cached: a million new tables cost two array builds, not
        # a million writes and 2 GB of cache.
        k = new_entries - old_entries
        gts = ext.gt_sectors
        dirs = [d for d in (ext.gd, ext.rgd) if d is not None]
        firsts = [ext._alloc(k * gts * SECTOR) // SECTOR for d in dirs]  # both, before either changes
        for d, first in zip(dirs, firsts):
            d.extend(array(d.typecode, range(first, first + k * gts, gts)))
        if new_entries > ext.gd_area:
            # the directories outgrow their sectors: new ones at the end of the file
            area = ceil_div(new_entries * 4, SECTOR) * SECTOR
            ext.gd_offset = ext._alloc(area) // SECTOR
            ext.file.pwrite(ext.gd_offset * SECTOR, bytes(area))
            if ext.rgd is not None:
                ext.rgd_offset = ext._alloc(area) // SECTOR
                ext.file.pwrite(ext.rgd_offset * SECTOR, bytes(area))
            ext.gd_area = area // 4
        if ext.next_alloc > ext.file.size():
            ext.file.truncate(ext.next_alloc)  # the new tables read as zeros
        ext.file.flush()
        ext.write_directories()
        ext._gd_dirty = False
    ext.capacity = new_cap
    ext.gd_entries = new_entries
    ext.reset_scans()
    ext.file.flush()
    ext.file.pwrite(0, ext.header_bytes())
    ext.file.flush()


def resize(img, new_size: int) -> None:
    from vdtool.formats.vmdk import SPLIT_SECTORS, FlatExtent, _stem_ext

    if not img.writable:
        raise ReadOnlyError("image is opened read-only", img.path)
    if img._stream is not None or any(getattr(e, "compressed", False) for e in img._extents):
        raise NotSupported("resize", "vmdk", img.path, "a streamOptimized image is written once; convert it")
    if new_size < 0 or new_size > sp.MAX_CAPACITY_BYTES:
        raise UsageError(f"{img.path}: vmdk size {new_size} is outside 0..2^56")
    new_sectors = ceil_div(new_size, SECTOR)
    exts = img._extents
    kinds = {type(e) for e in exts}
    if len(kinds) != 1 or kinds - {SparseExtent, FlatExtent}:
        raise NotSupported("resize", "vmdk", img.path, "the image mixes extent kinds")
    sparse = SparseExtent in kinds
    split = img.variant in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
    if img._desc_home != "file" and len(exts) != 1:
        raise NotSupported("resize", "vmdk", img.path)
    img._begin_write()
    starts = img._starts
    drop = []
    while len(exts) > 1 and starts[-1] >= new_sectors * SECTOR:
        drop.append(exts.pop())
        starts.pop()
    last = exts[-1]
    last_start = starts[-1] // SECTOR
    want = new_sectors - last_start
    extra = 0
    if split and want > SPLIT_SECTORS:
        extra = want - SPLIT_SECTORS
        want = max(SPLIT_SECTORS, last.capacity)
        extra = new_sectors - last_start - want
    _resize_extent(last, want, sparse)
    new_lines = []
    folder = os.path.dirname(os.path.abspath(img.path))
    stem, ext_name = _stem_ext(img.path)
    letter = "s" if sparse else "f"
    idx = len(exts)
    while extra > 0:
        idx += 1
        n = min(SPLIT_SECTORS, extra)
        name = f"{stem}-{letter}{idx:03d}{ext_name}"
        p = os.path.join(folder, name)
        if os.path.exists(p):
            raise VdError(f"cannot add extent {name}: the file already exists", img.path)
        f = ImageFile(p, create=True)
        img._files[os.path.realpath(p)] = f
        if sparse:
            ref = exts[0]
            sp.write_new_sparse(f, n, version=ref.version, flags=ref.flags & ~(sp.FLAG_COMPRESSED | sp.FLAG_MARKERS),
                                desc=None, grain=ref.grain)
            f.flush()
            e = SparseExtent(f, True)
        else:
            f.truncate(n * SECTOR)
            e = FlatExtent(f, 0, n * SECTOR, exts[0].kind)
        img._add_extent(e)
        new_lines.append(ExtentLine("RW", n, "SPARSE" if sparse else exts[0].kind, name, 0))
        extra -= n
    if img._desc_home == "file":
        keep = img._desc.extents[:len(exts) - len(new_lines)]
        img._desc.set_extents(keep + new_lines)
    img._sync_extent_lines()
    for f in img._files.values():
        if f.writable:
            f.flush()
    img._write_descriptor()
    img.file.flush()
    for e in drop:
        if e.file is not None:
            path = e.file.path
            img._files.pop(os.path.realpath(path), None)
            e.file.close()
            if not any(x.file is not None and x.file.path == path for x in exts) and path != img.path:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _resize_extent(e, want: int, sparse: bool) -> None:
    if want == e.capacity:
        return
    if sparse:
        _sparse_resize(e, want)
    else:
        need = e.file_offset + want * SECTOR
        if want < e.capacity:
            if e.file.size() <= e.file_offset + e.size:
                e.file.truncate(need)
        elif e.file.size() < need:
            e.file.truncate(need)
        e.capacity = want


# == compact ==========================================================================

def compact(img, progress: Progress = NO_PROGRESS) -> None:
    from vdtool.formats.vmdk import FlatExtent

    if not img.writable:
        raise ReadOnlyError("image is opened read-only", img.path)
    if img._stream is not None:
        raise NotSupported("compact", "vmdk", img.path, "the image is still being written")
    img.flush()
    has_parent = img.parent is not None
    total = max(1, img.virtual_size)
    for i, e in enumerate(img._extents):
        start = img._starts[i]
        sub = progress.sub(100 * start / total, 100 * e.size / total)
        if isinstance(e, SparseExtent):
            if e.compressed:
                _compact_stream(img, i, e, sub)
            else:
                _compact_sparse(e, has_parent, lambda o, n, s=start: img.parent_read(s + o, n), sub)
        elif isinstance(e, FlatExtent):
            _compact_flat(e, sub)
    img.flush()


def _compact_flat(e, progress: Progress) -> None:
    bs = 1 << 16
    buf = bytearray(bs)
    zero = bytes(bs)
    pos = 0
    while pos < e.size:
        st, n = e.block_status(pos, e.size - pos)
        if st == Status.DATA:
            b = pos // bs * bs
            end = pos + n
            while b < end:
                m = min(bs, e.size - b)
                view = memoryview(buf)[:m]
                e.readinto(b, view)
                if buf.startswith(zero[:m]):
                    e.file.punch_hole(e.file_offset + b, m)
                b += bs
            pos = b
        else:
            pos += n
        progress.update(min(pos, e.size), e.size)


def _metadata_ranges(e: SparseExtent) -> list:
    r = [(0, SECTOR)]
    if e.desc_offset:
        r.append((e.desc_offset * SECTOR, (e.desc_offset + e.desc_size) * SECTOR))
    area = ceil_div(max(e.gd_entries, 1) * 4, SECTOR) * SECTOR
    r.append((e.gd_offset * SECTOR, e.gd_offset * SECTOR + area))
    if e.rgd is not None:
        r.append((e.rgd_offset * SECTOR, e.rgd_offset * SECTOR + area))
    gtb = e.gt_sectors * SECTOR
    for d, scan in ((e.gd, e.table_scan()), (e.rgd, e.rgd_scan())):
        if d is None:
            continue
        for i0, i1, first, stride in scan.segs:
            if stride == e.gt_sectors:
                r.append((first * SECTOR, (first + (i1 - i0) * stride) * SECTOR))  # back to back: one range
            else:
                r += [(v * SECTOR, v * SECTOR + gtb) for v in d[i0:i1] if v]
    r.sort()
    # merged, so that ranges are disjoint and a grain is tested against its neighbours only
    out = []
    for a, b in r:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _compact_sparse(e: SparseExtent, has_parent: bool, parent_read, progress: Progress) -> None:
    gb = e.grain_bytes
    # 1. release grains that read as zeros (a zero marker or the grain kept where the parent differs)
    grains = [(g, v) for g, v in e.all_gtes() if v > GTE_ZERO or not e.zero_grain]
    zero = bytes(gb)
    for k, (g, v) in enumerate(grains):
        data = e.read_grain_raw(v)
        avail = min(gb, e.size - g * gb)
        if data[:avail] == zero[:avail] or data.count(0) == len(data) and len(data) < gb:
            if not has_parent:
                e._set_gte(g, 0)
            elif e.zero_grain:
                e._set_gte(g, GTE_ZERO)
            elif parent_read(g * gb, avail).count(0) == avail:
                e._set_gte(g, 0)
        progress.update(k, 2 * max(1, len(grains)))
    e._released.clear()
    e.flush_metadata()
    # 2. move the remaining grains down, lowest first; a slot freed by a move is reused only after the
    # tables that stopped pointing at it are on disk
    reserved = _metadata_ranges(e)
    live = sorted((v, g) for g, v in e.all_gtes() if v > GTE_ZERO)
    t = e.overhead * SECTOR
    lead_end = 0
    for a, b in reserved:
        if a <= lead_end:
            lead_end = max(lead_end, b)
    t = max(t if t <= (live[0][0] * SECTOR if live else t) else 0, lead_end)
    t = ceil_div(t, SECTOR) * SECTOR
    pending: list = []
    oldest = None
    ri = 0

    def commit():
        nonlocal pending, oldest
        if pending:
            e.file.flush()
            for g, nv in pending:
                e._set_gte(g, nv)
            e._released.clear()
            e.flush_metadata()
        pending = []
        oldest = None

    end = 0
    for k, (v, g) in enumerate(live):
        h = v * SECTOR
        moved = False
        while True:
            while ri < len(reserved) and reserved[ri][1] <= t:
                ri += 1
            clash = None
            j = ri
            while j < len(reserved) and reserved[j][0] < t + gb:
                if reserved[j][1] > t:
                    clash = max(clash or 0, reserved[j][1])
                j += 1
            if clash is None:
                break
            t = ceil_div(clash, SECTOR) * SECTOR
        if t + gb <= h:
            if oldest is not None and t + gb > oldest:
                commit()
            e.file.pwrite(t, e.read_grain_raw(v))
            pending.append((g, t // SECTOR))
            oldest = h if oldest is None else min(oldest, h)
            end = max(end, t + gb)
            t += gb
            moved = True
        if not moved:
            end = max(end, h + gb)
            t = max(t, h + gb)
        progress.update(len(live) + k, 2 * max(1, len(live)))
    commit()
    _pack_metadata(e, max(end, lead_end))
    reserved = _metadata_ranges(e)
    meta_end = max(b for a, b in reserved)
    new_end = max(end, meta_end, e.overhead * SECTOR if not live else 0)
    new_end = ceil_div(new_end, SECTOR) * SECTOR
    if new_end < e.file.size():
        e.file.truncate(new_end)
    e.file_size = e.file.size()
    e.next_alloc = sp.pad_sector(e.file_size)
    e.file.flush()


def _pack_metadata(e: SparseExtent, data_end: int) -> None:
    """Grain tables and directories above the last grain (appended by a
    resize) move down behind it, so the file can end there."""
    t = sp.pad_sector(data_end)
    gtb = e.gt_sectors * SECTOR
    area = ceil_div(max(e.gd_entries, 1) * 4, SECTOR) * SECTOR
    if not any(b > t for a, b in _metadata_ranges(e)):
        return
    moves = []
    for d in (e.gd, e.rgd):
        if d is None:
            continue
        for ti, v in enumerate(d):
            if v * SECTOR >= t:
                moves.append((v * SECTOR, d, ti))
    moves.sort(key=lambda m: m[0])
    pos = t
    changed = False
    for old, d, ti in moves:
        if pos + gtb <= old:
            e.file.pwrite(pos, e.file.pread(old, gtb))
            d[ti] = pos // SECTOR
            changed = True
            pos += gtb
        else:
            pos = max(pos, old + gtb)
    new_gd = e.gd_offset
    new_rgd = e.rgd_offset
    if e.gd_offset * SECTOR >= pos + area:
        new_gd = pos // SECTOR
        pos += area
    if e.rgd is not None and e.rgd_offset * SECTOR >= pos + area:
        new_rgd = pos // SECTOR
        pos += area
    if not changed and new_gd == e.gd_offset and new_rgd == e.rgd_offset:
        return
    e.file.flush()
    e.gd_offset, e.rgd_offset = new_gd, new_rgd
    e.write_directories()
    e.file.flush()
    e.file.pwrite(0, e.header_bytes())
    e.file.flush()
    e._gt_cache.clear()
    e._gt_dirty.clear()
    e.reset_scans()


def _compact_stream(img, i: int, e: SparseExtent, progress: Progress) -> None:
    """A stream is rewritten: its grains (still compressed) into a new file,
    renamed over the old one."""
    path = e.file.path
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.compact-tmp")
    desc = img._desc.render() if img._desc_home is e else b""
    f = ImageFile(tmp, create=True)
    try:
        w = sp.StreamWriter(f, e.capacity, desc, e.grain)
        live = sorted(e.all_gtes())
        for k, (g, v) in enumerate(live):
            if e._status_of(v) != Status.DATA:
                continue
            data = e._grain_data(v, g)
            if data.count(0) == len(data):
                continue
            w._emit(g, sp.compress_grain(data, e.grain_bytes))
            progress.update(k, max(1, len(live)))
        w.finish()
        f.flush()
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    f.close()
    os.replace(tmp, path)
    old = e.file
    nf = ImageFile(path, writable=True)
    for key, val in list(img._files.items()):
        if val is old:
            img._files[key] = nf
    if img.file is old:
        img.file = nf
    old.close()
    ne = SparseExtent(nf, True)
    img._extents[i] = ne
    if img._desc_home is e:
        img._desc_home = ne


# == check ============================================================================

def check(img, repair: Optional[str] = None) -> CheckResult:
    from vdtool.formats.vmdk import FlatExtent

    if repair not in (None, "leaks", "all"):
        raise UsageError(f"check repair mode must be None, 'leaks' or 'all', not {repair!r}")
    if repair and not img.writable:
        raise ReadOnlyError("image is opened read-only; it must be opened for writing to repair it", img.path)
    res = CheckResult()
    res.total_clusters = 0
    res.allocated_clusters = 0
    res.compressed_clusters = 0
    fix = repair == "all"
    try:
        if img.writable:
            img.flush()
        desc_changed = False
        lines = img._desc.extents if img._desc_home == "file" else img._desc.extents[:1]
        for k, e in enumerate(img._extents):
            el = lines[k] if k < len(lines) else None
            name = os.path.basename(e.path) if e.path else f"extent {k}"
            if el is not None and el.sectors != e.capacity and isinstance(e, SparseExtent):
                # A sparse extent's size is its header's capacity; resize
                # writes the header, then the descriptor, so an interrupted
                # resize leaves a stale size in the descriptor: harmless, and
                # -r leaks writes the header's size there.
                res.leaks += 1
                res.messages.append(f"Leaked: descriptor gives extent {name} {el.sectors} sectors, its header "
                                    f"{e.capacity} (the header's size is used)")
                if repair:
                    el.sectors = e.capacity
                    desc_changed = True
                    res.leaks_fixed += 1
            if isinstance(e, SparseExtent):
                _check_sparse(e, res, fix, name, fix_leaks=repair is not None)
                res.image_end_offset = e.file.size()
            elif isinstance(e, FlatExtent):
                need = e.file_offset + e.size
                have = e.file.size()
                if have < need:
                    res.corruptions += 1
                    res.messages.append(f"ERROR: flat extent {name} is {have} bytes, shorter than the {need} "
                                        f"bytes the descriptor names")
                    if fix:
                        e.file.truncate(need)
                        res.corruptions_fixed += 1
        if desc_changed:
            img._write_descriptor()
        if img.writable:
            img.flush()
    except VdError as ex:
        res.check_errors += 1
        res.messages.append(f"ERROR: {ex}")
    except (ValueError, OverflowError, IndexError, KeyError, MemoryError) as ex:
        res.check_errors += 1
        res.messages.append(f"ERROR: internal check failure: {type(ex).__name__}: {ex}")
    return res


def _copy_table_to_redundant(e: SparseExtent, ti: int) -> None:
    """Give redundant directory entry ``ti`` a table of its own, a copy of
    the primary's (after an unclean shutdown left it empty)."""
    area = e.gt_sectors * SECTOR
    off = e._alloc(area)
    e.file.pwrite(off, le_u32_bytes(e.gt(ti)).ljust(area, b"\0"))
    e.file.flush()
    e.rgd[ti] = off // SECTOR
    e.reset_scans()
    e.write_directories()
    e.file.flush()


_LOOSE_LIMIT = 1 << 16  # more loose entries than this: the entry-by-entry walk


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


def _check_sparse(e: SparseExtent, res: CheckResult, fix: bool, name: str, fix_leaks: bool = False) -> None:
    repair_leaks = fix or fix_leaks
    fs = e.file.size()
    gb = e.grain_bytes
    total_grains = ceil_div(e.size, gb)
    res.total_clusters += total_grains
    reserved = _metadata_ranges(e)
    gtb = e.gt_sectors * SECTOR
    # grain tables: in the file, not shared, primary and redundant in step
    gscan, rscan = e.table_scan(), e.rgd_scan()
    dirs = [(d, what, scan) for d, what, scan in ((e.gd, "grain directory", gscan),
                                                  (e.rgd, "redundant grain directory", rscan)) if d is not None]
    # Directories in runs of tables at a fixed stride (what qemu-img, VMware
    # and VirtualBox write; a 64 TiB extent has 2M entries) are not walked
    # entry by entry: a run's entries are distinct and increasing, so when
    # the runs (and the few loose entries) cover value ranges apart from
    # each other no table is shared, and those past the end of the file are
    # the tail of a run.
    few_loose = all(scan.loose_count <= _LOOSE_LIMIT for d, what, scan in dirs)
    apart = False
    if few_loose:
        spans = []
        for d, what, scan in dirs:
            for i0, i1, first, stride in scan.segs:
                spans += [(first, d[i1 - 1])] if stride else [(v, v) for v in d[i0:i1] if v]
        spans.sort()
        apart = all(spans[k][1] < spans[k + 1][0] for k in range(len(spans) - 1))
    if apart:
        limit = (fs - gtb) // SECTOR  # v * SECTOR + gtb > fs  <=>  v > limit
        for d, what, scan in dirs:
            for i0, i1, first, stride in scan.segs:
                past = range(bisect.bisect_right(d, limit, i0, i1), i1) if stride else [
                    ti for ti in range(i0, i1) if d[ti] and d[ti] > limit]
                for ti in past:
                    res.corruptions += 1
                    res.messages.append(f"ERROR: {name}: {what} entry {ti} points past the end of the file")
    else:
        seen = {}
        for d, what, scan in dirs:
            for ti, v in enumerate(d):
                if not v:
                    continue
                if v * SECTOR + gtb > fs:
                    res.corruptions += 1
                    res.messages.append(f"ERROR: {name}: {what} entry {ti} points past the end of the file")
                if v in seen:
                    res.corruptions += 1
                    res.messages.append(f"ERROR: {name}: {what} entry {ti} and {seen[v]} share the grain table "
                                        f"at sector {v}")
                seen[v] = f"{what} entry {ti}"
    if e.rgd is not None:
        # Inside runs both entries are non-zero and a pair of tables that are
        # both empty (holes, or zeros) agrees: only pairs where either side
        # may hold entries, and loose entries (which may be zero), are looked at.
        n = e.gd_entries
        if few_loose:
            loose = sorted({ti for scan in (gscan, rscan) for i0, i1, first, stride in scan.segs if not stride
                            for ti in range(i0, i1)})
            pairs = _unique(heapq.merge(loose, _tables_in_either(gscan, rscan, n)))
        else:
            pairs = range(n)
        for ti in pairs:
            a, b = e.gd[ti], e.rgd[ti]
            if (a == 0) != (b == 0):
                if e.unclean and a and not b:
                    # the primary directory is written first: a new table the
                    # redundant directory does not know yet (unclean shutdown)
                    res.leaks += 1
                    res.messages.append(f"Leaked: {name}: redundant grain directory entry {ti} is stale "
                                        f"(unclean shutdown)")
                    if fix or fix_leaks:
                        _copy_table_to_redundant(e, ti)
                        res.leaks_fixed += 1
                    continue
                res.corruptions += 1
                res.messages.append(f"ERROR: {name}: grain directory entry {ti} is {a}, redundant entry {b}")
                continue
            if not a:
                continue
            t = le_u32_bytes(e.gt(ti))
            rt = e.file.pread(b * SECTOR, e.gt_bytes)
            if t != rt and e.unclean and a != b:
                # after an unclean shutdown the redundant copy may lag the
                # primary (written first, see flush_metadata): harmless
                res.leaks += 1
                res.messages.append(f"Leaked: {name}: redundant grain table {ti} is stale (unclean shutdown)")
                if fix or fix_leaks:
                    e.file.pwrite(b * SECTOR, t)
                    res.leaks_fixed += 1
            elif t != rt:
                res.corruptions += 1
                res.messages.append(f"ERROR: {name}: grain table {ti} differs from its redundant copy")
                if fix:
                    e.file.pwrite(b * SECTOR, t)
                    res.corruptions_fixed += 1
    # grain table entries: in range, not into metadata, no grain used twice, markers sane
    owners = {}
    starts = [a for a, b in reserved]
    for g, v in list(e.all_gtes()):
        if v == GTE_ZERO and e.zero_grain:
            continue
        bad = None
        h = v * SECTOR
        if g >= total_grains:
            # what an interrupted shrink leaves (the header's smaller
            # capacity is written first): out of sight, so a leak
            res.leaks += 1
            res.messages.append(f"Leaked: {name}: grain table entry for grain {g} lies beyond the disk's "
                                f"{total_grains} grains")
            if repair_leaks:
                e._set_gte(g, 0)
                e._released.clear()
                res.leaks_fixed += 1
            continue
        elif h >= fs:
            bad = f"grain {g} at sector {v} points past the end of the file ({fs} bytes)"
        else:
            span = gb
            if e.compressed:
                span = SECTOR
                if e.markers:
                    lba, size = sp.GRAIN_MARKER.unpack(e.file.pread(h, sp.GRAIN_MARKER.size).ljust(12, b"\0"))
                    if lba != g * e.grain:
                        bad = f"grain {g} at sector {v} has a marker for sector {lba}"
                    elif size == 0 or h + sp.GRAIN_MARKER.size + size > fs:
                        bad = f"compressed grain {g} at sector {v} has size {size}, past the end of the file"
                    span = sp.GRAIN_MARKER.size + size
            j = bisect.bisect_right(starts, h) - 1
            if bad is None:
                for a, b in reserved[max(0, j):j + 3]:
                    if a < h + span and h < b:
                        bad = f"grain {g} at sector {v} overlaps metadata at bytes {a}..{b}"
                        break
            if bad is None and v in owners:
                res.corruptions += 1
                res.messages.append(f"ERROR: {name}: grain {g} and grain {owners[v]} share sector {v}")
                if fix and not e.compressed:
                    data = e.read_grain_raw(v)
                    nh = e._alloc(gb)
                    e.file.pwrite(nh, data)
                    e.file.flush()
                    e._set_gte(g, nh // SECTOR)
                    e._released.clear()
                    res.corruptions_fixed += 1
                continue
        if bad:
            res.corruptions += 1
            res.messages.append(f"ERROR: {name}: {bad}")
            if fix:
                e._set_gte(g, 0)
                e._released.clear()
                res.corruptions_fixed += 1
            continue
        owners[v] = g
        res.allocated_clusters += 1
        if e.compressed:
            res.compressed_clusters += 1
    e.flush_metadata()
    if fix or fix_leaks:
        e.reset_scans()  # redundant tables may have been rewritten in place
    if (fix or fix_leaks) and e.unclean and e.writable:
        e.unclean = 0  # the redundant tables are in step again
        e.file.pwrite(0, e.header_bytes())
        e.file.flush()

"""QCOW2 compact: clusters that read as zeros stop being stored, the
highest clusters move down into free space, and the file is cut after the
last used cluster.  With internal snapshots only what the active image
alone uses (OFLAG_COPIED: refcount 1) is released or moved; what a
snapshot shares stays where it is."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import UnsupportedFeature, VdError
from vdtool.core.progress import Progress
from vdtool.formats.qcow2.check import run_check
from vdtool.formats.qcow2.layout import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                                         OFLAG_ZERO, REFT_OFFSET_MASK, SC_ALLOC_ALL, SC_ZERO_ALL)
from vdtool.formats.qcow2.resize import truncate_to_used

COMPACT_BATCH = 4096  # clusters moved between flushes


def run_compact(st, refcounts, clusters, progress: Progress) -> None:
    clusters.flush_metadata()
    _release_zero_clusters(st, clusters, progress.sub(0, 40))
    clusters.flush_metadata()
    _move_clusters_down(st, refcounts, clusters, progress.sub(40, 55))
    clusters.flush_metadata()
    res = CheckResult()
    run_check(st, refcounts, clusters, res, "leaks")
    if res.check_errors or res.corruptions:
        raise VdError("compact: the image has inconsistencies (" + "; ".join(res.messages[:3]) +
                      "); run 'vdtool check -r all' first", st.path)
    truncate_to_used(st, refcounts, clusters)
    progress.update(1, 1)


# -- zero clusters ---------------------------------------------------------------------------

def _release_zero_clusters(st, clusters, progress: Progress) -> None:
    """Clusters whose data is all zeros stop being stored: unallocated in a
    standalone image, zero flag in a v3 overlay (a v2 overlay keeps them)."""
    w = st.l2_words
    has_backing = bool(st.backing_name)
    if has_backing and st.version < 3:
        return
    chunk = max(1, (4 << 20) >> st.cb)
    mv = memoryview(bytearray(chunk << st.cb))
    n_l1 = st.l1_size
    for l1i in range(n_l1):
        off = st.l1[l1i] & L1E_OFFSET_MASK
        progress.update(l1i, n_l1)
        if not off:
            continue
        found = _zero_entries(st, clusters, clusters.l2_table(off), chunk, mv)
        if not found:
            continue
        tbl = clusters.l2_for_write(l1i)
        for idx in found:
            e = tbl[idx * w]
            if has_backing:
                tbl[idx * w] = OFLAG_ZERO if w == 1 else 0
                if w == 2:
                    tbl[idx * 2 + 1] = SC_ZERO_ALL
            else:
                tbl[idx * w] = 0
                if w == 2:
                    tbl[idx * 2 + 1] = 0
            clusters.release_entry(e)
        clusters.maybe_flush()


def _zero_entries(st, clusters, tbl, chunk: int, mv) -> list:
    """Indexes of one L2 table's entries whose clusters hold only zeros;
    runs of host-contiguous allocated clusters are read a few MiB at a time."""
    cb = st.cb
    w = st.l2_words
    zero = zeros(st.cs)
    out = []
    idx = 0
    nent = st.l2_entries
    while idx < nent:
        e = tbl[idx * w]
        if e & OFLAG_COMPRESSED:
            try:
                if clusters.decompress(e) == zero:
                    out.append(idx)
            except (VdError, UnsupportedFeature):
                pass
            idx += 1
            continue
        host = e & L2E_OFFSET_MASK
        if not host or not e & OFLAG_COPIED:
            idx += 1
            continue
        if w == 1 and e & OFLAG_ZERO:
            out.append(idx)  # preallocated zero cluster: drop the preallocation
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
        st.check_data_cluster(host)
        n = j - idx
        st.file.readinto(host, mv[:n << cb])
        for k in range(n):
            if mv[k << cb:(k + 1) << cb] == zero:
                out.append(idx + k)
        idx = j
    return out


# -- moving clusters down --------------------------------------------------------------------

def _used_clusters(st, refcounts) -> int:
    E = st.rc.entries
    used = 0
    for e in st.rt:
        off = e & REFT_OFFSET_MASK
        if off:
            used += E - refcounts.block(off).count(0)
    return used


def _movable(st, clusters, target: int) -> dict:
    """Clusters at or past ``target`` that can move: cluster -> (kind, index,
    L2 index) with kind 0 data, 1 L2 table, 2 refcount block."""
    cb = st.cb
    w = st.l2_words
    owners: dict = {}
    for l1i in range(st.l1_size):
        le = st.l1[l1i]
        off = le & L1E_OFFSET_MASK
        if not off:
            continue
        if not le & OFLAG_COPIED:
            continue  # shared with a snapshot: never moved
        if off >> cb >= target:
            owners[off >> cb] = (1, l1i, 0)
        tbl = clusters.l2_table(off)
        for idx in range(0, len(tbl), w):
            e = tbl[idx]
            host = e & L2E_OFFSET_MASK
            if host and not e & OFLAG_COMPRESSED and e & OFLAG_COPIED and host >> cb >= target:
                owners[host >> cb] = (0, l1i, idx)
    for rti, e in enumerate(st.rt):
        off = e & REFT_OFFSET_MASK
        if off and off >> cb >= target:
            owners[off >> cb] = (2, rti, 0)
    return owners


def _holes(st, refcounts, target: int):
    """Free clusters below ``target``, lowest first."""
    E = st.rc.entries
    shift = st.rb_shift
    c = 1
    while c < target:
        rti = c >> shift
        off = st.rt[rti] & REFT_OFFSET_MASK if rti < len(st.rt) else 0
        if not off:
            yield c
            c += 1
            continue
        blk = refcounts.block(off)
        try:
            i = blk.index(0, c & (E - 1))
        except ValueError:
            c = (rti + 1) << shift
            continue
        c = (rti << shift) + i
        if c < target:
            yield c
        c += 1


def _move_clusters_down(st, refcounts, clusters, progress: Progress) -> None:
    """Fill free clusters low in the file with the highest movable clusters
    (data clusters, L2 tables, refcount blocks).  Each batch: copy, flush,
    repoint, flush, free the old places: a crash leaves old or new, plus leaks."""
    target = _used_clusters(st, refcounts)
    owners = _movable(st, clusters, target)
    if not owners:
        return
    sources = sorted(owners, reverse=True)
    total = len(sources)
    gen = _holes(st, refcounts, target)
    moved = 0
    buf = bytearray(st.cs)
    for src in sources:
        dst = next(gen, None)
        while dst is not None and refcounts.get(dst) != 0:
            dst = next(gen, None)
        if dst is None or dst >= src:
            break
        if not _move_one(st, refcounts, clusters, owners[src], src, dst, buf):
            continue
        moved += 1
        if moved % COMPACT_BATCH == 0:
            clusters.flush_metadata()
            progress.update(moved, total)
    clusters.flush_metadata()
    progress.update(total, total)


def _move_one(st, refcounts, clusters, owner: tuple, src: int, dst: int, buf) -> bool:
    """Move cluster ``src`` to the free cluster ``dst`` and repoint its owner."""
    cb = st.cb
    kind, a, idx = owner
    src_off, dst_off = src << cb, dst << cb
    refcounts.update(dst, 1, 1)
    if kind == 0:
        tbl = clusters.l2_for_write(a)
        e = tbl[idx]
        if (e & L2E_OFFSET_MASK) != src_off:
            refcounts.update(dst, 1, -1)
            return False
        st.file.readinto(src_off, buf)
        st.file.pwrite(dst_off, buf)
        st.note_written(dst_off + st.cs)
        st.data_dirty = True
        tbl[idx] = (e & ~L2E_OFFSET_MASK) | dst_off
    elif kind == 1:
        tbl = clusters.l2_table(src_off)
        st.l2_cache.pop(src_off, None)
        st.l2_dirty.discard(src_off)
        st.l2_cache[dst_off] = tbl
        st.l2_dirty.add(dst_off)
        st.l1[a] = dst_off | (st.l1[a] & OFLAG_COPIED)
        st.l1_dirty.add(a)
    else:
        blk = refcounts.block(src_off)
        st.rb_cache.pop(src_off, None)
        st.rb_dirty.discard(src_off)
        st.rb_cache[dst_off] = blk
        st.rb_dirty.add(dst_off)
        st.rt[a] = dst_off
        st.rt_dirty.add(a)
    st.meta_index = None
    refcounts.defer_free(src, 1)
    return True

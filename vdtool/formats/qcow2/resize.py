"""Growing and shrinking a qcow2 image, and cutting the file to what its
refcounts say is used (shrink and compact).

Growing an overlay does not mark the new area as zeros: a parent larger
than the old size shows through there (the stack decides about parents)."""

from __future__ import annotations

from vdtool.core.backend import Status
from vdtool.core.bytesutil import ceil_div
from vdtool.core.errors import NotSupported, UsageError
from vdtool.formats.qcow2.layout import (L1E_OFFSET_MASK, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE, REFT_OFFSET_MASK,
                                         SECTOR)


def resize(st, refcounts, clusters, writer, new_size: int) -> None:
    """Change the virtual size (whole sectors, as QEMU keeps)."""
    writer.begin()
    new_size = ceil_div(int(new_size), SECTOR) * SECTOR
    if new_size < 0 or new_size > MAX_VIRTUAL_SIZE:
        raise UsageError(f"qcow2 image size {new_size} is outside 0..{MAX_VIRTUAL_SIZE}")
    old_size = st.size
    if new_size == old_size:
        return
    if st.nb_snapshots and st.version < 3:
        # as qemu-img: a version 3 image records each snapshot's disk size, a version 2 image may not
        raise NotSupported("resizing", "qcow2 version 2", st.path, "the image has internal snapshots")
    if new_size > old_size:
        _grow(st, clusters, writer, old_size, new_size)
    else:
        _shrink(st, refcounts, clusters, writer, old_size, new_size)


def _grow(st, clusters, writer, old_size: int, new_size: int) -> None:
    cs = st.cs
    need = ceil_div(new_size, cs << st.l2_bits)
    if need > MAX_L1_ENTRIES:
        raise UsageError(f"qcow2 image size {new_size} needs an L1 table of {need} entries, above the "
                         f"limit of {MAX_L1_ENTRIES}")
    tail = min(new_size, ceil_div(old_size, cs) * cs) - old_size
    clusters.flush_metadata()
    clusters.grow_l1(need)
    st.size = new_size
    if tail:
        # bytes past the old end inside the last cluster must read as zeros
        _zero_partial_raw(st, clusters, writer, old_size, tail)
    clusters.flush_metadata()
    st.write_size_l1()


def _shrink(st, refcounts, clusters, writer, old_size: int, new_size: int) -> None:
    # the smaller size goes into the header first, so a crash while the
    # part past it is zeroed and released leaves the new content (and at
    # worst leaked clusters), never a disk of the old size with part of
    # its end already gone.
    cs = st.cs
    clusters.flush_metadata()
    st.size = new_size
    st.write_size_l1()
    # then zero the tail of the new last cluster, drop every cluster past it
    tail = ceil_div(new_size, cs) * cs - new_size
    if tail:
        st.size = old_size  # (the zeroing writes past the new end)
        try:
            _zero_partial_raw(st, clusters, writer, new_size, min(tail, old_size - new_size))
        finally:
            st.size = new_size
    _drop_clusters(st, clusters, ceil_div(new_size, cs), ceil_div(old_size, cs))
    st.size = new_size
    clusters.flush_metadata()
    st.write_size_l1()
    clusters.flush_metadata()
    truncate_to_used(st, refcounts, clusters)


def _drop_clusters(st, clusters, first_gone: int, last: int) -> None:
    """Guest clusters first_gone..last-1 stop being mapped (whole L2 tables
    where they cover one)."""
    l2b = st.l2_bits
    w = st.l2_words
    l2mask = st.l2_entries - 1
    ci = first_gone
    while ci < last:
        l1i = ci >> l2b
        stop = min(last, (l1i + 1) << l2b)
        off = st.l1[l1i] & L1E_OFFSET_MASK
        if off:
            if ci == l1i << l2b:
                tbl = clusters.l2_table(off)
                for idx in range(0, st.l2_entries * w, w):
                    if tbl[idx]:
                        clusters.release_entry(tbl[idx])
                clusters.drop_l2(l1i, off)
            else:
                tbl = clusters.l2_for_write(l1i)
                for k in range(ci, stop):
                    idx = (k & l2mask) * w
                    if tbl[idx]:
                        clusters.release_entry(tbl[idx])
                    tbl[idx] = 0
                    if w == 2:
                        tbl[idx + 1] = 0
        ci = stop


def _zero_partial_raw(st, clusters, writer, offset: int, length: int) -> None:
    s, n = clusters.block_status(offset, length)
    if s == Status.ZERO and n >= length:
        return
    if s == Status.UNALLOCATED and n >= length and not st.backing_name:
        return
    writer.write(offset, memoryview(bytes(length)))


def _drop_empty_refblocks(st, refcounts, clusters) -> None:
    """Refcount blocks that count nothing but themselves are released, so
    the file can end where the data ends (QEMU's reftable shrink)."""
    clusters.flush_metadata()
    E = st.rc.entries
    shift = st.rb_shift
    dropped = []
    for rti in range(len(st.rt)):
        off = st.rt[rti] & REFT_OFFSET_MASK
        if not off or rti == 0:
            continue
        blk = refcounts.block(off)
        own = off >> st.cb
        nzero = blk.count(0)
        if nzero == E or (nzero == E - 1 and own >> shift == rti and blk[own & (E - 1)] == 1):
            st.rt[rti] = 0
            st.rt_dirty.add(rti)
            dropped.append((off, own))
    if not dropped:
        return
    refcounts.write_blocks()  # table entries cleared on disk before the blocks are reused
    st.sync()
    for off, own in dropped:
        st.rb_cache.pop(off, None)
        if own >> shift < len(st.rt) and st.rt[own >> shift] & REFT_OFFSET_MASK:
            refcounts.defer_free(own, 1)
    st.meta_index = None
    st.free_hint = 1
    clusters.flush_metadata()


def truncate_to_used(st, refcounts, clusters) -> None:
    """Cut the file after the last cluster with a refcount."""
    _drop_empty_refblocks(st, refcounts, clusters)
    end = (refcounts.last_used_cluster() + 1) << st.cb
    # only ever cut: a file qemu made may end inside the L1 table's last cluster
    if end < st.file_size:
        st.file.truncate(end)
        st.file_size = end
        st.alloc_end = ceil_div(end, st.cs)
        st.free_hint = min(st.free_hint, st.alloc_end)

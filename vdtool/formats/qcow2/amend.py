"""qcow2 amend: the header options qemu-img amend changes in place.

- ``compat``: 0.10 -> 1.1 rewrites the header as version 3; 1.1 -> 0.10
  (refused where a version 2 image cannot say the same: refcount_bits
  other than 16, extended L2, zstd, an external data file) first turns
  every zero cluster into what version 2 can express (unallocated without
  a backing file, else a cluster of zeros), then rewrites the header.
- ``lazy_refcounts``: the compatible feature bit (a dirty image was
  already repaired by the writable open).
- ``refcount_bits``: a new refcount table and blocks at the new width,
  written past the end of the file and flushed before one header write
  switches to them; the old ones are freed after.  A crash leaves the old
  structures intact, or leaked clusters at worst.
- ``size``: as resize (images without a backing file).

qemu-img 7.2's order: upgrade, refcount width, lazy refcounts, size,
downgrade; every refusal that depends only on the options and the header
is made before anything is written."""

from __future__ import annotations

import sys
from array import array

from vdtool.core.bytesutil import ceil_div
from vdtool.core.errors import NotSupported, UnsupportedFeature, VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qcow2 import header, snapshot
from vdtool.formats.qcow2.layout import (ADDITIONAL_FIELDS_V3, CHECK_MAX_CLUSTERS, COMPAT_LAZY_REFCOUNTS,
                                         COMPRESSION_ZLIB, EXT_DATA_FILE, EXT_FEATURE_TABLE, INCOMPAT_DATA_FILE,
                                         INCOMPAT_DIRTY,
                                         L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                                         OFLAG_COPIED, REFT_OFFSET_MASK, V2_HEADER_LENGTH,
                                         V3_HEADER_LENGTH, feature_table_bytes)
from vdtool.formats.qcow2.refcount import RefCodec, write_fresh_structures

COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
# qemu-img amend's qcow2 options vdtool does not change, and why
NOT_AMENDABLE = {
    "backing_file": "changing the backing file is not supported by amend; use 'vdtool rebase' instead",
    "backing_fmt": "changing the backing format is not supported by amend; use 'vdtool rebase' instead",
    "data_file": "data-file can only be set for images that use an external data file (vdtool refuses those)",
    "data_file_raw": "data_file_raw can only be set for images that use an external data file (vdtool refuses "
                     "those)",
}
_LOW_BYTE = 0 if sys.byteorder == "little" else 7  # bits 0-7 of a native 'Q' item
_BIT0 = bytes(b & 1 for b in range(256))


class Plan:
    """The options checked against the image before anything changes."""

    def __init__(self, st, opts: dict):
        path = st.path
        self.version = st.version
        if "compat" in opts:
            v = COMPAT_LEVELS.get(str(opts["compat"]).strip())
            if v is None:
                raise VdError(f"unknown compatibility level {opts['compat']!r} (choose 0.10 or 1.1)", path)
            self.version = v
        self.order = st.refcount_order
        if "refcount_bits" in opts:
            bits = opts["refcount_bits"]
            if bits < 1 or bits > 64 or bits & (bits - 1):
                raise VdError(f"refcount width must be a power of two and may not exceed 64 bits (not {bits})",
                              path)
            if self.version < 3 and bits != 16:
                raise VdError("refcount widths other than 16 bits require compatibility level 1.1 or above "
                              "(use compat=1.1 or greater)", path)
            self.order = bits.bit_length() - 1
        self.lazy = opts.get("lazy_refcounts")
        if self.lazy and self.version < 3:
            raise VdError("lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
                          "or greater)", path)
        self.size = opts.get("size")
        if self.size is not None and self.size != st.size and st.backing_name:
            raise NotSupported("changing the size with amend", "qcow2", path,
                               "the image has a backing file; use 'vdtool resize' instead")
        if self.version < st.version:
            _downgrade_refusals(st, self.order)


def _downgrade_refusals(st, order: int) -> None:
    path = st.path
    if order != 4:
        raise VdError(f"compat=0.10 requires refcount_bits=16 (the image has {1 << order})", path)
    if st.incompat & INCOMPAT_DATA_FILE or any(t == EXT_DATA_FILE for t, _ in st.exts):
        raise VdError("cannot downgrade an image with a data file", path)
    if st.compression_type != COMPRESSION_ZLIB:
        # version 2 has no compression_type field: its readers would take zstd clusters for deflate
        raise VdError("cannot downgrade an image with zstd compression type to compat=0.10 (version 2 images "
                      "can only hold zlib-compressed clusters)", path)
    other = st.incompat & ~INCOMPAT_DIRTY
    if other:
        raise VdError(f"cannot downgrade an image with incompatible features {other:#x} set", path)


def run(st, refcounts, clusters, backend, opts: dict, progress: Progress = NO_PROGRESS) -> list:
    """Apply ``opts`` (typed amend options) to the open image; returns
    (key, old, new) for what changed."""
    plan = Plan(st, opts)
    changes = []
    clusters.flush_metadata()
    if plan.version > st.version:
        _set_version(st, 3)
        changes.append(("compat", "0.10", "1.1"))
    if plan.order != st.refcount_order:
        old = 1 << st.refcount_order
        change_refcount_order(st, refcounts, clusters, plan.order, progress.sub(0, 60))
        changes.append(("refcount_bits", old, 1 << plan.order))
    if plan.lazy is not None and st.version >= 3 and bool(st.compat & COMPAT_LAZY_REFCOUNTS) != plan.lazy:
        value = st.compat | COMPAT_LAZY_REFCOUNTS if plan.lazy else st.compat & ~COMPAT_LAZY_REFCOUNTS
        st.write_header_fields("compatible_features", "compatible_features", compatible_features=value)
        st.compat = value
        changes.append(("lazy_refcounts", not plan.lazy, plan.lazy))
    if plan.size is not None and plan.size != st.size:
        old = st.size
        backend.resize(plan.size)
        clusters.flush_metadata()
        changes.append(("size", old, st.size))
    if plan.version < st.version:
        _clean_for_downgrade(st, clusters)
        expand_zero_clusters(st, refcounts, clusters, progress.sub(60, 40))
        _set_version(st, 2)
        changes.append(("compat", "1.1", "0.10"))
    return changes


# -- the version ---------------------------------------------------------------------------

def _set_version(st, version: int) -> None:
    """Rewrite the whole header as ``version`` (one write in the first
    cluster, then a sync); the state follows once it is on disk."""
    saved = (st.version, st.header_length, st.header_extra, st.exts, st.incompat, st.compat, st.autoclear)
    if version >= 3:
        st.version = 3
        st.header_extra = bytes(ADDITIONAL_FIELDS_V3)
        st.header_length = V3_HEADER_LENGTH + ADDITIONAL_FIELDS_V3
        exts = [list(x) for x in st.exts if x[0] != EXT_FEATURE_TABLE]
        if st.cs > 4096:  # as create (and qemu-img) lay out a version 3 header
            exts.append([EXT_FEATURE_TABLE, feature_table_bytes()])
        st.exts = exts
        st.refcount_order = 4
    else:
        st.version = 2
        st.header_extra = b""
        st.header_length = V2_HEADER_LENGTH
        st.exts = [list(x) for x in st.exts if x[0] != EXT_FEATURE_TABLE]
        st.incompat = st.compat = st.autoclear = 0
    try:
        raw = header.whole_header(st, st.exts, header.backing_name_bytes(st.backing_name))
        if len(raw) > st.cs:
            raise UnsupportedFeature(f"the version {version} header needs {len(raw)} bytes, more than the first "
                                     f"cluster ({st.cs} bytes)", st.path)
        st.file.pwrite(0, raw + bytes(max(0, st.header_used - len(raw))))
        st.sync()
    except BaseException:
        (st.version, st.header_length, st.header_extra, st.exts, st.incompat, st.compat, st.autoclear) = saved
        raise
    st.header_used = len(raw)
    st.features = {}


def _clean_for_downgrade(st, clusters) -> None:
    """Everything on disk, and no dirty bit of this session left to clear
    later (a version 2 header has no feature fields)."""
    clusters.flush_metadata()
    if st.incompat & INCOMPAT_DIRTY:
        st.set_incompat(st.incompat & ~INCOMPAT_DIRTY)
    st.set_dirty_on_write = False
    if st.autoclear:
        # zero clusters are about to be written without updating bitmaps
        st.write_header_fields("autoclear_features", "autoclear_features", autoclear_features=0)
        st.autoclear = 0


def _zero_indexes(tbl: array):
    """Indexes of the entries with the zero flag (bit 0) set; compressed
    entries are left to the caller."""
    low = tbl.tobytes()[_LOW_BYTE::8].translate(_BIT0)
    i = low.find(1)
    while i >= 0:
        yield i
        i = low.find(1, i + 1)


def _has_zero(tbl: array) -> bool:
    return any(not tbl[i] & OFLAG_COMPRESSED for i in _zero_indexes(tbl))


def expand_zero_clusters(st, refcounts, clusters, progress: Progress = NO_PROGRESS) -> None:
    """No zero flags left in the active L2 tables: a zero cluster becomes
    unallocated where nothing shows through (no backing file), else a
    cluster of zeros (its preallocated one, or a new one).  Data first,
    then the tables (the ordered metadata flush)."""
    if st.nb_snapshots:
        for sn in st.snapshots:
            for e in snapshot.l1_table(st, sn):
                off = e & L1E_OFFSET_MASK
                if off and _has_zero(clusters.l2_table(off)):
                    raise NotSupported("downgrading to compat=0.10", "qcow2", st.path,
                                       f"internal snapshot {sn['name']!r} has zero clusters; not supported yet")
    cs, cb = st.cs, st.cb
    zeros = bytes(cs)
    backing = bool(st.backing_name)
    n = len(st.l1)
    for l1i in range(n):
        off = st.l1[l1i] & L1E_OFFSET_MASK
        if not off or not _has_zero(clusters.l2_table(off)):
            continue
        if st.nb_snapshots:
            raise NotSupported("downgrading to compat=0.10", "qcow2", st.path,
                               "the image has internal snapshots and zero clusters; not supported yet")
        tbl = clusters.l2_for_write(l1i)
        for i in list(_zero_indexes(tbl)):
            e = tbl[i]
            if e & OFLAG_COMPRESSED:
                continue
            host = e & L2E_OFFSET_MASK
            if host:
                st.check_data_cluster(host, "zero cluster")
                tbl[i] = host | (e & OFLAG_COPIED)
            elif backing:
                host = refcounts.alloc_clusters(1) << cb
                tbl[i] = host | OFLAG_COPIED
            else:
                tbl[i] = 0
                continue
            st.file.pwrite(host, zeros)
            st.note_written(host + cs)
            st.data_dirty = True
        clusters.maybe_flush()
        progress.update(l1i + 1, n)
    clusters.flush_metadata()


# -- the refcount width --------------------------------------------------------------------

def change_refcount_order(st, refcounts, clusters, order: int, progress: Progress = NO_PROGRESS) -> None:
    """Rebuild the refcount structures with 2**order-bit entries."""
    clusters.flush_metadata()
    cs, cb = st.cs, st.cb
    n = max(st.alloc_end, ceil_div(st.file.size(), cs), refcounts.last_used_cluster() + 1)
    if n > CHECK_MAX_CLUSTERS:
        raise UnsupportedFeature(f"the image file has {n} clusters, more than amend can count "
                                 f"({CHECK_MAX_CLUSTERS})", st.path)
    old = refcounts.stored(0, n)
    codec = RefCodec(order, cs)
    if old and max(old) > codec.max:
        ci = next(i for i, v in enumerate(old) if v > codec.max)
        raise VdError(f"cannot decrease refcount entry width to {codec.bits} bits: cluster at offset {ci << cb:#x} "
                      f"has a refcount of {old[ci]}", st.path)
    progress.update(1, 4)
    rt, rt_off, T, end = write_fresh_structures(st, old, codec, n)  # flushed before the header names them
    st.note_written(end << cb)
    progress.update(2, 4)
    old_rt_off, old_rt_clusters = st.rt_offset, st.rt_clusters
    old_blocks = sorted({e & REFT_OFFSET_MASK for e in st.rt if e & REFT_OFFSET_MASK})
    refcounts.switch_table(rt, rt_off, T, end, order=order)  # one header write: table and width
    header.set_geometry(st, cb, st.extl2, order)
    st.free_hint = 1
    st.free_byte_offset = 0
    progress.update(3, 4)
    # the old table and blocks are free now (a crash before this leaks them)
    freed = refcounts.update(old_rt_off >> cb, old_rt_clusters, -1)
    for off in old_blocks:
        freed += refcounts.update(off >> cb, 1, -1)
    refcounts.write_blocks()
    st.sync()
    refcounts.punch(freed)
    progress.update(4, 4)

"""Creating a qcow2 image, laid out as qemu-img 7.2 does: header, refcount
table, one refcount block, then the L1 table through the allocator (and,
preallocated, every L2 table and data cluster)."""

from __future__ import annotations

from array import array

from vdtool.core.bytesutil import be_bytes, ceil_div
from vdtool.core.errors import UsageError
from vdtool.core.progress import Progress
from vdtool.core.registry import qemu_driver_name
from vdtool.formats.qcow2.header import backing_name_bytes, set_geometry, whole_header
from vdtool.formats.qcow2.codec import check_level, zstd_module
from vdtool.formats.qcow2.layout import (ADDITIONAL_FIELDS, ADDITIONAL_FIELDS_V3, COMPAT_LAZY_REFCOUNTS,
                                         COMPRESSION_ZLIB, COMPRESSION_ZSTD, EXT_BACKING_FORMAT,
                                         EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAX_L1_ENTRIES,
                                         MAX_VIRTUAL_SIZE,
                                         OFLAG_COPIED, SC_ALLOC_ALL, SECTOR, V3_HEADER_LENGTH,
                                         feature_table_bytes, l2_bits)

# options create takes from qemu-img's set but leaves to others
_PASSED_THROUGH = ("preallocation", "backing_fmt", "backing_file", "cache")


def create_options(declared: tuple, options: dict | None, block_size: int | None) -> dict:
    """The -o options of create (``declared``: the backend's FormatOptions),
    typed and checked against each other."""
    known = {o.name: o for o in declared}
    opts = {o.name: o.default for o in declared}
    for key, value in (options or {}).items():
        if key in _PASSED_THROUGH:
            continue
        if key not in known:
            raise UsageError(f"unknown qcow2 option {key!r} (valid options: {', '.join(sorted(known))})")
        opt = known[key]
        if isinstance(value, str) and opt.type is not str:
            value = opt.parse(value, "qcow2")
        opts[key] = value
    if block_size is not None:
        given = opts["cluster_size"] if "cluster_size" in (options or {}) else None
        if given is not None and given != known["cluster_size"].default and int(given) != block_size:
            raise UsageError(f"block size {block_size} and cluster_size {given} disagree")
        opts["cluster_size"] = block_size
    compat = {"v2": "0.10", "v3": "1.1"}.get(str(opts["compat"]), str(opts["compat"]))
    if compat not in ("0.10", "1.1"):
        raise UsageError(f"qcow2 option compat: invalid value {opts['compat']!r}; choose from 0.10, 1.1")
    opts["compat"] = compat
    cs = int(opts["cluster_size"])
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise UsageError(f"qcow2 cluster size {cs} is not a power of two from 512 to 2 MiB")
    opts["cluster_size"] = cs
    _check_combinations(opts, compat, cs)
    return opts


def _check_combinations(opts: dict, compat: str, cs: int) -> None:
    rb = int(opts["refcount_bits"])
    if rb not in (1, 2, 4, 8, 16, 32, 64):
        raise UsageError(f"qcow2 refcount_bits {rb} is not a power of two from 1 to 64")
    if compat == "0.10":
        if rb != 16:
            raise UsageError("qcow2 compat 0.10 requires refcount_bits 16")
        if opts["lazy_refcounts"]:
            raise UsageError("qcow2 lazy_refcounts needs compat 1.1")
        if opts["extended_l2"]:
            raise UsageError("qcow2 extended_l2 needs compat 1.1")
    if opts["extended_l2"] and cs < 16384:
        raise UsageError(f"qcow2 extended_l2 needs a cluster size of 16K or more (got {cs})")
    ctype = str(opts.get("compression_type", "zlib"))
    if ctype not in ("zlib", "zstd"):
        raise UsageError(f"qcow2 option compression_type: invalid value {ctype!r}; choose from zlib, zstd")
    if ctype != "zlib" and compat == "0.10":
        raise UsageError("qcow2 compression_type other than zlib needs compat 1.1")
    opts["compression_level"] = check_level(opts.get("compression_level"),
                                            COMPRESSION_ZSTD if ctype == "zstd" else COMPRESSION_ZLIB)


class Plan:
    """What a new image will be, checked before its file is made."""

    def __init__(self, size: int, opts: dict, parent):
        if (size is None or size == 0) and parent is not None and parent.size:
            size = parent.size
        size = ceil_div(int(size or 0), SECTOR) * SECTOR  # QEMU keeps whole sectors
        if size < 0 or size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"qcow2 image size {size} is outside 0..{MAX_VIRTUAL_SIZE}")
        self.size = size
        self.cs = opts["cluster_size"]
        self.cb = self.cs.bit_length() - 1
        self.extl2 = bool(opts["extended_l2"])
        self.l1_size = ceil_div(size, self.cs << l2_bits(self.cb, self.extl2))
        if self.l1_size > MAX_L1_ENTRIES:
            raise UsageError(f"qcow2 image size {size} needs an L1 table of {self.l1_size} entries, above the "
                             f"limit of {MAX_L1_ENTRIES}; use a larger cluster_size")
        self.version = 3 if opts["compat"] == "1.1" else 2
        self.backing = backing_name_bytes(parent.recorded_name) if parent is not None else None
        self.parent = parent
        self.refcount_order = opts["refcount_bits"].bit_length() - 1
        self.lazy_refcounts = bool(opts["lazy_refcounts"])
        self.compression_type = COMPRESSION_ZSTD if opts.get("compression_type") == "zstd" else COMPRESSION_ZLIB
        if self.compression_type == COMPRESSION_ZSTD:
            zstd_module()  # a missing binding is refused before any file is made


def lay_out(st, refcounts, clusters, plan: Plan, variant: str, progress: Progress) -> None:
    """Write the new image's metadata into ``st``'s (empty) file."""
    st.version = plan.version
    set_geometry(st, plan.cb, plan.extl2, plan.refcount_order)
    st.rt_offset, st.rt_clusters = plan.cs, 1
    if plan.version >= 3:
        st.incompat = (INCOMPAT_EXTL2 if plan.extl2 else 0) | (INCOMPAT_COMPRESSION if plan.compression_type else 0)
        st.compat = COMPAT_LAZY_REFCOUNTS if plan.lazy_refcounts else 0
        st.header_length = V3_HEADER_LENGTH + ADDITIONAL_FIELDS_V3  # compression_type and padding
        st.header_extra = ADDITIONAL_FIELDS.pack(compression_type=plan.compression_type).ljust(ADDITIONAL_FIELDS_V3,
                                                                                             b"\0")
        st.compression_type = plan.compression_type
    _write_first_clusters(st, plan)
    if plan.l1_size:
        clusters.grow_l1(plan.l1_size)
    st.size = plan.size
    st.write_size_l1()
    if variant != "sparse":
        _preallocate(st, refcounts, clusters, variant, progress)
    clusters.flush_metadata()


def _write_first_clusters(st, plan: Plan) -> None:
    """Header, refcount table and its one block (counting these three)."""
    parent = plan.parent
    cs = st.cs
    exts = []
    if parent is not None and parent.format:
        exts.append([EXT_BACKING_FORMAT, qemu_driver_name(parent.format).encode()])
    if plan.version >= 3 and cs > 4096:  # qemu-img 7.2 leaves the table out of small clusters
        exts.append([EXT_FEATURE_TABLE, feature_table_bytes()])
    st.exts = exts
    st.backing_name = parent.recorded_name if parent is not None else None
    st.backing_format = parent.format if parent is not None and parent.format else None
    hdr = whole_header(st, exts, plan.backing)
    if len(hdr) > cs:
        raise UsageError(f"the qcow2 header with its backing file name needs {len(hdr)} bytes, more than "
                         f"one {cs}-byte cluster; use a larger cluster_size or a shorter name")
    st.header_used = len(hdr)
    st.file.pwrite(0, hdr + bytes(cs - len(hdr)))
    rt = array("Q", bytes(cs))
    rt[0] = 2 * cs
    st.file.pwrite(cs, be_bytes(rt))
    blk = st.rc.new()
    for c in range(3):
        blk[c] = 1
    st.file.pwrite(2 * cs, st.rc.encode(blk))
    st.rt = rt
    st.file_size = 3 * cs
    st.alloc_end = 3
    st.free_hint = 3


def _preallocate(st, refcounts, clusters, variant: str, progress: Progress) -> None:
    """Every cluster allocated; 'full' also has the data space allocated in the file."""
    cb = st.cb
    l2b = st.l2_bits
    total = ceil_div(st.size, st.cs)
    w = st.l2_words
    for l1i in range(st.l1_size):
        c0 = l1i << l2b
        if c0 >= total:
            break
        n = min(total, c0 + (1 << l2b)) - c0
        tbl = clusters.l2_for_write(l1i)
        first = refcounts.alloc_clusters(n)
        for k in range(n):
            tbl[k * w] = ((first + k) << cb) | OFLAG_COPIED
            if w == 2:
                tbl[k * w + 1] = SC_ALLOC_ALL
        end = (first + n) << cb
        if variant == "full":
            st.file.preallocate(first << cb, n << cb)
        if end > st.file_size:
            st.file.truncate(end)
            st.file_size = end
        clusters.maybe_flush()
        progress.update(min(c0 + n, total), total)

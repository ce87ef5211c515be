"""qcow2 for ``measure``: the size of a new image as qemu-img 7.2 computes
it (every L2 table of the disk counted, as for a fully allocated image,
plus the clusters the data needs), and the persistent bitmaps an image
holds (qemu-img measure's ``bitmaps``)."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import CorruptImageError, UsageError, VdError
from vdtool.formats.qcow2.layout import (AUTOCLEAR_BITMAPS, BITMAP_DIR_ENTRY, BITMAPS_EXTENSION, EXT_BITMAPS,
                                         MAX_BITMAPS, MAX_L1_BYTES)

# qemu-img's preallocation modes, as vdtool's variants
PREALLOCATION = {"off": "sparse", "metadata": "metadata", "falloc": "full", "full": "full"}
_MAX_DIRECTORY = 64 << 20  # qemu's limit on the bitmap directory
_MAX_NAME = 1023


def variant_of(variant: str | None, options: dict) -> str:
    """--variant, or qemu-img's ``-o preallocation=...`` (which must agree)."""
    mode = options.get("preallocation")
    if mode is None:
        return variant or "sparse"
    if mode not in PREALLOCATION:
        raise UsageError(f"qcow2 option preallocation: invalid value {mode!r}; choose from "
                         f"{', '.join(PREALLOCATION)}")
    if variant is not None and variant != PREALLOCATION[mode]:
        raise UsageError(f"--variant {variant} and preallocation={mode} disagree")
    return PREALLOCATION[mode]


def refcount_metadata_size(clusters: int, cs: int, refcount_order: int) -> int:
    """Bytes of refcount table and blocks that cover ``clusters`` clusters
    and themselves (the fixed point qemu finds)."""
    per_table_cluster = cs // 8
    per_block = cs * 8 >> refcount_order
    table = blocks = 0
    n = -1
    while True:
        blocks = ceil_div(clusters + table + blocks, per_block)
        table = ceil_div(blocks, per_table_cluster)
        last, n = n, clusters + blocks + table
        if n == last:
            return (blocks + table) * cs


def fully_allocated(size: int, cs: int, refcount_order: int, extl2: bool) -> int:
    """Header, every L2 table, the L1 table, refcounts and every data cluster."""
    l2e = 16 if extl2 else 8
    total = align_up(size, cs)
    meta = cs
    nl2e = align_up(total // cs, cs // l2e)
    meta += nl2e * l2e
    nl1e = align_up(nl2e * l2e // cs, cs // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + total) // cs, cs, refcount_order)
    return meta + total


def measure(size: int, source, opts: dict, variant: str, options: dict) -> dict:
    """``opts``: create's checked options; ``options``: the raw -o pairs."""
    cs = opts["cluster_size"]
    extl2 = bool(opts["extended_l2"])
    order = int(opts["refcount_bits"]).bit_length() - 1
    total = align_up(size, cs)
    l2_tables = ceil_div(total // cs, cs // (16 if extl2 else 8))
    if l2_tables * 8 > MAX_L1_BYTES:
        raise VdError(f"the image size {size} is too large for qcow2 clusters of {cs} bytes "
                         f"(try using a larger cluster size)")
    full = fully_allocated(total, cs, order, extl2)
    if variant == "full":
        data = total
    elif source is None:
        data = 0
    elif options.get("backing_file"):
        data = total  # what a new parent shares with the source is unknown: count it all (as qemu)
    else:
        data = source.data_blocks(cs) * cs
    out = {"required": full - total + data, "fully-allocated": full}
    if source is not None and opts["compat"] == "1.1":
        bitmaps = source.bitmaps_size(cs)
        if bitmaps is not None:
            out["bitmaps"] = bitmaps
    return out


def read_bitmaps(st) -> list | None:
    """(name, granularity) of the persistent bitmaps in ``st``'s image; None
    for a version 2 image (it cannot have any)."""
    if st.version < 3:
        return None
    if not st.autoclear & AUTOCLEAR_BITMAPS:
        return []  # stale bitmaps (a program without bitmap support wrote the image): qemu ignores them
    out = []
    path = st.file.path
    for etype, data in st.exts:
        if etype != EXT_BITMAPS:
            continue
        if len(data) < BITMAPS_EXTENSION.size:
            raise CorruptImageError(f"bitmaps extension is {len(data)} bytes, expected "
                                    f"{BITMAPS_EXTENSION.size}", path)
        ext = BITMAPS_EXTENSION.unpack(data)
        count, dsize, doff = ext.nb_bitmaps, ext.bitmap_directory_size, ext.bitmap_directory_offset
        if not 0 < count <= MAX_BITMAPS or dsize > _MAX_DIRECTORY or doff & (st.cs - 1) \
                or doff + dsize > st.file.size():
            raise CorruptImageError(f"bitmap directory (offset {doff:#x}, size {dsize}, {count} bitmaps) "
                                    f"is invalid", path)
        raw = st.file.pread_exact(doff, dsize, "bitmap directory")
        pos = 0
        for i in range(count):
            if pos + BITMAP_DIR_ENTRY.size > len(raw):
                raise CorruptImageError(f"bitmap directory entry {i} runs past the directory", path)
            ent = BITMAP_DIR_ENTRY.unpack(raw, pos)
            if not 9 <= ent.granularity_bits <= 31 or ent.name_size > _MAX_NAME:
                raise CorruptImageError(f"bitmap directory entry {i}: granularity bits {ent.granularity_bits}, "
                                        f"name of {ent.name_size} bytes", path)
            start = pos + BITMAP_DIR_ENTRY.size + ent.extra_data_size
            name = raw[start:start + ent.name_size]
            if len(name) != ent.name_size:
                raise CorruptImageError(f"bitmap directory entry {i} runs past the directory", path)
            out.append((name.decode("utf-8", "surrogateescape"), 1 << ent.granularity_bits))
            pos = align_up(start + ent.name_size, 8)
    return out

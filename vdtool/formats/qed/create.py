"""Creating a QED image as QEMU lays it out: the header in the first cluster
(the backing file name right after it), the L1 table in the next
``table_size`` clusters, nothing else."""

from __future__ import annotations

from vdtool.core.backend import ParentSpec
from vdtool.core.bytesutil import align_up
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.qed.layout import (DEFAULT_CLUSTER, DEFAULT_HEADER_SIZE, DEFAULT_TABLE, HEADER, MAX_CLUSTER,
                                       MAX_TABLE, MIN_CLUSTER, MIN_TABLE, QED_MAGIC, SECTOR, VARIANTS, is_pow2,
                                       qemu_max_image_size)


def new_header(size: int, variant: str | None, block_size: int | None, options: dict) -> Record:
    if variant not in (None, *VARIANTS):
        raise UsageError(f"qed has no variant {variant!r}; choose from {', '.join(VARIANTS)}")
    cs = int(block_size or options.get("cluster_size") or DEFAULT_CLUSTER)
    if not is_pow2(cs) or not MIN_CLUSTER <= cs <= MAX_CLUSTER:
        raise UsageError(f"QED cluster size {cs} must be a power of two from {MIN_CLUSTER} to {MAX_CLUSTER}")
    ts = int(options.get("table_size") or DEFAULT_TABLE)
    if not is_pow2(ts) or not MIN_TABLE <= ts <= MAX_TABLE:
        raise UsageError(f"QED table size {ts} must be a power of two from {MIN_TABLE} to {MAX_TABLE} (clusters)")
    if ts == 1:
        # the specification allows it, but QEMU (7.2) cannot open an image with one-cluster tables that it
        # made itself ("QED table offset is invalid"): vdtool reads such images and does not make them
        raise UsageError("QED table size 1 is not supported for new images: QEMU cannot open them; use 2 or more")
    size = align_up(size, SECTOR)
    if size < 0 or size > qemu_max_image_size(cs, ts):
        raise UsageError(f"QED image size {size} is above the limit of {qemu_max_image_size(cs, ts)} bytes for cluster "
                         f"size {cs} and table size {ts}")
    return HEADER.new(magic=QED_MAGIC, cluster_size=cs, table_size=ts, header_size=DEFAULT_HEADER_SIZE,
                      l1_table_offset=DEFAULT_HEADER_SIZE * cs, image_size=size)


def write_image(f: ImageFile, hdr: Record) -> None:
    """The header cluster and an empty L1 table into the empty file ``f``
    (the backend records a parent afterwards)."""
    cs = hdr.cluster_size
    f.truncate(hdr.l1_table_offset + hdr.table_size * cs)
    f.pwrite(0, HEADER.pack(hdr))


def measure(size: int, source, block_size: int | None, options: dict) -> dict:
    hdr = new_header(size, None, block_size, options)
    cs, ts = hdr.cluster_size, hdr.table_size
    meta = hdr.l1_table_offset + ts * cs
    per_table = ts * cs // 8 * cs
    tables_full = -(-hdr.image_size // per_table)
    full = meta + tables_full * ts * cs + align_up(hdr.image_size, cs)
    if source is None:
        return {"required": meta, "fully-allocated": full}
    used = source.data_blocks(cs)
    return {"required": meta + min(tables_full, used) * ts * cs + used * cs, "fully-allocated": full}

"""Creating a QCOW image as QEMU lays it out: the 48-byte header, the backing
file name right after it, the L1 table at the next 8-byte boundary, padded
with zeros to a 512-byte multiple."""

from __future__ import annotations

from vdtool.core.backend import ParentSpec
from vdtool.core.bytesutil import align_up
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.qcow.layout import (BACKING_BITS, DEFAULT_BITS, HEADER, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
                                        MAX_L2_BITS, MAX_SIZE, MIN_CLUSTER_BITS, MIN_L2_BITS, QCOW_MAGIC,
                                        QCOW_VERSION, SECTOR, VARIANTS, l1_entries)


def new_header(size: int, variant: str | None, block_size: int | None, parent: ParentSpec | None,
               options: dict) -> tuple:
    """(header, backing name bytes) of a new image."""
    if variant not in (None, *VARIANTS):
        raise UsageError(f"qcow has no variant {variant!r}; choose from {', '.join(VARIANTS)}")
    bs = block_size or options.get("cluster_size")
    if bs:
        bits = int(bs).bit_length() - 1
        if 1 << bits != int(bs) or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
            raise UsageError(f"qcow cluster size {bs} must be a power of two from 512 to 64K")
        cbits, l2bits = bits, max(MIN_L2_BITS, min(MAX_L2_BITS, bits - 3))  # one-cluster L2 tables
    else:
        cbits, l2bits = BACKING_BITS if parent is not None else DEFAULT_BITS
    size = align_up(size, SECTOR)
    if size < 0 or size > MAX_SIZE:
        raise UsageError(f"qcow image size {size} is above the limit of 2^60 bytes")
    name = parent.recorded_name.encode("utf-8", "surrogateescape") if parent is not None else b""
    if len(name) > MAX_BACKING_NAME:
        raise UsageError(f"backing file name of {len(name)} bytes is longer than QCOW's {MAX_BACKING_NAME}")
    l1_off = align_up(HEADER.size + len(name), 8)
    hdr = HEADER.new(magic=QCOW_MAGIC, version=QCOW_VERSION, backing_file_offset=HEADER.size if name else 0,
                     backing_file_size=len(name), size=size, cluster_bits=cbits, l2_bits=l2bits,
                     l1_table_offset=l1_off)
    return hdr, name


def write_image(f: ImageFile, hdr: Record, name: bytes) -> None:
    f.truncate(hdr.l1_table_offset + align_up(l1_entries(hdr) * 8, SECTOR))
    if name:
        f.pwrite(HEADER.size, name)
    f.pwrite(0, HEADER.pack(hdr))


def measure(size: int, source, variant: str | None, block_size: int | None, options: dict) -> dict:
    """measure's sizes: header and L1 table as create writes them, then one
    L2 table and cluster per cluster convert writes (a full image: all)."""
    hdr, _name = new_header(size, variant, block_size, None, options)
    cs, per = 1 << hdr.cluster_bits, 1 << hdr.l2_bits
    meta = hdr.l1_table_offset + align_up(l1_entries(hdr) * 8, SECTOR)
    l2_bytes = align_up(per * 8, cs)
    clusters = -(-hdr.size // cs)
    tables = -(-clusters // per)
    # the first L2 table starts on a cluster boundary after the L1 table
    full = align_up(meta, cs) + tables * l2_bytes + clusters * cs if clusters else meta
    if source is None:
        return {"required": meta, "fully-allocated": full}
    used = source.data_blocks(cs)
    if not used:
        return {"required": meta, "fully-allocated": full}
    return {"required": align_up(meta, cs) + min(tables, used) * l2_bytes + used * cs, "fully-allocated": full}

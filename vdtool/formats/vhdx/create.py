"""Create: a new VHDX laid out as qemu and Hyper-V lay theirs out: the
1 MiB header section (file identifier, two headers, two region tables),
the log at 1 MiB, the metadata region, the BAT, then the payload blocks
(all of them for a fixed image, FULLY_PRESENT in order; none for a dynamic
or differencing one).  Everything but the data is written before the
headers, which are written last: a file cut short has no valid header."""

from __future__ import annotations

from vdtool import __version__
from vdtool.core.bytesutil import align_up
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.formats.vhdx.crc import with_zeroed_field
from vdtool.formats.vhdx.headers import encode_header
from vdtool.formats.vhdx.layout import (BAT_GUID, CHECKSUM_OFFSET, FILE_IDENTIFIER, FILE_SIGNATURE, HAS_PARENT, HEADER,
                                        HEADER_OFFSETS, HEADER_SECTION, HEADER_SIGNATURE, LEAVE_BLOCK_ALLOCATED,
                                        LOG_VERSION, MAX_BLOCK, MAX_DISK, METADATA_GUID, MIN_BLOCK, NULL_GUID,
                                        PAYLOAD_BLOCK_FULLY_PRESENT, REGION_REQUIRED, REGION_SIGNATURE,
                                        REGION_TABLE_BYTES, REGION_TABLE_ENTRY, REGION_TABLE_HEADER,
                                        REGION_TABLE_OFFSETS, SECTOR_SIZES, VERSION, MiB, bat_entries, bat_entry,
                                        bat_index, is_pow2, random_guid)
from vdtool.formats.vhdx.metadata import build_region

GiB, TiB = 1 << 30, 1 << 40
DEFAULT_LOG = MiB


def default_block_size(size: int) -> int:
    """qemu-img's choice by disk size (Hyper-V always takes 32 MiB)."""
    if size > 32 * TiB:
        return 64 * MiB
    if size > 100 * GiB:
        return 32 * MiB
    if size > GiB:
        return 16 * MiB
    return 8 * MiB


class NewImage:
    """A new image's facts, checked (``plan``)."""

    __slots__ = ("size", "fixed", "block", "lss", "pss", "log_size", "locator", "notices")

    def __init__(self, size, fixed, block, lss, pss, log_size, locator=b""):
        self.size, self.fixed, self.block, self.lss, self.pss = size, fixed, block, lss, pss
        self.log_size, self.locator = log_size, locator
        self.notices: list = []


def plan(size: int, variant: str, block_size, differencing: bool, opts: dict) -> NewImage:
    fixed = variant == "fixed"
    if differencing and fixed:
        raise UsageError("a fixed VHDX cannot have a parent; differencing VHDXs are dynamic")
    lss = int(opts.get("logical_sector_size") or 512)
    pss = int(opts.get("physical_sector_size") or 4096)
    for name, v in (("logical_sector_size", lss), ("physical_sector_size", pss)):
        if v not in SECTOR_SIZES:
            raise UsageError(f"vhdx option {name}: {v} is not 512 or 4096")
    if size < 0:
        raise UsageError(f"size {size} is negative")
    rounded = align_up(max(size, lss), lss)
    notices = []
    if rounded != size:
        notices.append(f"size rounded up from {size} to {rounded} bytes (whole {lss}-byte sectors)")
    if rounded > MAX_DISK:
        raise UsageError(f"size {rounded} is larger than a VHDX can hold (64 TiB)")
    bs = default_block_size(rounded) if block_size is None else block_size
    if not is_pow2(bs) or not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise UsageError(f"block size {bs} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
    log_size = opts.get("log_size") or DEFAULT_LOG
    if log_size % MiB or not MiB <= log_size <= 1 << 30:
        raise UsageError(f"vhdx option log_size: {log_size} must be whole MiB from 1 MiB to 1 GiB")
    new = NewImage(rounded, fixed, bs, lss, pss, log_size)
    new.notices = notices
    return new


def _identifier() -> bytes:
    creator = f"vdtool {__version__}".encode("utf-16-le")
    buf = bytearray(64 * 1024)
    FILE_IDENTIFIER.pack_into(buf, 0, FILE_IDENTIFIER.new(Signature=FILE_SIGNATURE, Creator=creator))
    return bytes(buf)


def region_table(bat_off: int, bat_len: int, meta_off: int, meta_len: int) -> bytes:
    buf = bytearray(REGION_TABLE_BYTES)
    REGION_TABLE_HEADER.pack_into(buf, 0, REGION_TABLE_HEADER.new(Signature=REGION_SIGNATURE, EntryCount=2))
    for i, (g, off, n) in enumerate(((BAT_GUID, bat_off, bat_len), (METADATA_GUID, meta_off, meta_len))):
        REGION_TABLE_ENTRY.pack_into(buf, REGION_TABLE_HEADER.size + i * REGION_TABLE_ENTRY.size,
                                     REGION_TABLE_ENTRY.new(Guid=g, FileOffset=off, Length=n, Required=REGION_REQUIRED))
    crc = with_zeroed_field(buf, CHECKSUM_OFFSET)
    buf[CHECKSUM_OFFSET:CHECKSUM_OFFSET + 4] = crc.to_bytes(4, "little")
    return bytes(buf)


def places(new: NewImage, differencing: bool) -> tuple:
    """(log offset, metadata offset, BAT offset, BAT length, data offset, entries)."""
    _, entries = bat_entries(new.size, new.block, new.lss, differencing)
    log_off = HEADER_SECTION
    meta_off = log_off + new.log_size
    bat_off = meta_off + MiB
    bat_len = align_up(max(entries * 8, 1), MiB)
    return log_off, meta_off, bat_off, bat_len, bat_off + bat_len, entries


def write_image(f: ImageFile, new: NewImage, differencing: bool, page83: bytes = b"") -> None:
    log_off, meta_off, bat_off, bat_len, data_off, entries = places(new, differencing)
    flags = (LEAVE_BLOCK_ALLOCATED if new.fixed else 0) | (HAS_PARENT if differencing else 0)
    meta = build_region(new.block, flags, new.size, new.lss, new.pss, page83 or random_guid(), new.locator)
    if len(meta) > MiB:
        raise UsageError(f"the parent locator is too large ({len(new.locator)} bytes)")
    bat = bytearray(entries * 8)
    end = data_off
    if new.fixed:
        blocks = -(-new.size // new.block)
        ratio = (1 << 23) * new.lss // new.block
        for b in range(blocks):
            e = bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, data_off + b * new.block)
            bat[bat_index(b, ratio) * 8:bat_index(b, ratio) * 8 + 8] = e.to_bytes(8, "little")
        end = data_off + blocks * new.block
    f.truncate(end)
    f.pwrite(0, _identifier())
    f.pwrite(meta_off, meta)
    f.pwrite(bat_off, bat)
    table = region_table(bat_off, bat_len, meta_off, MiB)
    for off in REGION_TABLE_OFFSETS:
        f.pwrite(off, table)
    f.flush()
    hdr = HEADER.new(Signature=HEADER_SIGNATURE, FileWriteGuid=random_guid(), DataWriteGuid=random_guid(),
                     LogGuid=NULL_GUID, LogVersion=LOG_VERSION, Version=VERSION, LogLength=new.log_size,
                     LogOffset=log_off)
    for seq, off in enumerate(HEADER_OFFSETS):
        f.pwrite(off, encode_header(hdr.replace(SequenceNumber=seq)))
    f.flush()


def measure(size: int, source, variant: str, block_size, opts: dict) -> dict:
    new = plan(size, variant or "dynamic", block_size, False, opts)
    _, _, _, _, data_off, _ = places(new, False)
    blocks = -(-new.size // new.block)
    full = data_off + blocks * new.block
    if new.fixed:
        return {"required": full, "fully-allocated": full}
    used = source.data_blocks(new.block) if source is not None else 0
    return {"required": data_off + used * new.block, "fully-allocated": full}

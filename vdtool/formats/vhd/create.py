"""Create: the arguments checked and rounded, then a new file with its
footer (and for a dynamic disk the footer copy, header and empty BAT).

The geometry is the specification's (rounded down) CHS, stored for
BIOS-style readers; the creator application "qem2" says the current size is
the disk's size, so readers never cut the tail to the geometry."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field

from vdtool import __version__
from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vhd.layout import (AZURE_ALIGN, COOKIE, CREATOR_APP, CREATOR_HOST_OS, DEFAULT_BLOCK,
                                       FEATURE_RESERVED, FOOTER, FOOTER_SIZE, HEADER_SIZE, MAX_BLOCK,
                                       MAX_DYNAMIC_SIZE, MAX_SIZE, MIN_CREATE_BLOCK, NO_OFFSET, SECTOR,
                                       TYPE_DIFF, TYPE_DYNAMIC, TYPE_FIXED, VERSION_1_0, bitmap_bytes,
                                       chs_geometry, dynamic_header, pack_with_checksum, uuid_bytes, vhd_now)


@dataclass
class NewImage:
    """A new image's facts, checked."""

    size: int
    fixed: bool
    differencing: bool
    block: int
    unique_id: bytes
    notices: list = field(default_factory=list)  # what was rounded, for the user


def plan(size: int, variant: str, block_size, differencing: bool, opts: dict) -> NewImage:
    """Check and round the arguments (UsageError for what cannot be made)."""
    fixed = variant == "fixed"
    notices = []
    if size < 0:
        raise UsageError(f"size {size} is negative")
    if opts.get("azure"):
        if not fixed:
            raise UsageError("vhd option azure=on needs --variant fixed (Azure takes only fixed VHDs)")
        rounded = align_up(size, AZURE_ALIGN)
        if rounded != size:
            notices.append(f"size rounded up from {size} to {rounded} bytes (a whole MiB, as Azure requires)")
        size = rounded
    if size % SECTOR:
        rounded = align_up(size, SECTOR)
        notices.append(f"size rounded up from {size} to {rounded} bytes (whole 512-byte sectors)")
        size = rounded
    if differencing and fixed:
        raise UsageError("a fixed VHD cannot have a parent; differencing VHDs are dynamic")
    if size > MAX_SIZE:
        raise UsageError(f"size {size} is larger than a VHD can describe (2^56)")
    if not fixed and size > MAX_DYNAMIC_SIZE:
        raise UsageError(f"size {size} is above the 2040 GiB ({MAX_DYNAMIC_SIZE} bytes) a dynamic VHD "
                         f"can hold; use --variant fixed or VHDX")
    bs = DEFAULT_BLOCK if block_size is None else block_size
    # Blocks under 4 KiB read fine, but QEMU sizes their bitmaps as 0 bytes
    # (it rounds sectors / 8 down) and would misread such an image
    if not fixed and (bs <= 0 or bs & (bs - 1) or not MIN_CREATE_BLOCK <= bs <= MAX_BLOCK):
        raise UsageError(f"block size {bs} must be a power of two from {MIN_CREATE_BLOCK} to {MAX_BLOCK}")
    uid = uuid_bytes(opts.get("uuid")) if opts.get("uuid") else uuidlib.uuid4().bytes
    if opts.get("uuid") and uid == bytes(16):
        raise UsageError(f"vhd option uuid: {opts.get('uuid')!r} is not a UUID")
    return NewImage(size, fixed, differencing, bs, uid, notices)


def _creator_version() -> int:
    try:
        major, minor = (int(x) for x in __version__.split(".")[:2])
    except ValueError:
        major, minor = 0, 1
    return (major << 16) | minor


def new_footer(new: NewImage) -> Record:
    cyl, heads, spt = chs_geometry(new.size)
    return FOOTER.new(
        cookie=COOKIE, features=FEATURE_RESERVED, file_format_version=VERSION_1_0,
        data_offset=NO_OFFSET if new.fixed else FOOTER_SIZE, time_stamp=vhd_now(),
        creator_application=CREATOR_APP, creator_version=_creator_version(), creator_host_os=CREATOR_HOST_OS,
        original_size=new.size, current_size=new.size, cylinders=cyl, heads=heads, sectors_per_track=spt,
        disk_type=TYPE_FIXED if new.fixed else (TYPE_DIFF if new.differencing else TYPE_DYNAMIC),
        unique_id=new.unique_id, reserved=bytes(427))


def write_image(f: ImageFile, new: NewImage) -> None:
    """The new image's metadata (a fixed disk's data is a hole)."""
    footer = pack_with_checksum(FOOTER, new_footer(new))
    if new.fixed:
        f.truncate(new.size)
        f.pwrite(new.size, footer)
        return
    n = ceil_div(new.size, new.block)
    bat_bytes = align_up(n * 4, SECTOR)
    table_offset = FOOTER_SIZE + HEADER_SIZE
    f.pwrite(0, footer)
    f.pwrite(table_offset, b"\xff" * bat_bytes)
    f.pwrite(FOOTER_SIZE, dynamic_header(table_offset, n, new.block))
    f.pwrite(table_offset + bat_bytes, footer)


def measure(size: int, source, variant: str, block_size, opts: dict) -> dict:
    """measure's sizes: a fixed disk is its data and the footer; a dynamic
    one the footer copy, header, BAT and footer, and for each block convert
    writes its sector bitmap and the block."""
    new = plan(size, variant, block_size, False, opts)
    if new.fixed:
        full = new.size + FOOTER_SIZE
        return {"required": full, "fully-allocated": full}
    n = ceil_div(new.size, new.block)
    meta = FOOTER_SIZE + HEADER_SIZE + align_up(n * 4, SECTOR) + FOOTER_SIZE
    per_block = bitmap_bytes(new.block) + new.block
    used = source.data_blocks(new.block) if source is not None else 0
    return {"required": meta + used * per_block, "fully-allocated": meta + n * per_block}

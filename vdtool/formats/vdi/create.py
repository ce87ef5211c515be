"""Creating a VDI: a 1.1+ header, the block map and the data area aligned
to 1 MiB (as VirtualBox lays them out), all FREE for a dynamic image, every
block allocated in order for a fixed one."""

from __future__ import annotations

from vdtool.core.backend import ParentSpec
from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.core.progress import Progress
from vdtool.formats.vdi.blockmap import BlockMap
from vdtool.formats.vdi.layout import (HEADER1PLUS, HEADER_OFFSET, MAX_BLOCK, MAX_BLOCKS, MAX_DISK, MAX_OFFSET,
                                       MIN_BLOCK, NULL_UUID, PREHEADER, VARIANTS, VDI_DATA_ALIGN,
                                       VDI_GEOMETRY_SECTOR_SIZE, VDI_IMAGE_COMMENT_SIZE,
                                       VDI_IMAGE_DEFAULT_BLOCK_SIZE, VDI_IMAGE_FILE_INFO, VDI_IMAGE_SIGNATURE,
                                       VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_VERSION,
                                       encode_header, is_pow2, parse_uuid, random_uuid)
from vdtool.formats.vdi.parent import write_parent
from vdtool.formats.vdi.state import VdiState

_PREALLOCATE_STEP = 64 << 20  # a fixed image's data is allocated (and progress reported) in pieces


def _variant(variant: str | None, parent: ParentSpec | None, opts: dict) -> str:
    variant = variant or ("fixed" if opts.get("static") else "dynamic")
    if variant not in VARIANTS:
        raise UsageError(f"vdi has no variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if parent is not None and variant == "fixed":
        raise UsageError("a differencing VDI is always dynamic; --variant fixed cannot have a parent")
    return variant


def _geometry(size: int, block_size: int | None) -> tuple:
    """(disk size, block size, blocks, map offset, data offset), checked."""
    bs = VDI_IMAGE_DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if not is_pow2(bs) or bs < MIN_BLOCK or bs > MAX_BLOCK:
        raise UsageError(f"VDI block size {bs} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
    if size < 0 or size > MAX_DISK:
        raise UsageError(f"VDI disk size {size} is outside 0..2^56")
    size = align_up(size, 512)
    blocks = ceil_div(size, bs)
    if blocks > MAX_BLOCKS:
        raise UsageError(f"{size} bytes need {blocks} blocks of {bs}; a VDI holds at most 2^32 - 16")
    off_blocks = align_up(HEADER_OFFSET + HEADER1PLUS.size, VDI_DATA_ALIGN)
    off_data = align_up(off_blocks + 4 * blocks, VDI_DATA_ALIGN)
    if off_data > MAX_OFFSET:
        raise UsageError(f"a block map of {blocks} entries does not fit in a VDI; use a larger block size")
    return size, bs, blocks, off_blocks, off_data


def new_header(size: int, variant: str | None, block_size: int | None, parent: ParentSpec | None,
               options: dict | None) -> Record:
    """The header of a new image (before any file is touched: bad arguments
    are UsageErrors)."""
    opts = dict(options or {})
    variant = _variant(variant, parent, opts)
    size, bs, blocks, off_blocks, off_data = _geometry(size, block_size)
    comment = (opts.get("comment") or "").encode("utf-8")
    if len(comment) >= VDI_IMAGE_COMMENT_SIZE:
        raise UsageError(f"VDI comment is {len(comment)} bytes; at most {VDI_IMAGE_COMMENT_SIZE - 1} fit")
    image_uuid = parse_uuid(opts["uuid"]) if opts.get("uuid") else random_uuid()
    if image_uuid == NULL_UUID:
        raise UsageError("the image UUID cannot be all zeros")
    fixed = variant == "fixed"
    return HEADER1PLUS.new(
        cbHeader=HEADER1PLUS.size, u32Type=VDI_IMAGE_TYPE_FIXED if fixed else VDI_IMAGE_TYPE_NORMAL,
        szComment=comment, offBlocks=off_blocks, offData=off_data, cbSector=VDI_GEOMETRY_SECTOR_SIZE,
        cbDisk=size, cbBlock=bs, cBlocks=blocks, cBlocksAllocated=blocks if fixed else 0,
        uuidCreate=image_uuid, uuidModify=random_uuid(), uuidLinkage=NULL_UUID, uuidParentModify=NULL_UUID,
        LCHS_cbSector=VDI_GEOMETRY_SECTOR_SIZE)


def write_image(f: ImageFile, hdr: Record, parent: ParentSpec | None, progress: Progress) -> VdiState:
    """Write a new image with header ``hdr`` into the empty file ``f``."""
    fixed = hdr.u32Type == VDI_IMAGE_TYPE_FIXED
    bmap = BlockMap.in_order(hdr.cBlocks) if fixed else BlockMap.all_free(hdr.cBlocks)
    data_size = hdr.cBlocks * hdr.cbBlock if fixed else 0
    f.truncate(hdr.offData + data_size)
    f.pwrite(0, PREHEADER.pack(szFileInfo=VDI_IMAGE_FILE_INFO, u32Signature=VDI_IMAGE_SIGNATURE,
                               u32Version=VDI_IMAGE_VERSION))
    f.pwrite(HEADER_OFFSET, encode_header(VDI_IMAGE_VERSION, hdr))
    f.pwrite(hdr.offBlocks, bmap.disk_image())
    for p in range(0, data_size, _PREALLOCATE_STEP):
        f.preallocate(hdr.offData + p, min(_PREALLOCATE_STEP, data_size - p))
        progress.update(min(p + _PREALLOCATE_STEP, data_size), data_size)
    state = VdiState(f, VDI_IMAGE_VERSION, hdr, bmap, f.size())
    state.modified = True  # a new image needs no second modification UUID
    if parent is not None:
        write_parent(state, parent)
    return state


def measure(size: int, source, variant: str | None, block_size: int | None, options: dict) -> dict:
    """measure's sizes: header and block map (aligned to 1 MiB, as create
    lays them out), then one block for each block convert writes (all of
    them for a fixed image)."""
    variant = _variant(variant, None, options)
    size, bs, blocks, _off_blocks, off_data = _geometry(size, block_size)
    full = off_data + blocks * bs
    if variant == "fixed":
        return {"required": full, "fully-allocated": full}
    used = source.data_blocks(bs) if source is not None else 0
    return {"required": off_data + used * bs, "fully-allocated": full}

"""Resizing a VDI: shrinking releases the blocks past the new end (the
smaller size reaches the header first); growing extends the block map,
moving the first data blocks to the end when the map needs their room."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import NotSupported, UnsupportedFeature, UsageError
from vdtool.formats.vdi.layout import (MAX_BLOCKS, MAX_DISK, MAX_OFFSET, VDI_IMAGE_BLOCK_FREE,
                                       VDI_IMAGE_BLOCK_ZERO, VDI_IMAGE_VERSION_OLD)
from vdtool.formats.vdi.metadata import begin_write, close_holes, set_entry, sync
from vdtool.formats.vdi.state import VdiState


def resize(state: VdiState, new_size: int) -> None:
    if new_size < 0 or new_size > MAX_DISK:
        raise UsageError(f"VDI disk size {new_size} is outside 0..2^56")
    begin_write(state)
    new_size = align_up(new_size, 512)
    new_blocks = ceil_div(new_size, state.hdr.cbBlock)
    if new_size < state.virtual_size:
        _shrink(state, new_size, new_blocks)
        return
    if new_blocks > state.hdr.cBlocks:
        _grow_map(state, new_blocks)
    state.hdr.cbDisk = new_size
    state.hdr_dirty = True
    sync(state)


def _shrink(state: VdiState, new_size: int, new_blocks: int) -> None:
    hdr = state.hdr
    # The smaller size goes into the header first: a crash while the
    # blocks past it are released then leaves the new content (and
    # leaked blocks at worst), never the old size with its end gone.
    hdr.cbDisk = new_size
    state.hdr_dirty = True
    sync(state)
    state.file.flush()
    _zero_past_end(state, new_size, new_blocks)
    release = {}  # allocated blocks past the end: close_holes gives them up in a crash-safe order
    mv = state.map.mv
    for b in range(new_blocks, hdr.cBlocks):
        if mv[b] < VDI_IMAGE_BLOCK_ZERO:
            release[b] = VDI_IMAGE_BLOCK_FREE
        elif mv[b] != VDI_IMAGE_BLOCK_FREE:
            set_entry(state, b, VDI_IMAGE_BLOCK_FREE)
    if release:
        close_holes(state, release=release)
    # only now that no entry points past it: the map ends at the new count
    hdr.cBlocks = new_blocks
    state.dirty = {b for b in state.dirty if b < new_blocks}
    state.hdr_dirty = True
    sync(state)
    state.map.resize(new_blocks)


def _zero_past_end(state: VdiState, new_size: int, new_blocks: int) -> None:
    """Bytes past the new end inside the last kept block must read as zeros
    if the disk grows again."""
    bs = state.hdr.cbBlock
    within = new_size & (bs - 1)
    if within and new_blocks <= state.hdr.cBlocks:
        b = new_blocks - 1
        e = state.map.mv[b]
        if e < VDI_IMAGE_BLOCK_ZERO:
            state.file.write_zeroes(state.data_pos(b, e) + within, bs - within)


def _grow_map(state: VdiState, new_blocks: int) -> None:
    if new_blocks > MAX_BLOCKS:
        raise UsageError(f"{new_blocks} blocks do not fit in a VDI block map")
    hdr = state.hdr
    old_blocks = hdr.cBlocks
    need_end = hdr.offBlocks + 4 * new_blocks
    if need_end > hdr.offData:
        if state.version == VDI_IMAGE_VERSION_OLD:
            raise NotSupported("growing", "vdi", state.path, "a VDI 0.2 header cannot move its data")
        _relocate_for_map(state, need_end)
    state.map.resize(new_blocks)
    hdr.cBlocks = new_blocks
    if state.fixed:
        # a fixed image stays fully allocated: the new blocks come zeroed, in order
        first = hdr.cBlocksAllocated
        count = new_blocks - old_blocks
        state.file.truncate(state.block_pos(first + count))
        state.file.preallocate(state.block_pos(first), count * state.total)
        for k in range(count):
            set_entry(state, old_blocks + k, first + k)
        hdr.cBlocksAllocated = first + count
    state.dirty.update(range(old_blocks, new_blocks))
    state.hdr_dirty = True


def _relocate_for_map(state: VdiState, need_end: int) -> None:
    """Make room for a larger block map: the data area starts k blocks
    later, and the blocks that lived in those k slots move to the end."""
    hdr = state.hdr
    total = state.total
    k = ceil_div(need_end - hdr.offData, total)
    if hdr.offData + k * total > MAX_OFFSET:
        raise UnsupportedFeature("the block map cannot grow further: the data offset would pass 4 GiB", state.path)
    n = hdr.cBlocksAllocated
    rev = state.map.reverse(n)
    base = max(n, k)  # first slot that is past the new data offset and free
    buf = bytearray(total)
    moved = {}
    for j in range(min(k, n)):
        if rev[j] < 0:
            continue
        state.file.readinto(state.block_pos(j), buf)
        state.file.pwrite(state.block_pos(base + j), buf)
        moved[j] = base + j
    state.file.flush()
    mv = state.map.mv
    for idx, vals in state.map.allocated_chunks():
        for i, e in zip(idx, vals):
            mv[i] = moved.get(e, e) - k
    hdr.offData += k * total
    hdr.cBlocksAllocated = base + min(k, n) - k
    state.dirty.update(range(hdr.cBlocks))
    state.hdr_dirty = True
    sync(state)
    close_holes(state)

"""Writing a VDI's metadata back, in the order that keeps a crash safe:
data first, then the map entries and header that point at it.  Also the
two changes every writer makes: allocating a block, and closing the holes
released blocks leave (the last blocks move into them)."""

from __future__ import annotations

from vdtool.core.errors import ReadOnlyError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vdi.layout import (HEADER1PLUS, HEADER_OFFSET, VDI_GEOMETRY_SECTOR_SIZE, VDI_IMAGE_BLOCK_FREE,
                                       encode_header, random_uuid)
from vdtool.formats.vdi.state import VdiState

_WHOLE_MAP = 4096  # more dirty entries than this: the whole map is written in one go
_ALLOC_BATCH = 4096  # allocations between syncs: the dirty set stays small
_SPAN = 1 << 16  # changed entries this close together are written in one go
_MOVE_BATCH_BYTES = 64 << 20  # data blocks moved between two consistent states


def set_entry(state: VdiState, b: int, value: int) -> None:
    state.map.mv[b] = value
    state.dirty.add(b)


def _runs(indices: list):
    """(first, last + 1) of each run of consecutive sorted ``indices``."""
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        yield indices[i], indices[j] + 1
        i = j + 1


def _put_entries(state: VdiState) -> None:
    """Write the changed map entries: in one write where they lie within
    _SPAN entries of each other (the entries between are unchanged, so
    rewriting them is harmless, and one write is one step for a crash),
    the whole map where many changed, else run by run."""
    if not state.dirty:
        return
    f, hdr = state.file, state.hdr
    lo, hi = min(state.dirty), max(state.dirty) + 1
    if len(state.dirty) > _WHOLE_MAP:
        lo, hi = 0, hdr.cBlocks
    if hi - lo <= _SPAN or len(state.dirty) > _WHOLE_MAP:
        f.pwrite(hdr.offBlocks + 4 * lo, state.map.disk_bytes(lo, hi))
        return
    for lo, hi in _runs(sorted(state.dirty)):
        f.pwrite(hdr.offBlocks + 4 * lo, state.map.disk_bytes(lo, hi))


def sync(state: VdiState) -> None:
    """Data first, then the map entries and header that point at it."""
    if not state.dirty and not state.hdr_dirty:
        return
    f, hdr = state.file, state.hdr
    f.flush()
    _put_entries(state)
    f.pwrite(HEADER_OFFSET, encode_header(state.version, hdr))
    f.flush()
    state.dirty.clear()
    state.hdr_dirty = False


def begin_write(state: VdiState, content: bool = True) -> None:
    """Before any change: the image must be writable and its map consistent.
    ``content``: the change reaches the disk's data (a new modification UUID)."""
    if not state.file.writable:
        raise ReadOnlyError("image is opened read-only", state.path)
    problems = state.map_problems()
    if problems:
        raise state.corrupt(f"block map has {len(problems)} inconsistent entries (first: entry "
                            f"{problems[0][1]} -> block {problems[0][2]}); 'vdtool check -r all' repairs it")
    hdr = state.hdr
    if state.v1 and hdr.cbHeader < HEADER1PLUS.size and hdr.offBlocks >= HEADER_OFFSET + HEADER1PLUS.size:
        # VirtualBox turns 1.1 headers into 1.1+ (LCHS geometry) when it writes
        hdr.cbHeader = HEADER1PLUS.size
        hdr.LCHS_cCylinders = hdr.LCHS_cHeads = hdr.LCHS_cSectors = 0
        hdr.LCHS_cbSector = VDI_GEOMETRY_SECTOR_SIZE
        state.hdr_dirty = True
    if content and not state.modified:
        # a new modification UUID once per write session, as VirtualBox's VD layer does
        state.modified = True
        renew_modification_uuid(state)


def renew_modification_uuid(state: VdiState) -> None:
    """A new uuidModify, written at the next sync."""
    state.hdr.uuidModify = random_uuid()
    state.hdr_dirty = True


def alloc(state: VdiState, b: int, block) -> None:
    """Store a whole new block for virtual block ``b``: data, then (at the
    next sync) the map entry."""
    hdr = state.hdr
    idx = hdr.cBlocksAllocated
    if idx >= hdr.cBlocks:
        raise state.corrupt(f"no room for another block: {idx} of {hdr.cBlocks} are allocated")
    pos = state.block_pos(idx)
    if hdr.cbBlockExtra:
        state.file.pwrite(pos, bytes(hdr.cbBlockExtra))
    state.file.pwrite(pos + hdr.cbBlockExtra, block)
    hdr.cBlocksAllocated = idx + 1
    state.hdr_dirty = True
    set_entry(state, b, idx)
    if len(state.dirty) >= _ALLOC_BATCH:
        sync(state)


def close_holes(state: VdiState, progress: Progress = NO_PROGRESS, release: dict | None = None) -> int:
    """Give up the data blocks no entry uses, and those of the entries in
    ``release`` (virtual block -> the marker it gets instead: compact's
    blocks of zeros): the last blocks move down into the holes, the
    allocated count shrinks, the file is cut.  Returns the number of data
    blocks given up.

    Order, so that a crash at any write leaves an image that reads as before
    and that neither vdtool nor qemu-img calls corrupt, except where that
    cannot be (below):

    - blocks to give up at the end of the file: their entries, a flush, then
      the smaller count (the one window: a crash before that header write
      leaves a count above the map's, which wastes blocks and nothing else;
      the flush keeps a disk from writing the header first, which would
      leave a count below an entry in use);
    - a hole below the end, in batches: the entries of the blocks of zeros
      that leave the holes are written (and flushed) first, then the last
      data blocks are copied into them (flushed), then their entries point
      at the copies (flushed) and the count falls.  Between the first write
      and that header write the count is above the map's: qemu-img, which has no
      notion of a leaked VDI block, calls that an "allocated blocks
      mismatch"; vdtool calls it leaks.  No order avoids it: the count must
      match the entries in every state qemu-img accepts, so a data block can
      only enter a slot that no entry uses, and below the count every slot
      is used.

    Progress is reported (and a stop request honoured) only between batches,
    where the image on disk is whole."""
    release = release or {}
    if state.dirty or state.hdr_dirty:
        sync(state)  # earlier changes reach the disk in their own order first
    hdr = state.hdr
    n = hdr.cBlocksAllocated
    rev = state.map.reverse(n)
    free = bytearray(n)
    for s in range(n):
        if rev[s] < 0 or rev[s] in release:
            free[s] = 1
    total_free = free.count(1)
    batch = max(1, _MOVE_BATCH_BYTES // state.total)
    top, lo = n, 0
    buf = bytearray(state.total)
    try:
        while True:
            while lo < top and not free[lo]:
                lo += 1
            if lo >= top:
                break
            top = _batch(state, rev, free, release, lo, top, batch, buf)
            progress.update(n - top, total_free)
    finally:
        end = state.block_pos(hdr.cBlocksAllocated)
        if not state.dirty and state.file.size() > end:
            state.file.truncate(max(end, hdr.offData))
        state.fsize = state.file.size()
    return n - hdr.cBlocksAllocated


def _give_up(state: VdiState, b: int, release: dict) -> None:
    set_entry(state, b, release.get(b, VDI_IMAGE_BLOCK_FREE))


def _pair_up(free: bytearray, lo: int, top: int, batch: int) -> tuple:
    """Up to ``batch`` (hole, data block) pairs: the first holes from ``lo``
    with the last data blocks below ``top``, each hole below its block.
    Returns (pairs, the first hole not taken)."""
    pairs = []
    s, h = top, lo
    while len(pairs) < batch:
        s -= 1
        while s > h and free[s]:
            s -= 1
        while h < s and not free[h]:
            h += 1
        if h >= s:
            break
        pairs.append((h, s))
        h += 1
    return pairs, h


def _batch(state: VdiState, rev, free: bytearray, release: dict, lo: int, top: int, batch: int,
           buf: bytearray) -> int:
    """One step from a whole image to a whole image: some of the last data
    blocks move into the first holes, every block from the lowest one moved
    up to ``top`` is given up.  Returns the new count."""
    pairs, h = _pair_up(free, lo, top, batch)
    new_top = pairs[-1][1] if pairs else top
    while new_top > h and free[new_top - 1]:
        new_top -= 1
    if pairs:
        # the entries of the blocks of zeros in the holes first: no entry may read a hole being filled
        for d, _ in pairs:
            if rev[d] >= 0:
                _give_up(state, rev[d], release)
                rev[d] = -1
        _write_entries(state)
        f = state.file
        for d, s in pairs:
            f.readinto(state.block_pos(s), buf)
            f.pwrite(state.block_pos(d), buf)
        for d, s in pairs:
            set_entry(state, rev[s], d)
            rev[d], rev[s] = rev[s], -1
            free[d], free[s] = 0, 1
    for s in range(new_top, top):
        if rev[s] >= 0:  # a block to give up
            _give_up(state, rev[s], release)
            rev[s] = -1
    state.hdr.cBlocksAllocated = new_top
    state.hdr_dirty = True
    _lower_count(state)
    return new_top


def _lower_count(state: VdiState) -> None:
    """The copies, then the entries, then the smaller count, a flush between
    each: a disk may put the header down before the map otherwise, and a
    count below an entry in use would give its block to the next write."""
    f = state.file
    f.flush()
    _write_entries(state)
    f.pwrite(HEADER_OFFSET, encode_header(state.version, state.hdr))
    f.flush()
    state.hdr_dirty = False


def _write_entries(state: VdiState) -> None:
    """The changed map entries only (the header stays), flushed."""
    _put_entries(state)
    state.file.flush()
    state.dirty.clear()

"""Writing a VDI's metadata back, in the order that keeps a crash safe:
data first, then the map entries and header that point at it.  Also the
two changes every writer makes: allocating a block, and closing the holes
released blocks leave (the last blocks move into them)."""

from __future__ import annotations

from vdtool.core.errors import ReadOnlyError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vdi.layout import (HEADER1PLUS, HEADER_OFFSET, VDI_GEOMETRY_SECTOR_SIZE, encode_header,
                                       random_uuid)
from vdtool.formats.vdi.state import VdiState

_WHOLE_MAP = 4096  # more dirty entries than this: the whole map is written in one go
_ALLOC_BATCH = 4096  # allocations between syncs: the dirty set stays small


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


def sync(state: VdiState) -> None:
    """Data first, then the map entries and header that point at it."""
    if not state.dirty and not state.hdr_dirty:
        return
    f, hdr = state.file, state.hdr
    f.flush()
    dirty = sorted(state.dirty)
    if len(dirty) > _WHOLE_MAP:
        f.pwrite(hdr.offBlocks, state.map.disk_bytes(0, hdr.cBlocks))
    else:
        for lo, hi in _runs(dirty):
            f.pwrite(hdr.offBlocks + 4 * lo, state.map.disk_bytes(lo, hi))
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


def close_holes(state: VdiState, progress: Progress = NO_PROGRESS) -> int:
    """Move the last data blocks into unused slots, shrink the allocated
    count, truncate.  Map entries that freed the slots reach the disk
    before any block moves into them; moved data is flushed before the map
    points at its new place.  Returns the number of slots reclaimed."""
    hdr = state.hdr
    n = hdr.cBlocksAllocated
    rev = state.map.reverse(n)
    holes = [i for i in range(n) if rev[i] < 0]
    new_n = n - len(holes)
    if holes:
        sync(state)
        dst = [h for h in holes if h < new_n]
        src = [i for i in range(n - 1, new_n - 1, -1) if rev[i] >= 0]
        buf = bytearray(state.total)
        for k, (s, d) in enumerate(zip(src, dst)):
            state.file.readinto(state.block_pos(s), buf)
            state.file.pwrite(state.block_pos(d), buf)
            progress.update(k + 1, len(src))
        if src:
            state.file.flush()
        for s, d in zip(src, dst):
            set_entry(state, rev[s], d)
        hdr.cBlocksAllocated = new_n
        state.hdr_dirty = True
        sync(state)
    end = state.block_pos(new_n)
    if state.file.size() > end:
        state.file.truncate(max(end, hdr.offData))
    state.fsize = state.file.size()
    return len(holes)

"""Checking a VDI (the backend's ``_check``) and repairing its block map.

Counted as qemu-img check counts them: every map entry that points past the
file, not below cBlocksAllocated or at a block another entry uses is one
corruption, a file cut inside the allocated blocks one more; each data
block below the count that no entry uses is a leak."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.progress import Progress
from vdtool.formats.vdi.layout import VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO
from vdtool.formats.vdi.metadata import begin_write, close_holes, set_entry, sync
from vdtool.formats.vdi.state import VdiState

_WHY = {"eof": "past the end of the file", "count": "not below the allocated count {n}",
        "dup": "which another entry uses"}


def check(state: VdiState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    """Fill ``res``; ``repair`` 'all' fixes the map (copying shared blocks,
    taking blocks past the count in, dropping entries past the file), then
    'leaks' or 'all' closes the holes leaked blocks leave."""
    if state.file.writable:
        sync(state)
    state.fsize = state.file.size()
    count, frag = state.scan_map(lenient=True, progress=progress)
    problems = list(state.problems)
    short = _report(state, res, problems, count)
    if repair == "all" and (problems or short):
        repair_map(state, problems)
        if short:
            state.file.truncate(state.block_pos(state.hdr.cBlocksAllocated))
        res.corruptions_fixed = res.corruptions
        state.problems = []
    if repair in ("leaks", "all") and not state.problems:
        begin_write(state, content=False)
        reclaimed = close_holes(state)
        res.leaks_fixed = min(res.leaks, reclaimed)
    if repair:
        sync(state)
        count, frag = state.map.stats()
    res.total_clusters = state.hdr.cBlocks
    res.allocated_clusters, res.fragmented_clusters = count, frag
    res.image_end_offset = state.block_pos(state.hdr.cBlocksAllocated)


def _report(state: VdiState, res: CheckResult, problems: list, count: int) -> bool:
    """Count and word what the scan found; returns whether the file ends
    inside the allocated blocks."""
    n = state.hdr.cBlocksAllocated
    # data blocks below the count that some entry points at (without problems: every entry, once)
    used = n - state.map.used(n).count(0) if problems else count
    for kind, b, e in problems:
        res.corrupt(f"block map entry {b} points to data block {e}, " + _WHY[kind].format(n=n))
    end = state.block_pos(n)
    short = bool(n) and state.fsize < end and used > 0
    if short:
        res.corrupt(f"the file ends at {state.fsize}, inside the {n} allocated blocks (they end at {end})")
    leaks = n - used
    if leaks:
        res.leak(f"{leaks} of the {n} allocated blocks are not in the block map", leaks)
    if state.fixed and count != state.hdr.cBlocks:
        res.say("warning: a fixed image with unallocated blocks")
    return short


def repair_map(state: VdiState, problems: list) -> None:
    """Make every entry point below the count, inside the file, at a block
    of its own."""
    hdr = state.hdr
    diff = state.is_diff
    state.problems = []
    counts = [e for kind, _, e in problems if kind == "count"]
    if counts:
        # blocks that lie in the file but above the count: take them in
        hdr.cBlocksAllocated = max(max(counts) + 1, hdr.cBlocksAllocated)
        state.hdr_dirty = True
    for kind, b, e in problems:
        if kind == "eof":
            set_entry(state, b, VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE)
    sync(state)
    dups = [(b, e) for kind, b, e in problems if kind == "dup"]
    if dups:
        _unshare(state, dups, diff)
        sync(state)


def _unshare(state: VdiState, dups: list, diff: bool) -> None:
    """A shared block is copied (into an unused slot first) so both entries
    keep reading what they read."""
    hdr = state.hdr
    used = state.map.used(hdr.cBlocksAllocated)
    holes = iter([i for i, u in enumerate(used) if not u])
    buf = bytearray(state.total)
    for b, e in dups:
        dst = next(holes, None)
        if dst is None:
            if hdr.cBlocksAllocated < hdr.cBlocks:
                dst = hdr.cBlocksAllocated
                hdr.cBlocksAllocated += 1
                state.hdr_dirty = True
            else:
                set_entry(state, b, VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE)
                continue
        state.file.readinto(state.block_pos(e), buf)
        state.file.pwrite(state.block_pos(dst), buf)
        state.file.flush()
        set_entry(state, b, dst)

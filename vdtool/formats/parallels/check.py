"""Checking a Parallels image (the backend's ``_check``) and repairing it.

Counted as qemu-img check counts them: each BAT entry outside the data
area or the file is a corruption; space past the last cluster is leaked
(in clusters, rounded up).  vdtool also counts entries that share a
cluster (newer QEMU does), and an image left with the in-use flag set is
one leak where qemu-img counts a corruption (see ``check``)."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.bytesutil import ceil_div
from vdtool.core.progress import Progress
from vdtool.formats.parallels.load import describe
from vdtool.formats.parallels.metadata import alloc, set_entry, sync
from vdtool.formats.parallels.state import ParallelsState


def check(state: ParallelsState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    """Fill ``res``; ``repair`` 'all' clears the in-use flag, drops entries
    outside the file and gives shared clusters copies of their own; 'leaks'
    or 'all' cuts the file after the last cluster."""
    if state.file.writable:
        sync(state)
    state.fsize = state.file.size()
    state.scan()
    fix = repair == "all"
    if state.unclean:
        # qemu-img calls this a corruption; what a writer that stopped
        # midway can leave wrong is found by the rest of the check (vdtool
        # writes data before the BAT entries that point at it), so here it
        # is a leftover like a leak, and 'check -r leaks' clears it
        res.leak("image was not closed correctly (in-use flag set)")
        if repair:
            state.unclean = False  # the flag is cleared when the repairing writer closes
            res.leaks_fixed += 1
    problems = list(state.problems)
    for kind, i, other in problems:
        res.corrupt(describe(kind, i, other), repairing=fix)
    if fix and problems:
        repair_bat(state, problems)
        res.corruptions_fixed += len(problems)
    allocated, frag, high = state.scan()
    progress.update(1, 2)
    cs = state.cluster
    end = high + cs if high >= 0 else state.data_start
    if state.fsize > end:
        extra = state.fsize - end
        count = ceil_div(extra, cs)
        res.leak(f"{extra} bytes at the end of the image, past its last cluster", count)
        if repair:
            state.file.truncate(end)
            state.fsize = end
            res.leaks_fixed += count
    res.total_clusters = state.hdr.bat_entries
    res.allocated_clusters, res.fragmented_clusters = allocated, frag
    res.image_end_offset = end


def repair_bat(state: ParallelsState, problems: list) -> None:
    """Entries outside the file read as zeros from now on; an entry sharing
    a cluster gets a copy of it (data first, then the entry)."""
    for kind, i, _ in problems:
        if kind != "dup":  # outside the file or off a cluster boundary
            set_entry(state, i, 0)
    sync(state)
    state.problems = []
    buf = bytearray(state.cluster)
    for kind, i, _ in problems:
        if kind == "dup":
            state.file.readinto(state.host(i), buf)
            alloc(state, i, buf)
    sync(state)

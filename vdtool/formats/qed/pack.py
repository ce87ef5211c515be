"""Moving clusters down into unused space and cutting the file after the
last one in use (compact, shrink, ``check -r leaks``).  QED has no reference
counts: a cluster nothing names is free.  Each move copies the cluster into
free space, flushes, and only then points the table at the copy (the old
place is still valid until then); the file is cut last.

An L2 table (``table_size`` clusters) moves only into as many free clusters
in a row.  One that finds none stays for the pass while the data below it
moves down (which gathers the free space right below it); then it goes to
the end of the file and, in the next pass, down into the space it left."""

from __future__ import annotations

import heapq

from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qed.layout import QED_CLUSTER_ZERO
from vdtool.formats.qed.state import QedState

_BATCH = 256  # moves per flush of the tables
_PASSES = 4


def owners(st: QedState) -> dict:
    """file cluster index -> ("d", guest cluster) or ("t", L1 index) for
    every cluster a table names (valid offsets only: check runs first)."""
    cs = st.cs
    tabs = st.tables
    ts = st.hdr.table_size
    out: dict = {}
    for i, off in enumerate(tabs.l1):
        if not off:
            continue
        for k in range(ts):
            out[off // cs + k] = ("t", i)
        t = tabs.l2(i)
        base = i * tabs.l2_entries
        for j, e in enumerate(t):
            if e > QED_CLUSTER_ZERO:
                out[e // cs] = ("d", base + j)
    return out


def pack(st: QedState, progress: Progress = NO_PROGRESS) -> int:
    """Move clusters down into free space and truncate; returns how many
    clusters the file lost."""
    cs = st.cs
    st.tables.flush()
    old_end = -(-max(st.file.size(), st.data_start) // cs)
    end = old_end
    for _ in range(_PASSES):
        pinned, end = _pass(st, progress)
        if not pinned:
            break
        for i in pinned:
            _move_table(st, i, st.tables.allocate(st.hdr.table_size * cs, cs))
        st.tables.flush()
    if end < old_end:
        st.file.flush()  # the tables that name the moved clusters are on disk before the old places go
        st.file.truncate(end * cs)
        st.file.flush()
    st.tables.end = max(end * cs, st.data_start)
    st.tables.file_size = st.file.size()
    st.tables.forget()
    return max(0, old_end - end)


def _move_table(st: QedState, i: int, dst: int) -> None:
    """Point L1 entry ``i`` at a copy of its table at ``dst`` (written at the
    next flush, before the L1 table)."""
    tabs = st.tables
    t = tabs.l2(i)
    tabs.cache[dst] = t
    tabs.dirty_l2.add(dst)
    tabs.set_l1(i, dst)


def _pass(st: QedState, progress: Progress) -> tuple:
    """One pass from the top down; returns (L1 indices of tables that found
    no room, the file's new end in clusters)."""
    tabs = st.tables
    cs = st.cs
    ts = st.hdr.table_size
    used = owners(st)
    first = st.data_start // cs
    holes = [c for c in range(first, max(used, default=first - 1) + 1) if c not in used]
    heap = [-c for c in used]
    heapq.heapify(heap)
    pinned: list = []
    keep = first  # the end the pinned tables need

    def top() -> int:
        while heap and -heap[0] not in used:
            heapq.heappop(heap)
        return -heap[0] if heap else first - 1

    hi, h, moved, total = top(), 0, 0, len(holes)
    while h < len(holes) and hi >= first and holes[h] < hi:
        what, idx = used[hi]
        if what == "d":
            dst = holes[h]
            st.file.pwrite(dst * cs, st.file.pread(hi * cs, cs).ljust(cs, b"\0"))  # a short last cluster too
            tabs.set_entry(idx, dst * cs)
            del used[hi]
            used[dst] = ("d", idx)
            heapq.heappush(heap, -dst)
            h += 1
        else:
            start = tabs.l1[idx] // cs
            run = _free_run(holes, h, ts, start)
            for k in range(ts):
                del used[start + k]
            if run is None:
                pinned.append(idx)
                keep = max(keep, start + ts)
            else:
                dst = holes[run]
                _move_table(st, idx, dst * cs)
                for k in range(ts):
                    used[dst + k] = ("t", idx)
                    heapq.heappush(heap, -(dst + k))
                del holes[run:run + ts]
        moved += 1
        if moved % _BATCH == 0:
            tabs.flush()
        progress.update(min(h, total), max(total, 1))
        hi = top()
    tabs.flush()
    return (pinned if h < len(holes) and holes[h] < keep else []), max(hi + 1, keep, first)


def _free_run(holes: list, h: int, n: int, below: int):
    """Index into ``holes`` (from ``h``) of ``n`` consecutive free clusters
    that end at or below cluster ``below``; None if there are none."""
    for k in range(h, len(holes) - n + 1):
        if holes[k] + n > below:
            return None
        if holes[k + n - 1] == holes[k] + n - 1:
            return k
    return None

"""Checking a QED image (the backend's ``_check``), counted as QEMU's
qed-check counts: every L1 or L2 entry naming an offset that is unaligned,
inside the header or past the end of the file is one corruption (repaired by
clearing it), every cluster past the L1 table that nothing names is one leak
(``-r leaks`` moves clusters down over them and cuts the file).  vdtool
also counts a cluster named twice as a corruption (repaired by giving the
later entry a copy).  A repair clears the need-check flag."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.progress import Progress
from vdtool.core.tablemap import distinct_entries
from vdtool.formats.qed.clusters import allocate
from vdtool.formats.qed.header import clear_need_check
from vdtool.formats.qed.layout import QED_CLUSTER_ZERO, QED_F_NEED_CHECK
from vdtool.formats.qed.pack import pack
from vdtool.formats.qed.state import QedState


def check(st: QedState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    tabs = st.tables
    if st.file.writable:
        tabs.flush()
    fix = repair == "all"
    cs = st.cs
    tabs.file_size = st.file.size()
    tabs.end = max(tabs.file_size, st.data_start)  # entries past the end of the file are corrupt
    nclusters = -(-tabs.file_size // cs)
    used = bytearray(max(nclusters, st.data_start // cs))
    used[:st.data_start // cs] = b"\x01" * (st.data_start // cs)
    allocated = 0
    dups = []
    for i in range(len(tabs.l1)):
        off = tabs.l1[i]
        if not off:
            continue
        why = tabs.table_problem(off)
        if why is None and any(used[off // cs + k] for k in range(st.hdr.table_size)):
            why = "overlaps another table or the L1 table"
        if why:
            res.corrupt(f"L1 entry {i}: L2 table offset {off} {why}", repairing=fix)
            if fix:
                tabs.set_l1(i, 0)
            continue
        for k in range(st.hdr.table_size):
            used[off // cs + k] = 1
        allocated += _check_l2(st, res, i, used, dups, fix)
        progress.update(i + 1, len(tabs.l1))
    if fix:
        for ci in dups:
            allocate(st, ci, st.file.pread(st.tables.entry(ci), cs).ljust(cs, b"\0"))
    leaks = used.count(0)
    if leaks:
        res.leak(f"{leaks} clusters are not referenced by any table", count=leaks)
    if st.hdr.features & QED_F_NEED_CHECK and not repair:
        res.say("the need-check flag is set: the image was not closed cleanly (check -r clears it)")
    if repair:
        tabs.flush()
        if fix:
            res.corruptions_fixed = res.corruptions
        if res.corruptions == res.corruptions_fixed:
            pack(st)  # also what cleared entries left unreferenced
            res.leaks_fixed = leaks
            clear_need_check(st)
    res.total_clusters = -(-st.virtual_size // cs)
    res.allocated_clusters = allocated


def _check_l2(st: QedState, res: CheckResult, i: int, used: bytearray, dups: list, fix: bool) -> int:
    tabs = st.tables
    cs = st.cs
    t = tabs.l2(i)
    n = _clean_l2(st, t, used)
    if n is not None:
        return n
    base = i * tabs.l2_entries
    n = 0
    for j, e in enumerate(t):
        if e <= QED_CLUSTER_ZERO:
            continue
        why = st.data_problem(e)
        if why is None and e // cs < len(used) and used[e // cs]:
            if e // cs >= st.data_start // cs:
                res.corrupt(f"cluster {base + j} names data at offset {e}, which another entry or table uses",
                            repairing=fix)
                dups.append(base + j)
                n += 1
                continue
            why = "lies inside the header or L1 table"
        if why:
            res.corrupt(f"cluster {base + j}: data offset {e} {why}", repairing=fix)
            if fix:
                t[j] = 0
                tabs.mark_l2_dirty(i)
            continue
        used[e // cs] = 1
        n += 1
    return n


def _clean_l2(st: QedState, t, used: bytearray) -> int | None:
    """How many clusters table ``t`` names, marked in ``used``, when none of
    its entries has a problem (distinct, aligned, in the data area, on no
    cluster marked before); None, and nothing marked, otherwise.  Whole-set
    operations instead of a test per entry (see core.tablemap)."""
    cs = st.cs
    clean = distinct_entries(t, st.data_start, max(st.tables.file_size, st.tables.end), QED_CLUSTER_ZERO)
    if clean is None or any(map(cs.__rmod__, clean[0])):
        return None
    clusters = list(map(cs.__rfloordiv__, clean[0]))
    if (clusters and max(clusters) >= len(used)) or any(map(used.__getitem__, clusters)):
        return None
    for c in clusters:
        used[c] = 1
    return len(clusters)

"""Checking a QCOW image (the backend's ``_check``).  QEMU has no check for
QCOW; vdtool counts as qemu-img counts for qcow2: every L1 entry naming an
L2 table outside the file and every L2 entry naming data outside it (or a
compressed cluster that does not inflate) is one corruption, repaired by
clearing the entry; two entries naming the same cluster are one more (the
later one is repaired by a copy).  Unused space is not tracked (no reference
counts): compact rewrites the file without it."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.errors import CorruptImageError
from vdtool.core.progress import Progress
from vdtool.core.tablemap import Claimed, distinct_entries
from vdtool.formats.qcow.clusters import allocate, decompress
from vdtool.formats.qcow.layout import QCOW_OFLAG_COMPRESSED
from vdtool.formats.qcow.state import QcowState


def check(st: QcowState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    tabs = st.tables
    if st.file.writable:
        tabs.flush()
    fix = repair == "all"
    tabs.file_size = st.file.size()
    tabs.end = tabs.file_size
    seen = Claimed()
    dups: list = []
    allocated = compressed = 0
    for i in range(len(tabs.l1)):
        off = tabs.l1[i]
        if not off:
            continue
        why = tabs.table_problem(off)
        if why:
            res.corrupt(f"L1 entry {i}: L2 table offset {off} {why}", repairing=fix)
            if fix:
                tabs.set_l1(i, 0)
            continue
        t = tabs.l2(i)
        base = i * tabs.l2_entries
        # most tables are clean: every entry distinct, uncompressed and in
        # the file (a compressed entry has bit 63 set, so it is past the end)
        clean = distinct_entries(t, tabs.min_offset, max(tabs.file_size, tabs.end))
        if clean is not None and seen.claim_all(*clean):
            allocated += len(clean[0])
            progress.update(i + 1, len(tabs.l1))
            continue
        for j, e in enumerate(t):
            if not e:
                continue
            why = st.data_problem(e)
            if why is None and e & QCOW_OFLAG_COMPRESSED:
                try:
                    decompress(st, base + j, e)
                except CorruptImageError as ex:
                    why = str(ex).split(": ", 1)[-1]
            if why:
                res.corrupt(f"cluster {base + j}: entry {e:#x} {why}", repairing=fix)
                if fix:
                    t[j] = 0
                    tabs.mark_l2_dirty(i)
                continue
            allocated += 1
            if e & QCOW_OFLAG_COMPRESSED:
                compressed += 1
            elif e in seen:
                res.corrupt(f"cluster {base + j} names data at offset {e}, which another entry uses", repairing=fix)
                dups.append(base + j)
            else:
                seen.add(e)
        progress.update(i + 1, len(tabs.l1))
    if fix:
        for ci in dups:
            allocate(st, ci, st.file.pread(tabs.entry(ci), st.cs).ljust(st.cs, b"\0"))
        tabs.flush()
        res.corruptions_fixed = res.corruptions
    res.total_clusters = -(-st.virtual_size // st.cs)
    res.allocated_clusters = allocated
    res.compressed_clusters = compressed

"""Compacting a QED image: data clusters that read as zeros stop being data
(a zero entry where a parent could show through, none without a parent),
then clusters move down over the space released and leaked, and the file
is cut after the last one in use."""

from __future__ import annotations

from vdtool.core.bytesutil import is_zero
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qed.layout import QED_CLUSTER_ZERO
from vdtool.formats.qed.pack import pack
from vdtool.formats.qed.state import QedState


def compact(st: QedState, progress: Progress = NO_PROGRESS) -> None:
    tabs = st.tables
    cs = st.cs
    marker = QED_CLUSTER_ZERO if st.has_backing else 0
    buf = bytearray(cs)
    n = len(tabs.l1)
    for i in range(n):
        t = tabs.l2(i)
        if t is None:
            continue
        base = i * tabs.l2_entries
        for j in range(len(t)):
            e = t[j]
            if e > QED_CLUSTER_ZERO and st.data_problem(e) is None:
                st.file.readinto(e, buf)
                if is_zero(buf):
                    tabs.set_entry(base + j, marker)
        progress.update(i + 1, 2 * n)
    tabs.flush()
    pack(st)

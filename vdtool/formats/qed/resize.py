"""Resizing a QED image.  Growing changes the header's size (the L1 table
covers the format's maximum already).  Shrinking -- which qemu-img refuses
for QED -- writes the smaller size first, then zeros the tail of a cut
cluster, drops the entries past the end and moves clusters down over what
they leave, so qemu-img check finds no leaks."""

from __future__ import annotations

from vdtool.core.errors import UsageError
from vdtool.formats.qed.header import write_header
from vdtool.formats.qed.layout import QED_CLUSTER_ZERO, SECTOR, qemu_max_image_size
from vdtool.formats.qed.pack import pack
from vdtool.formats.qed.state import QedState


def resize(st: QedState, new_size: int) -> None:
    hdr = st.hdr
    limit = qemu_max_image_size(hdr.cluster_size, hdr.table_size)
    if new_size % SECTOR or new_size < 0 or new_size > limit:
        raise UsageError(f"QED size must be a multiple of {SECTOR} from 0 to {limit} (cluster size "
                         f"{hdr.cluster_size}, table size {hdr.table_size}), not {new_size}")
    old = hdr.image_size
    if new_size == old:
        return
    st.tables.flush()
    st.tables.changing()
    hdr.image_size = new_size
    write_header(st)
    st.file.flush()
    if new_size < old:
        _drop_tail(st, new_size, old)
        pack(st)


def _drop_tail(st: QedState, new_size: int, old: int) -> None:
    cs = st.cs
    tabs = st.tables
    first = -(-new_size // cs)  # the first cluster wholly past the end
    cut = new_size % cs
    if cut:
        e = tabs.entry(new_size // cs)
        if e > QED_CLUSTER_ZERO and st.data_problem(e) is None:
            st.file.zero_range(e + cut, cs - cut)  # a later grow reads zeros there
    last = -(-old // cs)
    n = tabs.l2_entries
    for i in range(first // n, -(-last // n)):
        if not tabs.l1[i]:
            continue
        if i * n >= first:
            tabs.set_l1(i, 0)
            continue
        for ci in range(max(first, i * n), min(last, (i + 1) * n)):
            tabs.set_entry(ci, 0)
    tabs.flush()

"""Resizing a QCOW image (QEMU cannot resize qcow at all).  The L1 table is
sized by the disk size: where a larger table fits in the zero padding QEMU
leaves after it, it grows in place; otherwise a copy goes to the end of the
file (flushed) before one header write names it and the new size together.
A shrink writes the smaller size first, then zeros the tail of a cut
cluster and drops the entries past the end (their space stays unused until
compact rewrites the file)."""

from __future__ import annotations

from array import array

from vdtool.core.bytesutil import U64, align_up, be_bytes
from vdtool.core.errors import UsageError
from vdtool.formats.qcow.header import write_xen
from vdtool.formats.qcow.layout import HEADER, MAX_SIZE, SECTOR, l1_entries
from vdtool.formats.qcow.state import QcowState


def resize(st: QcowState, new_size: int) -> None:
    hdr = st.hdr
    if new_size % SECTOR or new_size > MAX_SIZE:
        raise UsageError(f"qcow size must be a multiple of {SECTOR} up to 2^60, not {new_size}")
    if new_size == hdr.size:
        return
    tabs = st.tables
    tabs.changing()  # a tapdisk image's L1 table goes big-endian first
    tabs.flush()
    if new_size < hdr.size:
        _shrink(st, new_size)
        return
    old_n = len(tabs.l1)
    new_hdr = hdr.replace(size=new_size)
    new_n = l1_entries(new_hdr)
    if new_n > old_n:
        l1 = array(U64, tabs.l1)
        l1.extend([0] * (new_n - old_n))
        padded = align_up(old_n * 8, SECTOR)
        in_place = new_n * 8 <= padded and st.file.pread(hdr.l1_table_offset + old_n * 8, new_n * 8 - old_n * 8) \
            == bytes(new_n * 8 - old_n * 8)
        if not in_place:
            pos = tabs.allocate(align_up(new_n * 8, SECTOR), 4096 if st.xen is not None else SECTOR)
            st.file.pwrite(pos, be_bytes(l1) + bytes(align_up(new_n * 8, SECTOR) - new_n * 8))
            st.file.flush()
            new_hdr.l1_table_offset = pos
            tabs.l1_little = False
        tabs.l1 = l1
        tabs.l1_offset = new_hdr.l1_table_offset
    st.file.pwrite(0, HEADER.pack(new_hdr))
    st.file.flush()
    st.hdr = new_hdr
    write_xen(st)


def _shrink(st: QcowState, new_size: int) -> None:
    from vdtool.formats.qcow.clusters import write  # (no parent data is needed: zeros over a cluster we hold)

    tabs, cs = st.tables, st.cs
    old = st.hdr.size
    st.hdr = st.hdr.replace(size=new_size)
    st.file.pwrite(0, HEADER.pack(st.hdr))
    st.file.flush()
    cut = new_size % cs
    if cut and tabs.entry(new_size // cs):
        write(st, new_size, bytes(cs - cut), lambda o, n: bytes(n))  # a later grow reads zeros there
    first = -(-new_size // cs)
    n = tabs.l2_entries
    last = -(-old // cs)
    for i in range(first // n, min(len(tabs.l1), -(-last // n))):
        if not tabs.l1[i]:
            continue
        if i * n >= first:
            tabs.set_l1(i, 0)
            continue
        for ci in range(first, min(last, (i + 1) * n)):
            tabs.set_entry(ci, 0)
    tabs.flush()
    write_xen(st)

"""QED's data path: what a range is (unallocated, zeros, data), reads, writes
(allocating clusters at the end of the file, copy-on-write from the parent
for partial clusters) and zeros (zero clusters over unallocated space, zeros
in place over data, as QEMU writes them)."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import CorruptImageError
from vdtool.formats.qed.layout import QED_CLUSTER_ZERO
from vdtool.formats.qed.state import QedState


def data_offset(st: QedState, ci: int, e: int) -> int:
    why = st.data_problem(e)
    if why:
        raise CorruptImageError(f"L2 entry of cluster {ci} names offset {e}, which {why}", st.path)
    return e


def kind(e: int) -> Status:
    if e == 0:
        return Status.UNALLOCATED
    if e == QED_CLUSTER_ZERO:
        return Status.ZERO
    return Status.DATA


def block_status(st: QedState, offset: int, length: int) -> tuple:
    size = st.virtual_size
    if offset >= size or length <= 0:
        return Status.ZERO, max(length, 1)
    end = min(offset + length, size)
    cs = st.cs
    ci = offset // cs
    last = (end - 1) // cs
    status = kind(st.tables.entry(ci))
    n = st.tables.run_end(ci, last + 1, kind)
    return status, min(n * cs, end) - offset


def readinto(st: QedState, offset: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    total = len(mv)
    cs = st.cs
    pos = 0
    while pos < total:
        off = offset + pos
        ci, within = divmod(off, cs)
        n = min(cs - within, total - pos)
        e = st.tables.entry(ci)
        if e > QED_CLUSTER_ZERO:
            host = data_offset(st, ci, e)
            n = _contiguous(st, ci, e, n, total - pos)
            st.file.readinto(host + within, mv[pos:pos + n])
        else:
            mv[pos:pos + n] = zeros(n)
        pos += n


def _contiguous(st: QedState, ci: int, e: int, n: int, room: int) -> int:
    """``n`` grown over the clusters after ``ci`` stored right after it in the
    file (one read instead of one per cluster)."""
    cs = st.cs
    while n < room and st.tables.entry(ci + 1) == e + cs and st.data_problem(e + cs) is None:
        ci, e = ci + 1, e + cs
        n = min(room, n + cs)
    return n


def write(st: QedState, offset: int, data, parent_read: Callable) -> None:
    mv = memoryview(data).cast("B")
    total = len(mv)
    cs = st.cs
    pos = 0
    while pos < total:
        off = offset + pos
        ci, within = divmod(off, cs)
        n = min(cs - within, total - pos)
        e = st.tables.entry(ci)
        if e > QED_CLUSTER_ZERO:
            st.file.pwrite(data_offset(st, ci, e) + within, mv[pos:pos + n])
        elif n == cs:
            n = allocate_run(st, ci, mv[pos:], lambda c: st.tables.entry(c) <= QED_CLUSTER_ZERO)
        else:
            allocate(st, ci, _partial(st, ci, e, within, mv[pos:pos + n], parent_read))
        pos += n


def _partial(st: QedState, ci: int, e: int, within: int, data, parent_read: Callable) -> bytearray:
    """A whole cluster for a partial write into cluster ``ci``: an
    unallocated one starts from what the parent shows."""
    cs = st.cs
    block = bytearray(cs)
    start = ci * cs
    inside = max(0, min(cs, st.virtual_size - start))
    if e == 0 and inside and st.has_backing:
        block[:inside] = parent_read(start, inside)
    block[within:within + len(data)] = data
    return block


def allocate(st: QedState, ci: int, data) -> int:
    """Write ``data`` (one cluster) into a new cluster at the end of the file
    and point cluster ``ci`` at it (the entry is written at the next flush)."""
    off = st.tables.allocate(st.cs, st.cs)
    st.file.pwrite(off, data)
    st.tables.set_entry(ci, off)
    return off


def allocate_run(st: QedState, ci: int, data, free) -> int:
    """Whole clusters of ``data`` into new clusters from ``ci`` on, as many
    in a row as ``free(cluster)`` allows, with one write; returns the bytes
    written."""
    cs = st.cs
    k = 1
    while (k + 1) * cs <= len(data) and free(ci + k):
        k += 1
    off = st.tables.allocate(k * cs, cs)
    st.file.pwrite(off, data[:k * cs])
    for j in range(k):
        st.tables.set_entry(ci + j, off + j * cs)
    return k * cs


def write_zeroes(st: QedState, offset: int, length: int, parent_read: Callable, unmap: bool) -> None:
    """Zeros over [offset, offset+length).  Whole unallocated clusters get
    zero entries where a parent could show through (now, or after a rebase:
    ``unmap`` asks for the marker even without a parent)."""
    cs = st.cs
    size = st.virtual_size
    pos, end = offset, offset + length
    while pos < end:
        ci, within = divmod(pos, cs)
        n = min(cs - within, end - pos)
        e = st.tables.entry(ci)
        whole = within == 0 and (n == cs or pos + n >= size)
        if e > QED_CLUSTER_ZERO:
            # data stays allocated (no reference counts to free it with): zeros in place
            st.file.zero_range(data_offset(st, ci, e) + within, n)
        elif e == QED_CLUSTER_ZERO:
            pass
        elif whole:
            if st.has_backing or unmap:
                st.tables.set_entry(ci, QED_CLUSTER_ZERO)
        elif st.has_backing and parent_read(pos, n) != bytes(n):
            allocate(st, ci, _partial(st, ci, 0, within, bytes(n), parent_read))
        pos += n

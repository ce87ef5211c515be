"""QCOW's data path: what a range is (unallocated or data; version 1 has no
zero clusters), reads (plain and zlib-compressed clusters: raw deflate,
window 2^12, as QEMU and tapdisk write them), writes (clusters allocated at
the end of the file, aligned to the cluster size; a partial write into a
compressed or unallocated cluster copies what it showed first) and
compressed clusters for convert -c."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.bytesutil import zeros
from vdtool.core.deflate import DeflateError, deflate, inflate
from vdtool.core.errors import CorruptImageError
from vdtool.formats.qcow.layout import QCOW_OFLAG_COMPRESSED
from vdtool.formats.qcow.state import QcowState

WBITS = -12  # raw deflate with a 4 KiB window


def checked(st: QcowState, ci: int, e: int) -> int:
    why = st.data_problem(e)
    if why:
        raise CorruptImageError(f"L2 entry of cluster {ci} ({e:#x}) {why}", st.path)
    return e


def block_status(st: QcowState, offset: int, length: int) -> tuple:
    size = st.virtual_size
    if offset >= size or length <= 0:
        return Status.ZERO, max(length, 1)
    end = min(offset + length, size)
    cs = st.cs
    ci = offset // cs
    last = (end - 1) // cs
    alloc = st.tables.entry(ci) != 0
    n = st.tables.run_end(ci, last + 1, bool)
    return (Status.DATA if alloc else Status.UNALLOCATED), min(n * cs, end) - offset


def decompress(st: QcowState, ci: int, e: int) -> bytes:
    off, size = st.compressed(e)
    if st.cache[0] == e:
        return st.cache[1]
    raw = st.file.pread(off, size)
    try:
        out = inflate(raw, st.cs, WBITS).data
    except DeflateError as ex:
        raise CorruptImageError(f"compressed cluster {ci} at offset {off} does not inflate: {ex}", st.path) from None
    if len(out) != st.cs:
        raise CorruptImageError(f"compressed cluster {ci} at offset {off} inflates to {len(out)} bytes, not "
                                f"{st.cs}", st.path)
    st.cache = (e, out)
    return out


def readinto(st: QcowState, offset: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    total = len(mv)
    cs = st.cs
    pos = 0
    while pos < total:
        ci, within = divmod(offset + pos, cs)
        n = min(cs - within, total - pos)
        e = st.tables.entry(ci)
        if not e:
            mv[pos:pos + n] = zeros(n)
        elif e & QCOW_OFLAG_COMPRESSED:
            checked(st, ci, e)
            mv[pos:pos + n] = decompress(st, ci, e)[within:within + n]
        else:
            host = checked(st, ci, e)
            while pos + n < total and st.tables.entry(ci + 1) == e + cs and st.data_problem(e + cs) is None:
                ci, e = ci + 1, e + cs  # stored right after: one read for the run
                n = min(total - pos, n + cs)
            st.file.readinto(host + within, mv[pos:pos + n])
        pos += n


def write(st: QcowState, offset: int, data, parent_read: Callable) -> None:
    mv = memoryview(data).cast("B")
    total = len(mv)
    cs = st.cs
    pos = 0
    while pos < total:
        ci, within = divmod(offset + pos, cs)
        n = min(cs - within, total - pos)
        e = st.tables.entry(ci)
        if e and not e & QCOW_OFLAG_COMPRESSED:
            st.file.pwrite(checked(st, ci, e) + within, mv[pos:pos + n])
        elif n == cs:
            # unallocated or compressed clusters: replaced whole
            n = allocate_run(st, ci, mv[pos:], lambda c: _replaceable(st.tables.entry(c)))
        else:
            allocate(st, ci, _partial(st, ci, e, within, mv[pos:pos + n], parent_read))
        pos += n


def _partial(st: QcowState, ci: int, e: int, within: int, data, parent_read: Callable) -> bytearray:
    cs = st.cs
    start = ci * cs
    if e:
        block = bytearray(decompress(st, ci, checked(st, ci, e)))
    else:
        block = bytearray(cs)
        inside = max(0, min(cs, st.virtual_size - start))
        if inside and st.backing_name:
            block[:inside] = parent_read(start, inside)
    block[within:within + len(data)] = data
    return block


def allocate(st: QcowState, ci: int, data) -> int:
    off = st.tables.allocate(st.cs, st.cs)
    st.file.pwrite(off, data)
    st.tables.set_entry(ci, off)
    st.cache = (-1, b"")
    return off


def _replaceable(e: int) -> bool:
    return not e or bool(e & QCOW_OFLAG_COMPRESSED)


def allocate_run(st: QcowState, ci: int, data, free) -> int:
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
    st.cache = (-1, b"")
    return k * cs


def write_zeroes(st: QcowState, offset: int, length: int, parent_read: Callable) -> None:
    """QCOW v1 has no zero clusters: zeros over data are written in place;
    over an unallocated cluster they are written only where a parent shows
    something else."""
    cs = st.cs
    pos, end = offset, offset + length
    while pos < end:
        ci, within = divmod(pos, cs)
        n = min(cs - within, end - pos)
        e = st.tables.entry(ci)
        if e and not e & QCOW_OFLAG_COMPRESSED:
            st.file.zero_range(checked(st, ci, e) + within, n)
        elif e or (st.backing_name and parent_read(pos, n) != bytes(n)):
            write(st, pos, bytes(n), parent_read)
        pos += n


def compress(cs: int, data, level: int | None = None) -> bytes | None:
    """One cluster deflated as QEMU's qcow reads it (raw deflate, window
    2^12; level: deflate 1-9, None for zlib's default 6, QEMU's);
    None when it does not get smaller."""
    out = deflate(data, level, WBITS)
    return out if len(out) < cs else None


def write_compressed(st: QcowState, offset: int, packed: bytes | None, data) -> None:
    """A whole cluster: compressed at the end of the file, unaligned, right
    after what is there (as QEMU packs them); plain when ``packed`` is None."""
    cs = st.cs
    ci = offset // cs
    e = st.tables.entry(ci)
    if packed is None or offset % cs or (e and not e & QCOW_OFLAG_COMPRESSED):
        block = bytes(data) + bytes(cs - len(data)) if len(data) < cs else data
        write(st, offset, block, lambda o, n: bytes(n))
        return
    off = st.tables.allocate(len(packed), 1)
    st.file.pwrite(off, packed)
    st.tables.set_entry(ci, st.compressed_entry(off, len(packed)))
    st.cache = (-1, b"")

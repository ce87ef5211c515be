"""The data path: block_status, read, write and write_zeroes.

A fixed disk is its data.  In a dynamic disk each block's sector bitmap
says which sectors it holds: a clear bit reads the parent (zeros in a
dynamic disk), as VirtualBox does; QEMU ignores the bitmaps but always sets
whole ones, so the two agree on every image QEMU writes.  Callers check
ranges and writability."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.backend import MapExtent, Status
from vdtool.core.bytesutil import ZERO_BUFFER, ceil_div, is_zero, zeros
from vdtool.core.extents import flat_extent
from vdtool.formats.vhd.layout import SECTOR, TYPE_DIFF, TYPE_FIXED, UNUSED
from vdtool.formats.vhd.metadata import bits, run, set_bits
from vdtool.formats.vhd.space import allocate, release, require_usable
from vdtool.formats.vhd.state import VhdState

ParentRead = Callable[[int, int], bytes]


def data_offset(st: VhdState, idx: int) -> int:
    """Where block ``idx``'s data starts in the file (after its bitmap)."""
    return st.bat[idx] * SECTOR + st.bitmap_size


def block_status(st: VhdState, offset: int, length: int) -> tuple:
    end = min(offset + length, st.size)
    if offset >= end:
        return Status.ZERO, max(length, 1)
    if st.disk_type == TYPE_FIXED:
        data = st.file.next_data(offset)
        if data > offset:
            return Status.ZERO, min(data, end) - offset
        hole = st.file.next_hole(offset)
        return Status.DATA, max(1, min(hole, end) - offset)
    bs = st.block
    bat = st.bat
    status = None
    pos = offset
    while pos < end:
        idx = pos // bs
        bstart = idx * bs
        bend = min(bstart + bs, end)
        if bat[idx] == UNUSED:
            here = Status.UNALLOCATED
            # skip whole runs of unallocated blocks quickly
            j = idx + 1
            last = (end - 1) // bs
            while j <= last and bat[j] == UNUSED:
                j += 1
            bend = min(j * bs, end)
            n = bend - pos
        else:
            require_usable(st, idx)
            b = bits(st, idx)
            if b == st.full_mask:
                here, n = Status.DATA, bend - pos
            else:
                s = (pos - bstart) // SECTOR
                is_set, cnt = run(st.spb, b, s, ceil_div(bend - bstart, SECTOR))
                here = Status.DATA if is_set else Status.UNALLOCATED
                n = min(bstart + (s + cnt) * SECTOR, bend) - pos
        if status is None:
            status = here
        elif here != status:
            break
        pos += n
        if pos < bend:
            break  # the run changed inside a block
    return status, pos - offset


def map_extent(st: VhdState, offset: int, length: int, has_parent: bool) -> MapExtent:
    """qemu-img map's view: a fixed disk is its file (holes: data reading
    as zeros); a dynamic disk's block is data at its place after the
    bitmap, a free block of a disk without a parent is ZERO."""
    end = min(offset + length, st.size)
    if offset >= end:
        return MapExtent(Status.ZERO, max(length, 1))
    if st.disk_type == TYPE_FIXED:
        return flat_extent(st.file, offset, end - offset)
    status, n = block_status(st, offset, length)
    if status == Status.UNALLOCATED and not has_parent:
        return MapExtent(Status.ZERO, n)
    if status != Status.DATA:
        return MapExtent(status, n)
    idx = offset // st.block
    n = min(n, (idx + 1) * st.block - offset)
    return MapExtent(Status.DATA, n, data_offset(st, idx) + offset - idx * st.block)


def readinto(st: VhdState, offset: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    total = len(mv)
    if st.disk_type == TYPE_FIXED:
        inside = max(0, min(total, st.size - offset))
        if inside:
            st.file.readinto(offset, mv[:inside])
        if inside < total:
            mv[inside:] = zeros(total - inside)
        return
    bs, bat = st.block, st.bat
    done = 0
    while done < total:
        pos = offset + done
        idx = pos // bs
        bstart = idx * bs
        n = min(bstart + bs - pos, total - done)
        if pos >= st.size or idx >= st.max_table_entries or bat[idx] == UNUSED:
            mv[done:done + n] = zeros(n)
        else:
            require_usable(st, idx)
            b = bits(st, idx)
            base = data_offset(st, idx) - bstart  # file offset of disk offset 0, in this block
            if b == st.full_mask:
                st.file.readinto(base + pos, mv[done:done + n])
            else:
                _read_sectors(st, b, bstart, base, pos, mv[done:done + n])
        done += n


def _read_sectors(st: VhdState, b: int, bstart: int, base: int, pos: int, out: memoryview) -> None:
    """Fill ``out`` from disk offset ``pos`` in the block at ``bstart``
    whose bitmap is ``b``: sectors whose bit is clear read as zeros."""
    stop = pos + len(out)
    limit = ceil_div(stop - bstart, SECTOR)
    done = 0
    while pos < stop:
        s = (pos - bstart) // SECTOR
        is_set, cnt = run(st.spb, b, s, limit)
        k = min(bstart + (s + cnt) * SECTOR, stop) - pos
        if is_set:
            st.file.readinto(base + pos, out[done:done + k])
        else:
            out[done:done + k] = zeros(k)
        done += k
        pos += k


def write(st: VhdState, offset: int, mv: memoryview, parent_read: ParentRead) -> None:
    if st.disk_type == TYPE_FIXED:
        st.file.pwrite(offset, mv)
        return
    bs = st.block
    total = len(mv)
    done = 0
    while done < total:
        pos = offset + done
        idx = pos // bs
        bstart = idx * bs
        n = min(bstart + bs - pos, total - done)
        write_in_block(st, idx, pos - bstart, mv[done:done + n], parent_read)
        done += n


def write_in_block(st: VhdState, idx: int, inb: int, data, parent_read: ParentRead) -> None:
    """Write ``data`` at ``inb`` bytes into block ``idx`` (allocating it);
    partial sectors are completed from the block or, where the block does
    not hold them, from the parent."""
    if st.bat[idx] == UNUSED:
        allocate(st, idx)
    require_usable(st, idx)
    n = len(data)
    s0, s1 = inb // SECTOR, (inb + n - 1) // SECTOR  # first and last sector touched
    base = data_offset(st, idx)
    head_cut = inb % SECTOR
    tail_cut = (inb + n) % SECTOR
    b = bits(st, idx) if head_cut or tail_cut else 0

    def sector_content(s: int) -> bytearray:
        if (b >> (st.spb - 1 - s)) & 1:
            return bytearray(st.file.pread(base + s * SECTOR, SECTOR).ljust(SECTOR, b"\0"))
        return bytearray(parent_read(idx * st.block + s * SECTOR, SECTOR))

    if s0 == s1 and (head_cut or tail_cut):
        sec = sector_content(s0)
        sec[head_cut:head_cut + n] = data
        st.file.pwrite(base + s0 * SECTOR, sec)
    else:
        pos = 0
        if head_cut:
            sec = sector_content(s0)
            k = SECTOR - head_cut
            sec[head_cut:] = data[:k]
            st.file.pwrite(base + s0 * SECTOR, sec)
            pos = k
        body_end = n - tail_cut if tail_cut else n
        if body_end > pos:
            st.file.pwrite(base + inb + pos, data[pos:body_end])
        if tail_cut:
            sec = sector_content(s1)
            sec[:tail_cut] = data[body_end:]
            st.file.pwrite(base + s1 * SECTOR, sec)
    set_bits(st, idx, s0, s1 + 1)
    st.data_dirty = True


def write_zeros_in_block(st: VhdState, idx: int, inb: int, n: int, parent_read: ParentRead) -> None:
    """Write ``n`` zero bytes at ``inb`` into block ``idx``, in pieces of
    the shared zero buffer."""
    k = 0
    while k < n:
        m = min(len(ZERO_BUFFER), n - k)
        write_in_block(st, idx, inb + k, zeros(m), parent_read)
        k += m


def write_zeroes(st: VhdState, offset: int, length: int, unmap: bool, parent_read: ParentRead) -> None:
    """Zeros over the range: released blocks where a whole block may go
    (over a parent only where the parent reads zeros there), else written."""
    if st.disk_type == TYPE_FIXED:
        if not (unmap and st.file.punch_hole(offset, length)):
            st.file.write_zeroes(offset, length)
        return
    bs = st.block
    diff = st.disk_type == TYPE_DIFF
    pos, end = offset, offset + length
    while pos < end:
        idx = pos // bs
        bstart = idx * bs
        n = min(bstart + bs - pos, end - pos)
        whole = pos == bstart and (n == bs or pos + n >= st.size)
        allocated = st.bat[idx] != UNUSED
        parent_zero = not diff or is_zero(parent_read(pos, n))
        if allocated and whole and unmap and parent_zero:
            release(st, idx)
        elif allocated or not parent_zero:
            write_zeros_in_block(st, idx, pos - bstart, n, parent_read)
        pos += n

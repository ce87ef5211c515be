"""Compact: a fixed disk punches holes where its data is zeros; a dynamic
one releases blocks that read as zeros (over the parent's zeros only, in a
differencing disk), then closes the holes by moving blocks down, each copy
landing on space nothing uses before the BAT points at it."""

from __future__ import annotations

from vdtool.core.backend import Status
from vdtool.core.bytesutil import ceil_div, is_zero
from vdtool.core.errors import CorruptImageError
from vdtool.core.progress import Progress
from vdtool.formats.vhd.blocks import ParentRead, block_status, data_offset
from vdtool.formats.vhd.layout import SECTOR, TYPE_DIFF, TYPE_FIXED, UNUSED
from vdtool.formats.vhd.metadata import bits, flush, run, write_bat, write_footer
from vdtool.formats.vhd.space import allocated_blocks
from vdtool.formats.vhd.state import VhdState

FIXED_STEP = 1 << 16  # the granularity of holes punched in a fixed disk


def compact(st: VhdState, progress: Progress, parent_read: ParentRead) -> None:
    if st.disk_type == TYPE_FIXED:
        _compact_fixed(st, progress)
        return
    if st.bad:
        raise CorruptImageError(f"{len(st.bad)} BAT entries are unusable ({next(iter(st.bad.values()))}); "
                                f"run check -r all first", st.path)
    flush(st)
    _release_zero_blocks(st, progress.sub(0, 60), parent_read)
    _close_holes(st, progress.sub(60, 40))
    st.bitmaps.clear()
    write_footer(st)
    st.file.flush()


def _block_reads_zero(st: VhdState, idx: int, buf: bytearray, parent_read: ParentRead) -> bool:
    """Whether allocated block ``idx`` reads as zeros (its sectors in use
    are zero, and in a differencing disk so is the parent under them)."""
    bstart = idx * st.block
    n = min(st.block, st.size - bstart)
    st.file.readinto(data_offset(st, idx), memoryview(buf)[:n])
    b = bits(st, idx)
    s, limit = 0, ceil_div(n, SECTOR)
    while s < limit:
        is_set, cnt = run(st.spb, b, s, limit)
        if is_set:
            lo, hi = s * SECTOR, min((s + cnt) * SECTOR, n)
            if not is_zero(buf, lo, hi - lo):
                return False
            if st.disk_type == TYPE_DIFF and not is_zero(parent_read(bstart + lo, hi - lo)):
                return False
        s += cnt
    return True


def _release_zero_blocks(st: VhdState, progress: Progress, parent_read: ParentRead) -> None:
    allocated = allocated_blocks(st)
    total = len(allocated) or 1
    buf = bytearray(st.block)
    released = 0
    for k, idx in enumerate(allocated):
        if _block_reads_zero(st, idx, buf, parent_read):
            st.bat[idx] = UNUSED
            st.bitmaps.pop(idx, None)
            released += 1
        progress.update(k + 1, total)
    if released:
        write_bat(st)
        st.file.flush()


def _close_holes(st: VhdState, progress: Progress) -> None:
    """Blocks not in their final slot move into free slots, the highest
    first; blocks straddling the target area go to the end first."""
    slot = st.slot
    blocks = sorted((e * SECTOR, i) for i, e in enumerate(st.bat) if e != UNUSED)
    first = st.meta_end()
    count = len(blocks)
    region_end = first + count * slot
    placed = set()
    misplaced = []
    for off, i in blocks:
        k, r = divmod(off - first, slot)
        if off >= first and r == 0 and k < count:
            placed.add(k)
        else:
            misplaced.append((off, i))
    sbuf = bytearray(slot)
    straddle = [(o, i) for o, i in misplaced if o < region_end]
    if straddle:
        relocated = {}
        for o, i in straddle:
            st.file.readinto(o, sbuf)
            st.file.pwrite(st.next_free, sbuf)
            relocated[i] = st.next_free
            st.next_free += slot
        _point_bat_at(st, relocated)
        misplaced = [(relocated.get(i, o), i) for o, i in misplaced]
    free = [k for k in range(count) if k not in placed]
    misplaced.sort(reverse=True)
    assign = {}
    for (o, i), k in zip(misplaced, free):
        st.file.readinto(o, sbuf)
        st.file.pwrite(first + k * slot, sbuf)
        assign[i] = first + k * slot
        progress.update(len(assign), len(free) or 1)
    if assign:
        _point_bat_at(st, assign)
    st.next_free = region_end


def _point_bat_at(st: VhdState, new_offsets: dict) -> None:
    """After the copies are on disk, the BAT entries of the moved blocks."""
    st.file.flush()
    for i, new in new_offsets.items():
        st.bat[i] = new // SECTOR
    write_bat(st)
    st.file.flush()


def _compact_fixed(st: VhdState, progress: Progress) -> None:
    step = FIXED_STEP
    buf = bytearray(step)
    pos = 0
    while pos < st.size:
        status, n = block_status(st, pos, st.size - pos)
        if status == Status.DATA:
            start = pos // step * step
            stop = pos + n
            while start < stop:
                m = min(step, st.size - start)
                st.file.readinto(start, memoryview(buf)[:m])
                if is_zero(buf, 0, m):
                    st.file.punch_hole(start, m)
                start += step
            pos = max(start, pos + n)
        else:
            pos += n
        progress.update(min(pos, st.size), st.size)

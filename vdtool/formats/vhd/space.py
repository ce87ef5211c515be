"""Where blocks live in a dynamic VHD: which BAT entries are usable,
allocating and releasing blocks, moving blocks out of the way of growing
metadata, and pulling the end of the file back."""

from __future__ import annotations

import bisect
import operator
from itertools import islice

from vdtool.core.bytesutil import align_up
from vdtool.core.errors import CorruptImageError, VdError
from vdtool.formats.vhd.layout import BAT_PER_SECTOR, FOOTER, SECTOR, UNUSED, pack_with_checksum
from vdtool.formats.vhd.metadata import write_bat, write_footer
from vdtool.formats.vhd.state import VhdState


def find_bad_entries(st: VhdState, file_size: int) -> None:
    """Mark unusable BAT entries in ``st.bad`` (check reports and repairs
    them: past the end of the data, over metadata, over another block) and
    set where new blocks go."""
    if _all_usable(st):
        st.bad = {}
        top = max(st.meta_end(), st.data_end)
        if st.allocated_count():
            top = max(top, max(filter(UNUSED.__ne__, st.bat)) * SECTOR + st.slot)
        st.next_free = align_up(top, SECTOR)
        return
    bad = st.bad = {}
    meta = sorted(st.meta_ranges())
    slot, block, bm_size = st.slot, st.block, st.bitmap_size
    used = []
    cur = max(st.size, st.footer.current_size)
    for i, e in enumerate(st.bat):
        if e == UNUSED:
            continue
        off = e * SECTOR
        need = bm_size + min(block, max(cur - i * block, 0))
        if off + need > st.data_end:
            bad[i] = (f"BAT entry {i}: block at offset {off} (length {need}) runs past the end of the data "
                      f"(file size {file_size})")
            continue
        for s, e2, what in meta:
            if off < e2 and s < off + slot:
                bad[i] = f"BAT entry {i}: block at offset {off} overlaps the {what} at {s}"
                break
        else:
            used.append((off, i))
    # of blocks that overlap, the first in the file stays usable
    used.sort()
    keep_end, keep_i = -1, -1
    for o, i in used:
        if o < keep_end:
            bad[i] = f"BAT entry {i}: block at offset {o} overlaps block {keep_i} at {keep_end - slot}"
        else:
            keep_end, keep_i = o + slot, i
    top = max([o + slot for o, _ in used] + [st.meta_end(), st.data_end])
    st.next_free = align_up(top, SECTOR)


def _all_usable(st: VhdState) -> bool:
    """Whether no BAT entry is unusable, tested on the whole table (sorted
    offsets: blocks apart, the last inside the data, none over metadata)
    instead of entry by entry; False when in doubt (the walk then names
    what is wrong)."""
    offs = sorted(map(SECTOR.__mul__, filter(UNUSED.__ne__, st.bat)))
    if not offs:
        return True
    slot = st.slot
    if offs[-1] + slot > st.data_end:  # the longest a block can be
        return False
    if not all(map(operator.le, map(slot.__add__, offs), islice(offs, 1, None))):
        return False  # two blocks overlap
    # a block at off meets the range [s, e) when s - slot < off < e
    return not any(bisect.bisect_left(offs, e) > bisect.bisect_right(offs, s - slot)
                   for s, e, _ in st.meta_ranges())


def allocated_blocks(st: VhdState) -> list:
    """The blocks the BAT points at, in block order."""
    if len(st.bat) == st.bat.count(UNUSED):  # an empty table, at C speed
        return []
    return [i for i, e in enumerate(st.bat) if e != UNUSED]


def require_usable(st: VhdState, idx: int) -> None:
    """Refuse to read or write through a broken BAT entry."""
    why = st.bad.get(idx)
    if why is not None:
        raise CorruptImageError(why + " (vdtool check -r all drops it)", st.path)


def allocate(st: VhdState, idx: int) -> None:
    """Give block ``idx`` the slot at the end (bitmap cleared, data zero)."""
    off = st.next_free
    if (off // SECTOR) >= UNUSED:
        raise VdError(f"the file would grow past what a BAT entry can address (offset {off})", st.path)
    st.next_free = off + st.slot
    st.bat[idx] = off // SECTOR
    st.bat_dirty.add(idx // BAT_PER_SECTOR)
    st.bitmaps[idx] = bytearray(st.bitmap_size)
    st.bm_dirty.add(idx)
    st.footer_dirty = True
    # Only the old footer can lie here, inside the bitmap written at
    # flush; anything past it would be stale data that must read as zeros
    if st.file.size() > off + st.bitmap_size:
        st.file.zero_range(off + st.bitmap_size, st.block)


def release(st: VhdState, idx: int) -> None:
    """Unallocate block ``idx`` and give its space back to the file system."""
    off = st.bat[idx] * SECTOR
    st.bat[idx] = UNUSED
    st.bat_dirty.add(idx // BAT_PER_SECTOR)
    st.bitmaps.pop(idx, None)
    st.bm_dirty.discard(idx)
    st.bad.pop(idx, None)
    st.data_dirty = True
    if off + st.slot <= st.file.size():
        st.file.punch_hole(off, st.slot)


def make_room(st: VhdState, start: int, end: int) -> None:
    """Move every block that overlaps [start, end) to the end of the file,
    flushed before the BAT points at the new place."""
    slot = st.slot
    movers = [i for i, e in enumerate(st.bat)
              if e != UNUSED and i not in st.bad and e * SECTOR < end and start < e * SECTOR + slot]
    st.next_free = max(st.next_free, align_up(end, SECTOR))
    if not movers:
        return
    buf = bytearray(slot)
    moved = {}
    for i in movers:
        st.file.readinto(st.bat[i] * SECTOR, buf)
        new = st.next_free
        # the block and a footer behind it in one write: the block lands
        # where the end footer was, and a crash before the footer is
        # written again must not leave the file without one
        st.file.pwrite(new, bytes(buf) + pack_with_checksum(FOOTER, st.footer))
        st.next_free = new + slot
        moved[i] = new
    write_footer(st)
    st.file.flush()
    for i, new in moved.items():
        st.bat[i] = new // SECTOR
    write_bat(st)
    st.file.flush()


def trim_tail(st: VhdState) -> None:
    """Pull the end of the file back to the last block in use."""
    ends = [e * SECTOR + st.slot for e in st.bat if e != UNUSED and e * SECTOR < st.next_free]
    top = align_up(max(ends + [st.meta_end()]), SECTOR)
    if top < st.next_free:
        st.next_free = top

"""Resize: a fixed disk moves its footer; a dynamic one grows its BAT
(moving what lies behind it) or, shrinking, releases the blocks past the
new end after the smaller size is on disk."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import NotSupported, UsageError
from vdtool.formats.vhd.blocks import ParentRead, write_zeros_in_block
from vdtool.formats.vhd.layout import (CHS_CREATORS, CREATOR_APP, FOOTER, FOOTER_SIZE, MAX_DYNAMIC_SIZE, MAX_SIZE,
                                       SECTOR, TYPE_FIXED, UNUSED, chs_geometry, pack_with_checksum)
from vdtool.formats.vhd.metadata import flush, write_bat, write_footer, write_header
from vdtool.formats.vhd.space import make_room, release, trim_tail
from vdtool.formats.vhd.state import VhdState


def resize(st: VhdState, new_size: int, parent_read: ParentRead) -> None:
    if new_size < 0:
        raise UsageError(f"size {new_size} is negative")
    new_size = align_up(new_size, SECTOR)
    if new_size > MAX_SIZE:
        raise UsageError(f"size {new_size} is larger than a VHD can describe (2^56)")
    if st.disk_type == TYPE_FIXED:
        _resize_fixed(st, new_size)
        return
    if new_size > MAX_DYNAMIC_SIZE:
        raise UsageError(f"size {new_size} is above the 2040 GiB ({MAX_DYNAMIC_SIZE} bytes) a dynamic VHD "
                         f"can hold")
    need = ceil_div(new_size, st.block)
    if new_size < st.size:
        _shrink_dynamic(st, new_size, need, parent_read)
    elif need > st.max_table_entries:
        flush(st)
        _grow_bat(st, need)
    set_size_fields(st, new_size)
    st.size = new_size
    trim_tail(st)
    write_footer(st)
    st.file.flush()


def set_size_fields(st: VhdState, new_size: int) -> None:
    """The footer's size fields for ``new_size``: current size, CHS
    geometry and original size.  The specification calls original size
    informational (the size at creation; Hyper-V's Resize-VHD leaves it
    there), but libvhdi, and so vhdiinfo and the forensic tools built on it,
    take it as the media size: it follows the new size, so that every
    reader (qemu-img, VirtualBox and Hyper-V by current size, libvhdi by
    original size, CHS readers by the geometry) sees the same disk."""
    ft = st.footer
    ft.current_size = new_size
    ft.original_size = new_size
    ft.cylinders, ft.heads, ft.sectors_per_track = chs_geometry(new_size)
    if ft.creator_application in CHS_CREATORS:
        # the geometry would cut the new size: say the current size counts
        ft.creator_application = CREATOR_APP


def _resize_fixed(st: VhdState, new_size: int) -> None:
    f = st.file
    f.flush()
    old_end = st.data_end
    set_size_fields(st, new_size)
    f.pwrite(new_size, pack_with_checksum(FOOTER, st.footer))
    f.flush()
    if new_size > old_end:
        # the old footer now lies inside the disk: it must read as zeros
        f.zero_range(old_end, min(FOOTER_SIZE, new_size - old_end))
    else:
        f.truncate(new_size + FOOTER_SIZE)
    f.flush()
    st.data_end = new_size
    st.size = new_size


def _shrink_dynamic(st: VhdState, new_size: int, need: int, parent_read: ParentRead) -> None:
    """The smaller size goes into the footer first: from then on the part
    past the new end is out of sight, so a crash while it is zeroed and its
    blocks released leaves the new content (and at worst leaked blocks),
    never a disk that reads neither old nor new, or a header whose table no
    longer covers the old size."""
    old_size, bs = st.size, st.block
    flush(st)
    set_size_fields(st, new_size)
    st.size = new_size
    write_footer(st)
    st.file.flush()
    if new_size % bs:
        idx = new_size // bs
        if st.bat[idx] != UNUSED and idx not in st.bad:
            cut = min((idx + 1) * bs, old_size)
            write_zeros_in_block(st, idx, new_size - idx * bs, cut - new_size, parent_read)
    for i in range(need, st.max_table_entries):
        if st.bat[i] != UNUSED:
            release(st, i)
    flush(st)
    del st.bat[need:]
    st.max_table_entries = need
    write_bat(st)
    write_header(st)
    st.file.flush()


def _grow_bat(st: VhdState, need: int) -> None:
    """A BAT of ``need`` entries in place: blocks behind the table move to
    the end, and so do locators in the way (the header that points at them
    written while the old, smaller table is still the valid one)."""
    to = st.table_offset
    new_bat_end = align_up(to + need * 4, SECTOR)
    old_end = align_up(to + st.max_table_entries * 4, SECTOR)
    if to < st.header_offset < new_bat_end:
        raise NotSupported("growing", "vhd", st.path, "the dynamic disk header follows the BAT")
    in_way = [loc for loc in st.locators if loc.offset < new_bat_end and to < loc.offset + loc.space]
    end = new_bat_end
    if in_way:
        end = align_up(max([new_bat_end] + [loc.offset + loc.space for loc in st.locators]), SECTOR)
        datas = [st.file.pread_exact(loc.offset, loc.length, "parent locator") for loc in in_way]
        pos = end
        end += sum(align_up(len(d), SECTOR) for d in datas)
    make_room(st, old_end, end)
    if in_way:
        for loc, data in zip(in_way, datas):
            space = align_up(len(data), SECTOR)
            st.file.pwrite(pos, data.ljust(space, b"\0"))
            loc.offset, loc.space = pos, space
            pos += space
        st.file.flush()
        write_header(st)  # still the old table size: the old BAT stays valid
        st.file.flush()
    st.bat.extend([UNUSED] * (need - st.max_table_entries))
    st.max_table_entries = need
    write_bat(st)
    st.file.flush()
    write_header(st)
    st.file.flush()

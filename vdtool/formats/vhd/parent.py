"""set_parent: record a parent (differencing disk) or drop it (dynamic
disk), in an order that a crash between two writes leaves an image that
opens: the old header never points at half-written locators, and a
differencing disk never loses its parent's UUID before it stops being one."""

from __future__ import annotations

import os

from vdtool.core.backend import ParentSpec
from vdtool.core.bytesutil import align_up
from vdtool.formats.vhd.layout import (HEADER_SIZE, SECTOR, TYPE_DIFF, TYPE_DYNAMIC, uuid_bytes, vhd_time)
from vdtool.formats.vhd.locators import Locator, decode_path, encode_paths
from vdtool.formats.vhd.metadata import flush, write_footer, write_header
from vdtool.formats.vhd.space import make_room
from vdtool.formats.vhd.state import VhdState


def set_parent(st: VhdState, parent: ParentSpec | None) -> None:
    flush(st)
    if parent is None:
        _drop_parent(st)
        return
    uid, ts = _parent_identity(parent)
    abs_path = os.path.abspath(parent.path)
    datas = encode_paths(parent.recorded_name, abs_path)
    start = _locator_area(st)
    spaces = [align_up(max(len(d), SECTOR), SECTOR) for _, d in datas]
    need_end = start + sum(spaces)
    make_room(st, start, need_end)
    locs = []
    pos = start
    for (code, data), space in zip(datas, spaces):
        st.file.pwrite(pos, data.ljust(space, b"\0"))
        locs.append(Locator(code=code, space=space, length=len(data), offset=pos, path=decode_path(code, data)))
        pos += space
    st.file.flush()
    st.locators = locs
    st.parent_uid, st.parent_ts = uid, ts
    st.parent_name = os.path.basename(abs_path)[:256]
    st.next_free = max(st.next_free, align_up(need_end, SECTOR))
    write_header(st)
    st.file.flush()
    st.disk_type = st.footer.disk_type = TYPE_DIFF
    write_footer(st)
    st.file.flush()


def _drop_parent(st: VhdState) -> None:
    # Footer first: once it says "dynamic" the parent fields of the header
    # are ignored, so a crash between the two writes leaves a standalone
    # disk.  (Header first left a differencing disk whose parent UUID was
    # zero: it no longer opened.)
    st.disk_type = st.footer.disk_type = TYPE_DYNAMIC
    write_footer(st)
    st.file.flush()
    st.parent_uid, st.parent_ts, st.parent_name = bytes(16), 0, ""
    st.locators = []
    write_header(st)
    st.file.flush()


def _parent_identity(parent: ParentSpec) -> tuple:
    """(Parent Unique ID, Parent Time Stamp): a VHD parent's own unique ID
    and footer time stamp, else the parent's UUID (if any) and mtime."""
    pimg = parent.image
    if pimg is not None and pimg.name == "vhd":
        return uuid_bytes(pimg.uuid), pimg.timestamp
    return uuid_bytes(parent.uuid), vhd_time(parent.mtime) if parent.mtime else 0


def _locator_area(st: VhdState) -> int:
    """Where new locator data goes: right after the BAT (and the header,
    should that come later); blocks in the way move to the end."""
    start = align_up(max(st.table_offset + st.max_table_entries * 4, st.header_offset + HEADER_SIZE), SECTOR)
    if st.disk_type == TYPE_DIFF:
        # Never overwrite the locators the header on disk points at: a
        # crash before the new header is written would leave the old
        # header naming half-written paths.  The new data goes past them.
        for loc in st.locators:
            start = max(start, align_up(loc.offset + loc.space, SECTOR))
    return start

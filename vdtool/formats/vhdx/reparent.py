"""Changing the parent (rebase, merge into the child): a new parent
locator is written in free space of the metadata region and flushed, then
the metadata table entry and the file parameters change through the log.
Dropping the parent first makes partially present blocks whole (their
missing sectors were copied or zeroed by the op), so the image is a
plain dynamic one."""

from __future__ import annotations

from vdtool.core.backend import ParentSpec, Status
from vdtool.core.errors import UsageError
from vdtool.formats.vhdx import bat
from vdtool.formats.vhdx.headers import begin_modification
from vdtool.formats.vhdx.layout import (FILE_PARAMETERS, FILE_PARAMETERS_GUID, HAS_PARENT, METADATA_SIGNATURE,
                                        METADATA_TABLE_ENTRY, METADATA_TABLE_HEADER,
                                        PARENT_LOCATOR_GUID, PAYLOAD_BLOCK_FULLY_PRESENT,
                                        PAYLOAD_BLOCK_PARTIALLY_PRESENT, META_IS_REQUIRED, META_IS_VIRTUAL_DISK,
                                        bat_entries, bat_entry, bat_index, bat_offset, bat_state)
from vdtool.formats.vhdx.parent import encode_locator, locator_for
from vdtool.formats.vhdx.resize import patch_sectors, set_item
from vdtool.formats.vhdx.state import VhdxState


def set_parent(st: VhdxState, parent: ParentSpec | None, linkage: bytes | None) -> None:
    begin_modification(st, visible=True)
    if parent is None:
        if st.has_parent:
            _whole_blocks(st)
            _set_flags(st, st.param_flags & ~HAS_PARENT)
            _drop_locator_entry(st)
        st.locator, st.locator_type = {}, None
        bat.flush(st, {})
        return
    pairs = locator_for(parent.recorded_name, parent.path, linkage)
    _write_locator(st, encode_locator(pairs))
    if not st.has_parent:
        _, n = bat_entries(st.size, st.block_size, st.logical_sector, True)
        if n * 8 > st.bat_length:
            raise UsageError("the BAT region has no room for the sector bitmap entries of a differencing image")
        if n > len(st.bat):
            st.bat.extend([0] * (n - len(st.bat)))
            st.dirty_pages.update(range(len(st.bat) * 8 // 4096 + 1))
        _set_flags(st, st.param_flags | HAS_PARENT)
    st.locator = pairs
    bat.flush(st, {})


def _set_flags(st: VhdxState, flags: int) -> None:
    set_item(st, FILE_PARAMETERS_GUID, FILE_PARAMETERS.pack(BlockSize=st.block_size, Flags=flags))
    st.param_flags = flags


def _write_locator(st: VhdxState, raw: bytes) -> None:
    end = max([64 * 1024] + [e.Offset + e.Length for e in st.meta_entries if e.ItemId != PARENT_LOCATOR_GUID])
    old = [e for e in st.meta_entries if e.ItemId == PARENT_LOCATOR_GUID]
    # after every item, the old locator included: it stays valid until the table names the new one
    start = -(-max([end] + [e.Offset + e.Length for e in old]) // 4096) * 4096
    if start + len(raw) > st.meta_length:
        start = -(-end // 4096) * 4096 if not old else start
        if start + len(raw) > st.meta_length:
            raise UsageError(f"the parent locator ({len(raw)} bytes) does not fit the metadata region")
    st.file.pwrite(st.meta_offset + start, raw)
    st.file.flush()
    if old:
        idx = st.meta_entries.index(old[0])
        old[0].Offset, old[0].Length = start, len(raw)
    else:
        idx = len(st.meta_entries)
        st.meta_entries.append(METADATA_TABLE_ENTRY.new(ItemId=PARENT_LOCATOR_GUID, Offset=start, Length=len(raw),
                                                        Flags=META_IS_REQUIRED | META_IS_VIRTUAL_DISK))
        patch_sectors(st, st.meta_offset + 10, len(st.meta_entries).to_bytes(2, "little"))
    entry = METADATA_TABLE_ENTRY.pack(st.meta_entries[idx])
    patch_sectors(st, st.meta_offset + (idx + 1) * METADATA_TABLE_ENTRY.size, entry)


def _drop_locator_entry(st: VhdxState) -> None:
    """The table without the parent locator (qemu refuses any image whose
    metadata has one): the table's used part rewritten through the log."""
    old = len(st.meta_entries)
    st.meta_entries = [e for e in st.meta_entries if e.ItemId != PARENT_LOCATOR_GUID]
    raw = bytearray((old + 1) * METADATA_TABLE_ENTRY.size)
    METADATA_TABLE_HEADER.pack_into(raw, 0, METADATA_TABLE_HEADER.new(Signature=METADATA_SIGNATURE,
                                                                      EntryCount=len(st.meta_entries)))
    for i, e in enumerate(st.meta_entries):
        METADATA_TABLE_ENTRY.pack_into(raw, (i + 1) * METADATA_TABLE_ENTRY.size, e)
    patch_sectors(st, st.meta_offset, bytes(raw))


def _whole_blocks(st: VhdxState) -> None:
    """PARTIALLY_PRESENT blocks become FULLY_PRESENT: sectors whose bit is
    clear get zeros (the op wrote every sector the parent showed)."""
    cache: dict = {}
    ratio = st.ratio
    for b in range(st.blocks):
        i = bat_index(b, ratio)
        e = st.bat[i]
        if bat_state(e) != PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            continue
        pos = b * st.block_size
        end = min(pos + st.block_size, st.size)
        while pos < end:
            status, n, _ = bat.locate(st, pos, end - pos, cache)
            if status != Status.DATA:
                st.file.pwrite(bat_offset(e) + pos - b * st.block_size, bytes(n))
            pos += n
        st.set_entry(i, bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, bat_offset(e)))

"""Resize both ways.  Growing: a BAT region too small for the new size is
written anew past the end of the file first, then the region tables, the
virtual disk size and the BAT change together through the log; new blocks
of a fixed image are allocated (FULLY_PRESENT) before.  Shrinking: the
size and the dropped entries change through the log, then the file is cut
after the last block still used (space in between stays a leak at worst).
The bytes of a partial last block beyond the old size are zeroed before
they become part of the disk."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.bytesutil import align_up
from vdtool.core.errors import UsageError
from vdtool.formats.vhdx import bat
from vdtool.formats.vhdx.bat import used_end
from vdtool.formats.vhdx.create import region_table
from vdtool.formats.vhdx.headers import begin_modification
from vdtool.formats.vhdx.layout import (BAT_GUID, LOG_SECTOR, MAX_DISK, PAYLOAD_BLOCK_FULLY_PRESENT,
                                        PAYLOAD_BLOCK_NOT_PRESENT, REGION_TABLE_OFFSETS, SB_BLOCK_NOT_PRESENT,
                                        VIRTUAL_DISK_SIZE, VIRTUAL_DISK_SIZE_GUID, MiB, bat_entries, bat_entry,
                                        bat_index, bitmap_index)
from vdtool.formats.vhdx.metadata import item_location
from vdtool.formats.vhdx.state import VhdxState


def set_item(st: VhdxState, item_id: bytes, data: bytes) -> None:
    """Queue a metadata item's new bytes (written through the log at flush)."""
    off, length = item_location(st, item_id)
    if len(data) > length:
        raise st.corrupt(f"metadata item at {off} is {length} bytes, {len(data)} needed")
    patch_sectors(st, off, data)


def patch_sectors(st: VhdxState, off: int, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        sec = (off + pos) - (off + pos) % LOG_SECTOR
        cur = bytearray(st.pending.get(sec) or st.read(sec, LOG_SECTOR).ljust(LOG_SECTOR, b"\0"))
        lo = off + pos - sec
        n = min(LOG_SECTOR - lo, len(data) - pos)
        cur[lo:lo + n] = data[pos:pos + n]
        st.pending[sec] = bytes(cur)
        pos += n


def resize(st: VhdxState, new_size: int, cache: dict, parent_read: Callable) -> None:
    if new_size <= 0 or new_size % st.logical_sector or new_size > MAX_DISK:
        raise UsageError(f"new size {new_size} must be a positive multiple of the logical sector size "
                         f"{st.logical_sector}, up to 64 TiB")
    if new_size == st.size:
        return
    begin_modification(st, visible=True)
    old = st.size
    if new_size > old:
        _zero_tail(st, old, new_size, cache, parent_read)
    _, n = bat_entries(new_size, st.block_size, st.logical_sector, st.has_parent)
    if n * 8 > st.bat_length:
        _move_bat(st, n)
    if n > len(st.bat):
        st.bat.extend([0] * (n - len(st.bat)))
        st.dirty_pages.update(range(0, len(st.bat) * 8 // LOG_SECTOR + 1))
    if new_size < old:
        _drop_blocks(st, new_size)
    st.size = new_size
    if st.fixed and new_size > old:
        _allocate_fixed(st)
    set_item(st, VIRTUAL_DISK_SIZE_GUID, VIRTUAL_DISK_SIZE.pack(VirtualDiskSize=new_size))
    bat.flush(st, cache)
    if new_size < old:
        end = used_end(st)
        if end < st.file.size():
            st.file.truncate(end)
            st.fsize = end


def _zero_tail(st: VhdxState, old: int, new: int, cache: dict, parent_read: Callable) -> None:
    """Bytes of the last block past the old size may hold what a shrink left."""
    end = min(new, align_up(old, st.block_size))
    if end > old and bat.block_status(st, old, end - old, cache)[0] != 0:
        bat.write(st, old, memoryview(bytes(end - old)), cache, parent_read)


def _move_bat(st: VhdxState, n: int) -> None:
    """A larger BAT region past the end of the file, written and flushed
    before the region tables name it (through the log)."""
    length = align_up(n * 8, MiB)
    off = align_up(max(st.fsize, used_end(st)), MiB)
    raw = st.bat.tobytes()
    st.file.truncate(off + length)
    st.file.pwrite(off, raw)
    st.file.flush()
    st.fsize = off + length
    st.bat_offset, st.bat_length = off, length
    regions = {r.Guid: r for r in st.regions}
    meta = [r for g, r in regions.items() if g != BAT_GUID][0]
    table = region_table(off, length, meta.FileOffset, meta.Length)
    for toff in REGION_TABLE_OFFSETS:
        patch_sectors(st, toff, table)
    for r in st.regions:
        if r.Guid == BAT_GUID:
            r.FileOffset, r.Length = off, length
    st.dirty_pages.clear()


def _drop_blocks(st: VhdxState, new_size: int) -> None:
    blocks = -(-new_size // st.block_size)
    ratio = st.ratio
    for b in range(blocks, st.blocks):
        st.set_entry(bat_index(b, ratio), bat_entry(PAYLOAD_BLOCK_NOT_PRESENT, 0))
    first_chunk = -(-blocks // ratio)
    for c in range(first_chunk, -(-st.blocks // ratio)):
        i = bitmap_index(c, ratio)
        if i < len(st.bat):
            st.set_entry(i, bat_entry(SB_BLOCK_NOT_PRESENT, 0))


def _allocate_fixed(st: VhdxState) -> None:
    """Every block of a fixed image present: the new ones at the end of
    the file, in order, with one truncate."""
    ratio = st.ratio
    start = off = align_up(st.fsize, MiB)
    for b in range(st.blocks):
        i = bat_index(b, ratio)
        if st.bat[i] & 7 != PAYLOAD_BLOCK_FULLY_PRESENT:
            st.set_entry(i, bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, off))
            off += st.block_size
    if off > start:
        st.file.truncate(off)
        st.fsize = off

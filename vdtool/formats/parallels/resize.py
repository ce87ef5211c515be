"""Resizing a Parallels image.  Shrinking writes the smaller size first,
then releases the clusters past it; growing extends the BAT, moving the
first clusters to the end when the BAT needs their room."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.errors import UsageError
from vdtool.formats.parallels.layout import (MAX_BAT, MAX_V1_SECTORS, SECTOR, SECTORS_PER_TRACK,
                                             DEFAULT_HEADS, bat_end)
from vdtool.formats.parallels.metadata import begin_write, close_holes, set_entry, sync
from vdtool.formats.parallels.state import ParallelsState


def resize(state: ParallelsState, new_size: int) -> None:
    if new_size < 0:
        raise UsageError(f"disk size {new_size} is negative")
    begin_write(state)
    hdr = state.hdr
    new_size = align_up(new_size, SECTOR)
    if not state.v2 and new_size // SECTOR > MAX_V1_SECTORS:
        raise UsageError(f"a WithoutFreeSpace Parallels image holds at most {MAX_V1_SECTORS} sectors")
    n = ceil_div(new_size, state.cluster)
    if n > MAX_BAT:
        raise UsageError(f"{new_size} bytes need {n} clusters: too many for a Parallels BAT")
    old = state.virtual_size
    if not hdr.data_off:
        # a v1 image without data_off has its data start after the BAT:
        # recorded now, so a BAT of another size does not move it
        hdr.data_off = state.data_start // SECTOR
        state.hdr_dirty = True
    if new_size < old:
        _set_size(state, new_size, hdr.bat_entries)  # the smaller size first (leaks at worst after a crash)
        sync(state)
        _zero_tail(state, new_size)
        for i in range(n, len(state.bat)):
            if state.bat[i]:
                set_entry(state, i, 0)
        sync(state)
        close_holes(state)
        del state.bat[n:]
        state.dirty = {i for i in state.dirty if i < n}
        _set_size(state, new_size, n)
        sync(state)
        return
    if n > hdr.bat_entries:
        _grow_bat(state, n)
    _set_size(state, new_size, n)
    sync(state)


def _set_size(state: ParallelsState, size: int, entries: int) -> None:
    hdr = state.hdr
    hdr.nb_sectors = size // SECTOR
    hdr.cylinders = size // SECTOR // DEFAULT_HEADS // SECTORS_PER_TRACK
    hdr.bat_entries = entries
    state.hdr_dirty = True


def _zero_tail(state: ParallelsState, new_size: int) -> None:
    """Bytes past the new end inside the last kept cluster must read as
    zeros if the disk grows again."""
    cs = state.cluster
    i, within = divmod(new_size, cs)
    if within and i < len(state.bat) and state.bat[i]:
        state.file.write_zeroes(state.host(i) + within, cs - within)


def _grow_bat(state: ParallelsState, n: int) -> None:
    """Room for ``n`` entries: while the BAT would run into the data area,
    the data area starts clusters later and the clusters that lay there
    move to the end; the new entries are zeroed before the header counts
    them."""
    hdr, cs = state.hdr, state.cluster
    need = bat_end(n)
    start = state.data_start
    if need > start:
        k = ceil_div(need - start, cs)
        close_holes(state)  # packed: the clusters in the first k slots are the ones to move
        owner = {state.host(i): i for i, e in enumerate(state.bat) if e}
        buf = bytearray(cs)
        moves = []
        for slot in range(k):
            src = start + slot * cs
            if src in owner:
                dst = state.data_end
                state.file.readinto(src, buf)
                state.file.pwrite(dst, buf)
                state.data_end = dst + cs
                moves.append((owner[src], dst))
        state.file.flush()
        for i, dst in moves:
            set_entry(state, i, state.entry_for(dst))
        sync(state)
        new_start = start + k * cs
        hdr.data_off = new_start // SECTOR
        state.data_end = max(state.data_end, new_start)
        if state.file.size() < new_start:
            state.file.truncate(new_start)
    state.file.pwrite(bat_end(hdr.bat_entries), bytes(4 * (n - hdr.bat_entries)))
    state.file.flush()
    state.bat.extend([0] * (n - hdr.bat_entries))

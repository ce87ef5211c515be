"""Where a Bochs image's guest sectors are: block status, host offsets and
reads through the catalog and the extents' sector bitmaps."""

from __future__ import annotations

from vdtool.core.backend import MapExtent, Status
from vdtool.formats.bochs.layout import CATALOG_FREE, SECTOR
from vdtool.formats.bochs.state import BochsState


def _bitmap(st: BochsState, index: int) -> bytes:
    """The sector bitmap of the extent stored at ``index`` (the last one cached)."""
    if st.bitmap_cache[0] != index:
        bits = st.file.pread_exact(st.extent_start(index), st.bitmap_bytes, "Bochs extent bitmap")
        st.bitmap_cache = (index, bits)
    return st.bitmap_cache[1]


def _bit(bits: bytes, sector: int) -> int:
    return bits[sector >> 3] >> (sector & 7) & 1


def run_at(st: BochsState, offset: int, length: int) -> tuple:
    """(present, n, host): whether the sectors from ``offset`` are in the
    file, how many bytes (at most ``length``; within one extent when
    present) share that, and the host offset of the first (None when
    absent)."""
    ei, within = divmod(offset, st.extent)
    n_max = min(length, st.extent - within)
    index = st.catalog[ei]
    if index == CATALOG_FREE:
        # a run of absent extents answers at once (an empty 8 TB disk has a million)
        nxt = ei + 1
        while n_max < length and nxt < len(st.catalog) and st.catalog[nxt] == CATALOG_FREE:
            n_max = min(length, n_max + st.extent)
            nxt += 1
        return False, n_max, None
    bits = _bitmap(st, index)
    first = within // SECTOR
    last = (within + n_max - 1) // SECTOR
    present = _bit(bits, first)
    s = first + 1
    while s <= last and _bit(bits, s) == present:
        s += 1
    n = min(n_max, s * SECTOR - within)
    host = st.extent_start(index) + st.bitmap_skip + within if present else None
    return bool(present), n, host


def block_status(st: BochsState, offset: int, length: int) -> tuple:
    present, n, _ = run_at(st, offset, length)
    return (Status.DATA if present else Status.UNALLOCATED), n


def map_extent(st: BochsState, offset: int, length: int) -> MapExtent:
    present, n, host = run_at(st, offset, length)
    return MapExtent(Status.DATA, n, host) if present else MapExtent(Status.UNALLOCATED, n)


def readinto(st: BochsState, offset: int, buf) -> None:
    """Sectors in the file are read, absent ones are zeros (the stack shows
    a journal's base image under them)."""
    mv = memoryview(buf).cast("B")
    pos = 0
    while pos < len(mv):
        present, n, host = run_at(st, offset + pos, len(mv) - pos)
        part = mv[pos:pos + n]
        if present:
            _read_host(st, host, part)
        else:
            part[:] = bytes(n)
        pos += n


def _read_host(st: BochsState, host: int | None, part) -> None:
    got = st.file.readinto(host, part)
    if got != len(part):
        raise st.corrupt(f"extent data at offset {host} ({len(part)} bytes) runs past the end of the file")

"""The BAT and the data path: loading and judging the entries, where a
guest byte lives (every payload block state, sector bitmaps of differencing
images), reading, writing and zeroing, and flushing changed BAT pages and
sector bitmaps through the log.

Payload states: NOT_PRESENT reads the parent (zeros without one);
UNDEFINED, ZERO and UNMAPPED (3, and qemu's 5) read as zeros; FULLY_PRESENT
reads the block in the file; PARTIALLY_PRESENT (differencing images only)
reads the file where the chunk's sector bitmap has a bit set, else the
parent."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable

from vdtool.core.backend import MapExtent, Status
from vdtool.core.bytesutil import align_up, is_zero
from vdtool.formats.vhdx.headers import begin_modification
from vdtool.formats.vhdx.layout import (BITMAP_BLOCK, HEADER_SECTION, LOG_SECTOR, PAYLOAD_BLOCK_FULLY_PRESENT,
                                        PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                                        PAYLOAD_BLOCK_ZERO, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT, STATE_NAMES,
                                        MiB, bat_entries, bat_entry, bat_index, bat_offset, bat_state,
                                        bitmap_index)
from vdtool.formats.vhdx.log import write_through_log
from vdtool.formats.vhdx.state import VhdxState

PRESENT = (PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def load_bat(st: VhdxState) -> None:
    """Read the BAT (sized by the metadata) into ``st.bat``."""
    _, n = bat_entries(st.size, st.block_size, st.logical_sector, st.has_parent)
    if n * 8 > st.bat_length:
        raise st.corrupt(f"BAT region of {st.bat_length} bytes is too small for {n} entries "
                         f"(virtual size {st.size}, block size {st.block_size})")
    raw = st.read(st.bat_offset, n * 8)
    if len(raw) < n * 8:
        raise st.corrupt(f"BAT of {n} entries at offset {st.bat_offset} runs past the end of the file "
                         f"(file size {st.fsize})")
    bat = array("Q")
    bat.frombytes(raw)
    if sys.byteorder == "big":
        bat.byteswap()
    st.bat = bat


def scan(st: VhdxState) -> tuple:
    """(problems, bad): what is wrong with the BAT entries as (kind, text)
    and the indices of entries that must not be followed (past the end of
    the file, inside the header section, the log or a region, overlapping
    another block, a state the entry may not have)."""
    problems, bad = [], set()
    ratio = st.ratio
    taken = [(0, HEADER_SECTION, "the header section")]
    hdr = st.hdr
    if hdr.LogLength:
        taken.append((hdr.LogOffset, hdr.LogOffset + hdr.LogLength, "the log"))
    taken += [(r.FileOffset, r.FileOffset + r.Length, "a region") for r in st.regions]
    seen: dict = {}
    for i, e in enumerate(st.bat):
        state = bat_state(e)
        is_bitmap = i % (ratio + 1) == ratio
        if is_bitmap:
            ok_states, length, what = (SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT), BITMAP_BLOCK, "sector bitmap"
        else:
            ok_states, length, what = tuple(STATE_NAMES), st.block_size, "payload block"
        if state not in ok_states or (not is_bitmap and state == PAYLOAD_BLOCK_PARTIALLY_PRESENT
                                      and not st.has_parent):
            problems.append(("corrupt", f"BAT entry {i} ({what}) has state {state}, not valid here"))
            bad.add(i)
            continue
        if state != SB_BLOCK_PRESENT and state != PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            continue
        off = bat_offset(e)
        why = _placement(off, length, st.fsize, taken, seen)
        if why:
            problems.append(("corrupt", f"BAT entry {i} ({what}) at offset {off}: {why}"))
            bad.add(i)
        else:
            seen[off] = i
    return problems, bad


def _placement(off: int, length: int, fsize: int, taken: list, seen: dict) -> str:
    if off + length > align_up(fsize, MiB):
        return f"past the end of the file (file size {fsize})"
    for lo, hi, what in taken:
        if off < hi and lo < off + length:
            return f"overlaps {what}"
    if off in seen:
        return f"the same place as BAT entry {seen[off]}"
    return ""


def check_blocks_overlap(st: VhdxState) -> list:
    """Pairs of present blocks whose spans overlap (blocks of different
    sizes: payload blocks and 1 MiB bitmaps)."""
    spans = []
    ratio = st.ratio
    for i, e in enumerate(st.bat):
        if bat_state(e) in PRESENT:
            length = BITMAP_BLOCK if i % (ratio + 1) == ratio else st.block_size
            spans.append((bat_offset(e), length, i))
    spans.sort()
    out = []
    for (a, alen, ai), (b, _, bi) in zip(spans, spans[1:]):
        if b < a + alen:
            out.append((ai, bi))
    return out


def used_end(st: VhdxState) -> int:
    """Where the last thing the image uses ends."""
    end = max([MiB, st.hdr.LogOffset + st.hdr.LogLength] + [r.FileOffset + r.Length for r in st.regions])
    ratio = st.ratio
    for i, e in enumerate(st.bat):
        if i not in st.bad and bat_state(e) in PRESENT:
            end = max(end, bat_offset(e) + (BITMAP_BLOCK if i % (ratio + 1) == ratio else st.block_size))
    return end


# -- where guest bytes live --------------------------------------------------------------------------

def _bitmap(st: VhdxState, block: int, cache: dict):
    """The sector bitmap of ``block``'s chunk (a 1 MiB bytearray), or None."""
    chunk = block // st.ratio
    if chunk in cache:
        return cache[chunk]
    idx = bitmap_index(chunk, st.ratio)
    e = st.bat[idx] if idx < len(st.bat) else 0
    if bat_state(e) != SB_BLOCK_PRESENT or idx in st.bad:
        bm = None
    else:
        bm = bytearray(st.read(bat_offset(e), BITMAP_BLOCK).ljust(BITMAP_BLOCK, b"\0"))
    cache[chunk] = bm
    return bm


def _bits_run(bm, first: int, count: int) -> tuple:
    """(bit value, how many of ``count`` bits from ``first`` share it)."""
    val = bm[first >> 3] >> (first & 7) & 1
    n = 1
    while n < count:
        i = first + n
        if i & 7 == 0 and n + 8 <= count:
            byte = bm[i >> 3]
            if byte == (0xFF if val else 0):
                n += 8
                continue
        if (bm[i >> 3] >> (i & 7) & 1) != val:
            break
        n += 1
    return val, n


def locate(st: VhdxState, offset: int, length: int, cache: dict) -> tuple:
    """(Status, n, host offset or None) for the run at ``offset``."""
    bs = st.block_size
    block = offset // bs
    within = offset - block * bs
    n = min(length, bs - within)
    idx = bat_index(block, st.ratio)
    e = st.bat[idx]
    state = bat_state(e)
    if idx in st.bad:
        raise st.corrupt(f"BAT entry {idx} (block {block}) is damaged ({STATE_NAMES.get(state, state)} at offset "
                         f"{bat_offset(e)}); run 'vdtool check -r all'")
    if state == PAYLOAD_BLOCK_NOT_PRESENT:
        return Status.UNALLOCATED, n, None
    if state == PAYLOAD_BLOCK_FULLY_PRESENT:
        return Status.DATA, n, bat_offset(e) + within
    if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        bm = _bitmap(st, block, cache)
        if bm is None:
            return Status.UNALLOCATED, n, None
        lss = st.logical_sector
        chunk_start = (block // st.ratio) * st.ratio * bs
        first = (offset - chunk_start) // lss
        end_sector = -(-(offset + n - chunk_start) // lss)
        val, run = _bits_run(bm, first, end_sector - first)
        n = min(n, (first + run) * lss + chunk_start - offset)
        return (Status.DATA, n, bat_offset(e) + within) if val else (Status.UNALLOCATED, n, None)
    return Status.ZERO, n, None


def block_status(st: VhdxState, offset: int, length: int, cache: dict) -> tuple:
    status, n, _ = locate(st, offset, length, cache)
    return status, n


def map_extent(st: VhdxState, offset: int, length: int, cache: dict) -> MapExtent:
    status, n, host = locate(st, offset, length, cache)
    return MapExtent(status, n, host)


def readinto(st: VhdxState, offset: int, buf, cache: dict, parent_read: Callable) -> None:
    mv = memoryview(buf).cast("B")
    pos = 0
    while pos < len(mv):
        status, n, host = locate(st, offset + pos, len(mv) - pos, cache)
        part = mv[pos:pos + n]
        if status == Status.DATA:
            st.readinto(host, part)
        elif status == Status.UNALLOCATED:
            part[:] = parent_read(offset + pos, n)
        else:
            part[:] = bytes(n)
        pos += n


# -- writing -------------------------------------------------------------------------------------

def _allocate(st: VhdxState, length: int) -> int:
    """Room for ``length`` bytes at the end of the file, 1 MiB aligned."""
    off = align_up(st.fsize, MiB)
    st.file.truncate(off + length)
    st.fsize = off + length
    return off


def write(st: VhdxState, offset: int, mv: memoryview, cache: dict, parent_read: Callable) -> None:
    begin_modification(st, visible=True)
    bs = st.block_size
    pos = 0
    while pos < len(mv):
        at = offset + pos
        block = at // bs
        within = at - block * bs
        n = min(len(mv) - pos, bs - within)
        _write_block(st, block, within, mv[pos:pos + n], cache, parent_read)
        pos += n


def _write_block(st: VhdxState, block: int, within: int, data, cache: dict, parent_read: Callable) -> None:
    idx = bat_index(block, st.ratio)
    if idx in st.bad:
        raise st.corrupt(f"BAT entry {idx} (block {block}) is damaged; run 'vdtool check -r all'")
    e = st.bat[idx]
    state = bat_state(e)
    if state in PRESENT:
        st.file.pwrite(bat_offset(e) + within, data)
        if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            _set_bits(st, block, within, len(data), cache)
        return
    bs = st.block_size
    if (state != PAYLOAD_BLOCK_NOT_PRESENT or not st.has_parent) and is_zero(bytes(data)):
        return  # already reads as zeros
    host = _allocate(st, bs)
    if state == PAYLOAD_BLOCK_NOT_PRESENT and st.has_parent:
        _copy_from_parent(st, host, block * bs, bs, within, len(data), parent_read)
    st.file.pwrite(host + within, data)
    st.set_entry(idx, bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, host))


def _copy_from_parent(st: VhdxState, host: int, start: int, bs: int, within: int, n: int,
                      parent_read: Callable) -> None:
    """Fill a new block of a differencing image with the parent's data
    around the part being written (a FULLY_PRESENT block holds it all)."""
    end_virtual = min(start + bs, st.size)
    step = 4 * MiB
    for lo, hi in ((start, start + within), (start + within + n, end_virtual)):
        pos = lo
        while pos < hi:
            k = min(step, hi - pos)
            chunk = parent_read(pos, k)
            if not is_zero(chunk):
                st.file.pwrite(host + pos - start, chunk)
            pos += k


def _set_bits(st: VhdxState, block: int, within: int, length: int, cache: dict) -> None:
    bm = _bitmap(st, block, cache)
    if bm is None:
        return
    lss = st.logical_sector
    chunk = block // st.ratio
    first = ((block - chunk * st.ratio) * st.block_size + within) // lss
    last = first + -(-length // lss)
    for i in range(first, last):
        bm[i >> 3] |= 1 << (i & 7)
    pages = range((first >> 3) // LOG_SECTOR, ((last - 1) >> 3) // LOG_SECTOR + 1)
    st.dirty_bitmaps.setdefault(chunk, set()).update(pages)


def write_zeroes(st: VhdxState, offset: int, length: int, unmap: bool, cache: dict, parent_read: Callable) -> None:
    """Whole blocks become ZERO blocks (NOT_PRESENT where nothing below can
    show through and the image may release blocks); partial ones get zeros
    written, as does everything when ``unmap`` is off in a fixed image."""
    begin_modification(st, visible=True)
    bs = st.block_size
    pos, end = offset, offset + length
    while pos < end:
        block = pos // bs
        n = min(end - pos, (block + 1) * bs - pos)
        whole = pos % bs == 0 and (n == bs or pos + n >= st.size)
        idx = bat_index(block, st.ratio)
        if whole and not st.fixed and unmap:
            st.set_entry(idx, bat_entry(PAYLOAD_BLOCK_ZERO, 0))
        elif bat_state(st.bat[idx]) in PRESENT or (st.has_parent and bat_state(st.bat[idx]) == 0):
            _write_zero_run(st, pos, n, cache, parent_read)
        pos += n


def _write_zero_run(st: VhdxState, pos: int, n: int, cache: dict, parent_read: Callable) -> None:
    step = 4 * MiB
    end = pos + n
    while pos < end:
        k = min(step, end - pos)
        write(st, pos, memoryview(bytes(k)), cache, parent_read)
        pos += k


# -- flushing metadata ---------------------------------------------------------------------------

def dirty_sectors(st: VhdxState, cache: dict) -> dict:
    """The 4 KiB sectors of changed BAT pages, sector bitmaps and other
    metadata, by file offset."""
    out = dict(st.pending)
    raw = st.bat.tobytes() if sys.byteorder == "little" else _swapped(st.bat)
    for p in st.dirty_pages:
        out[st.bat_offset + p * LOG_SECTOR] = raw[p * LOG_SECTOR:(p + 1) * LOG_SECTOR].ljust(LOG_SECTOR, b"\0")
    for chunk, pages in st.dirty_bitmaps.items():
        bm = cache.get(chunk)
        e = st.bat[bitmap_index(chunk, st.ratio)]
        if bm is None:
            continue
        for p in pages:
            out[bat_offset(e) + p * LOG_SECTOR] = bytes(bm[p * LOG_SECTOR:(p + 1) * LOG_SECTOR])
    return out


def _swapped(bat: array) -> bytes:
    b = array("Q", bat)
    b.byteswap()
    return b.tobytes()


def flush(st: VhdxState, cache: dict, crash_hook=None) -> None:
    """Changed metadata through the log; then, once nothing names them,
    released blocks at the end of the file are cut off."""
    sectors = dirty_sectors(st, cache)
    if not sectors:
        return
    write_through_log(st, sectors, crash_hook)
    st.dirty_pages.clear()
    st.pending.clear()
    st.dirty_bitmaps.clear()
    end = used_end(st)
    if end < st.fsize:
        st.file.truncate(end)
        st.fsize = end

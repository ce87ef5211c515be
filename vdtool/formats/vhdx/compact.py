"""Compact: payload blocks that read as zeros are released (NOT_PRESENT;
ZERO in a differencing image, where the parent must not show through),
then blocks from the end of the file move into holes, and the file is cut
after the last block.  A block moves only into space that was free before
the pass began, its copy is flushed before the BAT names it (through the
log), so a crash leaves every entry pointing at whole data."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.bytesutil import is_zero
from vdtool.core.progress import Progress
from vdtool.formats.vhdx import bat
from vdtool.formats.vhdx.bat import used_end
from vdtool.formats.vhdx.headers import begin_modification
from vdtool.formats.vhdx.layout import (BITMAP_BLOCK, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
                                        PAYLOAD_BLOCK_ZERO, MiB, bat_entry, bat_index, bat_offset, bat_state)
from vdtool.formats.vhdx.state import VhdxState


def compact(st: VhdxState, cache: dict, progress: Progress, parent_read: Callable) -> None:
    if st.fixed:
        return  # LeaveBlockAllocated: the blocks stay where they are
    begin_modification(st, visible=False)
    ratio = st.ratio
    for b in range(st.blocks):
        i = bat_index(b, ratio)
        e = st.bat[i]
        if i in st.bad or bat_state(e) != PAYLOAD_BLOCK_FULLY_PRESENT:
            continue
        if _block_is_zero(st, bat_offset(e)):
            st.set_entry(i, bat_entry(PAYLOAD_BLOCK_ZERO if st.has_parent else PAYLOAD_BLOCK_NOT_PRESENT, 0))
        progress.update(b + 1, st.blocks * 2)
    bat.flush(st, cache)
    for _ in range(4):
        if not _move_pass(st, cache):
            break
    end = used_end(st)
    if end < st.file.size():
        st.file.truncate(end)
        st.fsize = end


def _block_is_zero(st: VhdxState, off: int) -> bool:
    pos = 0
    while pos < st.block_size:
        n = min(4 * MiB, st.block_size - pos)
        data = st.read(off + pos, n)
        if not is_zero(data):
            return False
        pos += n
    return True


def _used(st: VhdxState) -> list:
    ratio = st.ratio
    spans = [(0, max([st.hdr.LogOffset + st.hdr.LogLength] + [r.FileOffset + r.Length for r in st.regions]), -1)]
    for i, e in enumerate(st.bat):
        if i not in st.bad and bat_state(e) in bat.PRESENT:
            spans.append((bat_offset(e), BITMAP_BLOCK if i % (ratio + 1) == ratio else st.block_size, i))
    spans = [(a, a + n, i) if i >= 0 else (a, n, i) for a, n, i in spans]
    return sorted(spans)


def _move_pass(st: VhdxState, cache: dict) -> bool:
    """Move payload blocks from the end into holes free when the pass began."""
    spans = _used(st)
    holes = []
    for (_, a_end, _), (b, _, _) in zip(spans, spans[1:]):
        start = -(-a_end // MiB) * MiB
        while start + st.block_size <= b:
            holes.append(start)
            start += st.block_size
    moved = False
    ratio = st.ratio
    for lo, hi, i in reversed(spans):
        if not holes or i < 0 or i % (ratio + 1) == ratio or holes[0] >= lo:
            continue
        dest = holes.pop(0)
        pos = 0
        while pos < st.block_size:
            n = min(4 * MiB, st.block_size - pos)
            st.file.pwrite(dest + pos, st.read(lo + pos, n))
            pos += n
        st.set_entry(i, bat_entry(bat_state(st.bat[i]), dest))
        moved = True
    if moved:
        bat.flush(st, cache)  # flushes the copies first
    return moved

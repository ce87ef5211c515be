"""Compacting a VDI: allocated blocks that read as zeros are released (FREE,
or ZERO where a parent's data would otherwise show through), then the last
blocks move into the holes and the file is cut.  The scan only reads; what
it finds is handed to metadata.close_holes, which writes it in crash-safe
order (a block's entry changes when its slot is given up, not before)."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.errors import NotSupported
from vdtool.core.progress import Progress
from vdtool.formats.vdi.layout import VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO
from vdtool.formats.vdi.metadata import begin_write, close_holes, sync
from vdtool.formats.vdi.state import VdiState


def compact(state: VdiState, parent_read: Callable[[int, int], bytes], progress: Progress) -> None:
    if state.fixed:
        raise NotSupported("compact", "vdi", state.path, "a fixed image stays fully allocated")
    begin_write(state, content=False)
    bs = state.hdr.cbBlock
    cblocks = state.hdr.cBlocks
    zero = bytes(bs)
    buf = bytearray(bs)
    diff = state.is_diff
    size = state.virtual_size
    scan = progress.sub(0, 70)
    release = {}  # virtual block -> its marker once its data block is given up
    for idx, vals in state.map.allocated_chunks():
        for b, e in zip(idx, vals):
            state.file.readinto(state.data_pos(b, e), buf)
            if buf == zero:
                marker = VDI_IMAGE_BLOCK_FREE
                if diff:
                    start = b * bs
                    inside = max(0, min(bs, size - start))
                    if inside and parent_read(start, inside) != zero[:inside]:
                        marker = VDI_IMAGE_BLOCK_ZERO
                release[b] = marker
            scan.update(b + 1, cblocks)
    scan.update(cblocks, cblocks)
    close_holes(state, progress.sub(70, 30), release)
    sync(state)

"""Compacting a Parallels image: clusters that read as zeros are released
and the last clusters move into the slots they leave, then the file is cut
after the last one."""

from __future__ import annotations

from vdtool.core.bytesutil import is_zero
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.parallels.metadata import begin_write, close_holes, set_entry, sync
from vdtool.formats.parallels.state import ParallelsState


def compact(state: ParallelsState, parent_read, progress: Progress = NO_PROGRESS) -> int:
    """Release all-zero clusters (of an image whose parent reads zeros
    there: bare images have none) and close the holes; returns how many
    clusters were released."""
    begin_write(state)
    cs = state.cluster
    buf = bytearray(cs)
    released = 0
    total = len(state.bat)
    for i, e in enumerate(state.bat):
        if e:
            state.file.readinto(state.host(i), buf)
            inside = max(0, min(cs, state.virtual_size - i * cs))
            if is_zero(buf) and (not inside or is_zero(bytearray(parent_read(i * cs, inside)))):
                set_entry(state, i, 0)
                released += 1
        if i % 256 == 0:
            progress.update(i, total)
    sync(state)
    close_holes(state)
    return released

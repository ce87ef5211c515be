"""The data side of ``measure``: what convert would write from an image.

A block of the new image is written when it holds any non-zero byte: the
source's block_status rules out zero and unallocated runs without reading
them, and DATA runs are read and judged block by block with the copy
engine's own zero test (vdtool.core.copy.data_runs), so the count is the
one convert would write."""

from __future__ import annotations

from vdtool.core.backend import MeasureSource, Status
from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.copy import data_runs
from vdtool.core.errors import VdError
from vdtool.core.progress import NO_PROGRESS, Progress

_CHUNK = 4 << 20
# qcow2's bitmap directory entry: 24 bytes of fixed fields before the name
_BITMAP_DIR_ENTRY = 24
_BITMAP_TABLE_ENTRY = 8


class StackSource(MeasureSource):
    """``stack`` (an ImageStack) as convert would read it."""

    def __init__(self, stack, progress: Progress = NO_PROGRESS):
        self.stack = stack
        self.progress = progress
        self._counts: dict = {}

    def data_blocks(self, block: int) -> int:
        if block <= 0 or block & (block - 1):
            raise VdError(f"internal error: measure asked for blocks of {block} bytes")
        if block not in self._counts:
            self._counts[block] = self._count(block)
        return self._counts[block]

    def _count(self, block: int) -> int:
        stack = self.stack
        size = stack.virtual_size
        chunk = max(_CHUNK // block, 1) * block
        buf = bytearray(chunk)
        view = memoryview(buf)
        zeros = memoryview(bytes(chunk))
        count = 0
        judged = 0  # every block below this offset is counted (or found zero) already
        pos = 0
        while pos < size:
            status, n, _ = stack.block_status(pos, size - pos)
            if n <= 0:
                raise VdError(f"internal error: block_status returned length {n} at offset {pos}", stack.path)
            if status != Status.DATA:
                pos += n
                continue
            a = max(pos // block * block, judged)
            end = min(align_up(pos + n, block), size)
            while a < end:
                m = min(chunk, end - a)
                stack.readinto(a, view[:m])
                count += sum(ceil_div(e - s, block) for s, e in data_runs(buf, m, block, zeros))
                a += m
                self.progress.update(a, size)
            judged = end
            pos = max(pos + n, end)
        return count

    def bitmaps_size(self, cluster_size: int) -> int | None:
        """qemu's estimate: every bitmap wholly allocated, its table, and the
        directory, each rounded up to clusters of the new image."""
        top = self.stack.top
        bitmaps = top.persistent_bitmaps()
        if bitmaps is None:
            return None
        total = 0
        directory = 0
        for name, granularity in bitmaps:
            bits = ceil_div(top.virtual_size, granularity)
            clusters = ceil_div(ceil_div(bits, 8), cluster_size)
            total += clusters * cluster_size
            total += align_up(clusters * _BITMAP_TABLE_ENTRY, cluster_size)
            raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
            directory += align_up(_BITMAP_DIR_ENTRY + len(raw), 8)
        return total + align_up(directory, cluster_size)

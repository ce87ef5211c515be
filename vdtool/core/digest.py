"""xxh3-128 digests of a disk's virtual content."""

from __future__ import annotations

from vdtool.core.backend import Status
from vdtool.core.progress import NO_PROGRESS, Progress

_ZEROS = bytes(4 << 20)
CHUNK = 4 << 20


class ContentDigest:
    """Fed in disk order; zero runs are hashed from a shared zero buffer
    without reading anything."""

    def __init__(self):
        import xxhash

        self._h = xxhash.xxh3_128()

    def update(self, data) -> None:
        self._h.update(data)

    def update_zeros(self, n: int) -> None:
        mv = memoryview(_ZEROS)
        while n > 0:
            k = min(n, len(_ZEROS))
            self._h.update(mv[:k])
            n -= k

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_stack(stack, progress: Progress = NO_PROGRESS, size=None) -> str:
    """xxh3-128 of everything ``stack`` shows (or of its first ``size``
    bytes), walking extents."""
    d = ContentDigest()
    size = stack.virtual_size if size is None else min(size, stack.virtual_size)
    buf = bytearray(CHUNK)
    pos = 0
    while pos < size:
        status, n, _ = stack.block_status(pos, min(CHUNK, size - pos))
        if status == Status.DATA:
            view = memoryview(buf)[:n]
            stack.readinto(pos, view)
            d.update(view)
        else:
            d.update_zeros(n)
        pos += n
        progress.update(pos, size)
    return d.hexdigest()

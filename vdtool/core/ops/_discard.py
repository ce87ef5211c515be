"""discard: make ranges read as zeros, releasing whole blocks."""

from __future__ import annotations

from vdtool.core.backend import Status
from vdtool.core.errors import UsageError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.sizes import parse_size
from vdtool.core.stack import open_image


def parse_range(text: str) -> tuple:
    if ":" not in text:
        raise UsageError(f"range {text!r} is not OFFSET:LENGTH")
    off, length = text.split(":", 1)
    return parse_size(off), parse_size(length)


def discard(path: str, ranges=(), *, zeroes: bool = False, fmt: str | None = None, parent_search=(),
            force: bool = False, untrusted: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """``ranges``: (offset, length) pairs or 'OFFSET:LENGTH' strings.
    Returns ``{"filename", "discarded-bytes"}``."""
    parsed = [parse_range(r) if isinstance(r, str) else tuple(r) for r in ranges]
    if not parsed and not zeroes:
        raise UsageError("name ranges OFFSET:LENGTH or --zeroes")
    stack = open_image(path, fmt, writable=True, parent_search=parent_search, force=force,
                       untrusted=untrusted)
    done = 0
    try:
        size = stack.virtual_size
        for off, length in parsed:
            if off < 0 or length < 0 or off + length > size:
                raise UsageError(f"{path}: range {off}:{length} runs past the end of the disk (size {size})")
        total = sum(n for _, n in parsed) + (size if zeroes else 0)
        for off, length in parsed:
            if length:
                stack.discard(off, length)
            done += length
            progress.update(done, total)
        if zeroes:
            done += discard_zero_blocks(stack, progress.sub(0, 100))
        stack.flush()
    finally:
        stack.close()
    progress.finish()
    return {"filename": path, "discarded-bytes": done}


def discard_zero_blocks(stack, progress: Progress = NO_PROGRESS) -> int:
    """Release every block of the top image that holds data reading as zeros."""
    top = stack.top
    block = max(top.block_size, 4096)
    size = top.virtual_size
    zero = bytes(block)
    buf = bytearray(block)
    pos = 0
    released = 0
    while pos < size:
        status, n = top.block_status(pos, size - pos)
        if status == Status.DATA:
            start = pos // block * block
            end = pos + n
            b = start
            while b < end:
                k = min(block, size - b)
                view = memoryview(buf)[:k]
                stack.readinto(b, view)  # what the user sees, parents included
                if buf.startswith(zero if k == block else zero[:k]):
                    stack.discard(b, k)
                    released += k
                b += block
            pos = b
        else:
            pos += n
        progress.update(pos, size)
    return released

"""resize: grow (new part reads as zeros) or, with shrink, cut the disk."""

from __future__ import annotations

from vdtool.core.backend import Cap, Status
from vdtool.core.errors import NotSupported, UsageError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.sizes import format_size, parse_relative_size
from vdtool.core.stack import open_image


def allocated_in(stack, start: int, end: int) -> int:
    """Bytes the top image holds as data in [start, end)."""
    total = 0
    pos = start
    top = stack.top
    while pos < end:
        status, n = top.block_status(pos, end - pos)
        if status == Status.DATA:
            total += n
        pos += n
    return total


def resize(path: str, size, fmt: str | None = None, *, shrink: bool = False, parent_search=(),
           force: bool = False, untrusted: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """``size``: bytes, or a string SIZE / +SIZE / -SIZE.  Returns
    ``{"filename", "old-size", "new-size", "lost-allocated-bytes"}``."""
    stack = open_image(path, fmt, writable=True, parent_search=parent_search, force=force,
                       untrusted=untrusted)
    try:
        top = stack.top
        old = top.virtual_size
        new = parse_relative_size(size, old) if isinstance(size, str) else int(size)
        if not top.capabilities & Cap.RESIZE:
            raise NotSupported("resize", top.name, path)
        lost = 0
        if new < old:
            if not shrink:
                raise UsageError(f"{path}: new size {new} is smaller than the current size {old}; "
                                 f"add --shrink to cut the disk (data past the new end is lost)")
            if not top.capabilities & Cap.SHRINK:
                raise NotSupported("shrinking", top.name, path)
            lost = allocated_in(stack, new, old)
        if new != old:
            top.resize(new)
            if new > old and len(stack) > 1:
                # the parent may be larger than the old disk: the new part
                # must read as zeros, not as the parent's data
                parent_size = stack.layers[-2].virtual_size
                if parent_size > old:
                    stack.write_zeroes(old, min(new, parent_size) - old)
            top.flush()
    finally:
        stack.close()
    progress.finish()
    result = {"filename": path, "old-size": old, "new-size": new, "lost-allocated-bytes": lost}
    if lost:
        result["message"] = f"{format_size(lost)} of allocated data past the new end was discarded"
    return result

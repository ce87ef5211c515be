"""compact: release zero and unused blocks, close the holes, truncate."""

from __future__ import annotations

from vdtool.core.backend import Cap
from vdtool.core.errors import NotSupported
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_image


def compact(path: str, fmt: str | None = None, *, parent_search=(), force: bool = False,
            untrusted: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """Returns ``{"filename", "before", "after"}`` (bytes on disk)."""
    stack = open_image(path, fmt, writable=True, parent_search=parent_search, force=force,
                       untrusted=untrusted)
    try:
        top = stack.top
        if not top.capabilities & Cap.COMPACT:
            raise NotSupported("compact", top.name, path)
        before = top.actual_size()
        top.defer_identity_change()  # the content does not change: children stay valid
        top.compact(progress)
        top.flush()
        after = top.actual_size()
    finally:
        stack.close()
    progress.finish()
    return {"filename": path, "before": before, "after": after}

"""check: metadata consistency, qemu-img's exit codes and JSON keys."""

from __future__ import annotations

from typing import Optional

from vdtool.core.backend import CheckResult
from vdtool.core.errors import ChainError, UsageError, VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_backend, open_image

EXIT_NO_CHECK = 63


def check(path: str, fmt: Optional[str] = None, *, repair: Optional[str] = None, parent_search=(),
          force: bool = False, untrusted: bool = False, force_share: bool = False,
          progress: Progress = NO_PROGRESS) -> CheckResult:
    if repair not in (None, "leaks", "all"):
        raise UsageError(f"--repair takes leaks or all, not {repair!r}")
    img = open_backend(path, fmt, writable=repair is not None, untrusted=untrusted, force_share=force_share,
                       options={"check": True, "repair": bool(repair), "force": force})
    try:
        result = img.check(repair, progress=progress.sub(0, 95))
        if repair:
            img.flush()
        parent = img.parent
    finally:
        img.close()
    if parent is not None:
        # the chain must be reachable and consistent too
        try:
            open_image(path, fmt, parent_search=parent_search, force=force, force_share=force_share).close()
        except ChainError as e:
            result.messages.append(f"warning: {e}")
        except VdError as e:
            result.messages.append(f"warning: parent cannot be opened: {e}")
    progress.finish()
    return result

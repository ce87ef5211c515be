"""check: metadata consistency, qemu-img's exit codes and JSON keys."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.errors import ChainError, UsageError, VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_backend, open_image

EXIT_NO_CHECK = 63


def check(path: str, fmt: str | None = None, *, repair: str | None = None, parent_search=(),
          force: bool = False, untrusted: bool = False, force_share: bool = False,
          progress: Progress = NO_PROGRESS) -> CheckResult:
    if repair not in (None, "leaks", "all"):
        raise UsageError(f"--repair takes leaks or all, not {repair!r}")
    img = open_backend(path, fmt, writable=repair is not None, untrusted=untrusted, force_share=force_share,
                       options={"check": True, "repair": bool(repair), "force": force})
    try:
        result = img.check(repair, progress=progress.sub(0, 95))
        result.format_name = img.name
        if repair:
            img.flush()
        parent = img.parent
    finally:
        img.close()
    if parent is not None:
        _check_chain(result, path, fmt, parent_search, force, force_share)
    progress.finish()
    return result


def _check_chain(result: CheckResult, path: str, fmt: str | None, parent_search, force: bool,
                 force_share: bool) -> None:
    """The chain must open too: a parent that is gone, or is not the image
    the child recorded (VDI UUID, VMDK CID, VHD UUID and time stamp), is a
    check error (exit status 1), as qemu-img check fails on a backing file
    it cannot open.  ``--force`` accepts an identity mismatch, as it does
    for every other command."""
    try:
        open_image(path, fmt, parent_search=parent_search, force=force, force_share=force_share).close()
    except ChainError as e:
        result.chain_error = str(e)
        result.error(f"could not open the image's chain: {e}")
    except VdError as e:
        result.chain_error = f"parent cannot be opened: {e}"
        result.error(f"could not open the image's chain: parent cannot be opened: {e}")

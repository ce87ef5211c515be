"""checksum: a digest of a disk's virtual content that is the same for the
same content in any format, variant and chain (see vdtool.core.digest for
the construction)."""

from __future__ import annotations

from vdtool.core.digest import ALGORITHMS, DEFAULT_ALGORITHM, digest_stack
from vdtool.core.errors import UsageError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_image


def checksum(path: str, fmt: str | None = None, *, algorithm: str = DEFAULT_ALGORITHM, parent_search=(),
             force: bool = False, untrusted: bool = False, force_share: bool = False,
             workers: int | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """``{"filename", "algorithm", "checksum", "virtual-size"}`` of the disk
    ``path`` shows, its chain of parents included."""
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown checksum algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    stack = open_image(path, fmt, parent_search=parent_search, force=force, untrusted=untrusted,
                       force_share=force_share)
    try:
        size = stack.virtual_size
        digest = digest_stack(stack, progress, algorithm=algorithm, workers=workers)
    finally:
        stack.close()
    progress.finish(size)
    return {"filename": path, "algorithm": algorithm, "checksum": digest, "virtual-size": size}

"""measure: how big a new image would be (qemu-img measure)."""

from __future__ import annotations

from vdtool.core import registry
from vdtool.core.errors import UsageError, VdError
from vdtool.core.measure import StackSource
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_image


def measure(image: str | None = None, *, size: int | None = None, fmt: str = "raw",
            src_format: str | None = None, variant: str | None = None, block_size: int | None = None,
            options: dict | None = None, parent_search=(), force: bool = False, force_share: bool = False,
            untrusted: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """The file size a new ``fmt`` image would take: for an empty disk of
    ``size`` bytes, or for ``convert`` of ``image`` (its chain flattened).
    Returns qemu-img measure's keys: ``required``, ``fully-allocated`` and,
    for qcow2 v3 from an image that can hold persistent bitmaps,
    ``bitmaps`` (first, in qemu-img's order)."""
    if image is not None and size is not None:
        raise VdError("--size N cannot be used together with a filename")
    if image is None and size is None:
        raise VdError("Either --size N or one filename must be specified")
    try:
        name = registry.canonical_name(fmt or "raw")
    except UsageError as e:  # qemu-img: an unknown output format is an error (1), not a usage error
        raise VdError(str(e)) from None
    backend = registry.get_backend(name)
    if variant is not None and variant not in backend.variants:
        raise UsageError(f"{name} has no variant {variant!r}; choose from {', '.join(backend.variants)}")
    if image is None:
        if size < 0:
            raise UsageError(f"size {size} is negative")
        result = backend.measure(size, None, variant=variant, block_size=block_size, options=dict(options or {}))
    else:
        stack = open_image(image, src_format, parent_search=parent_search, force=force, untrusted=untrusted,
                           force_share=force_share)
        try:
            source = StackSource(stack, progress)
            result = backend.measure(stack.virtual_size, source, variant=variant, block_size=block_size,
                                     options=dict(options or {}))
        finally:
            stack.close()
    progress.finish()
    order = ("bitmaps", "required", "fully-allocated")
    return {k: int(result[k]) for k in order if k in result}

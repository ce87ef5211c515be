"""create: a new empty image, optionally an overlay over a parent."""

from __future__ import annotations

from vdtool.core import registry
from vdtool.core.backend import Cap, ParentSpec
from vdtool.core.errors import NotSupported, UsageError, VdError
from vdtool.core.fileio import is_url
from vdtool.core.ops.common import (backend_for_new_image, open_parent, output_format, parent_spec,
                                    staged_output)
from vdtool.core.progress import NO_PROGRESS, Progress


def create(path: str, size: int | None = None, *, fmt: str | None = None, variant: str | None = None,
           block_size: int | None = None, parent: str | None = None, parent_format: str | None = None,
           uuid: str | None = None, comment: str | None = None, options: dict | None = None,
           force: bool = False, parent_search=(), untrusted: bool = False, unsafe: bool = False,
           progress: Progress = NO_PROGRESS) -> dict:
    """Create ``path``; returns ``{"filename", "format", "virtual-size"}``.
    ``unsafe`` (qemu-img create -u): record ``parent`` (with
    ``parent_format``, and ``size`` given) without opening it, so it need
    not exist yet; only for formats that record no parent identity."""
    if is_url(path):
        raise VdError("a URL cannot be written: vdtool reads images from http(s) URLs but creates local "
                      "files only", path)
    name = output_format(path, fmt)
    backend = backend_for_new_image(path, name, variant)
    opts = backend.parse_options(dict(options or {}))
    for key, value in (("uuid", uuid), ("comment", comment)):
        if value is not None:
            if key not in opts:
                raise UsageError(f"--{key} is not supported for {name} images")
            opts[key] = value
    pstack = None
    try:
        spec = None
        if parent and not backend.capabilities & Cap.DIFF:
            raise NotSupported("a parent image", name, path)
        if unsafe:
            spec = _unopened_parent(backend, name, parent, parent_format, size)
        elif parent:
            pstack = open_parent(parent, parent_format, parent_search, untrusted=untrusted)
            spec = parent_spec(path, pstack)
            if size is None:
                size = pstack.virtual_size
        if size is None:
            raise UsageError("a size is needed (or --parent to take the parent's)")
        if size < 0:
            raise UsageError(f"size {size} is negative")
        with staged_output(path, force) as tmp:
            img = backend.create(tmp, size, variant=variant, block_size=block_size, parent=spec, options=opts,
                                 progress=progress)
            try:
                # a format may round the size (VHD's azure=on to whole MiB);
                # report what the image holds and the backend's notes on why
                actual = img.virtual_size
                notices = list(getattr(img, "notices", None) or ())
                img.flush()
            finally:
                img.close()
        progress.finish()
        result = {"filename": path, "format": name, "virtual-size": actual}
        if notices:
            result["message"] = "; ".join(notices)
        return result
    finally:
        if pstack is not None:
            pstack.close()


def _unopened_parent(backend, name: str, parent: str | None, parent_format: str | None,
                     size: int | None) -> ParentSpec:
    """The parent of ``create -u``, recorded as given without opening it."""
    if not parent or not parent_format or size is None:
        raise UsageError("-u/--unsafe needs the parent (-b), its format (-F) and a size: the parent is not opened")
    if backend.parent_identity:
        raise UsageError(f"{name} records its parent's identity (UUID or CID), read from the parent: it must "
                         f"exist, so -u/--unsafe is only for qcow2")
    return ParentSpec(path=parent, recorded_name=parent, format=registry.canonical_name(parent_format), size=size)

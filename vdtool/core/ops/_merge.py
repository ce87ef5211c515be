"""merge: fold a chain's layers into the parent or into the child
(VirtualBox's VDMerge).  Data is written and flushed before any parent
reference changes; files are deleted only after everything else succeeded."""

from __future__ import annotations

import os

from vdtool.core.backend import Cap, Status
from vdtool.core.errors import NotSupported, UsageError, VdError
from vdtool.core.ops.common import parent_spec, same_file, write_explicit_zeroes
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import ImageStack, open_image

CHUNK = 4 << 20


def _base_index(stack: ImageStack, base: str | None, default: int) -> int:
    if base is None:
        return default
    for i, layer in enumerate(stack.layers):
        if same_file(layer.path, base):
            return i
    raise UsageError(f"{base} is not in the chain of {stack.path} "
                     f"(chain: {', '.join(layer.path for layer in reversed(stack.layers))})")


def _copy_layers(stack: ImageStack, target, lo: int, hi: int, progress: Progress, *,
                 only_where_target_unallocated: bool, target_standalone: bool) -> int:
    """Copy what layers lo..hi (inclusive) hold into ``target``."""
    size = min(stack.virtual_size, target.virtual_size)
    buf = bytearray(CHUNK)
    zeros = memoryview(bytes(CHUNK))
    pos = 0
    moved = 0
    while pos < size:
        # runs that hold no data are taken whole (an empty 2 TiB base is a
        # handful of calls, not half a million); data is read a chunk at a time
        status, n, level = stack.block_status(pos, size - pos, top=hi, bottom=lo)
        if status == Status.DATA:
            n = min(n, CHUNK)
        if only_where_target_unallocated:
            tstatus, tn = target.block_status(pos, n)
            n = min(n, tn)
            if tstatus != Status.UNALLOCATED:
                pos += n
                progress.update(pos, size)
                continue
        if status == Status.DATA:
            view = memoryview(buf)[:n]
            stack.readinto_layers(pos, view, hi + 1)
            if target_standalone and buf.startswith(zeros[:n]):
                pass  # zeros over nothing: leave unallocated
            else:
                target.write(pos, view)
                moved += n
        elif status == Status.ZERO and not target_standalone:
            if only_where_target_unallocated:
                # into child: the parent changes next, so the zeros must be
                # the child's own (write_zeroes may defer to the old parent)
                write_explicit_zeroes(target, pos, n)
            else:
                target.write_zeroes(pos, n, unmap=True)
        pos += n
        progress.update(pos, size)
    return moved


def merge(image: str, *, into: str = "parent", base: str | None = None, keep: bool = False,
          fmt: str | None = None, parent_search=(), force: bool = False, untrusted: bool = False,
          progress: Progress = NO_PROGRESS) -> dict:
    """Returns ``{"target", "deleted": [...], "warnings": [...]}``."""
    if into not in ("parent", "child"):
        raise UsageError(f"--into takes parent or child, not {into!r}")
    stack = open_image(image, fmt, writable=(into == "child"), parent_search=parent_search, force=force,
                       untrusted=untrusted)
    warnings: list = []
    deleted: list = []
    try:
        top_i = len(stack.layers) - 1
        if top_i == 0:
            raise UsageError(f"{image} has no parent: nothing to merge")
        if into == "parent":
            b = _base_index(stack, base, top_i - 1)
            if b >= top_i:
                raise UsageError(f"--base must be below {image} in its chain")
            target = stack.reopen_layer(b, writable=True)
            if not target.capabilities & Cap.WRITE:
                raise NotSupported("writing", target.name, target.path)
            # IMAGE must keep opening over BASE until it is deleted: keep the
            # identity it checks (VDI modification UUID, VMDK CID) while the
            # data goes in; BASE gets a new one once the merged images are gone
            target.defer_identity_change()
            if target.virtual_size < stack.virtual_size:
                if not target.capabilities & Cap.RESIZE:
                    raise NotSupported("growing (needed to merge a larger child)", target.name, target.path)
                target.resize(stack.virtual_size)
            _copy_layers(stack, target, b + 1, top_i, progress.sub(0, 95),
                         only_where_target_unallocated=False, target_standalone=False)
            target.flush()
            merged = [layer.path for layer in stack.layers[b + 1:]]
            target_path = target.path
            target_cls = type(target)
        else:
            b = _base_index(stack, base, 0)
            if b >= top_i:
                raise UsageError(f"--base must be below {image} in its chain")
            target = stack.top
            target.defer_identity_change()  # IMAGE reads as before: its children stay valid
            new_parent = stack.layers[b - 1] if b > 0 else None
            _copy_layers(stack, target, b, top_i - 1, progress.sub(0, 95),
                         only_where_target_unallocated=True, target_standalone=new_parent is None)
            target.flush()
            if new_parent is not None:
                target.set_parent(parent_spec(target.path, ImageStack(stack.layers[:b])))
            else:
                target.set_parent(None)
            target.flush()
            merged = []
            target_path = target.path
    finally:
        stack.close()
    if into == "parent":
        if keep:
            warnings.append("the merged images were kept; they no longer describe a consistent state of the "
                            "disk over the merged parent")
        else:
            # top first: whatever a crash leaves is still a whole chain, IMAGE
            # over the images it needs (bottom first left IMAGE without parent)
            for p in reversed(merged):
                try:
                    os.unlink(p)
                    deleted.append(p)
                except OSError as e:
                    raise VdError(f"merged, but could not delete: {e.strerror}", p) from None
        _new_identity(target_path, target_cls)
        warnings.append(f"images that had {', '.join(merged)} as their parent must be rebased onto "
                        f"{target_path}")
    progress.finish()
    return {"target": target_path, "deleted": deleted, "warnings": warnings}


def _new_identity(path: str, cls) -> None:
    """BASE's content changed for everything but the merged images: give it
    a new modification identity, so other children of BASE see that."""
    from vdtool.core.backend import ImageBackend

    if cls.change_identity is ImageBackend.change_identity:
        return
    img = cls.open(path, writable=True)
    try:
        img.change_identity()
        img.flush()
    finally:
        img.close()

"""rebase: change an image's parent; safe mode keeps what it reads."""

from __future__ import annotations

from vdtool.core.backend import Cap, Status
from vdtool.core.errors import NotSupported, UsageError
from vdtool.core.ops.common import open_parent, parent_spec, write_explicit_zeroes
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import ImageStack, open_image


def rebase(image: str, new_parent: str | None, *, parent_format: str | None = None, unsafe: bool = False,
           fmt: str | None = None, parent_search=(), force: bool = False, untrusted: bool = False,
           progress: Progress = NO_PROGRESS) -> dict:
    """``new_parent`` None or "" makes the image stand alone."""
    stack = open_image(image, fmt, writable=True, parent_search=parent_search, force=force or unsafe,
                       chain=not unsafe, untrusted=untrusted)
    newp = None
    try:
        top = stack.top
        if not top.capabilities & Cap.DIFF:
            raise NotSupported("rebase", top.name, image, "the format cannot record a parent")
        if new_parent:
            newp = open_parent(new_parent, parent_format, parent_search, untrusted=untrusted)
            for layer in newp.layers:
                if _same(layer.path, top.path):
                    raise UsageError(f"{new_parent} has {image} in its own chain: that would make a loop")
        if not unsafe:
            top.defer_identity_change()  # IMAGE reads as before: its children stay valid
            _copy_differences(stack, newp, progress.sub(0, 95))
            top.flush()
        top.set_parent(parent_spec(top.path, newp) if newp is not None else None)
        top.flush()
    finally:
        stack.close()
        if newp is not None:
            newp.close()
    progress.finish()
    return {"filename": image, "parent": new_parent or None}


def _same(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _copy_differences(stack: ImageStack, newp: ImageStack | None, progress: Progress) -> None:
    """Where the top holds nothing and the old and new parents differ, copy
    the old parent's data into the top."""
    top = stack.top
    size = top.virtual_size
    block = max(top.block_size, 4096)
    chunk = max((4 << 20) // block, 1) * block
    old_buf = bytearray(chunk)
    new_buf = bytearray(chunk)
    zeros = memoryview(bytes(chunk))
    levels = len(stack.layers) - 1
    pos = 0
    while pos < size:
        # runs are taken whole until data has to be read, then a chunk at a time
        status, n = top.block_status(pos, size - pos)
        if status != Status.UNALLOCATED:
            pos += n
            progress.update(pos, size)
            continue
        # Walk extents, never read zeros: where neither the old chain nor
        # the new parent holds data both read as zeros and nothing needs
        # copying (a safe rebase of an empty 64 GiB overlay used to read and
        # compare every byte of it: 12 s instead of a fraction of one).
        old_status, on, _ = stack.block_status(pos, n, top=levels - 1)
        if newp is not None and pos < newp.virtual_size:
            new_status, nn, _ = newp.block_status(pos, min(n, newp.virtual_size - pos))
        else:
            new_status, nn = Status.ZERO, n
        if old_status != Status.DATA and new_status != Status.DATA:
            pos += min(n, on, nn)
            progress.update(pos, size)
            continue
        n = min(n, chunk - pos % chunk)
        old_view = memoryview(old_buf)[:n]
        stack.readinto_layers(pos, old_view, levels)
        new_view = memoryview(new_buf)[:n]
        if newp is not None:
            inside = max(0, min(n, newp.virtual_size - pos))
            if inside:
                newp.readinto(pos, new_view[:inside])
            new_view[inside:] = zeros[:n - inside]
        else:
            new_view[:] = zeros[:n]
        i = n if old_buf.startswith(new_view) else 0  # the whole chunk alike: one memcmp
        while i < n:
            k = min(block - (pos + i) % block, n - i)
            if not old_buf.startswith(new_view[i:i + k], i):
                if old_buf.startswith(zeros[:k], i):
                    write_explicit_zeroes(top, pos + i, k)
                else:
                    top.write(pos + i, old_view[i:i + k])
            i += k
        pos += n
        progress.update(pos, size)

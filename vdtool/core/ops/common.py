"""Helpers shared by the ops: output format choice, staging of new files,
parent specs."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager

from vdtool.core import registry
from vdtool.core.backend import ParentSpec, relative_parent_name
from vdtool.core.errors import UsageError, VdError
from vdtool.core.stack import ImageStack, open_image


def output_format(path: str, fmt: str | None) -> str:
    """The format of a new image: as named, else by the file's extension."""
    if fmt:
        return registry.canonical_name(fmt)
    guess = registry.format_for_extension(path)
    if guess:
        return guess
    raise UsageError(f"{path}: cannot tell the output format from the file name; name one with -O/-f "
                     f"(formats: {', '.join(registry.ALL_FORMATS)})")


def backend_for_new_image(path: str, fmt: str, variant: str | None):
    backend = registry.get_backend(fmt, path)
    if variant is not None and variant not in backend.variants:
        raise UsageError(f"{fmt} has no variant {variant!r}; choose from {', '.join(backend.variants)}")
    return backend


def parse_option_pairs(pairs) -> dict:
    """``-o KEY=VALUE`` (also comma-separated, as qemu-img takes them)."""
    out: dict = {}
    for item in pairs or ():
        for part in str(item).split(","):
            if not part:
                continue
            if "=" not in part:
                raise UsageError(f"option {part!r} is not KEY=VALUE")
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def destination(path: str, force: bool) -> str:
    """The file a new image is written to in place of ``path``: a symlink
    is followed to its target (as qemu-img and cp do, so the link stays a
    link), an existing file is replaced only with ``force``, and anything
    that is not a regular file (a device, FIFO, socket or folder) is never
    replaced, with or without ``force``."""
    if path == "-":
        raise VdError("standard output ('-') cannot be the destination here; name a file", path)
    from vdtool.core.fileio import is_url

    if is_url(path):
        raise VdError("a URL cannot be written: vdtool reads images from http(s) URLs but creates local files only",
                      path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as e:
        raise VdError(f"cannot look at the destination: {e.strerror or e}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise VdError("is a directory; vdtool replaces nothing but regular files", path)
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise VdError(f"is {kind}; vdtool replaces nothing but regular files (create makes new images; "
                          f"'vdtool convert' writes into {kind})", path)
    if not force:
        raise VdError("already exists; use --force to overwrite it", path)
    return target


STAGE_PREFIX = ".vdtool-"


def sweep_stale_stages(folder: str) -> None:
    """Remove staging folders that a killed vdtool (SIGKILL, power loss)
    left in ``folder``: their name carries the owner's process id, and one
    whose process is gone is removed and mentioned on stderr.  A folder
    whose owner still runs (or whose name has no process id) is left."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(STAGE_PREFIX)]
    except OSError:
        return
    for name in names:
        pid_text = name[len(STAGE_PREFIX):].split("-", 1)[0]
        path = os.path.join(folder, name)
        if not pid_text.isdigit() or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue  # someone else's process, or not a process id at all
        shutil.rmtree(path, ignore_errors=True)
        from vdtool.core.untrusted import notice

        notice(f"{path}: removed a staging folder left by an interrupted vdtool (process {pid_text} is gone)")


@contextmanager
def staged_output(final_path: str, force: bool, durable: bool = True):
    """Yield a path in a private folder beside ``final_path`` (same
    filesystem, same base name, so multi-file formats name their parts
    right); on success every file made there is renamed into place, on
    failure all of it is removed.  No half-written image ever carries the
    final name.  ``durable`` also fsyncs the folder after the renames (the
    files themselves are synced by whoever wrote them)."""
    final_path = destination(final_path, force)
    folder = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(folder):
        raise VdError("folder does not exist", folder)
    sweep_stale_stages(folder)
    stage = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=folder)
    ok = False
    staged = os.path.join(stage, os.path.basename(final_path))
    try:
        yield staged
        ok = True
    except VdError as e:
        # messages must name the user's file, not the staging folder
        if e.path and os.path.abspath(e.path).startswith(stage):
            name = final_path if os.path.abspath(e.path) == staged else os.path.join(
                folder, os.path.relpath(os.path.abspath(e.path), stage))
            e.args = (str(e).replace(e.path, name, 1),) + e.args[1:]
            e.path = name
        raise
    finally:
        if ok:
            names = os.listdir(stage)
            for name in names:
                target = os.path.join(folder, name)
                if os.path.lexists(target) and os.path.abspath(target) != os.path.abspath(final_path) and not force:
                    shutil.rmtree(stage, ignore_errors=True)
                    raise VdError("already exists; use --force to overwrite it", target)
            # the file with the final name goes last: a multi-file image (a
            # VMDK descriptor and its extents) never shows under the final
            # name before the files it names are in place
            final = os.path.basename(final_path)
            moved = []
            try:
                for name in sorted(names, key=lambda n: n == final):
                    os.replace(os.path.join(stage, name), os.path.join(folder, name))
                    moved.append(name)
            except OSError as e:
                # a failed rename (EIO...) must not leave the staging folder,
                # nor parts of the image without the file that names them
                for done in moved:
                    try:
                        os.unlink(os.path.join(folder, done))
                    except OSError:
                        pass
                shutil.rmtree(stage, ignore_errors=True)
                raise VdError(f"could not move the new image into place: {e.strerror or e}", final_path) from None
            if durable:
                _fsync_dir(folder)
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def parent_spec(child_final_path: str, parent_stack: ImageStack) -> ParentSpec:
    top = parent_stack.top
    try:
        mtime = os.stat(top.path).st_mtime
    except OSError:
        mtime = None
    return ParentSpec(
        path=top.path,
        recorded_name=relative_parent_name(child_final_path, top.path),
        format=top.name,
        size=top.virtual_size,
        uuid=top.uuid,
        modification_uuid=getattr(top, "modification_uuid", None),
        mtime=mtime,
        image=top,
    )


def open_parent(path: str, fmt: str | None, parent_search=(), force: bool = False,
                untrusted: bool = False, force_share: bool = False) -> ImageStack:
    return open_image(path, fmt, writable=False, parent_search=parent_search, force=force, untrusted=untrusted,
                      force_share=force_share)


def stack_over(parent: ImageStack | None, new_top) -> ImageStack:
    """A stack of the new image on its parent's layers (owned by ``parent``)."""
    return ImageStack((list(parent.layers) if parent else []) + [new_top])


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def write_explicit_zeroes(top, offset: int, length: int) -> None:
    """Make ``top`` itself record zeros over [offset, offset+length), whatever
    its current parent shows there.  For rebase and merge into child, whose
    parent is about to change: a backend's write_zeroes may leave a range
    unallocated where the *current* parent reads zeros (VHD always, VDI for
    part of a block), which the new parent would then show through.  Whole
    blocks of formats with zero markers get markers; the rest zero data."""
    from vdtool.core.backend import Cap

    block = max(top.block_size, 512)
    pos, end = offset, offset + length
    markers = bool(top.capabilities & Cap.ZERO_MARKER)
    zero = bytes(min(block, 1 << 20))
    while pos < end:
        n = min(block - pos % block, end - pos)
        whole = pos % block == 0 and (n == block or pos + n >= top.virtual_size)
        if markers and whole:
            top.write_zeroes(pos, n, unmap=True)
        else:
            k = 0
            while k < n:
                m = min(len(zero), n - k)
                top.write(pos + k, memoryview(zero)[:m])
                k += m
        pos += n

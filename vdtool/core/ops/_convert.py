"""convert: what a source stack shows, flattened into a new image."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vdtool.core.backend import Cap
from vdtool.core.copy import copy_stack
from vdtool.core.digest import ContentDigest, digest_stack
from vdtool.core.errors import NotSupported, UsageError, VdError
from vdtool.core.fileio import deferred_sync
from vdtool.core import registry
from vdtool.core.ops.common import (STAGE_PREFIX, backend_for_new_image, open_parent, output_format, parent_spec,
                                    same_file, stack_over, staged_output, sweep_stale_stages)
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.sinks import (STDOUT_NAME, StreamTarget, describe, open_target, refuse_terminal_stdout,
                                target_kind)
from vdtool.core.stack import open_image
from vdtool.core.streams import STDIN_NAME


@dataclass
class ConvertResult:
    filename: str
    format: str
    virtual_size: int
    source_digest: str | None = None
    output_digest: str | None = None
    written_bytes: int = 0


PREALLOCATED_VARIANTS = {"full", "fixed", "metadata", "monolithicFlat", "twoGbMaxExtentFlat", "vmfs"}


def convert(src: str, dst: str, *, src_format: str | None = None, fmt: str | None = None,
            variant: str | None = None, block_size: int | None = None, compress: bool = False,
            parent: str | None = None, parent_format: str | None = None, options: dict | None = None,
            verify: bool = False, force: bool = False, parent_search=(), force_share: bool = False,
            untrusted: bool = False, sync: bool | None = None, no_create: bool = False,
            target_is_zero: bool = False, size: int | None = None,
            progress: Progress = NO_PROGRESS) -> ConvertResult:
    """``sync``: True fsyncs the new image (and its folder) before returning,
    so it survives a power cut; False leaves it to the kernel's writeback,
    as qemu-img convert and cp do; None (the default) syncs only when DST
    replaces an existing file, so a power cut can never cost the old file
    and the new one both.  Either way DST appears under its name only when
    complete.

    ``src`` '-' is standard input; ``dst`` '-' is standard output, and a
    DST that is a FIFO or a device is written in place (see sinks.py).
    ``no_create`` (-n) writes into an existing image DST; ``target_is_zero``
    says DST (with -n, or a device) already reads as zeros, so zeros are not
    written.  ``size``: the disk size of raw input from standard input,
    named ahead so it can be streamed."""
    kind = target_kind(dst)
    if dst == STDOUT_NAME:
        refuse_terminal_stdout()
    if target_is_zero and not (no_create or kind == "device"):
        raise UsageError("--target-is-zero needs -n (an existing DST) or a device as DST: a new image "
                         "reads as zeros anyway")
    if size is not None and src != STDIN_NAME:
        raise UsageError("--size names the size of raw input from standard input (SRC '-') only")
    if src == dst == STDIN_NAME:
        pass  # standard input to standard output
    elif same_file(src, dst):
        raise VdError("source and destination are the same file", dst)
    if no_create:
        return _convert_into_existing(src, dst, kind, src_format=src_format, fmt=fmt, compress=compress,
                                      parent=parent, verify=verify, target_is_zero=target_is_zero, sync=sync,
                                      size=size, open_args=dict(parent_search=parent_search, untrusted=untrusted,
                                                                force_share=force_share),
                                      progress=progress)
    name = output_format(dst, fmt) if kind is None or fmt else "raw"
    backend = backend_for_new_image(dst, name, variant)
    if compress and variant is None and getattr(backend, "compress_variant", None):
        # formats whose compression is a variant of its own (vmdk's streamOptimized)
        variant = backend.compress_variant
    if variant is not None and variant == getattr(backend, "compress_variant", None):
        # a variant that is always compressed (streamOptimized): let the copy
        # engine compress in its thread pool instead of the backend, serially
        compress = True
    opts = backend.parse_options(dict(options or {}))
    if compress and not backend.capabilities & Cap.COMPRESS:
        raise NotSupported("compression (-c)", name, dst)
    new = _NewImage(backend, name, variant, block_size, opts, compress, parent, parent_format)
    if kind is not None:
        if variant in backend.multi_file_variants:
            one_file = [v for v in backend.variants if v not in backend.multi_file_variants]
            raise VdError(f"a {name} image of variant {variant} is several files and cannot be written into "
                          f"{describe(dst)}; variants that are one file: {', '.join(one_file)}", dst)
        if parent:
            raise UsageError(f"-b/--parent cannot be used when DST is {describe(dst)}: a parent is named by "
                             f"its path relative to the image's file")
        if verify:
            raise UsageError(f"--verify reads DST back, which {describe(dst)} cannot do; run "
                             f"'vdtool checksum' on SRC and on the written image instead")
    open_args = dict(parent_search=parent_search, untrusted=untrusted, force_share=force_share)
    source = _open_source(src, src_format, size, raw_out=kind == "stream" and name == "raw", **open_args)
    try:
        if kind is not None:
            return _convert_to_target(source, dst, kind, new, force=force, target_is_zero=target_is_zero,
                                      sync=bool(sync), progress=progress)
        return _convert_to_new_file(source, dst, new, verify=verify, force=force, sync=sync,
                                    open_args=open_args, progress=progress)
    finally:
        source.close()


@dataclass
class _NewImage:
    """What the new image is to be (the options of convert that say so)."""

    backend: object
    name: str
    variant: str | None
    block_size: int | None
    options: dict
    compress: bool
    parent: str | None
    parent_format: str | None


def _open_source(src: str, fmt: str | None, size: int | None, raw_out: bool, **open_args):
    """The source stack.  Raw input from standard input is streamed when its
    size is known ahead (``--size``) or the output is raw on a stream too;
    everything else from standard input is read into a temporary file."""
    if src == STDIN_NAME:
        from vdtool.core.rawinput import RawInput
        from vdtool.core.streams import stdin

        head = stdin().head()
        name = registry.canonical_name(fmt) if fmt else registry.probe_format(
            src, registry.ProbeData(head, b"", len(head)))
        if name == "raw" and (size is not None or raw_out):
            return RawInput(size)
        if size is not None:
            raise UsageError(f"--size is for raw input; standard input holds a {name} image")
        if not open_args.get("untrusted"):
            stream = registry.get_backend(name, src).stream_source(head, stdin().read, src)
            if stream is not None:
                stdin().streaming = True  # nothing else may read it now
                return stream
    return open_image(src, fmt, **open_args)


def _convert_to_new_file(source, dst: str, new: _NewImage, *, verify: bool, force: bool, sync, open_args: dict,
                         progress: Progress, wrap_top=None) -> ConvertResult:
    """The usual convert: a new image file, staged beside DST and renamed
    into place when complete.  ``wrap_top``: what the copy engine writes
    through instead of the new image itself (layout_ahead.Recording)."""
    backend, name = new.backend, new.name
    pstack = None
    try:
        spec = None
        if new.parent:
            if not backend.capabilities & Cap.DIFF:
                raise NotSupported("a parent image", name, dst)
            pstack = open_parent(new.parent, new.parent_format, open_args["parent_search"],
                                 untrusted=open_args["untrusted"], force_share=open_args["force_share"])
            spec = parent_spec(dst, pstack)
        size = source.virtual_size
        digest = ContentDigest() if verify else None
        copy_part = progress.sub(0, 80 if verify else 100)
        durable = sync if sync is not None else os.path.lexists(dst)
        with staged_output(dst, force, durable=durable) as tmp:
            # The staged file is renamed into place only on success, so the
            # fsyncs between data and metadata inside the copy protect
            # nothing: deferred_sync() keeps the write order and fsyncs each
            # new file once when it is closed (before the rename), or never.
            with deferred_sync(durable=durable):
                img = backend.create(tmp, size, variant=new.variant, block_size=new.block_size, parent=spec,
                                     options=new.options)
                try:
                    out = stack_over(pstack, wrap_top(img) if wrap_top else img)
                    stats = copy_stack(source, out, base=pstack, compress=new.compress,
                                       write_zeros=False, digest=digest, progress=copy_part)
                    _input_ended(source)
                    img.flush()
                finally:
                    img.close()
            result = ConvertResult(dst, name, size, written_bytes=stats.written_bytes)
            if verify:
                result.source_digest = digest.hexdigest()
                result.output_digest = _digest_written(backend, tmp, pstack, size, progress.sub(80, 20))
                if result.output_digest != result.source_digest:
                    raise VdError(f"verification failed: source digest {result.source_digest}, "
                                  f"written image digest {result.output_digest}", dst)
        progress.finish(size)
        return result
    finally:
        if pstack is not None:
            pstack.close()


def _digest_written(backend, path: str, pstack, size: int, progress: Progress) -> str:
    check_img = backend.open(path)
    try:
        written = stack_over(pstack, check_img)
        # A format may round the size up (qcow2 keeps whole sectors, as
        # qemu-img does): digest the source's size and require the padding
        # to read as zeros, else --verify of an odd-sized raw source could
        # never succeed.
        out = digest_stack(written, progress, size=size)
        extra = written.virtual_size - size
        if extra > 0 and written.read(size, min(extra, 1 << 20)) != bytes(min(extra, 1 << 20)):
            out += " (non-zero data past the source's end)"
        elif extra < 0:
            out += f" (output is {-extra} bytes shorter than the source)"
        return out
    finally:
        check_img.close()


def _input_ended(source) -> None:
    """Raw input streamed from standard input must end where --size said."""
    ended = getattr(source, "check_ended", None)
    if ended is not None:
        ended()


# -- destinations written in place: standard output, FIFOs, devices ----------------

class _TargetTop:
    """The copy engine's view of an in-place destination: raw disk bytes at
    their offsets (a stream takes them in order, as the engine gives them)."""

    capabilities = Cap.NONE
    block_size = 4096
    name = "raw"

    def __init__(self, target, size: int):
        self.target, self.virtual_size, self.path = target, size, target.name

    def write(self, offset: int, data) -> None:
        self.target.write_at(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.target.zero(offset, length)


class _OneLayer:
    def __init__(self, top):
        self.top = top


def _convert_to_target(source, dst: str, kind: str, new: _NewImage, *, force: bool, target_is_zero: bool,
                       sync: bool, progress: Progress) -> ConvertResult:
    """Raw output goes straight from the source into the target; another
    format is written into a temporary file first (its tables come before
    its data) and then copied into the target."""
    if kind == "device" and not force:
        raise VdError("is a block device: its content would be overwritten; add --force to write the image "
                      "into it (or -n to write into the image it holds)", dst)
    target = open_target(dst)
    try:
        if new.name == "raw" and new.variant in (None, "sparse", "full"):
            result = _raw_into_target(source, target, kind, target_is_zero, progress)
        else:
            result = _image_into_target(source, target, kind, new, target_is_zero, progress)
        if sync:
            target.sync()
        return result
    finally:
        target.close()


def _raw_into_target(source, target, kind: str, target_is_zero: bool, progress: Progress) -> ConvertResult:
    if getattr(source, "size", 0) is None:  # raw from standard input, size unknown: pump until it ends
        return _pump_raw(source, target, progress)
    size = source.virtual_size
    _fits(target, size)
    if isinstance(target, StreamTarget) and not target.sparse and hasattr(source, "file_runs"):
        written = _send_raw(source, target, size, progress)
    else:
        written = copy_stack(source, _OneLayer(_TargetTop(target, size)), mark_zeros=not target_is_zero,
                             progress=progress).written_bytes
    _input_ended(source)
    target.finish(size)
    progress.finish(size)
    return ConvertResult(target.name, "raw", size, written_bytes=written)


def _send_raw(source, target, size: int, progress: Progress) -> int:
    """Raw disk bytes into a pipe (or character device), where every byte
    goes down it: testing for zeros buys nothing there (layout_ahead.send_source
    sends a raw source's runs by sendfile)."""
    from vdtool.core.layout_ahead import send_source

    return send_source(source, 0, size, target, 0, bytearray(1 << 20), progress, size)


def _pump_raw(source, target, progress: Progress) -> ConvertResult:
    """Raw standard input of unknown size to a raw stream: block by block
    until the input ends (blocks of zeros become holes where the output is
    a file)."""
    from vdtool.core.bytesutil import data_runs

    chunk = 4 << 20
    zero_view = memoryview(bytes(chunk))
    pos = written = 0
    while True:
        data = source.read_some(chunk)
        if not data:
            break
        buf = bytearray(data)
        for a, b in data_runs(buf, len(buf), 4096, zero_view):
            target.write_at(pos + a, memoryview(buf)[a:b])
            written += b - a
        pos += len(buf)
        progress.update(pos, 0)
    target.finish(pos)
    return ConvertResult(target.name, "raw", pos, written_bytes=written)


def _fits(target, size: int) -> None:
    room = getattr(target, "size", None)
    if room is not None and size > room:
        raise VdError(f"the device is smaller than the image ({room} < {size} bytes); nothing was written",
                      target.name)


def _scratch_folder():
    """A private folder in TMPDIR for an image on its way into a target,
    named like a staging folder so that one a killed vdtool left is swept."""
    import tempfile

    return tempfile.TemporaryDirectory(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=tempfile.gettempdir())


def _image_into_target(source, target, kind: str, new: _NewImage, target_is_zero: bool,
                       progress: Progress) -> ConvertResult:
    import tempfile

    sweep_stale_stages(tempfile.gettempdir())  # what a killed stream convert left in TMPDIR
    if new.variant is not None and new.variant in new.backend.append_only_variants:
        return _appended_into_target(source, target, new, progress)
    if not new.compress and _readable_twice(source):
        result = _planned_into_target(source, target, new, target_is_zero, progress)
        if result is not None:
            return result
    return _spooled_into_target(source, target, new, target_is_zero, progress)


def _appended_into_target(source, target, new: _NewImage, progress: Progress) -> ConvertResult:
    """A variant whose writer only appends (streamOptimized) writes straight
    into the target as it goes."""
    from vdtool.core.fileio import files_in_folder_as
    from vdtool.core.layout_ahead import append_class

    with _scratch_folder() as folder:
        path = os.path.join(folder, _inner_name(source, target, new))
        with files_in_folder_as(folder, append_class(target)):
            inner = _convert_to_new_file(source, path, new, verify=False, force=False, sync=False,
                                         open_args={}, progress=progress)
    target.finish(target.written)
    return ConvertResult(target.name, new.name, inner.virtual_size, written_bytes=target.written)


def _readable_twice(source) -> bool:
    """Local files (standard input's temporary file too), not a URL or a
    stream read once."""
    from vdtool.core.sourcefile import SourceFile

    layers = getattr(source, "layers", ())
    return bool(layers) and not any(isinstance(getattr(layer, "file", None), SourceFile) for layer in layers)


def _planned_into_target(source, target, new: _NewImage, target_is_zero: bool,
                         progress: Progress) -> ConvertResult | None:
    """The image made in a shadow that keeps its tables and notes where its
    data goes, then sent with the data read again (layout_ahead.py); None
    when the format's writer read data back (then it is spooled instead)."""
    from vdtool.core.fileio import files_in_folder_as
    from vdtool.core.layout_ahead import DataMap, NotPlannable, Recording, emit, shadow_class

    data_map = DataMap()
    with _scratch_folder() as folder:
        path = os.path.join(folder, _inner_name(source, target, new))
        try:
            with files_in_folder_as(folder, shadow_class(data_map)):
                inner = _convert_to_new_file(source, path, new, verify=False, force=False, sync=False,
                                             open_args={}, progress=progress.sub(0, 40),
                                             wrap_top=lambda img: Recording(img, data_map))
        except NotPlannable:
            return None
        _one_file(folder, new, target)
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            _fits(target, total)
            part = progress.sub(40, 60)

            def deliver(fd, start, end):
                _deliver_range(fd, start, end, target, mark_holes=not target_is_zero, progress=part)

            emit(f.fileno(), total, data_map, source, target, deliver, part)
    target.finish(total)
    progress.finish(inner.virtual_size)
    return ConvertResult(target.name, new.name, inner.virtual_size, written_bytes=total)


def _one_file(folder: str, new: _NewImage, target) -> None:
    if len(os.listdir(folder)) != 1:  # a format that made several files (the early check knows VMDK's)
        raise VdError(f"the {new.name} image is several files and cannot be written into "
                      f"{describe(target.name)}", target.name)


def _spooled_into_target(source, target, new: _NewImage, target_is_zero: bool,
                         progress: Progress) -> ConvertResult:
    import tempfile

    from vdtool.core.notices import notice

    tmpdir = tempfile.gettempdir()
    notice(f"{describe(target.name)}: writing the {new.name} image into a temporary file in {tmpdir} first "
           f"(its tables come before its data)")
    with _scratch_folder() as folder:
        path = os.path.join(folder, _inner_name(source, target, new))
        inner = _convert_to_new_file(source, path, new, verify=False, force=False, sync=False,
                                     open_args={}, progress=progress.sub(0, 70))
        _one_file(folder, new, target)
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            _fits(target, total)
            _deliver_range(f.fileno(), 0, total, target, mark_holes=not target_is_zero,
                           progress=progress.sub(70, 30))
    target.finish(total)
    progress.finish(inner.virtual_size)
    return ConvertResult(target.name, new.name, inner.virtual_size, written_bytes=total)


def _inner_name(source, target, new: _NewImage) -> str:
    """The file name the image is written under: formats that record their
    own file name (a VMDK descriptor names its extent) then name the file
    the stream ends up in: standard output's file when it is one, else the
    target's or the source's name with the format's extension."""
    ext = (new.backend.extensions or ("",))[0]
    name = None
    if target.name == STDOUT_NAME:
        try:
            linked = os.readlink(f"/proc/self/fd/{target.fd}")
            if os.path.isfile(linked):
                name = os.path.basename(linked)
        except OSError:
            pass
    elif not target.name.startswith("/dev/"):
        name = os.path.splitext(os.path.basename(target.name))[0] + ext
    if name is None:
        src = getattr(source, "path", STDIN_NAME)
        base = os.path.splitext(os.path.basename(src))[0] if src != STDIN_NAME else "disk"
        name = (base or "disk") + ext
    return name


def _deliver_range(fd: int, pos: int, total: int, target, mark_holes: bool, progress: Progress) -> None:
    """Copy [pos, total) of a file into the target: its data runs
    (SEEK_DATA/SEEK_HOLE), its holes as zeros where the target does not
    read as zeros already."""
    buf = bytearray(1 << 20)
    while pos < total:
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            data_at = total  # ENXIO: only a hole up to the end
        data_at = min(data_at, total)
        if data_at > pos and (mark_holes or isinstance(target, StreamTarget)):
            target.zero(pos, data_at - pos)
        pos = data_at
        if pos >= total:
            break
        try:
            hole_at = min(os.lseek(fd, pos, os.SEEK_HOLE), total)
        except OSError:
            hole_at = total
        while pos < hole_at:
            want = min(64 << 20, hole_at - pos)
            n = target.send_file(fd, pos, pos, want)  # the kernel copies (0: it cannot here)
            if n <= 0:
                n = os.preadv(fd, [memoryview(buf)[:min(len(buf), want)]], pos)
                if n <= 0:
                    raise VdError(f"temporary image ended early at {pos} bytes", target.name)
                target.write_at(pos, memoryview(buf)[:n])
            pos += n
            progress.update(pos, total)


# -- -n: into an existing image ----------------------------------------------------

def _convert_into_existing(src: str, dst: str, kind: str | None, *, src_format, fmt, compress: bool, parent,
                           verify: bool, target_is_zero: bool, sync, size, open_args: dict,
                           progress: Progress) -> ConvertResult:
    """qemu-img's -n: DST exists and is written into (as the format -O names,
    else the one its content shows); it must be at least as big as SRC.
    Zeros are written too unless --target-is-zero."""
    if dst == STDOUT_NAME:
        raise UsageError("-n writes into an existing image; standard output is not one")
    if compress or parent or verify:
        raise UsageError("-n cannot be combined with -c, -b or --verify")
    name = registry.canonical_name(fmt) if fmt else None
    if kind is not None and (name in (None, "raw")):
        # a device or pipe holding raw content: written in place as it is
        new = _NewImage(backend_for_new_image(dst, "raw", None), "raw", None, None, {}, False, None, None)
        source = _open_source(src, src_format, size, raw_out=kind == "stream", **open_args)
        try:
            return _convert_to_target(source, dst, kind, new, force=True, target_is_zero=target_is_zero,
                                      sync=bool(sync), progress=progress)
        finally:
            source.close()
    if not os.path.lexists(dst):
        raise VdError("does not exist (-n writes into an existing image; leave -n out to create it)", dst)
    source = _open_source(src, src_format, size, raw_out=False, **open_args)
    try:
        out = open_image(dst, fmt, writable=True, chain=False)
        try:
            need = source.virtual_size
            if out.virtual_size < need:
                raise VdError(f"is smaller than the source ({out.virtual_size} < {need} bytes); resize it first",
                              dst)
            stats = copy_stack(source, out, mark_zeros=not target_is_zero, progress=progress)
            _input_ended(source)
            out.top.flush()
            if sync:
                out.top.file.flush()
        finally:
            out.close()
    finally:
        source.close()
    progress.finish(need)
    return ConvertResult(dst, out.top.name, need, written_bytes=stats.written_bytes)

"""ImageStack: a chain of images, base first, top last.

Fall-through lives here and nowhere else (VirtualBox's container model): a
read asks the top for block_status and goes down a layer while the answer is
UNALLOCATED.  The run length only ever shrinks on the way down, so layers with
different block sizes never hand back stale data.  Writes go to the top only;
lower images are opened read-only unless an op reopens one to write into it."""

from __future__ import annotations

import os

from vdtool.core import locate
from vdtool.core.backend import ImageBackend, ParentRef, Status
from vdtool.core.errors import ChainError, VdError
from vdtool.core.fileio import ImageFile, is_url

MAX_CHAIN_DEPTH = 64
_ZERO_CHUNK = bytes(1 << 20)


def _plain_fd(layer) -> int | None:
    """The descriptor of ``layer``'s own local file where its ranges may go
    by sendfile (``kernel_copy``: raw), else None: a remote file, or an
    image format whose reads check what its tables point at."""
    f = getattr(layer, "file", None)
    if not getattr(layer, "kernel_copy", False) or type(f) is not ImageFile or f.path != layer.path:
        return None
    return f.fd


class ImageStack:
    def __init__(self, layers: list):
        if not layers:
            raise ValueError("an ImageStack needs at least one image")
        self.layers: list = layers  # base first
        self.missing_parent: ParentRef | None = None  # set when opened with allow_missing_parent
        self.missing_reason: str = ""
        self.warnings: list = []  # set by open_image: notices about probing and references
        self._wire()

    def _wire(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.parent_read = self._reader_below(i)

    def _reader_below(self, level: int):
        def read_below(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            self.readinto_layers(offset, memoryview(buf), level)
            return bytes(buf)

        return read_below

    # -- facts ---------------------------------------------------------------
    @property
    def top(self) -> ImageBackend:
        return self.layers[-1]

    @property
    def base(self) -> ImageBackend:
        return self.layers[0]

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    @property
    def path(self) -> str:
        return self.top.path

    def __len__(self) -> int:
        return len(self.layers)

    # -- reading -------------------------------------------------------------
    def block_status(self, offset: int, length: int, *, top: int | None = None, bottom: int = 0) -> tuple:
        """(status, n, level) for the run at ``offset`` looking from layer
        ``top`` (default: the top) down to layer ``bottom``.  ``level`` is the
        layer that decided (-1 when no layer holds the range: zeros, or the
        parent below ``bottom`` shows through)."""
        level = len(self.layers) - 1 if top is None else top
        n = length
        while level >= bottom:
            layer = self.layers[level]
            size = layer.virtual_size
            if offset >= size:
                # beyond a lower layer's end reads as zeros
                return Status.ZERO, n, level
            status, got = layer.block_status(offset, min(n, size - offset))
            if got <= 0:
                raise VdError(f"internal error: block_status returned length {got} at offset {offset}", layer.path)
            n = min(n, got)
            if status != Status.UNALLOCATED:
                return status, n, level
            level -= 1
        return Status.UNALLOCATED, n, -1

    def block_status_above(self, offset: int, length: int, base: int = 0) -> tuple:
        """QEMU's is_allocated_above: (status, n, level) considering only the
        layers above ``base`` (an index; 0 means the whole chain)."""
        return self.block_status(offset, length, bottom=base)

    def readinto_layers(self, offset: int, buf: memoryview, top: int) -> None:
        """Read what layers ``0..top-1`` show into ``buf``."""
        pos = 0
        total = len(buf)
        while pos < total:
            if top <= 0:
                buf[pos:] = _zeros(total - pos)
                return
            status, n, level = self.block_status(offset + pos, total - pos, top=top - 1)
            if status == Status.DATA:
                self.layers[level].readinto(offset + pos, buf[pos:pos + n])
            else:
                buf[pos:pos + n] = _zeros(n)
            pos += n

    def file_runs(self, offset: int, length: int):
        """Where the bytes of [offset, offset + length) lie, for copies the
        kernel can make without them passing through vdtool (sendfile):
        ``(is_data, fd, host offset, n)`` runs in order; ``fd`` is None for a
        run that reads as zeros (``is_data`` False) or must be read through
        the layers (compressed data, a remote file, another file)."""
        pos, end = offset, offset + length
        while pos < end:
            status, n, level = self.block_status(pos, end - pos)
            fd = host = None
            if status == Status.DATA and level >= 0:
                layer = self.layers[level]
                fd = _plain_fd(layer)
                if fd is not None:  # only then is where the data lies worth asking
                    ext = layer.map_extent(pos, n)
                    n = max(1, min(n, ext.length))
                    if (ext.status == Status.DATA and ext.offset is not None and not ext.compressed
                            and not ext.zero and ext.file is None):
                        host = ext.offset
                    else:
                        fd = None
            elif status == Status.DATA:
                status = Status.ZERO  # no layer holds it
            yield (status == Status.DATA, fd, host if fd is not None else None, n)
            pos += n

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        if offset < 0 or offset + len(mv) > self.virtual_size:
            raise VdError(f"read of {len(mv)} bytes at offset {offset} is outside the disk "
                          f"(virtual size {self.virtual_size})", self.path)
        self.readinto_layers(offset, mv, len(self.layers))

    def read(self, offset: int, length: int) -> bytes:
        if length < 0:  # bytearray(-1) would raise ValueError, not a VdError
            raise VdError(f"read of {length} bytes at offset {offset}: negative length", self.path)
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    # -- writing (top only) ----------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {self.virtual_size})",
                          self.path)

    def write(self, offset: int, data) -> None:
        self._check_range(offset, len(data))
        self.top.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = True) -> None:
        self._check_range(offset, length)
        self.top.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self.top.discard(offset, length)

    def flush(self) -> None:
        for layer in self.layers:
            if layer.writable:
                layer.flush()

    def close(self) -> None:
        errors = []
        for layer in reversed(self.layers):
            try:
                layer.close()
            except VdError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def reopen_layer(self, level: int, writable: bool = True) -> ImageBackend:
        """Reopen one layer (for ops that write into a lower image)."""
        old = self.layers[level]
        cls = type(old)
        old.close()
        self.layers[level] = cls.open(old.path, writable=writable)
        self._wire()
        return self.layers[level]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _zeros(n: int):
    if n <= len(_ZERO_CHUNK):
        return memoryview(_ZERO_CHUNK)[:n]
    return bytes(n)


# -- opening --------------------------------------------------------------------

def resolve_parent_path(child_path: str, ref: ParentRef, search_dirs=()) -> str | None:
    """Where the parent named by ``ref`` lives.

    Names are tried in order: ``ref.filename`` then ``ref.extra["candidates"]``
    (VHD's relative and absolute locators, say); an absolute name is used as
    is, a relative one is taken from the child's folder (how QEMU and
    VirtualBox resolve it), then from the ``search_dirs``.  A parent named
    only by UUID (VDI) is looked up by ``vdtool.core.locate``.  Returns the
    first path that exists, else the first candidate (for messages), else None."""
    names = [n for n in [ref.filename, *ref.extra.get("candidates", ())] if n]
    if is_url(child_path):
        # relative to the URL, never a local file (urlnames); no folder searches
        from vdtool.core import urlnames

        return urlnames.parent_url(child_path, names)
    child_dir = os.path.dirname(os.path.abspath(child_path))
    candidates = []
    for name in names:
        if is_url(name):
            return name  # a local overlay of a remote base (qemu-img create -b URL)
        if os.path.isabs(name):
            candidates.append(name)
            continue
        candidates.append(os.path.join(child_dir, name))
        candidates += [os.path.join(d, name) for d in search_dirs]
        candidates += [os.path.join(d, os.path.basename(name)) for d in search_dirs]
    for c in candidates:
        if os.path.exists(c):
            return c
    if not names and ref.uuid:
        return locate.find_by_uuid(child_path, ref, search_dirs, opener=open_backend)
    if names and search_dirs:
        # moved and renamed: the --parent-search folders, by recorded identity (VHD UUID, VMDK CID)
        found = locate.find_by_identity(child_path, ref, search_dirs, opener=open_backend)
        if found:
            return found
    return candidates[0] if candidates else None


def check_parent_identity(child, parent, ref: ParentRef) -> str | None:
    """Why ``parent`` is not the image ``ref`` names, or None when it is.
    Compares the UUID, then every attribute in ``ref.extra["expect"]``
    (VDI's modification UUID, VMDK's CID, VHD's timestamp...)."""
    if ref.uuid and parent.uuid and ref.uuid.lower() != parent.uuid.lower():
        return f"parent {parent.path} has UUID {parent.uuid} but the image expects {ref.uuid}"
    for attr, expected in ref.extra.get("expect", {}).items():
        actual = getattr(parent, attr, None)
        if actual is not None and expected is not None and str(actual).lower() != str(expected).lower():
            return f"parent {parent.path} has {attr.replace('_', ' ')} {actual} but the image expects {expected}"
    return None


def open_backend(path: str, fmt: str | None = None, *, writable: bool = False,
                 options: dict | None = None, untrusted: bool = False, force_share: bool = False,
                 warnings: list | None = None) -> ImageBackend:
    """One image, no parents.  ``options`` go to the backend's open (e.g.
    ``{"repair": True}`` lets check -r open an image marked corrupt).

    ``untrusted``: apply the rules of vdtool.core.untrusted (format given or
    unambiguous, no references to other files, no unknown feature bits)
    before and after the backend opens the file.  ``force_share``: a
    read-only open takes and tests no QEMU lock bytes (qemu-img -U).
    Warnings (a raw image that looks like another format) go to
    ``untrusted.notice`` and, when given, the ``warnings`` list."""
    from vdtool.core import registry
    from vdtool.core import untrusted as ut
    from vdtool.core.fileio import force_share as sharing, is_special_source

    if not is_special_source(path):
        if not os.path.exists(path):
            raise VdError("no such file", path)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "DiskDescriptor.xml")):
                raise VdError("is a directory, not an image file", path)
            # a Parallels .hdd bundle: its backend reads the descriptor
            if fmt and registry.canonical_name(fmt) != "parallels":
                raise VdError(f"is a Parallels .hdd bundle, not a {fmt} image", path)
            fmt = "parallels"
    findings: list = []
    # the first and last bytes, read once for the probe and the inspection
    bundle = fmt == "parallels" and os.path.isdir(path)
    data = registry.read_probe_data(path) if (untrusted or not fmt or fmt == "raw") and not bundle else None
    if untrusted and bundle:
        name = "parallels"  # the bundle's images are judged once open (external_references)
    elif untrusted:
        name = ut.choose_format(path, fmt, data)
        findings, complete = ut.inspect_header(path, name, data)
        if findings and complete:
            raise ut.UntrustedImage(findings, path)
    else:
        name = registry.canonical_name(fmt) if fmt else registry.probe_format(path, data)
        if name == "raw":
            # -f raw never interprets headers; say so when the content looks
            # like another format (the format-probing attack, in reverse)
            w = ut.raw_warning(path, probed=not fmt, data=data)
            if w:
                ut.notice(w)
                if warnings is not None:
                    warnings.append(w)
    backend = registry.get_backend(name, path)
    with sharing(force_share and not writable):
        if options:
            img = backend.open(path, writable=writable, options=options)
        else:
            img = backend.open(path, writable=writable)
    if untrusted:
        try:
            findings = ut.merge_findings(findings, ut.inspect_backend(img))
        except BaseException:
            img.close()
            raise
        if findings:
            img.close()
            raise ut.UntrustedImage(findings, path)
    return img


def open_image(path: str, fmt: str | None = None, *, writable: bool = False, parent_search=(),
               force: bool = False, allow_missing_parent: bool = False, chain: bool = True,
               untrusted: bool = False, force_share: bool = False,
               allow_mismatch: bool = False) -> ImageStack:
    """Open ``path`` and its chain of parents.  The top is writable if asked;
    parents are read-only.  With ``allow_missing_parent`` a missing parent is
    recorded in ``stack.missing_parent`` instead of raising (for ``info``).
    ``force`` (--force): parents whose identity does not match are read
    anyway, and backends open images with recoverable damage (bad
    checksums) they would otherwise refuse.  ``allow_mismatch`` only lets
    identity mismatches through (``info`` reports them).
    ``untrusted`` and ``force_share``: see ``open_backend``; an untrusted
    image has no parents (a reference to one is refused)."""
    warnings: list = []
    options = {"force": True} if force else None
    top = open_backend(path, fmt, writable=writable, untrusted=untrusted, force_share=force_share,
                       warnings=warnings, options=options)
    layers = [top]
    top_dir = os.path.dirname(os.path.abspath(path))
    seen = {_file_id(path)}
    missing = None
    reason = ""
    try:
        current = top
        probed = not fmt
        while True:
            if probed and not untrusted:
                _warn_outside(current, top_dir, warnings)
            if not chain:
                break
            ref = current.parent
            if ref is None:
                break
            if len(layers) >= MAX_CHAIN_DEPTH:
                raise ChainError(f"chain of parents is deeper than {MAX_CHAIN_DEPTH} images", path)
            ppath = resolve_parent_path(current.path, ref, parent_search)
            if is_url(ppath) and ppath in seen:
                raise ChainError(f"chain of parents loops back to {ppath}", current.path)
            parent = _open_remote_parent(ppath, ref, force_share, warnings, options) if is_url(ppath) else None
            if parent is None and (ppath is None or is_url(ppath) or not os.path.exists(ppath)):
                if is_url(current.path) and not ref.filename:
                    reason = (f"parent with UUID {ref.uuid}: a parent that a remote image names only by UUID "
                              f"is not searched for")
                elif is_url(ppath):
                    reason = f"parent {ref.filename!r} not found (the server has no {ppath})"
                elif ref.filename:
                    reason = (f"parent {ref.filename!r} not found"
                              + (f" (looked for {ppath})" if ppath else "")
                              + "; if it moved, name it with --parent-search DIR or record the new place with "
                                "'vdtool rebase -u -b NEWPATH IMAGE'")
                else:
                    reason = (f"parent with UUID {ref.uuid} not found (looked in the image's folder, the one "
                              f"above it, --parent-search folders and VirtualBox registries there); if it "
                              f"moved, name its folder with --parent-search DIR, or record it with "
                              f"'vdtool rebase -u -b NEWPATH IMAGE'")
                if allow_missing_parent:
                    missing = ref
                    break
                raise ChainError(reason, current.path)
            fid = _file_id(ppath)
            if fid in seen:
                raise ChainError(f"chain of parents loops back to {ppath}", current.path)
            seen.add(fid)
            if parent is None:
                parent = open_backend(ppath, ref.format, writable=False, force_share=force_share,
                                      warnings=warnings, options=options)
            probed = not ref.format
            layers.append(parent)
            mismatch = check_parent_identity(current, parent, ref)
            if mismatch and not (force or allow_mismatch):
                raise ChainError(mismatch + " (--force reads it anyway)", current.path)
            current = parent
    except BaseException:
        for layer in layers:
            try:
                layer.close()
            except VdError:
                pass
        raise
    layers.reverse()
    stack = ImageStack(layers)
    stack.missing_parent = missing
    stack.missing_reason = reason
    stack.warnings = warnings
    return stack


def _open_remote_parent(url: str, ref: ParentRef, force_share: bool, warnings: list, options):
    """A parent at a URL, opened; None when the server says it is not there
    (then it is a missing parent, as a local file that does not exist)."""
    from vdtool.core.urlfile import HttpError

    try:
        return open_backend(url, ref.format, writable=False, force_share=force_share, warnings=warnings,
                            options=options)
    except HttpError as e:
        if e.not_found:
            return None
        raise


def _warn_outside(layer, top_dir: str, warnings: list) -> None:
    """A probed image that makes vdtool open a file outside the folder of
    the image named on the command line says so (a raw disk carrying a
    qcow2 header with a backing file would otherwise read host files
    silently)."""
    from vdtool.core import untrusted as ut

    if is_url(layer.path):
        return  # what a remote image names is a URL on its server (urlnames), never a local file
    own_dir = os.path.dirname(os.path.abspath(layer.path))
    try:
        refs = layer.external_references()
    except VdError:
        return
    for name in refs:
        full = name if is_url(name) else ut.outside_folder(name, top_dir, own_dir)
        if full:
            w = (f"{layer.path}: the format was probed ({layer.name}) and the image references {full}, outside "
                 f"the image's folder; vdtool follows it (name the format with -f, or use --untrusted for "
                 f"images from untrusted sources)")
            ut.notice(w)
            warnings.append(w)


def _file_id(path: str):
    if is_url(path):
        return path
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.abspath(path)

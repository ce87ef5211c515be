"""One opened VMDK image as its parts: descriptor, extents and files
(``Disk``, the state the backend and the whole-image operations share), and
how an image is read into one (``load_disk``)."""

from __future__ import annotations

import bisect
import os

from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature, VdError
from vdtool.core.fileio import ImageFile, is_url, open_file
from vdtool.formats.vmdk.descriptor import (NO_PARENT_CID, Descriptor, ExtentLine, geometry, is_hex32,
                                            new_descriptor)
from vdtool.formats.vmdk.flat import FlatExtent, ZeroExtent
from vdtool.formats.vmdk.layout import COWD_MAGIC, MAGIC, MAX_CAPACITY_BYTES, MAX_DESCRIPTOR_BYTES, SECTOR
from vdtool.formats.vmdk.sparse import SparseExtent

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # a stream is made by create only: its module is not loaded to read an image
    from vdtool.formats.vmdk.stream import StreamWriter

BARE_EXTENT_CID = 0xFFFFFFFE  # CID given to a sparse extent opened without a descriptor


class Disk:
    """What an opened image is made of.

    - ``path``: the image's path (the descriptor file, or the sparse extent
      that embeds the descriptor);
    - ``file``: the file opened first (that same path);
    - ``files``: real path -> ImageFile, every file of the image, each
      opened once (split images may name one file twice);
    - ``extents``: SparseExtent, FlatExtent or ZeroExtent, in disk order,
      and ``starts``: the byte offset in the disk where each begins;
    - ``desc``: the descriptor; ``desc_home``: where it is kept, "file" (a
      descriptor file), the SparseExtent that embeds it, or None (a bare
      extent opened alone, or a stream being written: nowhere to write it);
    - ``stream``: the StreamWriter while a streamOptimized image is being
      written (create, convert), else None."""

    def __init__(self, path: str, file: ImageFile):
        self.path = path
        self.file = file
        self.files: dict = {os.path.realpath(path): file}
        self.extents: list = []
        self.starts: list = []
        self.desc: Descriptor | None = None
        self.desc_home = None
        self.stream: StreamWriter | None = None

    # -- extents -----------------------------------------------------------------------
    def add_extent(self, ext) -> None:
        self.starts.append(sum(e.size for e in self.extents))
        self.extents.append(ext)

    def drop_last_extent(self):
        self.starts.pop()
        return self.extents.pop()

    def locate(self, offset: int) -> int:
        """Index of the extent holding disk byte ``offset``."""
        return bisect.bisect_right(self.starts, offset) - 1

    @property
    def virtual_size(self) -> int:
        if self.stream is not None:
            return self.stream.size
        return sum(e.size for e in self.extents)

    def extent_lines(self) -> list:
        """The descriptor's extent lines that describe ``extents`` (an
        embedded descriptor's single line; none for a bare extent)."""
        if self.desc_home == "file":
            return self.desc.extents
        return self.desc.extents[:1]

    # -- files ------------------------------------------------------------------------------
    def add_file(self, path: str, f: ImageFile) -> None:
        self.files[os.path.realpath(path)] = f

    def drop_file(self, path: str) -> None:
        self.files.pop(os.path.realpath(path), None)

    def replace_file(self, old: ImageFile, new: ImageFile) -> None:
        """``new`` stands where ``old`` was (a file rewritten and renamed over)."""
        for key, val in list(self.files.items()):
            if val is old:
                self.files[key] = new
        if self.file is old:
            self.file = new

    def flush(self) -> None:
        """Every extent's tables, then every writable file."""
        for e in self.extents:
            e.flush_metadata()
        for f in self.files.values():
            if f.writable:
                f.flush()

    def close_files(self) -> None:
        for f in list(self.files.values()):
            f.close()
        if not self.files:
            self.file.close()

    # -- descriptor -------------------------------------------------------------------------
    def write_descriptor(self) -> None:
        raw = self.desc.render()
        home = self.desc_home
        if home is None:
            return
        if home == "file":
            if len(raw) > MAX_DESCRIPTOR_BYTES:
                raise VdError(f"descriptor would grow to {len(raw)} bytes", self.path)
            self.file.pwrite(0, raw)
            self.file.truncate(len(raw))
            return
        area = home.desc_size * SECTOR
        if len(raw) > area:
            raise VdError(f"descriptor of {len(raw)} bytes does not fit in its {area}-byte area", self.path)
        home.file.pwrite(home.desc_offset * SECTOR, raw + bytes(area - len(raw)))

    def sync_extent_lines(self) -> None:
        """Extent sizes (and the geometry) in the descriptor follow the extents."""
        if self.desc_home == "file":
            for el, e in zip(self.desc.extents, self.extents):
                el.sectors = e.capacity
        elif self.desc.extents:
            self.desc.extents[0].sectors = self.extents[0].capacity
        adapter = self.desc.get("ddb.adapterType", "ide")
        if self.desc.get("ddb.geometry.cylinders") is not None:
            cyl, _, _ = geometry(self.virtual_size, adapter)
            self.desc.set("ddb.geometry.cylinders", str(cyl))


# == opening ===================================================================================

def load_disk(disk: Disk, writable: bool) -> None:
    """Read the image whose first file is ``disk.file``: a sparse extent
    (with or without an embedded descriptor) or a descriptor file naming
    extents.  When this raises, the files opened on the way are in
    ``disk.files`` for the caller to close."""
    f = disk.file
    fsize = f.size()
    head = f.pread(0, 4)
    if head == COWD_MAGIC:
        raise UnsupportedFeature("vmfsSparse (COWD) extents are not supported", disk.path)
    if head == MAGIC:
        _load_sparse(disk, writable)
    else:
        _load_descriptor_file(disk, fsize, writable)
    _check_descriptor(disk)


def _corrupt(disk: Disk, msg: str) -> CorruptImageError:
    return CorruptImageError(msg, disk.path)


def _check_descriptor(disk: Disk) -> None:
    ct = disk.desc.get("createType", "")
    if ct.lower() in ("vmfssparse", "sesparse"):
        raise UnsupportedFeature(f"createType {ct} is not supported", disk.path)
    for key in ("CID", "parentCID"):
        v = disk.desc.get(key)
        if v is not None and not is_hex32(v):
            raise _corrupt(disk, f"descriptor {key} {v!r} is not a 32-bit hexadecimal number")
    total = sum(e.size for e in disk.extents)
    if total > MAX_CAPACITY_BYTES:
        raise _corrupt(disk, f"extents add up to {total} bytes, beyond the limit of 2^56")


def _load_sparse(disk: Disk, writable: bool) -> None:
    """A sparse extent opened as the image: monolithicSparse or
    streamOptimized (descriptor embedded), or a split image's part alone."""
    f = disk.file
    ext = SparseExtent(f, writable)
    desc = None
    if ext.desc_offset and ext.desc_size:
        raw = f.pread_exact(ext.desc_offset * SECTOR, ext.desc_size * SECTOR, "embedded descriptor")
        if raw.strip(b"\0 \r\n"):
            desc = Descriptor.parse(raw, disk.path)
    if desc is None:
        # a bare extent (a split image's part opened alone): one extent, nowhere to keep a descriptor
        desc = new_descriptor("monolithicSparse", BARE_EXTENT_CID, NO_PARENT_CID,
                              [ExtentLine("RW", ext.capacity, "SPARSE", os.path.basename(disk.path), 0)], [])
        disk.desc_home = None
    else:
        if len(desc.extents) != 1 or desc.extents[0].type != "SPARSE":
            raise UnsupportedFeature(f"an embedded descriptor with {len(desc.extents)} extents "
                                     f"({', '.join(e.type for e in desc.extents)}) is not supported", disk.path)
        disk.desc_home = ext
    disk.desc = desc
    disk.add_extent(ext)


def _load_descriptor_file(disk: Disk, fsize: int, writable: bool) -> None:
    f = disk.file
    if fsize > MAX_DESCRIPTOR_BYTES:
        raise FormatError(f"descriptor file of {fsize} bytes is larger than 1 MiB (not a VMDK descriptor)",
                          disk.path)
    raw = f.pread(0, fsize)
    # the text ends at the first NUL; qemu's CID update can leave a NUL and
    # a newline before NUL padding, which its reader takes too: only
    # NULs and white space may follow
    text, _, rest = raw.partition(b"\0")
    if rest.strip(b"\0 \t\r\n"):
        raise FormatError("file is neither a VMDK sparse extent nor a text descriptor", disk.path)
    raw = text
    disk.desc = Descriptor.parse(raw, disk.path)
    disk.desc_home = "file"
    if not disk.desc.extents:
        raise _corrupt(disk, "descriptor names no extents")
    for el in disk.desc.extents:
        disk.add_extent(_open_extent(disk, el, writable))


def _open_extent(disk: Disk, el: ExtentLine, image_writable: bool):
    if el.type == "ZERO":
        return ZeroExtent(el.sectors * SECTOR)
    if el.type in ("VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW"):
        raise UnsupportedFeature(f"{el.type} extents are not supported", disk.path)
    writable = image_writable and el.access == "RW"
    f = _extent_file(disk, el.filename, writable)
    if f is disk.file:
        raise _corrupt(disk, f"extent {el.filename!r} is the descriptor file itself")
    if el.type == "SPARSE":
        if f.pread(0, 4) == COWD_MAGIC:
            raise UnsupportedFeature(f"extent {el.filename!r} is a vmfsSparse (COWD) extent, not supported",
                                     disk.path)
        ext = SparseExtent(f, writable)
        if any(e.file is f for e in disk.extents):
            raise _corrupt(disk, f"sparse extent file {el.filename!r} is named twice")
        return ext
    return FlatExtent(f, el.offset * SECTOR, el.sectors * SECTOR, el.type)


def extent_path(image_path: str, name: str) -> str:
    """Where an extent file the descriptor names lies (relative names are
    relative to the descriptor's folder; to its URL for a remote descriptor,
    which may not name a local file)."""
    if is_url(image_path):
        from vdtool.core import urlnames

        return urlnames.join(image_path, name, "extent")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def _extent_file(disk: Disk, name: str, writable: bool) -> ImageFile:
    p = extent_path(disk.path, name)
    if is_url(p):
        f = disk.files.get(p)
        if f is None:
            f = disk.files[p] = open_file(p, writable=writable)  # a 404 says which URL is missing
        return f
    if not os.path.exists(p):
        raise CorruptImageError(f"extent file {name!r} named by the descriptor is missing (looked for {p})",
                                disk.path)
    key = os.path.realpath(p)
    f = disk.files.get(key)
    if f is None:
        f = ImageFile(p, writable=writable)
        disk.files[key] = f
    return f

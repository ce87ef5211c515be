"""VMDK images: VMware's virtual disk, one descriptor and one or more extents.

Subformats read and written: monolithicSparse (default), monolithicFlat,
twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized and vmfs (flat
extent with the VMFS extent type).  Sparse extents live in
``_vmdk_sparse``, the text descriptor in ``_vmdk_descriptor``.

Choices worth knowing:
- A sparse extent's size is its header's capacity (as QEMU reads it); check
  reports a descriptor that disagrees.
- The CID changes on the first write of a session (VMware's rule), so an
  overlay recording the old CID as parentCID no longer matches.
- streamOptimized images are written once, in one sequential pass (create
  or convert); later writes are refused.  Its layout is VMware's: header
  with the at-end directory marker, grains with markers, grain tables after
  their grains, directory, footer, end-of-stream marker.
- Released grains stay in the file (punched where the filesystem can) until
  compact moves the remaining grains down and truncates."""

from __future__ import annotations

import bisect
import os
import random
import secrets
import uuid as uuidlib
from typing import Optional

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, ParentRef, ParentSpec, Status
from vdtool.core.errors import (CorruptImageError, FormatError, NotSupported, ReadOnlyError, UnsupportedFeature,
                                VdError)
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats._vmdk_descriptor import MAX_DESCRIPTOR, Descriptor, ExtentLine, new_descriptor
from vdtool.formats import _vmdk_sparse as sp
from vdtool.formats._vmdk_sparse import SECTOR, SparseExtent, StreamWriter

VARIANTS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
            "streamOptimized", "vmfs")
SPLIT_SECTORS = 4194304  # 2 GiB per extent, as qemu-img writes twoGbMaxExtent*
NO_PARENT_CID = 0xFFFFFFFF
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
MAX_TOTAL_BYTES = 1 << 56
_ZERO_CHUNK = bytes(1 << 20)


def _zeros(n: int):
    return memoryview(_ZERO_CHUNK)[:n] if n <= len(_ZERO_CHUNK) else bytes(n)


class FlatExtent:
    """Raw data in a file from ``file_offset`` on (FLAT and VMFS extents)."""

    kind = "FLAT"
    compressed = False

    def __init__(self, file, file_offset: int, size: int, etype: str = "FLAT"):
        self.file = file
        self.path = file.path
        self.file_offset = file_offset
        self.capacity = size // SECTOR
        self.kind = etype

    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self.size)
        if offset >= end:
            return Status.ZERO, length
        fo = self.file_offset
        data = self.file.next_data(fo + offset) - fo
        if data > offset:
            return Status.ZERO, min(data, end) - offset
        hole = self.file.next_hole(fo + offset) - fo
        return Status.DATA, max(1, min(hole, end) - offset)

    def readinto(self, offset: int, mv) -> None:
        self.file.readinto(self.file_offset + offset, mv)

    def write(self, offset: int, mv, parent_read) -> None:
        self.file.pwrite(self.file_offset + offset, mv)

    def write_zeroes(self, offset: int, length: int, has_parent: bool, parent_read) -> None:
        start = self.file_offset + offset
        if not has_parent and self.file.punch_hole(start, length):
            return
        pos, end = start, start + length
        while pos < end:
            n = min(len(_ZERO_CHUNK), end - pos)
            self.file.pwrite(pos, _zeros(n))
            pos += n

    def flush_metadata(self, sync: bool = True) -> None:
        pass


class ZeroExtent:
    kind = "ZERO"
    compressed = False

    def __init__(self, size: int):
        self.capacity = size // SECTOR
        self.file = None
        self.path = None

    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def block_status(self, offset: int, length: int) -> tuple:
        return Status.ZERO, length

    def readinto(self, offset: int, mv) -> None:
        mv[:] = _zeros(len(mv))

    def write(self, offset, mv, parent_read) -> None:
        raise NotSupported("writing into a ZERO extent", "vmdk")

    def write_zeroes(self, offset, length, has_parent, parent_read) -> None:
        pass

    def flush_metadata(self, sync: bool = True) -> None:
        pass


def _stem_ext(path: str) -> tuple:
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    if not ext:
        ext = ".vmdk"
    return stem, ext


def _new_cid(old: Optional[int] = None) -> int:
    while True:
        c = random.SystemRandom().getrandbits(32)
        if c not in (NO_PARENT_CID, old):
            return c


def _geometry(size: int, adapter: str) -> tuple:
    heads = 16 if adapter == "ide" else 255
    return size // (63 * heads * SECTOR), heads, 63


class VmdkBackend(ImageBackend):
    name = "vmdk"
    extensions = (".vmdk",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID | Cap.COMPRESS
                    | Cap.ZERO_MARKER)
    variants = VARIANTS
    compress_variant = "streamOptimized"  # what convert -c makes
    options = (
        FormatOption("adapter_type", str, "ide", "virtual adapter: ide, lsilogic, buslogic or legacyESX",
                     ADAPTERS),
        FormatOption("hwversion", str, "4", "VMware virtual hardware version (ddb.virtualHWVersion)"),
        FormatOption("compat6", bool, False, "VMDK version 6 image (hardware version 6)"),
        FormatOption("toolsversion", str, "2147483647", "VMware guest tools version (ddb.toolsVersion)"),
        FormatOption("zeroed_grain", bool, False, "zeroed-grain table entries for efficient zero writes"),
        FormatOption("uuid", str, None, "image UUID (ddb.uuid.image)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self._files: dict = {}  # real path -> ImageFile
        self._extents: list = []
        self._starts: list = []
        self._desc: Optional[Descriptor] = None
        self._desc_home = None  # "file", a SparseExtent (embedded), or None (not stored)
        self._stream: Optional[StreamWriter] = None
        self._cid_bumped = False
        self._closed = False

    # == probing and opening ==========================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:4] == sp.MAGIC:
            return sp.probe_header(head)
        if head[:4] == b"COWD":
            return 100
        start = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
        if start.startswith(b"# Disk DescriptorFile"):
            return 100
        if b"createType" in head[:4096] and b"# Disk DescriptorFile" in head[:1024]:
            return 90
        return 0

    def _load_image(self, options: dict) -> None:
        self._files[os.path.realpath(self.path)] = self.file
        self._load()

    def _abandon(self) -> None:
        self._close_files()

    _err = ImageBackend._corrupt

    def _load(self) -> None:
        f = self.file
        fsize = f.size()
        head = f.pread(0, 4)
        if head == b"COWD":
            raise UnsupportedFeature("vmfsSparse (COWD) extents are not supported", self.path)
        if head == sp.MAGIC:
            ext = SparseExtent(f, self.writable)
            desc = None
            if ext.desc_offset and ext.desc_size:
                raw = f.pread_exact(ext.desc_offset * SECTOR, ext.desc_size * SECTOR, "embedded descriptor")
                if raw.strip(b"\0 \r\n"):
                    desc = Descriptor.parse(raw, self.path)
            if desc is None:
                # a bare extent (a split image's part opened alone): one extent, nowhere to keep a descriptor
                desc = new_descriptor("monolithicSparse", 0xFFFFFFFE, NO_PARENT_CID,
                                      [ExtentLine("RW", ext.capacity, "SPARSE", os.path.basename(self.path), 0)],
                                      [])
                self._desc_home = None
            else:
                if len(desc.extents) != 1 or desc.extents[0].type != "SPARSE":
                    raise UnsupportedFeature(f"an embedded descriptor with {len(desc.extents)} extents "
                                             f"({', '.join(e.type for e in desc.extents)}) is not supported",
                                             self.path)
                self._desc_home = ext
            self._desc = desc
            self._add_extent(ext)
        else:
            if fsize > MAX_DESCRIPTOR:
                raise FormatError(f"descriptor file of {fsize} bytes is larger than 1 MiB (not a VMDK "
                                  f"descriptor)", self.path)
            raw = f.pread(0, fsize)
            if b"\0" in raw.rstrip(b"\0"):
                raise FormatError("file is neither a VMDK sparse extent nor a text descriptor", self.path)
            self._desc = Descriptor.parse(raw, self.path)
            self._desc_home = "file"
            if not self._desc.extents:
                raise self._err("descriptor names no extents")
            for el in self._desc.extents:
                self._add_extent(self._open_extent(el))
        ct = self._desc.get("createType", "")
        if ct.lower() in ("vmfssparse", "sesparse"):
            raise UnsupportedFeature(f"createType {ct} is not supported", self.path)
        for key in ("CID", "parentCID"):
            v = self._desc.get(key)
            if v is not None and not _is_hex32(v):
                raise self._err(f"descriptor {key} {v!r} is not a 32-bit hexadecimal number")
        total = sum(e.size for e in self._extents)
        if total > MAX_TOTAL_BYTES:
            raise self._err(f"extents add up to {total} bytes, beyond the limit of 2^56")

    def _add_extent(self, ext) -> None:
        self._starts.append(sum(e.size for e in self._extents))
        self._extents.append(ext)

    def _extent_path(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), name)

    def _extent_file(self, name: str, writable: bool) -> ImageFile:
        p = self._extent_path(name)
        if not os.path.exists(p):
            raise CorruptImageError(f"extent file {name!r} named by the descriptor is missing (looked for {p})",
                                    self.path)
        key = os.path.realpath(p)
        f = self._files.get(key)
        if f is None:
            f = ImageFile(p, writable=writable)
            self._files[key] = f
        return f

    def _open_extent(self, el: ExtentLine):
        if el.type == "ZERO":
            return ZeroExtent(el.sectors * SECTOR)
        if el.type in ("VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW"):
            raise UnsupportedFeature(f"{el.type} extents are not supported", self.path)
        writable = self.writable and el.access == "RW"
        f = self._extent_file(el.filename, writable)
        if f is self.file:
            raise self._err(f"extent {el.filename!r} is the descriptor file itself")
        if el.type == "SPARSE":
            magic = f.pread(0, 4)
            if magic == b"COWD":
                raise UnsupportedFeature(f"extent {el.filename!r} is a vmfsSparse (COWD) extent, not supported",
                                         self.path)
            ext = SparseExtent(f, writable)
            if any(e.file is f for e in self._extents):
                raise self._err(f"sparse extent file {el.filename!r} is named twice")
            return ext
        return FlatExtent(f, el.offset * SECTOR, el.sectors * SECTOR, el.type)

    # == facts ========================================================================
    @property
    def virtual_size(self) -> int:
        if self._stream is not None:
            return self._stream.size
        return sum(e.size for e in self._extents)

    @property
    def block_size(self) -> int:
        for e in self._extents:
            if isinstance(e, SparseExtent):
                return e.grain_bytes
        if self._stream is not None:
            return self._stream.grain_bytes
        return 1 << 16

    @property
    def cid(self) -> str:
        v = self._desc.get("CID", "ffffffff")
        return f"{int(v, 16):08x}" if _is_hex32(v) else v

    @property
    def parent_cid(self) -> str:
        v = self._desc.get("parentCID", "ffffffff")
        return f"{int(v, 16):08x}" if _is_hex32(v) else v

    @property
    def parent(self) -> Optional[ParentRef]:
        hint = self._desc.get("parentFileNameHint")
        if not hint:
            return None
        pc = self.parent_cid
        extra = {"expect": {"cid": pc}} if pc != "ffffffff" else {}
        return ParentRef(filename=hint, format=None, uuid=None, extra=extra)

    @property
    def variant(self) -> Optional[str]:
        ct = self._desc.get("createType")
        for v in VARIANTS:
            if ct and v.lower() == ct.lower():
                return v
        return ct

    @property
    def uuid(self) -> Optional[str]:
        return self._desc.get("ddb.uuid.image") or None

    @property
    def modification_uuid(self) -> Optional[str]:
        return self._desc.get("ddb.uuid.modification") or None

    def info(self) -> dict:
        d = {"create-type": self._desc.get("createType"), "cid": self.cid, "parent-cid": self.parent_cid}
        for key, name in (("ddb.adapterType", "adapter-type"), ("ddb.virtualHWVersion", "hw-version"),
                          ("ddb.longContentID", "long-content-id"), ("ddb.toolsVersion", "tools-version")):
            v = self._desc.get(key)
            if v is not None:
                d[name] = v
        geo = [self._desc.get(f"ddb.geometry.{k}") for k in ("cylinders", "heads", "sectors")]
        if all(geo):
            d["geometry"] = "/".join(geo)
        exts = []
        dirty = False
        for el, e in zip(self._desc.extents if self._desc_home == "file" else [None] * len(self._extents),
                         self._extents):
            x = {"type": e.kind, "virtual-size": e.size}
            if e.path:
                x["filename"] = el.filename if el is not None else os.path.basename(e.path)
            if isinstance(e, SparseExtent):
                x.update({"version": e.version, "cluster-size": e.grain_bytes, "compressed": e.compressed,
                          "zeroed-grain": e.zero_grain})
                dirty |= bool(e.unclean)
            exts.append(x)
        d["extents"] = exts
        d["dirty-flag"] = dirty
        return d

    def external_references(self) -> list:
        refs = []
        ref = self.parent
        if ref and ref.filename:
            refs.append(ref.filename)
        if self._desc_home == "file":
            for el in self._desc.extents:
                n = el.filename
                if n and (os.path.isabs(n) or ".." in n.replace("\\", "/").split("/")):
                    refs.append(n)
        return refs

    def actual_size(self) -> int:
        return sum(f.allocated_size() for f in self._files.values())

    # == data =========================================================================
    def _locate(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def block_status(self, offset: int, length: int) -> tuple:
        if self._stream is not None:
            raise NotSupported("reading while writing", "vmdk", self.path, "streamOptimized is written in one pass")
        size = self.virtual_size
        if offset >= size or length <= 0:
            return Status.ZERO, max(length, 1)
        i = self._locate(offset)
        e = self._extents[i]
        start = self._starts[i]
        n = min(length, start + e.size - offset)
        return e.block_status(offset - start, n)

    def readinto(self, offset: int, buf) -> None:
        if self._stream is not None:
            raise NotSupported("reading while writing", "vmdk", self.path, "streamOptimized is written in one pass")
        mv = memoryview(buf).cast("B")
        pos = 0
        total = len(mv)
        size = self.virtual_size
        while pos < total:
            off = offset + pos
            if off >= size:
                mv[pos:] = _zeros(total - pos)
                return
            i = self._locate(off)
            e = self._extents[i]
            start = self._starts[i]
            n = min(total - pos, start + e.size - off)
            e.readinto(off - start, mv[pos:pos + n])
            pos += n

    def _check_write(self, offset: int, length: int) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if offset < 0 or offset + length > self.virtual_size:
            raise VdError(f"write of {length} bytes at offset {offset} is outside the disk "
                          f"(virtual size {self.virtual_size})", self.path)

    def defer_identity_change(self) -> None:
        self._cid_bumped = True  # keep the CID children recorded as parentCID

    def change_identity(self) -> None:
        self._cid_bumped = False
        self._begin_write()

    def _begin_write(self) -> None:
        """First change of a session: a new CID, as VMware does."""
        if self._cid_bumped or self._stream is not None:
            return
        self._cid_bumped = True
        if self._desc_home is None:
            return
        old = self._desc.get("CID")
        cid = _new_cid(int(old, 16) if old and _is_hex32(old) else None)
        self._desc.set("CID", f"{cid:08x}", quoted=False)
        if self._desc.get("ddb.longContentID") is not None:
            self._desc.set("ddb.longContentID", secrets.token_hex(12) + f"{cid:08x}")
        if self._desc.get("ddb.uuid.modification") is not None:
            self._desc.set("ddb.uuid.modification", str(uuidlib.uuid4()))
        self._write_descriptor()

    def _extent_for_write(self, i: int):
        e = self._extents[i]
        if isinstance(e, SparseExtent) or isinstance(e, FlatExtent):
            if not e.file.writable:
                raise ReadOnlyError(f"extent {os.path.basename(e.path)} is read-only (RDONLY in the descriptor "
                                    f"or opened read-only)", self.path)
        return e

    def _each_extent(self, offset: int, length: int):
        pos = offset
        end = offset + length
        while pos < end:
            i = self._locate(pos)
            e = self._extent_for_write(i)
            start = self._starts[i]
            n = min(end - pos, start + e.size - pos)
            yield e, start, pos - offset, pos - start, n
            pos += n

    def _parent_reader(self, start: int):
        return lambda o, n: self.parent_read(start + o, n)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        if self._stream is not None:
            self._stream.write(offset, mv)
            return
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        self._begin_write()
        for e, start, rel, eoff, n in self._each_extent(offset, len(mv)):
            e.write(eoff, mv[rel:rel + n], self._parent_reader(start))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        if self._stream is not None:
            self._stream.write_zeroes(offset, length)
            return
        self._check_write(offset, length)
        if length <= 0:
            return
        self._begin_write()
        has_parent = self.parent is not None
        for e, start, rel, eoff, n in self._each_extent(offset, length):
            e.write_zeroes(eoff, n, has_parent, self._parent_reader(start))

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    # == compression (streamOptimized) ================================================
    def compress_block(self, data) -> Optional[bytes]:
        if self._stream is None:
            raise NotSupported("compression", "vmdk", self.path, "only streamOptimized images are compressed")
        return sp.compress_grain(data, self._stream.grain_bytes)

    def write_compressed_block(self, offset: int, compressed: Optional[bytes], data) -> None:
        if self._stream is None:
            raise NotSupported("compression", "vmdk", self.path, "only streamOptimized images are compressed")
        self._stream.write_compressed(offset, compressed, data)

    # == flush / close ================================================================
    def flush(self) -> None:
        if self._closed or not self.writable:
            return
        if self._stream is not None:
            self.file.flush()
            return
        for e in self._extents:
            e.flush_metadata()
        for f in self._files.values():
            if f.writable:
                f.flush()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.writable:
                if self._stream is not None:
                    self._stream.finish()
                    self.file.flush()
                else:
                    self.flush()
        finally:
            self._closed = True
            self._close_files()

    def _close_files(self) -> None:
        for f in list(self._files.values()):
            f.close()
        if not self._files:
            self.file.close()

    # == descriptor ===================================================================
    def _write_descriptor(self) -> None:
        raw = self._desc.render()
        home = self._desc_home
        if home is None:
            return
        if home == "file":
            if len(raw) > MAX_DESCRIPTOR:
                raise VdError(f"descriptor would grow to {len(raw)} bytes", self.path)
            self.file.pwrite(0, raw)
            self.file.truncate(len(raw))
            return
        area = home.desc_size * SECTOR
        if len(raw) > area:
            raise VdError(f"descriptor of {len(raw)} bytes does not fit in its {area}-byte area", self.path)
        home.file.pwrite(home.desc_offset * SECTOR, raw + bytes(area - len(raw)))

    def _sync_extent_lines(self) -> None:
        """Extent sizes in the descriptor follow the extents."""
        if self._desc_home == "file":
            for el, e in zip(self._desc.extents, self._extents):
                el.sectors = e.capacity
        elif self._desc.extents:
            self._desc.extents[0].sectors = self._extents[0].capacity
        adapter = self._desc.get("ddb.adapterType", "ide")
        if self._desc.get("ddb.geometry.cylinders") is not None:
            cyl, _, _ = _geometry(self.virtual_size, adapter)
            self._desc.set("ddb.geometry.cylinders", str(cyl))

    def set_parent(self, parent: Optional[ParentSpec]) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if self._desc_home is None:
            raise NotSupported("changing the parent", "vmdk", self.path, "the extent has no descriptor")
        if any(not isinstance(e, SparseExtent) for e in self._extents) and parent is not None:
            raise NotSupported("a parent image", "vmdk", self.path, "flat extents cannot be differencing")
        if parent is None:
            self._desc.set("parentFileNameHint", None)
            self._desc.set("parentCID", "ffffffff", quoted=False)
            self._desc.set("ddb.uuid.parent", None)
            self._desc.set("ddb.uuid.parentmodification", None)
        else:
            pcid = getattr(parent.image, "cid", None) if parent.image is not None else None
            pcid = pcid if pcid and _is_hex32(pcid) else "ffffffff"
            self._desc.set("parentCID", pcid, quoted=False)
            self._desc.set("parentFileNameHint", parent.recorded_name, after="createType")
            if parent.uuid and self._desc.get("ddb.uuid.image") is not None:
                self._desc.set("ddb.uuid.parent", parent.uuid)
        self._write_descriptor()
        self.file.flush()

    # == create =======================================================================
    @classmethod
    def create(cls, path: str, size: int, *, variant: Optional[str] = None, block_size: Optional[int] = None,
               parent: Optional[ParentSpec] = None, options: Optional[dict] = None,
               progress: Progress = NO_PROGRESS) -> "VmdkBackend":
        from vdtool.formats._vmdk_create import create_image

        return create_image(cls, path, size, variant=variant, block_size=block_size, parent=parent,
                            options=options, progress=progress)

    # == whole-image operations ========================================================
    def resize(self, new_size: int) -> None:
        from vdtool.formats._vmdk_ops import resize

        resize(self, new_size)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats._vmdk_ops import compact

        compact(self, progress)

    def check(self, repair: Optional[str] = None, progress: Progress = NO_PROGRESS) -> CheckResult:
        from vdtool.formats._vmdk_ops import check

        return check(self, repair)


def _is_hex32(v: str) -> bool:
    try:
        return 0 <= int(v, 16) <= 0xFFFFFFFF and len(v) <= 8 and not v.startswith(("-", "+", "0x"))
    except (ValueError, TypeError):
        return False

"""The VMDK backend: VMware's virtual disk, one descriptor and one or more
extents.

Subformats read and written: monolithicSparse (default), monolithicFlat,
twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized and vmfs (flat
extent with the VMFS extent type).

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

import os

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec, Status
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import NotSupported, ReadOnlyError, VdError
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vmdk.descriptor import NO_PARENT_CID_TEXT, cid_text, is_hex32, renew_cid
from vdtool.formats.vmdk.disk import Disk, load_disk
from vdtool.formats.vmdk.flat import FlatExtent
from vdtool.formats.vmdk.layout import probe_score
from vdtool.formats.vmdk.sparse import SparseExtent

VARIANTS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
            "streamOptimized", "vmfs")
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")


class VmdkBackend(ImageBackend):
    """``disk`` (a ``disk.Disk``) holds the descriptor, the extents and the
    files; the whole-image operations (``compact``, ``resize``, ``check``
    modules) work on it."""

    name = "vmdk"
    extensions = (".vmdk",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID | Cap.COMPRESS
                    | Cap.ZERO_MARKER)
    variants = VARIANTS
    compress_variant = "streamOptimized"  # what convert -c makes
    # a descriptor beside its extents: cannot go down one pipe or into one device
    multi_file_variants = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs")
    append_only_variants = ("streamOptimized",)

    @classmethod
    def stream_source(cls, head: bytes, read, name: str):
        """A streamOptimized stream in one-pass order reads front to back."""
        from vdtool.formats.vmdk import streamread  # only for a stream

        return streamread.StreamSource(read, head, name) if streamread.is_stream(head) else None
    options = (
        FormatOption("adapter_type", str, "ide", "virtual adapter: ide, lsilogic, buslogic or legacyESX",
                     ADAPTERS),
        FormatOption("hwversion", str, "4", "VMware virtual hardware version (ddb.virtualHWVersion)"),
        FormatOption("compat6", bool, False, "VMDK version 6 image (hardware version 6)"),
        FormatOption("toolsversion", str, "2147483647", "VMware guest tools version (ddb.toolsVersion)"),
        FormatOption("zeroed_grain", bool, False, "zeroed-grain table entries for efficient zero writes"),
        FormatOption("uuid", str, None, "image UUID (ddb.uuid.image)"),
        FormatOption("compression_level", int, None, "deflate level of streamOptimized grains, 1-9 (default 6); "
                                                     "a vdtool extra (qemu-img 7.2 has none), not stored"),
    )
    amend_options = (
        FormatOption("adapter_type", str, None, "virtual adapter (ddb.adapterType); the geometry follows: 16 "
                                                "heads for ide, 255 for the SCSI adapters", ADAPTERS),
        FormatOption("hwversion", str, None, "VMware virtual hardware version (ddb.virtualHWVersion), 1 to 99"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.disk = Disk(self.path, file)
        self._cid_bumped = False
        self._closed = False

    # == probing and opening ==========================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return probe_score(head)

    def _load_image(self, options: dict) -> None:
        load_disk(self.disk, self.writable)

    def _abandon(self) -> None:
        self.disk.close_files()

    # == facts ========================================================================
    @property
    def virtual_size(self) -> int:
        return self.disk.virtual_size

    @property
    def block_size(self) -> int:
        for e in self.disk.extents:
            if isinstance(e, SparseExtent):
                return e.grain_bytes
        if self.disk.stream is not None:
            return self.disk.stream.grain_bytes
        return 1 << 16

    @property
    def cid(self) -> str:
        return cid_text(self.disk.desc.get("CID", "ffffffff"))

    @property
    def parent_cid(self) -> str:
        return cid_text(self.disk.desc.get("parentCID", NO_PARENT_CID_TEXT))

    @property
    def parent(self) -> ParentRef | None:
        hint = self.disk.desc.get("parentFileNameHint")
        if not hint:
            return None
        pc = self.parent_cid
        extra = {"expect": {"cid": pc}} if pc != NO_PARENT_CID_TEXT else {}
        return ParentRef(filename=hint, format=None, uuid=None, extra=extra)

    @property
    def variant(self) -> str | None:
        ct = self.disk.desc.get("createType")
        for v in VARIANTS:
            if ct and v.lower() == ct.lower():
                return v
        return ct

    @property
    def uuid(self) -> str | None:
        return self.disk.desc.get("ddb.uuid.image") or None

    @property
    def modification_uuid(self) -> str | None:
        return self.disk.desc.get("ddb.uuid.modification") or None

    def info(self) -> dict:
        desc = self.disk.desc
        # qemu-img reports the CIDs as integers
        d = {"cid": _cid_int(self.cid), "parent-cid": _cid_int(self.parent_cid), "create-type": desc.get("createType")}
        for key, name in (("ddb.adapterType", "adapter-type"), ("ddb.virtualHWVersion", "hw-version"),
                          ("ddb.longContentID", "long-content-id"), ("ddb.toolsVersion", "tools-version")):
            v = desc.get(key)
            if v is not None:
                d[name] = v
        geo = [desc.get(f"ddb.geometry.{k}") for k in ("cylinders", "heads", "sectors")]
        if all(geo):
            d["geometry"] = "/".join(geo)
        d["extents"], d["dirty-flag"] = self._extents_info()
        return d

    def _extents_info(self) -> tuple:
        exts = []
        dirty = False
        extents = self.disk.extents
        lines = self.disk.desc.extents if self.disk.desc_home == "file" else [None] * len(extents)
        for el, e in zip(lines, extents):
            # "format": the descriptor's extent type, "" where the descriptor is
            # embedded in the extent (qemu-img's convention)
            x = {"type": e.kind, "virtual-size": e.size, "format": el.type if el is not None else ""}
            if e.path:
                # as qemu-img names it: the extent beside the image's name as given
                x["filename"] = os.path.join(os.path.dirname(self.path), el.filename) if el is not None \
                    else self.path
            if isinstance(e, SparseExtent):
                x.update({"version": e.version, "cluster-size": e.grain_bytes, "compressed": e.compressed,
                          "zeroed-grain": e.zero_grain})
                dirty |= bool(e.unclean)
            exts.append(x)
        return exts, dirty

    def external_references(self) -> list:
        refs = []
        ref = self.parent
        if ref and ref.filename:
            refs.append(ref.filename)
        if self.disk.desc_home == "file":
            for el in self.disk.desc.extents:
                n = el.filename
                if n and (os.path.isabs(n) or ".." in n.replace("\\", "/").split("/")):
                    refs.append(n)
        return refs

    def actual_size(self) -> int:
        return sum(f.allocated_size() for f in self.disk.files.values())

    # == data =========================================================================
    def _refuse_reads_while_streaming(self) -> None:
        if self.disk.stream is not None:
            raise NotSupported("reading while writing", "vmdk", self.path, "streamOptimized is written in one pass")

    def block_status(self, offset: int, length: int) -> tuple:
        self._refuse_reads_while_streaming()
        size = self.virtual_size
        if offset >= size or length <= 0:
            return Status.ZERO, max(length, 1)
        disk = self.disk
        i = disk.locate(offset)
        e = disk.extents[i]
        start = disk.starts[i]
        n = min(length, start + e.size - offset)
        return e.block_status(offset - start, n)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """The extent's answer; host offsets are in the extent's file."""
        self._refuse_reads_while_streaming()
        size = self.virtual_size
        if offset >= size or length <= 0:
            return MapExtent(Status.ZERO, max(length, 1))
        disk = self.disk
        i = disk.locate(offset)
        start = disk.starts[i]
        e = disk.extents[i]
        return e.map_extent(offset - start, min(length, start + e.size - offset))

    def readinto(self, offset: int, buf) -> None:
        self._refuse_reads_while_streaming()
        disk = self.disk
        extents, starts = disk.extents, disk.starts
        mv = memoryview(buf).cast("B")
        pos = 0
        total = len(mv)
        size = self.virtual_size
        while pos < total:
            off = offset + pos
            if off >= size:
                mv[pos:] = zeros(total - pos)
                return
            i = disk.locate(off)
            e = extents[i]
            start = starts[i]
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
        if self._cid_bumped or self.disk.stream is not None:
            return
        self._cid_bumped = True
        if self.disk.desc_home is None:
            return
        renew_cid(self.disk.desc)
        self.disk.write_descriptor()

    def _extent_for_write(self, i: int):
        e = self.disk.extents[i]
        if isinstance(e, (SparseExtent, FlatExtent)) and not e.file.writable:
            raise ReadOnlyError(f"extent {os.path.basename(e.path)} is read-only (RDONLY in the descriptor "
                                f"or opened read-only)", self.path)
        return e

    def _each_extent(self, offset: int, length: int):
        disk = self.disk
        pos = offset
        end = offset + length
        while pos < end:
            i = disk.locate(pos)
            e = self._extent_for_write(i)
            start = disk.starts[i]
            n = min(end - pos, start + e.size - pos)
            yield e, start, pos - offset, pos - start, n
            pos += n

    def _parent_reader(self, start: int):
        return lambda o, n: self.parent_read(start + o, n)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        if self.disk.stream is not None:
            self.disk.stream.write(offset, mv)
            return
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        self._begin_write()
        for e, start, rel, eoff, n in self._each_extent(offset, len(mv)):
            e.write(eoff, mv[rel:rel + n], self._parent_reader(start))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        if self.disk.stream is not None:
            self.disk.stream.write_zeroes(offset, length)
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
    def compress_block(self, data) -> bytes | None:
        if self.disk.stream is None:
            raise NotSupported("compression", "vmdk", self.path, "only streamOptimized images are compressed")
        return self.disk.stream.compress(data)

    def write_compressed_block(self, offset: int, compressed: bytes | None, data) -> None:
        if self.disk.stream is None:
            raise NotSupported("compression", "vmdk", self.path, "only streamOptimized images are compressed")
        self.disk.stream.write_compressed(offset, compressed, data)

    # == flush / close ================================================================
    def flush(self) -> None:
        if self._closed or not self.writable:
            return
        if self.disk.stream is not None:
            self.file.flush()
            return
        self.disk.flush()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.writable:
                if self.disk.stream is not None:
                    self.disk.stream.finish()
                    self.file.flush()
                else:
                    self.flush()
        finally:
            self._closed = True
            self.disk.close_files()

    # == amend ========================================================================
    def amend(self, options: dict, progress: Progress = NO_PROGRESS) -> list:
        from vdtool.formats.vmdk.amend import amend  # when used

        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        return amend(self.disk, options, self.path)

    # == parent =======================================================================
    def set_parent(self, parent: ParentSpec | None) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        disk = self.disk
        if disk.desc_home is None:
            raise NotSupported("changing the parent", "vmdk", self.path, "the extent has no descriptor")
        if any(not isinstance(e, SparseExtent) for e in disk.extents) and parent is not None:
            raise NotSupported("a parent image", "vmdk", self.path, "flat extents cannot be differencing")
        desc = disk.desc
        if parent is None:
            desc.set("parentFileNameHint", None)
            desc.set("parentCID", NO_PARENT_CID_TEXT, quoted=False)
            desc.set("ddb.uuid.parent", None)
            desc.set("ddb.uuid.parentmodification", None)
        else:
            pcid = getattr(parent.image, "cid", None) if parent.image is not None else None
            pcid = pcid if pcid and is_hex32(pcid) else NO_PARENT_CID_TEXT
            desc.set("parentCID", pcid, quoted=False)
            desc.set("parentFileNameHint", parent.recorded_name, after="createType")
            if parent.uuid and desc.get("ddb.uuid.image") is not None:
                desc.set("ddb.uuid.parent", parent.uuid)
        disk.write_descriptor()
        self.file.flush()

    # == create and whole-image operations ===============================================
    # Their modules are imported when used: opening an image to read it
    # (info, convert from VMDK, compare) starts faster without them.
    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "VmdkBackend":
        from vdtool.formats.vmdk.create import create_image

        disk = create_image(path, size, variant=variant, block_size=block_size, parent=parent, options=options,
                            variants=cls.variants, format_options=cls.options)
        if disk is None:
            return cls.open(path, writable=True)
        img = cls(disk.file)  # a stream, written in one pass from here
        img.disk = disk
        return img

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.vmdk.create import measure

        return measure(size, source, variant=variant, block_size=block_size, options=options,
                       variants=cls.variants, format_options=cls.options)

    def resize(self, new_size: int) -> None:
        from vdtool.formats.vmdk.resize import resize_disk

        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if self.disk.stream is not None or any(e.compressed for e in self.disk.extents):
            raise NotSupported("resize", "vmdk", self.path, "a streamOptimized image is written once; convert it")
        split = self.variant in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
        resize_disk(self.disk, new_size, split=split, begin_write=self._begin_write)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats.vmdk.compact import compact_disk

        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if self.disk.stream is not None:
            raise NotSupported("compact", "vmdk", self.path, "the image is still being written")
        self.flush()
        compact_disk(self.disk, self.parent is not None, self.parent_read, progress)
        self.file = self.disk.file  # a rewritten stream is a new file
        self.flush()

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        from vdtool.formats.vmdk.check import check_disk

        if self.writable:
            self.flush()
        check_disk(self.disk, res, repair, progress)
        if self.writable:
            self.flush()


def _cid_int(text: str) -> int | None:
    """A CID as the integer qemu-img reports (None for a malformed one)."""
    return int(text, 16) if is_hex32(text) else None

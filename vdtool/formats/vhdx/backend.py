"""``VhdxBackend``: the ImageBackend for VHDX images (fixed, dynamic and
differencing), tying the package's modules together.

Choices worth knowing:

- A pending log is replayed when the image is opened for writing; a
  read-only open reads through it (an overlay of the sectors it would
  write) and leaves the file alone.
- Every metadata change (BAT pages, sector bitmaps, metadata items) goes
  through the log at flush; data is flushed before it (bat.flush,
  log.write_through_log).
- The image's identity for its children is its DataWriteGuid (a child's
  parent_linkage): it is renewed before the first visible change of a
  session, unless an op defers it (``defer_identity_change``)."""

from __future__ import annotations

import struct

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec
from vdtool.core.errors import CorruptImageError, NotSupported, ReadOnlyError, UsageError
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vhdx import bat
from vdtool.formats.vhdx.headers import update_header
from vdtool.formats.vhdx.layout import NULL_GUID, bat_state, guid_text, random_guid, sniff
from vdtool.formats.vhdx.load import load
from vdtool.formats.vhdx.parent import parent_ref
from vdtool.formats.vhdx.state import VhdxState


class VhdxBackend(ImageBackend):
    name = "vhdx"
    extensions = (".vhdx",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.ZERO_MARKER)
    variants = ("dynamic", "fixed")
    sparse_grain = 64 << 10  # a new block's unwritten parts are holes that read as zeros
    options = (
        FormatOption("logical_sector_size", int, 512, "logical sector size of the virtual disk: 512 or 4096"),
        FormatOption("physical_sector_size", int, 4096, "physical sector size the disk reports: 512 or 4096"),
        FormatOption("log_size", "size", 1 << 20, "size of the metadata log (whole MiB, 1 MiB to 1 GiB)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.state = VhdxState(file)
        self.bitmaps: dict = {}  # sector bitmap cache (bat._bitmap)
        self.notices: list = []
        self._closed = False

    # == open and create ====================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        try:
            self.state = load(self.file, lenient=bool(options.get("check") or options.get("repair")))
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError) as e:
            raise CorruptImageError(f"malformed VHDX metadata ({type(e).__name__}: {e})", self.path) from None

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "VhdxBackend":
        from vdtool.formats.vhdx.create import plan, write_image

        opts = {o.name: o.default for o in cls.options}
        opts.update(options or {})
        variant = variant or "dynamic"
        if variant not in cls.variants:
            raise UsageError(f"vhdx has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        new = plan(size, variant, block_size, parent is not None, opts)
        if parent is not None:
            from vdtool.formats.vhdx.parent import encode_locator, locator_for

            new.locator = encode_locator(locator_for(parent.recorded_name, parent.path, _linkage_of(parent)))
        f = create_file(path)
        try:
            write_image(f, new, parent is not None)
            img = cls(f)
            img.state = load(f)
            img.notices = new.notices
            progress.update(1, 1)
        except BaseException:
            f.close()
            raise
        return img

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.vhdx.create import measure

        return measure(size, source, variant or "dynamic", block_size, cls.parse_options(dict(options or {})))

    # == facts ===============================================================================
    @property
    def virtual_size(self) -> int:
        return self.state.size

    @property
    def block_size(self) -> int:
        return self.state.block_size

    @property
    def variant(self) -> str:
        return "fixed" if self.state.fixed else "dynamic"

    @property
    def data_write_guid(self) -> str:
        """What a child records as parent_linkage."""
        return guid_text(self.state.hdr.DataWriteGuid)

    @property
    def parent(self) -> ParentRef | None:
        st = self.state
        return parent_ref(st.locator) if st.has_parent else None

    def info(self) -> dict:
        st = self.state
        hdr = st.hdr
        d = {
            "type": "differencing" if st.has_parent else self.variant,
            "block-size": st.block_size,
            "logical-sector-size": st.logical_sector,
            "physical-sector-size": st.physical_sector,
            "leave-blocks-allocated": st.fixed,
            "has-parent": st.has_parent,
            "page-83-data": guid_text(st.page83),
            "file-write-guid": guid_text(hdr.FileWriteGuid),
            "data-write-guid": guid_text(hdr.DataWriteGuid),
            "sequence-number": hdr.SequenceNumber,
            "log-offset": hdr.LogOffset,
            "log-size": hdr.LogLength,
            "log-pending": hdr.LogGuid != NULL_GUID,
            "chunk-ratio": st.ratio,
            "bat-entries": len(st.bat),
            "allocated-blocks": sum(1 for b in range(st.blocks) if bat_state(st.entry(b)) in bat.PRESENT),
        }
        if st.has_parent:
            d["parent-locator"] = dict(st.locator)
        if st.problems:
            d["problems"] = [t for _, t in st.problems][:16]
        return d

    # == data ================================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        return bat.block_status(self.state, offset, length, self.bitmaps)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        return bat.map_extent(self.state, offset, length, self.bitmaps)

    def readinto(self, offset: int, buf) -> None:
        bat.readinto(self.state, offset, buf, self.bitmaps, self.parent_read)

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)

    def write(self, offset: int, data) -> None:
        self._require_writable()
        mv = memoryview(data).cast("B")
        self.check_range(offset, len(mv))
        bat.write(self.state, offset, mv, self.bitmaps, self.parent_read)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._require_writable()
        self.check_range(offset, length)
        bat.write_zeroes(self.state, offset, length, unmap, self.bitmaps, self.parent_read)

    def flush(self) -> None:
        if self.writable:
            bat.flush(self.state, self.bitmaps)
            self.file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable:
                self.flush()
        finally:
            self.file.close()

    def defer_identity_change(self) -> None:
        self.state.data_renewed = True

    def change_identity(self) -> None:
        self._require_writable()
        update_header(self.state, DataWriteGuid=random_guid())

    # == whole-image operations ==============================================================
    def set_parent(self, parent: ParentSpec | None) -> None:
        from vdtool.formats.vhdx.reparent import set_parent

        self._require_writable()
        if self.state.fixed:
            raise NotSupported("a parent image", "vhdx", self.path, "fixed VHDXs cannot be differencing disks")
        set_parent(self.state, parent, _linkage_of(parent) if parent else None)

    def resize(self, new_size: int) -> None:
        from vdtool.formats.vhdx.resize import resize

        self._require_writable()
        self.flush()
        resize(self.state, new_size, self.bitmaps, self.parent_read)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats.vhdx.compact import compact

        self._require_writable()
        self.flush()
        compact(self.state, self.bitmaps, progress, self.parent_read)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        from vdtool.formats.vhdx.check import check

        check(self.state, res, repair, progress)


def _linkage_of(parent: ParentSpec) -> bytes:
    """The parent's DataWriteGuid when it is a VHDX; a made-up one for
    other formats (vdtool's stack then checks nothing: Hyper-V cannot open
    such a chain anyway)."""
    img = parent.image
    if isinstance(img, VhdxBackend):
        return img.state.hdr.DataWriteGuid
    return random_guid()

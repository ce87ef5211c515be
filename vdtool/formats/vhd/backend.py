"""``VhdBackend``: VHD images (Connectix / Microsoft Virtual PC, Hyper-V,
Azure): fixed, dynamic and differencing disks.  The on-disk layout is in
``layout``; this module ties the package's pieces into an ImageBackend.

Choices worth knowing:

- Which size is the disk's size.  Virtual PC (creator "vpc ", Virtual Server
  "vs  ") sizes the disk by its CHS geometry, and so does QEMU's "qemu"
  creator (which makes both agree by rounding the size to a geometry);
  Hyper-V ("win "), Disk2vhd ("d2v "), XenServer ("tap\\0"), XenConverter
  ("CTXS"), QEMU's force_size ("qem2"), VirtualBox ("vbox") and anything
  unknown use the current size.  A geometry at its maximum (65535/16/255),
  a zero geometry, or one claiming more than the current size falls back to
  the current size.  ``info`` shows both.
- Creator application of vdtool's images: "qem2".  It is the code QEMU
  (all versions since 2.5) reads as "current size is the disk's size",
  which is exactly vdtool's rule: the current size is what was asked for
  and the geometry is the specification's (rounded down) CHS, stored for
  BIOS-style readers but not used to cut the size.  Any code of our own
  ("vdtl") would make qemu-img size the disk by that geometry and lose the
  tail.
- Sector bitmaps are honoured on read: a clear bit reads the parent (zeros
  in a dynamic disk), as VirtualBox does; QEMU ignores them but always sets
  whole bitmaps, so the two agree on every image QEMU writes.
- Metadata (BAT, bitmaps, footer) is cached write-back.  flush() orders the
  writes: data, fsync, bitmaps, BAT, header, footer copy and footer, fsync.
  A crash leaves unreferenced space at worst, or a footer missing at the end
  of the file, which the copy at offset 0 stands in for (check -r restores).
- open(options={"force": True}) accepts wrong checksums (the CLI's --force);
  a bad footer at the end with a good copy at the start opens without it.
- Broken BAT entries (past the end of the file, over metadata, over other
  blocks) do not stop open, so check can report and repair them; reading or
  writing such a block is refused."""

from __future__ import annotations

import struct

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec
from vdtool.core import bytesutil
from vdtool.core.errors import CorruptImageError, NotSupported, ReadOnlyError, UsageError
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.layout import Record
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vhd import blocks, metadata
from vdtool.formats.vhd.check import check as check_image
from vdtool.formats.vhd.compact import compact as compact_image
from vdtool.formats.vhd.layout import (FEATURE_TEMPORARY, SECTOR, TYPE_DIFF, TYPE_FIXED, TYPE_NAMES,
                                       geometry_sectors, probe_score, size_source, time_stamp_text, uuid_text)
from vdtool.formats.vhd.load import load
from vdtool.formats.vhd.locators import parent_names
from vdtool.formats.vhd.parent import set_parent as record_parent
from vdtool.formats.vhd.resize import resize as resize_image
from vdtool.formats.vhd.state import VhdState


class VhdBackend(ImageBackend):
    name = "vhd"
    extensions = (".vhd", ".vpc")
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID)
    variants = ("dynamic", "fixed")
    sparse_grain = 64 << 10  # a new block's unwritten parts are holes that read as zeros
    options = (
        FormatOption("azure", bool, False,
                     "make an image Azure accepts: fixed, size rounded up to a whole MiB (needs --variant fixed)"),
        FormatOption("uuid", str, None, "unique ID of the new image (default: a random one)"),
    )
    amend_options = (
        FormatOption("uuid", str, None, "a new unique ID (children that recorded the old one no longer match)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.state = VhdState(file)  # replaced by the loader's at open
        self.notices: list = []  # what create rounded, for the user
        self._closed = False

    # == open and create ===================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return probe_score(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        # check must be able to open what it reports on and repairs
        force = bool(options.get("force") or options.get("check"))
        try:
            self.state = load(self.file, force)
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError) as e:
            raise CorruptImageError(f"malformed VHD metadata ({e})", self.path) from None

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "VhdBackend":
        opts = {o.name: o.default for o in cls.options}
        opts.update(options or {})
        variant = variant or "dynamic"
        if variant not in cls.variants:
            raise UsageError(f"vhd has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        from vdtool.formats.vhd.create import plan as plan_image, write_image  # when used: start-up

        new = plan_image(size, variant, block_size, parent is not None, opts)
        f = create_file(path)
        try:
            write_image(f, new)
            img = cls(f)
            img.state = load(f, force=False)
            img.notices = new.notices
            if parent is not None:
                img.set_parent(parent)
            progress.update(1, 1)
        except BaseException:
            f.close()
            raise
        return img

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.vhd.create import measure

        variant = variant or "dynamic"
        if variant not in cls.variants:
            raise UsageError(f"vhd has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        return measure(size, source, variant, block_size, cls.parse_options(dict(options or {})))

    # == facts ============================================================================
    @property
    def footer(self) -> Record:
        """The footer (layout.FOOTER) as it will be written."""
        return self.state.footer

    @property
    def virtual_size(self) -> int:
        return self.state.size

    @property
    def block_size(self) -> int:
        return 4096 if self.state.disk_type == TYPE_FIXED else self.state.block

    @property
    def variant(self) -> str:
        return TYPE_NAMES[self.state.disk_type]

    @property
    def uuid(self) -> str | None:
        return uuid_text(self.state.footer.unique_id)

    @property
    def timestamp(self) -> int:
        """The footer's time stamp: seconds since 2000-01-01 UTC."""
        return self.state.footer.time_stamp

    @property
    def size_source(self) -> str:
        return size_source(self.state.footer, self.state.size)

    @property
    def parent(self) -> ParentRef | None:
        st = self.state
        if st.disk_type != TYPE_DIFF:
            return None
        names = parent_names(st.locators, st.parent_name)
        return ParentRef(filename=names[0] if names else None, format=None, uuid=uuid_text(st.parent_uid),
                         extra={"candidates": names[1:], "parent-timestamp": st.parent_ts})

    def info(self) -> dict:
        st, ft = self.state, self.state.footer
        d = {
            "disk-type": TYPE_NAMES[st.disk_type],
            "current-size": ft.current_size,
            "original-size": ft.original_size,
            "geometry": f"{ft.cylinders}/{ft.heads}/{ft.sectors_per_track}",
            "geometry-size": geometry_sectors(ft) * SECTOR,
            "size-from": self.size_source,
            "creator-application": ft.creator_application.decode("latin-1"),
            "creator-version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator-host-os": ft.creator_host_os.decode("latin-1"),
            "timestamp": time_stamp_text(ft.time_stamp),
            "saved-state": bool(ft.saved_state),
            "unique-id": self.uuid,
        }
        if ft.features & FEATURE_TEMPORARY:
            d["temporary"] = True
        if st.disk_type != TYPE_FIXED:
            d["block-size"] = st.block
            d["max-table-entries"] = st.max_table_entries
            d["allocated-blocks"] = st.allocated_count()
        if st.disk_type == TYPE_DIFF:
            d["parent-unique-id"] = bytesutil.uuid_text(st.parent_uid)
            d["parent-timestamp"] = time_stamp_text(st.parent_ts)
            d["parent-unicode-name"] = st.parent_name
            d["parent-locators"] = [f"{loc.name}: {loc.path}" for loc in st.locators]
        if st.problems or st.bad:
            d["problems"] = [m for _, m in st.problems] + list(st.bad.values())[:16]
        return d

    # == data ===============================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        return blocks.block_status(self.state, offset, length)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        return blocks.map_extent(self.state, offset, length, self.parent is not None)

    def readinto(self, offset: int, buf) -> None:
        blocks.readinto(self.state, offset, buf)

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)

    def write(self, offset: int, data) -> None:
        self._require_writable()
        mv = memoryview(data).cast("B")
        self.check_range(offset, len(mv))
        blocks.write(self.state, offset, mv, self.parent_read)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._require_writable()
        self.check_range(offset, length)
        blocks.write_zeroes(self.state, offset, length, unmap, self.parent_read)

    def flush(self) -> None:
        if self.writable:
            metadata.flush(self.state)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable:
                self.flush()
        finally:
            self.file.close()

    def amend(self, options: dict, progress: Progress = NO_PROGRESS) -> list:
        from vdtool.formats.vhd.amend import amend  # when used

        self._require_writable()
        return amend(self.state, options)

    # == whole-image operations =============================================================
    def set_parent(self, parent: ParentSpec | None) -> None:
        self._require_writable()
        if self.state.disk_type == TYPE_FIXED:
            raise NotSupported("a parent image", "vhd", self.path, "fixed VHDs cannot be differencing disks")
        record_parent(self.state, parent)

    def resize(self, new_size: int) -> None:
        self._require_writable()
        resize_image(self.state, new_size, self.parent_read)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        self._require_writable()
        compact_image(self.state, progress, self.parent_read)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        check_image(self.state, res, repair, progress)

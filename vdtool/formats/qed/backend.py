"""``QedBackend``: the ImageBackend for QED images.  It holds one QedState
(``self.st``) and delegates to the package's modules."""

from __future__ import annotations

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec, Status
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qed import clusters
from vdtool.formats.qed.header import clear_need_check, load, set_backing
from vdtool.formats.qed.layout import QED_F_NEED_CHECK, VARIANTS, sniff
from vdtool.formats.qed.state import QedState


class QedBackend(ImageBackend):
    name = "qed"
    extensions = (".qed",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT | Cap.RESIZE
                    | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.ZERO_MARKER)
    variants = VARIANTS
    parent_identity = False  # a backing file is a name (and "raw" or probed)
    options = (
        FormatOption("cluster_size", "size", 65536, "cluster size, a power of two from 4K to 64M "
                                                    "(--block-size sets it too)"),
        FormatOption("table_size", int, 4, "L1 and L2 table size in clusters: 1, 2, 4, 8 or 16"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.st: QedState | None = None
        self._closed = False

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        self.st = load(self.file)
        if self.writable and self.st.hdr.features & QED_F_NEED_CHECK and not (options.get("check")
                                                                              or options.get("repair")):
            # as QEMU: a writable open of an image not closed cleanly checks and repairs it first
            res = self.check("all")
            if res.check_errors or res.corruptions > res.corruptions_fixed:
                raise self._corrupt("the image was not closed cleanly and its repair failed; run vdtool check")

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "QedBackend":
        from vdtool.formats.qed.create import new_header, write_image  # when used

        hdr = new_header(size, variant, block_size, cls.parse_options(dict(options or {})))
        f = create_file(path)
        try:
            write_image(f, hdr)
            self = cls(f)
            self.st = load(f)
            if parent is not None:
                self.set_parent(parent)
            return self
        except BaseException:
            f.close()
            raise

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.qed.create import measure

        return measure(size, source, block_size, cls.parse_options(dict(options or {})))

    # == facts ========================================================================================
    @property
    def virtual_size(self) -> int:
        return self.st.virtual_size

    @property
    def block_size(self) -> int:
        return self.st.cs

    @property
    def variant(self) -> str:
        return "dynamic"

    @property
    def parent(self) -> ParentRef | None:
        if not self.st.has_backing:
            return None
        return ParentRef(filename=self.st.backing_name, format="raw" if self.st.backing_raw else None)

    def info(self) -> dict:
        # qemu-img shows no format-specific data for QED and its dirty-flag is always false (QEMU
        # does not report need-check there): the same here, and vdtool's own key where the flag is set
        return {"need-check": True} if self.st.hdr.features & QED_F_NEED_CHECK else {}

    # == data =========================================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        return clusters.block_status(self.st, offset, length)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        status, n = self.block_status(offset, length)
        if offset >= self.st.virtual_size:
            return MapExtent(status, n)
        if status != Status.DATA:  # unallocated stays so without a backing file too, as qemu-img map shows it
            return MapExtent(status, n)
        cs = self.st.cs
        ci, within = divmod(offset, cs)
        host = clusters.data_offset(self.st, ci, self.st.tables.entry(ci)) + within
        run = min(n, cs - within)
        while run < n:
            c2 = (offset + run) // cs
            if self.st.tables.entry(c2) != host + run:
                break
            run = min(n, run + cs)
        return MapExtent(Status.DATA, run, host)

    def readinto(self, offset: int, buf) -> None:
        clusters.readinto(self.st, offset, buf)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.check_range(offset, len(mv))
        if len(mv):
            clusters.write(self.st, offset, mv, self.parent_read)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self.check_range(offset, length)
        if length:
            clusters.write_zeroes(self.st, offset, length, self.parent_read, unmap)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def flush(self) -> None:
        if self.writable:
            self._sync()
            self.file.flush()

    def _sync(self) -> None:
        """Tables written (data flushed before them), then need-check cleared."""
        st = self.st
        st.tables.flush()
        if st.need_check_ours:
            clear_need_check(st)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable and self.st is not None:
                self._sync()
        finally:
            self.file.close()

    # == whole-image operations ========================================================================
    def set_parent(self, parent: ParentSpec | None) -> None:
        self._sync()
        if parent is None:
            set_backing(self.st, None, False)
        else:
            set_backing(self.st, parent.recorded_name, parent.format == "raw")

    def resize(self, new_size: int) -> None:
        from vdtool.formats.qed.resize import resize  # when used

        resize(self.st, new_size)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats.qed.compact import compact  # when used

        compact(self.st, progress)
        self._sync()

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        from vdtool.formats.qed.check import check  # when used

        check(self.st, res, repair, progress)

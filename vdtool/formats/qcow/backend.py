"""``QcowBackend``: the ImageBackend for QCOW (version 1) images.  It holds
one QcowState (``self.st``) and delegates to the package's modules."""

from __future__ import annotations

import os

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec, Status
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.qcow import clusters
from vdtool.formats.qcow.header import load, set_backing, write_xen
from vdtool.formats.qcow.layout import QCOW_OFLAG_COMPRESSED, VARIANTS, sniff
from vdtool.formats.qcow.state import QcowState


class QcowBackend(ImageBackend):
    name = "qcow"
    extensions = (".qcow",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT | Cap.RESIZE
                    | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.COMPRESS)
    variants = VARIANTS
    parent_identity = False  # a backing file is a name
    options = (
        FormatOption("cluster_size", "size", 0, "cluster size, a power of two from 512 to 64K (default: 4K, "
                                                "or 512 with a backing file, as QEMU)"),
        FormatOption("compression_level", int, None, "deflate level of compressed clusters (-c), 1-9 (default 6); "
                                                     "a vdtool extra (qemu-img 7.2 has none), not stored"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.st: QcowState | None = None
        self._closed = False
        self.compression_level: int | None = None  # -o compression_level of create/convert

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        self.st = load(self.file)

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "QcowBackend":
        from vdtool.core.deflate import check_level
        from vdtool.formats.qcow.create import new_header, write_image  # when used

        opts = cls.parse_options(dict(options or {}))
        level = opts["compression_level"]
        if level is not None:
            level = check_level(level, "qcow option compression_level")
        hdr, name = new_header(size, variant, block_size, parent, opts)
        f = create_file(path)
        try:
            write_image(f, hdr, name)
            self = cls(f)
            self.st = load(f)
            self.compression_level = level
            return self
        except BaseException:
            f.close()
            raise

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.qcow.create import measure  # when used

        return measure(size, source, variant, block_size, cls.parse_options(dict(options or {})))

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
        if not self.st.backing_name:
            return None
        return ParentRef(filename=self.st.backing_name)

    def info(self) -> dict:
        # qemu-img shows no format-specific data for an unencrypted QCOW image
        return {}

    # == data =========================================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        return clusters.block_status(self.st, offset, length)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        status, n = self.block_status(offset, length)
        if offset >= self.st.virtual_size:
            return MapExtent(status, n)
        if status == Status.UNALLOCATED:  # also without a backing file, as qemu-img map shows it
            return MapExtent(status, n)
        cs = self.st.cs
        ci, within = divmod(offset, cs)
        e = self.st.tables.entry(ci)
        run = min(n, cs - within)
        if e & QCOW_OFLAG_COMPRESSED:
            return MapExtent(Status.DATA, run, None, compressed=True)
        host = clusters.checked(self.st, ci, e) + within
        while run < n and self.st.tables.entry((offset + run) // cs) == host + run:
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
            clusters.write_zeroes(self.st, offset, length, self.parent_read)

    def compress_block(self, data) -> bytes | None:
        cs = self.st.cs
        if len(data) < cs:
            data = bytes(data) + bytes(cs - len(data))
        return clusters.compress(cs, data, self.compression_level)

    def write_compressed_block(self, offset: int, compressed: bytes | None, data) -> None:
        self.check_range(offset, len(data))
        clusters.write_compressed(self.st, offset, compressed, data)

    def flush(self) -> None:
        if self.writable:
            self._sync()
            self.file.flush()

    def _sync(self) -> None:
        st = self.st
        st.tables.flush()
        if st.xen is not None and st.tables.on_change is None:
            write_xen(st)  # vdtool changed the tables: the L1 checksum follows them

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
        set_backing(self.st, parent.recorded_name if parent is not None else None)

    def resize(self, new_size: int) -> None:
        from vdtool.formats.qcow.resize import resize  # when used

        resize(self.st, new_size)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats.qcow.compact import rewrite  # when used

        tmp = rewrite(self.st, progress)
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old = self.file
        self.file = ImageFile(self.path, writable=True)
        old.close()
        self.st = load(self.file)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        from vdtool.formats.qcow.check import check  # when used

        check(self.st, res, repair, progress)

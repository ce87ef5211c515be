"""``ParallelsBackend``: the ImageBackend for bare Parallels images.  It
holds one ParallelsState (``self.state``) and does the data path itself
(block_status, read, write, write_zeroes); opening, creating, resize,
compact and check are the package's other modules."""

from __future__ import annotations

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentSpec, Status
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.parallels.create import new_header, write_image
from vdtool.formats.parallels.layout import INUSE_MAGIC, VARIANTS, sniff
from vdtool.formats.parallels.load import load
from vdtool.formats.parallels.metadata import alloc, begin_write, close_holes, mark_closed, mark_open, set_entry, sync
from vdtool.formats.parallels.state import ParallelsState


class ParallelsBackend(ImageBackend):
    name = "parallels"
    extensions = (".hds", ".hdd")
    capabilities = (Cap.CREATE_DYNAMIC | Cap.WRITE | Cap.DISCARD | Cap.COMPACT | Cap.RESIZE | Cap.SHRINK
                    | Cap.CHECK | Cap.REPAIR)
    variants = VARIANTS
    options = (
        FormatOption("cluster_size", "size", None, "cluster size in bytes, a multiple of 512 (default 1 MiB)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.state: ParallelsState | None = None  # set by _load_image or create
        self._closed = False

    # == class level ==============================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    @classmethod
    def open(cls, path: str, *, writable: bool = False, options: dict | None = None) -> ImageBackend:
        """A bare image, or a ``.hdd`` bundle folder (bundle.BundleBackend)."""
        from vdtool.formats.parallels.bundle import BundleBackend, is_bundle

        if is_bundle(path):
            return BundleBackend.open_bundle(path, cls, writable=writable, options=options)
        return super().open(path, writable=writable, options=options)

    def _load_image(self, options: dict) -> None:
        self.state = load(self.file, lenient=bool(options.get("check") or options.get("repair")))
        if self.file.writable:
            mark_open(self.state)

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "ParallelsBackend":
        if parent is not None:
            raise UsageError("a Parallels image cannot record a parent (bundle snapshots are not "
                             "implemented yet)")
        if variant not in (None, *VARIANTS):
            raise UsageError(f"parallels has no variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if variant == "bundle":
            from vdtool.formats.parallels.bundle import create_bundle

            return create_bundle(cls, path, size, block_size, dict(options or {}))
        hdr = new_header(size, variant, block_size, dict(options or {}))
        f = create_file(path)
        try:
            self = cls(f)
            self.state = write_image(f, hdr)
            mark_open(self.state)
            return self
        except BaseException:
            f.close()
            raise

    # == facts =====================================================================================
    @property
    def virtual_size(self) -> int:
        return self.state.virtual_size

    @property
    def block_size(self) -> int:
        return self.state.cluster

    @property
    def variant(self) -> str:
        return "dynamic"

    def info(self) -> dict:
        st = self.state
        hdr = st.hdr
        d = {
            "signature": hdr.magic.decode("ascii"),
            "cluster-size": st.cluster,
            "bat-entries": hdr.bat_entries,
            "data-offset": st.data_start,
            "geometry": f"{hdr.cylinders}/{hdr.heads}/{hdr.tracks}",
            "in-use": hdr.inuse == INUSE_MAGIC,
        }
        if hdr.ext_off:
            d["extension-offset"] = hdr.ext_off * 512
        problems = st.map_problems()
        if problems:
            d["bat-errors"] = len(problems)
        return d

    # == reading ===================================================================================
    def _run(self, offset: int, length: int) -> tuple:
        """(allocated, clusters' end of the run, first cluster): a run of
        clusters that are all allocated or all not."""
        st = self.state
        end = min(offset + length, st.virtual_size)
        cs = st.cluster
        i = offset // cs
        last = (end - 1) // cs
        bat = st.bat
        first = bool(bat[i])
        j = i + 1
        while j <= last and bool(bat[j]) == first:
            j += 1
        return first, min(j * cs, end), i

    def block_status(self, offset: int, length: int) -> tuple:
        if offset >= self.state.virtual_size or length <= 0:
            return Status.ZERO, max(length, 1)
        allocated, run_end, _ = self._run(offset, length)
        return (Status.DATA if allocated else Status.UNALLOCATED), run_end - offset

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """Clusters stored one after another in the file are one run; an
        unallocated cluster reads as zeros (a bare image has no parent)."""
        st = self.state
        if offset >= st.virtual_size or length <= 0:
            return MapExtent(Status.ZERO, max(length, 1))
        allocated, run_end, i = self._run(offset, length)
        if not allocated:
            return MapExtent(Status.ZERO, run_end - offset)
        cs = st.cluster
        host = st.host(i) + offset - i * cs
        run = min(run_end, (i + 1) * cs) - offset
        while offset + run < run_end:
            j = (offset + run) // cs
            if st.host(j) != host + run:
                break
            run = min(run_end - offset, run + cs)
        return MapExtent(Status.DATA, run, host)

    def readinto(self, offset: int, buf) -> None:
        st = self.state
        mv = memoryview(buf).cast("B")
        total = len(mv)
        cs, bat, n = st.cluster, st.bat, len(st.bat)
        pos = 0
        while pos < total:
            i, within = divmod(offset + pos, cs)
            k = min(cs - within, total - pos)
            if i < n and bat[i]:
                self.file.readinto(st.host(i) + within, mv[pos:pos + k])
            else:
                mv[pos:pos + k] = zeros(k)
            pos += k

    # == writing ===================================================================================
    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.check_range(offset, len(mv))
        if not len(mv):
            return
        st = self.state
        begin_write(st)
        cs, bat = st.cluster, st.bat
        pos, total = 0, len(mv)
        while pos < total:
            i, within = divmod(offset + pos, cs)
            k = min(cs - within, total - pos)
            if bat[i]:
                self.file.pwrite(st.host(i) + within, mv[pos:pos + k])
            elif k == cs:
                alloc(st, i, mv[pos:pos + k])
            else:
                alloc(st, i, self._partial_cluster(i, within, mv[pos:pos + k]))
            pos += k

    def _partial_cluster(self, i: int, within: int, data) -> bytearray:
        """A whole cluster for a write of ``data`` into unallocated cluster
        ``i``: what the layers below show there, with ``data`` over it."""
        st = self.state
        cs = st.cluster
        block = bytearray(cs)
        inside = max(0, min(cs, st.virtual_size - i * cs))
        if inside:
            block[:inside] = self.parent_read(i * cs, inside)
        block[within:within + len(data)] = data
        return block

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Whole clusters are released (they read as zeros unallocated);
        parts of allocated ones are zeroed in place."""
        self.check_range(offset, length)
        if not length:
            return
        st = self.state
        begin_write(st)
        cs, bat, vsize = st.cluster, st.bat, st.virtual_size
        freed = False
        pos, end = offset, offset + length
        while pos < end:
            i, within = divmod(pos, cs)
            k = min(cs - within, end - pos)
            if bat[i]:
                whole = within == 0 and (k == cs or pos + k >= vsize)
                if whole and unmap:
                    set_entry(st, i, 0)
                    freed = True
                else:
                    self.file.write_zeroes(st.host(i) + within, k)
            pos += k
        if freed:
            sync(st)
            close_holes(st)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def flush(self) -> None:
        if self.writable:
            sync(self.state)
            self.file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable and self.state is not None:
                mark_closed(self.state)
        finally:
            self.file.close()

    # == whole-image operations ======================================================================
    def resize(self, new_size: int) -> None:
        from vdtool.formats.parallels.resize import resize  # when used

        resize(self.state, new_size)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        from vdtool.formats.parallels.compact import compact  # when used

        compact(self.state, self.parent_read, progress)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        from vdtool.formats.parallels.check import check  # when used

        check(self.state, res, repair, progress)

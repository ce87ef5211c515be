"""Raw images: the file is the disk.  Holes are kept everywhere (create,
convert, discard, resize); block_status comes from SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

from vdtool.core.backend import Cap, ImageBackend, MapExtent, ParentSpec, Status
from vdtool.core.bytesutil import is_zero
from vdtool.core.errors import NotSupported, UsageError, VdError
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress

COMPACT_BLOCK = 1 << 16  # compact releases whole blocks of this size that read as zeros


class RawBackend(ImageBackend):
    name = "raw"
    extensions = (".img", ".raw")
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK)
    variants = ("sparse", "full")
    kernel_copy = True  # the disk is the file: any range may go by sendfile

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self._size = file.size()

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return 1

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "RawBackend":
        variant = variant or "sparse"
        if variant not in cls.variants:
            raise UsageError(f"raw has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        if parent is not None:
            raise NotSupported("a parent image", "raw", path, "raw images cannot be differencing images")
        f = create_file(path)
        try:
            f.truncate(size)
            if variant == "full":
                step = 64 << 20
                for pos in range(0, size, step):
                    f.preallocate(pos, min(step, size - pos))
                    progress.update(pos + min(step, size - pos), size)
        except BaseException:
            f.close()
            raise
        return cls(f)

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        """A raw file is the disk, allocated or not; qemu-img keeps whole
        sectors for a new disk of a given size."""
        options = dict(options or {})
        mode = options.pop("preallocation", "off")
        if mode not in ("off", "falloc", "full"):
            raise UsageError(f"raw option preallocation: invalid value {mode!r}; choose from off, falloc, full")
        if options:
            raise UsageError(f"unknown raw option {sorted(options)[0]!r} (valid options: preallocation)")
        if variant is not None and variant not in cls.variants:
            raise UsageError(f"raw has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        total = size if source is not None else -(-size // 512) * 512
        return {"required": total, "fully-allocated": total}

    # -- facts ---------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return 4096

    @property
    def variant(self) -> str:
        return "sparse" if self.file.allocated_size() < self._size else "full"

    # -- data ----------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self._size)
        if offset >= end:
            return Status.ZERO, length
        data = self.file.next_data(offset)
        if data > offset:
            return Status.ZERO, min(data, end) - offset
        hole = self.file.next_hole(offset)
        return Status.DATA, max(1, min(hole, end) - offset)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """The guest offset is the host offset, for data and holes alike
        (qemu-img map gives both an offset)."""
        status, n = self.block_status(offset, length)
        return MapExtent(status, n, offset if offset < self._size else None)

    def readinto(self, offset: int, buf) -> None:
        self.file.readinto(offset, buf)

    def write(self, offset: int, data) -> None:
        if not self.writable:
            raise VdError("image is opened read-only", self.path)
        if offset + len(data) > self._size:
            raise VdError(f"write past the end of the disk ({offset}+{len(data)} > {self._size})", self.path)
        self.file.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        if not self.writable:
            raise VdError("image is opened read-only", self.path)
        if unmap and self.file.punch_hole(offset, length):
            return
        self.file.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    # -- whole image -----------------------------------------------------------
    def resize(self, new_size: int) -> None:
        if not self.writable:
            raise VdError("image is opened read-only", self.path)
        self.file.truncate(new_size)
        self._size = new_size

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        """Punch holes where whole 64 KiB blocks read as zeros."""
        bs = COMPACT_BLOCK
        buf = bytearray(bs)
        pos = 0
        while pos < self._size:
            status, n = self.block_status(pos, self._size - pos)
            if status == Status.DATA:
                start = pos // bs * bs
                end = pos + n
                while start < end:
                    m = min(bs, self._size - start)
                    view = memoryview(buf)[:m]
                    self.file.readinto(start, view)
                    if is_zero(buf, 0, m):
                        self.file.punch_hole(start, m)
                    start += bs
                pos = start
            else:
                pos += n
            progress.update(min(pos, self._size), self._size)

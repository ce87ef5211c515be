"""The one file layer every backend uses: positional I/O, flush, holes.

Keeping all file access in this class lets tests wrap it (write counters,
fault injection, crash points) without touching the formats."""

from __future__ import annotations

import errno
import os
import stat

from vdtool.core.errors import CorruptImageError, VdError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode; False when the kernel/filesystem says no."""
    global _libc
    if _libc is None:
        import ctypes  # only when a hole is punched: ctypes.util costs start-up time
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.fallocate(fd, mode, offset, length) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    return True


def os_error(path: str, exc: OSError) -> VdError:
    return VdError(exc.strerror or str(exc), path)


class ImageFile:
    """An open image file.  All offsets are absolute byte offsets."""

    def __init__(self, path: str, *, writable: bool = False, create: bool = False):
        self.path = path
        self.writable = writable or create
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            st = os.stat(path) if not create else None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise VdError("is a directory, not an image file", path)
            # Opening a FIFO blocks until a writer comes: a parent named
            # "pipe" (or /proc/self/fd/0) used to hang vdtool info forever.
            # Refuse FIFOs and sockets; O_NONBLOCK covers a swap between
            # the stat and the open (no effect on files and devices).
            if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
                raise VdError("is a pipe or socket, not an image file", path)
            self.fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)
            mode = os.fstat(self.fd).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                os.close(self.fd)
                raise VdError("is a pipe or socket, not an image file", path)
            if hasattr(os, "set_blocking"):
                os.set_blocking(self.fd, True)
        except FileNotFoundError:
            raise VdError("no such file", path) from None
        except IsADirectoryError:
            raise VdError("is a directory, not an image file", path) from None
        except PermissionError:
            raise VdError("permission denied" + (" (opening for writing)" if self.writable else ""), path) from None
        except OSError as e:
            raise os_error(path, e) from None
        self._closed = False

    # -- reading -------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes; shorter only at end of file."""
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length and data:
                # pread may return short on some filesystems; loop to be sure
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(self.fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        except OSError as e:
            raise os_error(self.path, e) from None

    def pread_exact(self, offset: int, length: int, what: str = "data") -> bytes:
        """Exactly ``length`` bytes or a CorruptImageError naming ``what``."""
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImageError(
                f"{what} at offset {offset} (length {length}) runs past the end of the file "
                f"(file size {self.size()})",
                self.path,
            )
        return data

    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` from ``offset``; bytes past end of file read as zeros."""
        mv = memoryview(buf).cast("B")
        total = len(mv)
        got = 0
        try:
            while got < total:
                n = os.preadv(self.fd, [mv[got:]], offset + got)
                if n <= 0:
                    mv[got:] = bytes(total - got)
                    break
                got += n
        except OSError as e:
            raise os_error(self.path, e) from None
        return got

    # -- writing -------------------------------------------------------------
    def pwrite(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as e:
            raise os_error(self.path, e) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise os_error(self.path, e) from None

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise os_error(self.path, e) from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (reads as zeros afterwards).  False if unsupported."""
        if length <= 0:
            return True
        try:
            return _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            raise os_error(self.path, e) from None

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros, deallocating where the filesystem can."""
        if length <= 0:
            return
        end = self.size()
        if offset >= end:
            return
        length = min(length, end - offset)
        if self.punch_hole(offset, length):
            return
        chunk = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(chunk), offset + length - pos)
            self.pwrite(pos, memoryview(chunk)[:n])
            pos += n

    def preallocate(self, offset: int, length: int) -> None:
        """Allocate blocks (posix_fallocate); falls back to writing zeros."""
        if length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise os_error(self.path, e) from None
        chunk = bytes(1 << 20)
        pos = offset
        while pos < offset + length:
            n = min(len(chunk), offset + length - pos)
            self.pwrite(pos, memoryview(chunk)[:n])
            pos += n

    # -- facts ---------------------------------------------------------------
    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as e:
            raise os_error(self.path, e) from None

    def allocated_size(self) -> int:
        """Bytes the file really occupies on disk (sparse-aware)."""
        st = os.fstat(self.fd)
        return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size

    def next_data(self, offset: int) -> int:
        """Offset of the next data at or after ``offset`` (file size if none)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return max(offset, self.size())
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return offset
            raise os_error(self.path, e) from None

    def next_hole(self, offset: int) -> int:
        """Offset of the next hole at or after ``offset`` (EOF counts as a hole)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return offset
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return self.size()
            raise os_error(self.path, e) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

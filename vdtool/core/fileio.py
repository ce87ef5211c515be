"""The one file layer every backend uses: positional I/O, flush, holes.

Keeping all file access in this class lets tests wrap it (write counters,
fault injection, crash points) without touching the formats."""

from __future__ import annotations

import contextvars
import errno
import os
import stat
import struct
import sys
from contextlib import contextmanager

from vdtool.core.errors import CorruptImageError, ImageInUse, VdError
from vdtool.core.bytesutil import ZERO_BUFFER, zeros

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = None
_OFF_MAX = (1 << 63) - 1  # off_t
_NO_DATA = 1 << 63  # next_data's "none": offset + this is past every range


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


def zero_range_fd(fd: int, offset: int, length: int) -> bool:
    """fallocate(FALLOC_FL_ZERO_RANGE) on a descriptor (block devices take
    it too); False where the kernel or device says no."""
    return _fallocate(fd, _FALLOC_FL_ZERO_RANGE, offset, length)


# -- QEMU-compatible image locking ----------------------------------------------
#
# QEMU (block/file-posix.c) marks what an open image may be used for with
# shared (read) OFD locks on single bytes of the image file: byte 100+i while
# it holds permission i, byte 200+i while it does not let others have
# permission i.  Before it uses an image it takes its own bytes, then tests,
# with a write-lock probe (F_OFD_GETLK), that nobody holds byte 200+i for a
# permission it wants, nor byte 100+i for a permission it does not share.
# The locks are advisory and vanish when the file is closed.  vdtool takes
# and tests the same bytes, so QEMU and vdtool see each other.
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0F  # GRAPH_MOD (0x10) is never locked on files
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
# What vdtool holds and does not share, as qemu-img does for a format node's
# file: a reader holds consistent read and lets nobody write or resize under
# it; a writer also holds write and resize (metadata grows the file).
READ_PERMS = (PERM_CONSISTENT_READ, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))
WRITE_PERMS = (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))

# open_image(force_share=True) sets this around a read-only open, so every
# file the backend opens (VMDK extents too) skips locking (qemu-img -U).
_force_share = contextvars.ContextVar("vdtool_force_share", default=False)


@contextmanager
def force_share(on: bool = True):
    """Read-only opens inside this block take and test no locks."""
    token = _force_share.set(bool(on))
    try:
        yield
    finally:
        _force_share.reset(token)


# ops.convert sets this around the writing of its *staged* output: the new
# file is renamed into place only once it is complete, so a crash before
# that leaves nothing under the final name and the fsyncs between data and
# metadata inside the copy buy nothing.  Writable files opened in this block
# turn flush() into a note and, when durable, fsync once at close (before
# the rename); when not durable (a new file, as qemu-img convert and cp
# leave theirs) they leave the data to the kernel's normal writeback.
# Write order is unchanged; only the barriers are dropped.
_defer_sync = contextvars.ContextVar("vdtool_defer_sync", default=None)


@contextmanager
def deferred_sync(on: bool = True, durable: bool = True):
    """Writable opens inside this block fsync once at close (``durable``) or
    never, instead of at every flush().  Only for files nobody can see until
    they are complete (convert's staged output)."""
    token = _defer_sync.set(("durable" if durable else "volatile") if on else None)
    try:
        yield
    finally:
        _defer_sync.reset(token)


# Writes go to the kernel in pieces of at most 1 MiB.  A buffered write that
# covers a whole 2 MiB-aligned range lets the page cache allocate one 2 MiB
# folio for it, and on Linux 6.18 here that made such writes 5-10x slower
# (1 GiB in 4 MiB aligned pieces: 1.5-2.4 s; in 1 MiB pieces: 0.22-0.30 s;
# in 4 MiB pieces shifted by 4 KiB: 0.22-0.25 s).  The extra syscalls cost
# about a microsecond per MiB.
_WRITE_PIECE = 1 << 20


# While a staged file is written, writeback is started every _KICK_BYTES
# (sync_file_range(SYNC_FILE_RANGE_WRITE): starts it, waits for nothing), so
# the disk works while the copy goes on and the one fsync at close finds
# little left to do.  Durability still comes from that fsync alone.
_KICK_BYTES = 32 << 20
_sfr = None


def _start_writeback(fd: int) -> None:
    global _sfr
    if _sfr is None:
        _sfr = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                f = libc.sync_file_range
                f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                f.restype = ctypes.c_int
                _sfr = f
            except (OSError, AttributeError, ImportError):
                _sfr = False
    if _sfr:
        _sfr(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; a failure only means no head start


# Files this process has open with locks, by (st_dev, st_ino).  vdtool may
# open one file twice (rebase onto an image whose chain holds the image
# itself, to find the loop; a VDI parent search opening a sibling): its own
# locks must not make it refuse itself, so they are lifted while a new open
# tests for other processes' locks.
_held: dict = {}


def _flock(l_type: int, start: int, length: int = 1) -> bytes:
    # struct flock on Linux: short l_type, short l_whence, off_t l_start,
    # off_t l_len, pid_t l_pid (l_pid must be 0 for OFD locks); native
    # alignment gives the 4 bytes of padding before l_start.
    return struct.pack("hhqqi", l_type, os.SEEK_SET, start, length, 0)


def _ofd_supported() -> bool:
    import fcntl

    return hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")


def _set_lock(fd: int, byte: int, lock: bool) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK if lock else fcntl.F_UNLCK, byte))


def _byte_is_locked(fd: int, byte: int) -> bool:
    """Would an exclusive lock on ``byte`` conflict with another open file
    description's lock (QEMU's qemu_lock_fd_test)?"""
    import fcntl

    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return struct.unpack("hhqqi", got)[0] != fcntl.F_UNLCK


def os_error(path: str, exc: OSError) -> VdError:
    return VdError(exc.strerror or str(exc), path)


# -- sources that are not files ---------------------------------------------------
#
# Reading goes through open_file(), which gives an ImageFile for a path and
# for standard input ("-", read into a temporary file), and an object with
# ImageFile's read side (sourcefile.SourceFile) for http:// and https://
# URLs.  The modules that provide those are imported only when used.
STDIN = "-"


def is_url(path: str) -> bool:
    return isinstance(path, str) and path[:8].lower().startswith(("http://", "https://"))


def is_special_source(path: str) -> bool:
    """A name that open_file reads without a file of that name (stdin, a URL)."""
    return path == STDIN or is_url(path)


# convert plans an image for a stream by writing it into a folder of its own
# with a file class that keeps the tables and notes where the data goes
# (core/layout_ahead.py); while it does, every file a backend creates or
# opens for writing in that folder is of that class.
_file_class_in = contextvars.ContextVar("vdtool_file_class_in", default=None)


@contextmanager
def files_in_folder_as(folder: str, cls):
    """Files created or opened for writing under ``folder`` are ``cls``."""
    token = _file_class_in.set((os.path.abspath(folder) + os.sep, cls))
    try:
        yield
    finally:
        _file_class_in.reset(token)


def _file_class(path: str):
    redirect = _file_class_in.get()
    if redirect is not None and os.path.abspath(path).startswith(redirect[0]):
        return redirect[1]
    return ImageFile


def create_file(path: str) -> "ImageFile":
    """A new (or emptied) file for a backend's create."""
    return _file_class(path)(path, create=True)


def open_file(path: str, *, writable: bool = False, lock: bool = True):
    """The file an image is read from (or written to): an ImageFile (for
    standard input: over the temporary file it was read into), or a
    read-only SourceFile (sourcefile.py) for a URL."""
    if is_special_source(path):
        if writable:
            what = "standard input" if path == STDIN else "a URL"
            raise VdError(f"{what} is read-only: it cannot be opened for writing", path)
        if path == STDIN:
            from vdtool.core.streams import spooled_stdin  # only when '-' is used

            return ImageFile.adopt(spooled_stdin(), STDIN)
        from vdtool.core.urlfile import HttpFile  # only for URLs

        return HttpFile(path)
    return _file_class(path)(path, writable=writable, lock=lock) if writable else ImageFile(path, lock=lock)


class ImageFile:
    """An open image file.  All offsets are absolute byte offsets."""

    def __init__(self, path: str, *, writable: bool = False, create: bool = False, lock: bool = True):
        """``lock``: take and test QEMU's lock bytes (unless inside
        ``force_share()`` for a read-only open); probing opens without."""
        self.path = path
        self.writable = writable or create
        self.perms = (0, PERM_ALL)  # (held, shared) lock bits
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            # no O_TRUNC: truncate only once the locks say nobody uses the file
            flags |= os.O_CREAT
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
        mode = _defer_sync.get() if self.writable else None
        self._defer = mode is not None
        # a durable staged file is synced once at close, flushed or not
        self._unsynced = self._kick = mode == "durable"
        self._since_kick = 0
        try:
            if lock and not (not self.writable and _force_share.get()):
                self.set_perms(*(WRITE_PERMS if self.writable else READ_PERMS))
            # Only truncate a file that has content: on ext4 any truncate to
            # zero marks the file "replace-via-truncate" and its close()
            # then waits to start writeback of everything written (0.18 s
            # for 512 MiB), which a new file never needs.
            if create and os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, 0)
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt(cls, fd: int, name: str) -> "ImageFile":
        """A read-only ImageFile over an open descriptor (vdtool's own
        temporary file, e.g. standard input read into one), named ``name``
        in messages; no locks (nobody else knows the file)."""
        f = cls.__new__(cls)
        f.path, f.writable, f.perms, f.fd = name, False, (0, PERM_ALL), fd
        f._closed = f._defer = f._unsynced = f._kick = False
        f._since_kick = 0
        return f

    # -- locking (QEMU's lock bytes) --------------------------------------------
    def set_perms(self, held: int, shared: int) -> None:
        """Take the lock bytes for ``held`` permissions and for those not in
        ``shared``, drop the others, then test that no other process holds
        what conflicts; on conflict the old locks are restored and
        ImageInUse is raised.  Regular files only (devices: no locks)."""
        if not _ofd_supported():
            return
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                return
        except OSError:
            return
        old = self.perms
        try:
            st = os.fstat(self.fd)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = None
        siblings = [f for f in _held.get(key, ()) if f is not self and not f._closed]
        try:
            for f in siblings:
                f._restore((0, PERM_ALL))
            self._apply(held, shared)
            conflict = self._conflict(held, shared)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a filesystem without byte-range locks: nothing to share with
            self._restore(old)
            raise os_error(self.path, e) from None
        finally:
            for f in siblings:
                f._restore(f.perms)
        if conflict:
            self._restore(old)
            raise ImageInUse(conflict, self.path)
        self.perms = (held, shared)
        if key is not None:
            lst = _held.setdefault(key, [])
            if self not in lst:
                lst.append(self)
            self._lock_key = key

    def _apply(self, held: int, shared: int) -> None:
        for bit in PERM_NAMES:
            i = bit.bit_length() - 1
            _set_lock(self.fd, LOCK_PERM_BASE + i, bool(held & bit))
            _set_lock(self.fd, LOCK_SHARED_BASE + i, not shared & bit)

    def _restore(self, old) -> None:
        try:
            self._apply(*old)
        except OSError:
            pass

    def _conflict(self, held: int, shared: int):
        for bit, name in PERM_NAMES.items():
            i = bit.bit_length() - 1
            if held & bit and _byte_is_locked(self.fd, LOCK_SHARED_BASE + i):
                return (f"image is in use: another process (QEMU or vdtool) uses it and does not let others "
                        f"{'read it consistently' if bit == PERM_CONSISTENT_READ else name} "
                        f"(failed to get the {name!r} lock)"
                        + ("" if self.writable else "; -U/--force-share reads it anyway"))
        for bit, name in PERM_NAMES.items():
            i = bit.bit_length() - 1
            if not shared & bit and _byte_is_locked(self.fd, LOCK_PERM_BASE + i):
                what = "for writing" if bit in (PERM_WRITE, PERM_RESIZE) else f"with the {name!r} permission"
                return (f"image is in use: another process (QEMU or vdtool) holds it {what} "
                        f"(failed to get the shared {name!r} lock)"
                        + ("" if self.writable else "; -U/--force-share reads it anyway"))
        return None

    # -- reading -------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes; shorter only at end of file."""
        if offset < 0 or length < 0:
            raise CorruptImageError(f"read of {length} bytes at offset {offset} is out of range", self.path)
        if offset >= _OFF_MAX:
            return b""  # past what any file can hold: end of file (os.pread would raise OverflowError)
        length = min(length, _OFF_MAX - offset)
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
        if offset < 0:
            raise CorruptImageError(f"read at offset {offset} is out of range", self.path)
        if offset >= _OFF_MAX - total:
            mv[:] = bytes(total)  # past what any file can hold (os.preadv would raise OverflowError)
            return 0
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
        if offset < 0 or offset + len(mv) > _OFF_MAX:
            raise CorruptImageError(f"write of {len(mv)} bytes at offset {offset} is out of range", self.path)
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:done + _WRITE_PIECE], offset + done)
        except OSError as e:
            raise os_error(self.path, e) from None

        if self._kick:
            self._since_kick += len(mv)
            if self._since_kick >= _KICK_BYTES:
                self._since_kick = 0
                _start_writeback(self.fd)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise os_error(self.path, e) from None

    def flush(self) -> None:
        if self._defer:  # see deferred_sync(): one fsync at close, or none
            self._unsynced = self._kick
            return
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
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset`` (allocating them: use
        ``zero_range`` to release blocks instead)."""
        end = offset + length
        pos = offset
        while pos < end:
            n = min(len(ZERO_BUFFER), end - pos)
            self.pwrite(pos, zeros(n))
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
        self.write_zeroes(offset, length)

    # -- facts ---------------------------------------------------------------
    def size(self) -> int:
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                return os.lseek(self.fd, 0, os.SEEK_END)  # a device's st_size is 0
            return st.st_size
        except OSError as e:
            raise os_error(self.path, e) from None

    def allocated_size(self) -> int:
        """Bytes the file really occupies on disk (sparse-aware)."""
        st = os.fstat(self.fd)
        return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size

    def _regular(self) -> bool:
        # an open descriptor never changes type: one fstat, not one per SEEK_DATA
        reg = self.__dict__.get("_is_regular")
        if reg is None:
            try:
                reg = stat.S_ISREG(os.fstat(self.fd).st_mode)
            except OSError:
                return True
            self._is_regular = reg
        return reg

    def next_data(self, offset: int) -> int:
        """Offset of the next data at or after ``offset``; when there is none
        (holes up to the end of the file, or past it), a value beyond any
        range a caller asks about, so that the rest reads as zeros in one
        step."""
        # Fuzzing found: an offset past off_t (a VMDK flat extent at sector
        # 2^55) raised OverflowError, and a character device (/dev/zero as an
        # extent) answered lseek with 0, so callers walked it a byte at a
        # time.  Past off_t there is no data; devices are all data.
        # A flat extent starting past the end of its file walked a byte at
        # a time too: "no data" used to be answered with the offset itself.
        if offset >= _OFF_MAX:
            return offset + _NO_DATA
        if not self._regular():
            return offset
        try:
            return max(offset, os.lseek(self.fd, offset, os.SEEK_DATA))
        except OSError as e:
            if e.errno == errno.ENXIO:
                return offset + _NO_DATA
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return offset
            raise os_error(self.path, e) from None

    def next_hole(self, offset: int) -> int:
        """Offset of the next hole at or after ``offset`` (EOF counts as a hole)."""
        if offset >= _OFF_MAX:
            return offset
        if not self._regular():
            return _OFF_MAX  # a device has no holes (callers clamp to their range)
        try:
            return max(offset, os.lseek(self.fd, offset, os.SEEK_HOLE))
        except OSError as e:
            if e.errno == errno.ENXIO:
                return offset
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                size = self.size()
                return size if size > offset else offset + _NO_DATA
            raise os_error(self.path, e) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            error = None
            if self._unsynced:
                self._unsynced = False
                try:
                    os.fsync(self.fd)
                except OSError as e:
                    error = os_error(self.path, e)
            key = getattr(self, "_lock_key", None)
            if key is not None:
                lst = _held.get(key, [])
                if self in lst:
                    lst.remove(self)
                if not lst:
                    _held.pop(key, None)
            os.close(self.fd)
            if error is not None:
                raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

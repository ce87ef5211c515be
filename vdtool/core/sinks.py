"""Destinations that are not new files: standard output, FIFOs, character
and block devices.  They are written in place (a device or pipe is never
replaced by a file), from the first byte to the last, and every error says
how far the writing got.

- ``StreamTarget``: standard output, a FIFO or a character device, written
  forward only.  Where standard output is a regular file (``> out.img``)
  runs of zeros are skipped with a seek, so the file stays sparse.
- ``DeviceTarget``: a block device, written at offsets; runs of zeros are
  zeroed with fallocate(ZERO_RANGE) or BLKZEROOUT where the device takes
  them, else written as zeros."""

from __future__ import annotations

import errno
import os
import stat

from vdtool.core.bytesutil import ZERO_BUFFER, zeros
from vdtool.core.errors import VdError
from vdtool.core.progress import blocking_output

STDOUT_NAME = "-"
_PIECE = 1 << 20
_PIPE_SIZE = 1 << 20
_SEND_PIECE = 8 << 20  # per sendfile call: a stop signal is seen between calls
# sendfile cannot serve this pair of files (an O_APPEND output, an old kernel,
# a file system without splice): the caller reads and writes instead
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EXDEV}


def target_kind(path: str) -> str | None:
    """'stream' or 'device' for a destination written in place, None for a
    regular (or new) file.  A symlink is judged by what it points to."""
    if path == STDOUT_NAME:
        return "stream"
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return "device"
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return "stream"
    return None


def _widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (the most an unprivileged process may
    have by default) instead of 64 KiB: a sixteenth of the calls and of the
    hand-overs between vdtool and its reader.  Best effort: a pipe that
    stays small works the same."""
    import fcntl

    try:
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < _PIPE_SIZE:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (OSError, AttributeError):
        pass


def describe(path: str) -> str:
    return "standard output" if path == STDOUT_NAME else path


class _Target:
    def __init__(self, fd: int, name: str, own_fd: bool):
        self.fd, self.name, self.own_fd = fd, name, own_fd
        self.written = 0  # bytes of the image delivered so far (the position reached)

    def fail(self, e: OSError, what: str = "write") -> VdError:
        if e.errno == errno.EPIPE:
            raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe") from None
        where = describe(self.name)
        return VdError(f"{what} failed after {self.written} bytes: {e.strerror or e}", where)

    def send_file(self, src_fd: int, src_offset: int, offset: int, length: int) -> int:
        """Bytes of a file copied by the kernel; 0: the caller writes them."""
        return 0

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EROFS):  # pipes and ttys cannot be synced
                raise self.fail(e, "fsync") from None

    def close(self) -> None:
        if self.own_fd and self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError as e:
                if e.errno == errno.EPIPE:
                    raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe") from None
                raise VdError(f"close failed after {self.written} bytes: {e.strerror or e}",
                              describe(self.name)) from None


class StreamTarget(_Target):
    """Written forward only; a gap before a write is filled with zeros."""

    def __init__(self, fd: int, name: str, own_fd: bool):
        super().__init__(fd, name, own_fd)
        st = os.fstat(fd)
        # a regular file behind standard output (> out.img) keeps its holes;
        # O_APPEND (>> out.img) ignores seeks, so zeros are written there
        import fcntl

        self.sparse = stat.S_ISREG(st.st_mode) and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        self.start = os.lseek(fd, 0, os.SEEK_CUR) if self.sparse else 0
        self._skipped = False  # the file ends in a hole not yet made real
        self._no_sendfile = False  # set once the kernel refused a sendfile into this output
        if stat.S_ISFIFO(st.st_mode):
            _widen_pipe(fd)

    def write_at(self, offset: int, data) -> None:
        if offset < self.written:
            raise VdError(f"internal error: stream write at {offset} behind position {self.written}",
                          describe(self.name))
        if offset > self.written:
            self.zero(self.written, offset - self.written)
        mv = memoryview(data).cast("B")
        done = 0
        try:
            with blocking_output():
                while done < len(mv):
                    done += os.write(self.fd, mv[done:done + _PIECE])
                    self.written = offset + done
        except OSError as e:
            raise self.fail(e) from None
        self._skipped = False

    def send_file(self, src_fd: int, src_offset: int, offset: int, length: int) -> int:
        """``length`` bytes of the file ``src_fd`` from ``src_offset`` as the
        image's bytes at ``offset``, copied by the kernel (sendfile: into a
        pipe it passes page references, nothing is copied).  Returns how many
        were sent: fewer where the file ends early, 0 where the kernel cannot
        (then the caller reads and writes them)."""
        if self._no_sendfile or length <= 0:
            return 0
        if offset < self.written:
            raise VdError(f"internal error: stream write at {offset} behind position {self.written}",
                          describe(self.name))
        if offset > self.written:
            self.zero(self.written, offset - self.written)
        done = 0
        try:
            with blocking_output():
                while done < length:
                    n = os.sendfile(self.fd, src_fd, src_offset + done, min(length - done, _SEND_PIECE))
                    if n <= 0:
                        break  # the file ends here
                    done += n
                    self.written = offset + done
        except OSError as e:
            if done == 0 and e.errno in _NO_SENDFILE:
                self._no_sendfile = True
                return 0
            raise self.fail(e) from None
        if done:
            self._skipped = False
        return done

    def zero(self, offset: int, length: int) -> None:
        """Zeros from ``offset`` (the current position) for ``length`` bytes."""
        if offset != self.written or length <= 0:
            if length > 0:
                raise VdError(f"internal error: stream zeros at {offset}, position {self.written}",
                              describe(self.name))
            return
        if self.sparse:
            try:
                os.lseek(self.fd, length, os.SEEK_CUR)
            except OSError as e:
                raise self.fail(e, "seek") from None
            self.written += length
            self._skipped = True
            return
        end = offset + length
        try:
            with blocking_output():
                while self.written < end:
                    n = min(len(ZERO_BUFFER), end - self.written)
                    self.written += os.write(self.fd, zeros(n))
        except OSError as e:
            raise self.fail(e) from None

    def finish(self, total: int) -> None:
        """The image is ``total`` bytes: zeros up to there, and a file
        behind standard output gets its length (a trailing hole)."""
        if total > self.written:
            self.zero(self.written, total - self.written)
        if self.sparse and self._skipped:
            try:
                os.ftruncate(self.fd, self.start + self.written)
            except OSError as e:
                raise self.fail(e, "truncate") from None


class DeviceTarget(_Target):
    """A block device: written at offsets, zeros by fallocate/BLKZEROOUT."""

    def __init__(self, fd: int, name: str):
        super().__init__(fd, name, True)
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self._zero_ok = True

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:done + _PIECE], offset + done)
        except OSError as e:
            raise self.fail(e) from None
        self.written = max(self.written, offset + len(mv))

    def zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._zero_ok and offset % 512 == 0 and length % 512 == 0:
            if _zero_device_range(self.fd, offset, length):
                self.written = max(self.written, offset + length)
                return
            self._zero_ok = False
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(ZERO_BUFFER), end - pos)
            self.write_at(pos, zeros(n))
            pos += n

    def finish(self, total: int) -> None:
        pass


def _zero_device_range(fd: int, offset: int, length: int) -> bool:
    """fallocate(ZERO_RANGE), else the BLKZEROOUT ioctl; False where the
    device takes neither (then zeros are written)."""
    from vdtool.core.fileio import zero_range_fd

    try:
        if zero_range_fd(fd, offset, length):
            return True
    except OSError:
        pass
    try:
        import fcntl
        import struct

        BLKZEROOUT = 0x127F  # _IO(0x12, 127)
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        return True
    except (OSError, ImportError):
        return False


def refuse_terminal_stdout() -> None:
    """An image is not for a terminal's eyes (gzip and tar refuse too)."""
    if os.isatty(1):
        raise VdError("standard output is a terminal; redirect it to a file or a pipe "
                      "(vdtool convert SRC - > out.img)", STDOUT_NAME)


def _open_fifo(path: str, flags: int) -> int:
    """A FIFO opens for writing once a reader has it open: say that vdtool
    waits for one rather than hang without a word."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        from vdtool.core.notices import notice

        notice(f"{path}: waiting for a reader to open the FIFO")
        return os.open(path, flags)
    os.set_blocking(fd, True)
    return fd


def open_target(path: str, *, exclusive: bool = True):
    """The in-place destination ``path`` ('-' is standard output)."""
    if path == STDOUT_NAME:
        refuse_terminal_stdout()
        return StreamTarget(1, STDOUT_NAME, own_fd=False)
    kind = target_kind(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise VdError(f"cannot open the destination: {e.strerror or e}", path) from None
    if stat.S_ISSOCK(st.st_mode):
        raise VdError("is a socket; vdtool writes images into files, pipes and devices only", path)
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    if kind == "device" and exclusive:
        flags |= os.O_EXCL  # Linux: refuses a device that is mounted or held by another program
    try:
        if stat.S_ISFIFO(st.st_mode):
            fd = _open_fifo(path, flags)
        else:
            fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VdError("the device is in use (mounted, or held by another program)", path) from None
        raise VdError(f"cannot open the destination for writing: {e.strerror or e}", path) from None
    if kind == "device":
        return DeviceTarget(fd, path)
    return StreamTarget(fd, path, own_fd=True)

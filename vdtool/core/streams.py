"""Standard input as an image ('-').

A pipe can be read only once and only forward.  Two ways to read it:

- ``rawinput.RawInput``: raw disk content read forward exactly once, in
  bounded memory.  ``convert`` uses it for raw input whose size is known ahead
  (``--size``) or whose output is raw too.
- Everything else (a format that is read at random, ``info``, ``check``,
  ``compare``, ``checksum``) reads standard input into a temporary file in
  TMPDIR first, says so on stderr, and reads that.  The file is sparse
  (blocks of zeros are skipped, not written) and unlinked from the start, so
  nothing is left behind whatever stops vdtool.

The first 64 KiB are read ahead for probing (``head()``); both ways start
with them."""

from __future__ import annotations

import os
import tempfile

from vdtool.core.errors import VdError

STDIN_NAME = "-"
PROBE_BYTES = 65536
_PIECE = 1 << 20
_SPOOL_BLOCK = 4096  # zero blocks of this size are skipped in the spool


class _Stdin:
    """What this process has taken from file descriptor 0."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self._head: bytes | None = None
        self.consumed = 0  # bytes read from the descriptor so far
        self.spool = None  # the TemporaryFile once spooled
        self.spooled_size = 0
        self.streaming = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (short only at the end of the input)."""
        parts, got = [], 0
        while got < n:
            try:
                piece = os.read(self.fd, min(n - got, _PIECE))
            except OSError as e:
                raise VdError(f"cannot read standard input: {e.strerror or e}", STDIN_NAME) from None
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        self.consumed += got
        return b"".join(parts)

    def head(self) -> bytes:
        if self._head is None:
            self._head = self.read(PROBE_BYTES)
        return self._head

    def spooled(self, why: str = "") -> int:
        """Read all of standard input into the spool (once); its size."""
        if self.spool is not None:
            return self.spooled_size
        if self.streaming:
            raise VdError("standard input is already being read as a stream; it cannot be read twice",
                          STDIN_NAME)
        from vdtool.core.bytesutil import data_runs
        from vdtool.core.notices import notice

        head = self.head()
        tmpdir = tempfile.gettempdir()
        notice(f"-: reading standard input into a temporary file in {tmpdir}"
               + (f" ({why})" if why else ""))
        try:
            spool = tempfile.TemporaryFile(prefix="vdtool-stdin-", dir=tmpdir)
        except OSError as e:
            raise VdError(f"cannot make a temporary file in {tmpdir} for standard input: {e.strerror or e}",
                          STDIN_NAME) from None
        fd = spool.fileno()
        pos = 0
        zero_view = memoryview(bytes(_PIECE))
        data = head
        try:
            while data:
                buf = bytearray(data)
                for a, b in data_runs(buf, len(buf), _SPOOL_BLOCK, zero_view):
                    _pwrite_all(fd, memoryview(buf)[a:b], pos + a)
                pos += len(buf)
                data = self.read(_PIECE)
            os.ftruncate(fd, pos)
        except OSError as e:
            spool.close()
            raise VdError(f"cannot write standard input into {tmpdir}: {e.strerror or e} "
                          f"(after {pos} bytes; set TMPDIR to a folder with more room)", STDIN_NAME) from None
        self.spool, self.spooled_size = spool, pos
        return pos


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


_STDIN: _Stdin | None = None


def stdin() -> _Stdin:
    global _STDIN
    if _STDIN is None:
        _STDIN = _Stdin()
    return _STDIN


def spooled_stdin() -> int:
    """A new descriptor of the temporary file standard input was read into
    (for ``fileio.open_file('-')``)."""
    s = stdin()
    s.spooled("it is read at random, not in one pass")
    return os.dup(s.spool.fileno())


def stdin_is_terminal() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False

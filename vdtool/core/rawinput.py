"""Raw disk content streamed from standard input (``convert -f raw -``)."""

from __future__ import annotations

from vdtool.core.backend import Status
from vdtool.core.errors import VdError
from vdtool.core.streams import STDIN_NAME, stdin


class RawInput:
    """Raw disk content from standard input, read forward exactly once:
    the source stack of a streaming ``convert``.  ``size`` is the disk size
    named ahead (``--size``); the input must hold exactly that many bytes.
    With ``size`` None the size is unknown until the input ends (only a raw
    output can take that)."""

    path = STDIN_NAME
    layers = ()
    missing_parent = None

    def __init__(self, size: int | None):
        self._in = stdin()
        if self._in.spool is not None:
            raise VdError("standard input was already read", STDIN_NAME)
        self._in.streaming = True
        self._buf = self._in.head()
        self._buf_at = 0  # disk offset of self._buf[0]
        self.size = size
        self.ended = False

    @property
    def virtual_size(self) -> int:
        return self.size if self.size is not None else 1 << 62

    def block_status(self, offset: int, length: int):
        return Status.DATA, length, None

    def readinto(self, offset: int, view) -> None:
        """Fill ``view`` with the bytes at ``offset``, which must be where the
        last read ended (a pipe goes forward only)."""
        mv = memoryview(view).cast("B")
        if offset != self._buf_at:
            raise VdError(f"standard input is read in one pass; a read at offset {offset} came after "
                          f"offset {self._buf_at}", STDIN_NAME)
        n = len(mv)
        k = min(len(self._buf), n)
        mv[:k] = self._buf[:k]
        self._buf = self._buf[k:]
        got = k
        while got < n:
            piece = self._in.read(n - got)
            if not piece:
                break
            mv[got:got + len(piece)] = piece
            got += len(piece)
        self._buf_at += got
        if got < n:
            self.ended = True
            if self.size is not None:
                raise VdError(f"standard input ended after {self._buf_at} bytes, but --size says the disk "
                              f"is {self.size} bytes", STDIN_NAME)
            mv[got:] = bytes(n - got)
        return got

    def read_some(self, n: int) -> bytes:
        """The next up to ``n`` bytes (raw output of unknown size)."""
        if self._buf:
            out, self._buf = self._buf[:n], self._buf[n:]
        else:
            out = self._in.read(n)
        self._buf_at += len(out)
        return out

    def check_ended(self) -> None:
        """After the disk's last byte: the input must end there too."""
        if self.size is not None and not self._buf and not self._in.read(1):
            return
        if self.size is not None:
            raise VdError(f"standard input holds more than the {self.size} bytes --size names", STDIN_NAME)

    def close(self) -> None:
        pass

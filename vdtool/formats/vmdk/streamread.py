"""Reading a streamOptimized VMDK front to back, from a pipe.

VMware, qemu-img and vdtool write a stream in one pass: the header, the
embedded descriptor, then each grain (a marker with its LBA, then zlib data)
in increasing LBA order, each grain table after its grains, the directory,
a footer and an end-of-stream marker.  Read in that order the grains are
the disk in order, so the tables after them are not needed: this reader
keeps one grain at a time (bounded memory) and never seeks back.  A grain
out of order is an error naming the way out (save the stream to a file)."""

from __future__ import annotations

from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.deflate import DeflateError, inflate
from vdtool.core.errors import CorruptImageError, UnsupportedFeature
from vdtool.formats.vmdk.layout import (FLAG_COMPRESSED, FLAG_MARKERS, GRAIN_MARKER, MAGIC, MARKER_EOS,
                                        METADATA_MARKER, SECTOR, SPARSE_HEADER, header_problems)

_NO_END = 1 << 62  # the stream's length is unknown: header checks against "no end"
_MAX_METADATA_SECTORS = 1 << 24  # a table skipped in one marker: at most 8 GiB


def is_stream(head: bytes) -> bool:
    """Does ``head`` start a streamOptimized extent (compressed grains with
    markers)?  VMware and vdtool put its directory at the end, qemu-img in
    the header's overhead; either way the grains follow in disk order."""
    if len(head) < SECTOR or head[:4] != MAGIC:
        return False
    hdr = SPARSE_HEADER.unpack(head)
    return bool(hdr.flags & FLAG_COMPRESSED and hdr.flags & FLAG_MARKERS)


class StreamSource:
    """The disk a streamOptimized stream holds, as a source stack the copy
    engine reads in order (``virtual_size``, ``block_status``,
    ``readinto``).  ``read(n)`` gives the stream's next bytes (short only
    at its end); ``head`` is what was read of it already."""

    layers = ()
    missing_parent = None

    def __init__(self, read: Callable[[int], bytes], head: bytes, name: str = "-"):
        self.path = name
        self._read, self._buf, self._at = read, bytearray(head), 0  # _at: stream offset of _buf[0]
        hdr = SPARSE_HEADER.unpack(self._take(SECTOR, "header"))
        problems = header_problems(hdr, _NO_END)
        for kind, text in problems:
            raise (UnsupportedFeature if kind == "unsupported" else CorruptImageError)(text, name)
        self.grain_bytes = hdr.grainSize * SECTOR
        self.virtual_size = hdr.capacity * SECTOR
        self._skip_to(hdr.overHead * SECTOR)
        self._grain: tuple | None = None  # (disk offset, decompressed bytes) of the grain at hand
        self._next: tuple | None = None  # (disk offset, compressed bytes) read ahead
        self._ended = False
        self._last = -1  # disk offset of the last grain read
        self._served = 0  # reads go forward from here

    # -- the stream -------------------------------------------------------------------
    def _fill(self, end: int) -> bool:
        while self._at + len(self._buf) < end:
            more = self._read(min(1 << 20, end - self._at - len(self._buf)))
            if not more:
                return False
            self._buf += more
        return True

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(self._at + n):
            raise CorruptImageError(f"the stream ends inside the {what} (at byte {self._at + len(self._buf)})",
                                    self.path)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._at += n
        return out

    def _skip_to(self, offset: int) -> None:
        while self._at < offset:
            if not self._buf and not self._fill(self._at + 1):
                raise CorruptImageError(f"the stream ends at byte {self._at}, before offset {offset}", self.path)
            k = min(len(self._buf), offset - self._at)
            del self._buf[:k]
            self._at += k

    def _advance(self) -> None:
        """Read the next grain's marker and data into ``_next`` (None at the
        end of the stream), skipping tables."""
        self._next = None
        while not self._ended:
            if not self._fill(self._at + SECTOR):
                if self._buf:
                    raise CorruptImageError(f"the stream ends inside a marker at byte {self._at}", self.path)
                self._ended = True  # no end-of-stream marker: the grains so far are the disk
                return
            marker = GRAIN_MARKER.unpack(bytes(self._buf[:GRAIN_MARKER.size]))
            if marker.size:
                self._next = self._grain_record(marker)
                return
            meta = METADATA_MARKER.unpack(self._take(SECTOR, "marker"))
            if meta.type == MARKER_EOS:
                self._ended = True
                return
            if meta.numSectors > _MAX_METADATA_SECTORS:
                raise CorruptImageError(f"a metadata marker at byte {self._at - SECTOR} says {meta.numSectors} "
                                        f"sectors follow", self.path)
            self._skip_to(self._at + meta.numSectors * SECTOR)

    def _grain_record(self, marker) -> tuple:
        at = self._at
        lba_bytes = marker.lba * SECTOR
        if marker.size > 2 * self.grain_bytes + 4096:
            raise CorruptImageError(f"the grain at byte {at} says {marker.size} bytes of compressed data "
                                    f"(grains are {self.grain_bytes} bytes)", self.path)
        if marker.lba % (self.grain_bytes // SECTOR) or lba_bytes >= self.virtual_size:
            raise CorruptImageError(f"the grain at byte {at} has LBA {marker.lba}, not the start of a grain inside "
                                    f"the disk ({self.virtual_size // SECTOR} sectors)", self.path)
        if lba_bytes <= self._last:
            raise CorruptImageError(f"the grain at byte {at} (LBA {marker.lba}) comes after a later one: this "
                                    f"stream is not in one-pass order; save it to a file and convert that",
                                    self.path)
        record = -(-(GRAIN_MARKER.size + marker.size) // SECTOR) * SECTOR
        raw = self._take(record, "grain")
        self._last = lba_bytes
        return lba_bytes, raw[GRAIN_MARKER.size:GRAIN_MARKER.size + marker.size]

    def _lookahead(self) -> tuple | None:
        if self._next is None and not self._ended:
            self._advance()
        return self._next

    # -- the disk ---------------------------------------------------------------------
    def block_status(self, offset: int, length: int):
        g = self._grain
        if g is not None and g[0] <= offset < g[0] + self.grain_bytes:
            return Status.DATA, min(length, g[0] + self.grain_bytes - offset), None
        nxt = self._lookahead()
        if nxt is None or nxt[0] >= offset + length:
            return Status.ZERO, length, None
        if nxt[0] > offset:
            return Status.ZERO, nxt[0] - offset, None
        return Status.DATA, min(length, nxt[0] + self.grain_bytes - offset), None

    def readinto(self, offset: int, view) -> int:
        mv = memoryview(view).cast("B")
        if offset < self._served:
            raise CorruptImageError(f"a read at {offset} after {self._served}: a stream is read forward only",
                                    self.path)
        pos, end = offset, offset + len(mv)
        while pos < end:
            g = self._grain
            if g is None or pos >= g[0] + self.grain_bytes:
                nxt = self._lookahead()
                if nxt is not None and nxt[0] <= pos:
                    self._grain = (nxt[0], self._inflate(*nxt))
                    self._next = None
                    continue
                stop = end if nxt is None else min(end, nxt[0])
                mv[pos - offset:stop - offset] = bytes(stop - pos)
                pos = stop
                continue
            stop = min(end, g[0] + self.grain_bytes)
            mv[pos - offset:stop - offset] = g[1][pos - g[0]:stop - g[0]]
            pos = stop
        self._served = offset
        return len(mv)

    def _inflate(self, voff: int, comp: bytes) -> bytes:
        try:
            data = inflate(comp, self.grain_bytes).data
        except DeflateError as e:
            raise CorruptImageError(f"the grain at disk offset {voff} does not decompress: {e}", self.path) from None
        return data.ljust(self.grain_bytes, b"\0")

    def check_ended(self) -> None:
        """After the disk's last byte: read what is left (the tables, the
        footer), so that the writer of the stream does not see a broken
        pipe in a ``set -o pipefail`` script."""
        self._buf.clear()
        while self._read(1 << 20):
            pass

    def close(self) -> None:
        pass

"""Writing a streamOptimized VMDK: compressed grains with markers, in one
sequential pass (create, convert, or compact's rewrite).  Reading one is
the sparse extent's (``sparse.SparseExtent``)."""

from __future__ import annotations

from array import array

from vdtool.core import deflate
from vdtool.core.bytesutil import U32, align_up, ceil_div, le_bytes
from vdtool.core.errors import NotSupported, VdError
from vdtool.formats.vmdk.layout import (COMPRESSION_DEFLATE, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES, FLAG_COMPRESSED,
                                        FLAG_MARKERS, FLAG_NL_DETECT, GD_AT_END, GRAIN_MARKER, MARKER_EOS,
                                        MARKER_FOOTER, MARKER_GD, MARKER_GT, MAX_SECTOR_OFFSET, SECTOR,
                                        SPARSE_HEADER, metadata_marker, new_header)


def compress_grain(data, grain_bytes: int, level: int | None = None) -> bytes:
    """One grain as VMware stores it: zlib stream (RFC 1950) of the whole
    grain (``level``: deflate 1-9, None for the default)."""
    if len(data) < grain_bytes:
        data = bytes(data) + bytes(grain_bytes - len(data))
    return deflate.deflate(data, level)


class StreamWriter:
    """streamOptimized in one sequential pass, as VMware lays it out: header
    (gdOffset at end), descriptor, then grains (marker + zlib data) in
    increasing order, each grain table after its grains, the directory, a
    footer and the end-of-stream marker."""

    kind = "STREAM"

    def __init__(self, file, capacity: int, desc: bytes, grain: int = DEFAULT_GRAIN_SECTORS,
                 level: int | None = None):
        self.file = file
        self.level = level  # -o compression_level (deflate 1-9), None for the default
        self.path = file.path
        self.capacity = capacity
        self.grain = grain
        self.grain_bytes = grain * SECTOR
        self.gtes = DEFAULT_GTES
        self.gt_span = self.gtes * self.grain_bytes
        self.gd_entries = ceil_div(capacity * SECTOR, self.gt_span) if capacity else 0
        self.desc_size = max(1, ceil_div(len(desc), SECTOR))
        self.overhead = ceil_div(1 + self.desc_size, grain) * grain
        self.gd = array(U32, bytes(4 * self.gd_entries))
        self._gt = None  # (index, array) being filled
        self._pending = None  # (grain index, bytearray) partly written grain
        self._last = -1  # highest grain emitted
        self.pos = self.overhead * SECTOR
        self.finished = False
        file.truncate(0)
        file.pwrite(0, self._header(GD_AT_END))
        file.pwrite(SECTOR, desc.ljust(self.desc_size * SECTOR, b"\0"))

    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def _header(self, gd: int) -> bytes:
        return SPARSE_HEADER.pack(new_header(
            version=3, flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS, capacity=self.capacity,
            grainSize=self.grain, descriptorOffset=1, descriptorSize=self.desc_size, numGTEsPerGT=self.gtes,
            rgdOffset=0, gdOffset=gd, overHead=self.overhead, compressAlgorithm=COMPRESSION_DEFLATE))

    def compress(self, data) -> bytes:
        """One grain compressed (no I/O, no state: runs in worker threads)."""
        return compress_grain(data, self.grain_bytes, self.level)

    def _order(self, g: int) -> None:
        if g <= self._last:
            raise NotSupported("writing out of order", "vmdk", self.path,
                               f"streamOptimized is written in one sequential pass; grain {g} comes after "
                               f"grain {self._last}")

    def emit(self, g: int, comp: bytes) -> None:
        """Grain ``g``, already compressed, after every grain so far."""
        self._order(g)
        ti = g // self.gtes
        if self._gt is not None and self._gt[0] != ti:
            self._write_gt()
        if self._gt is None:
            self._gt = (ti, array(U32, bytes(4 * self.gtes)))
        rec = GRAIN_MARKER.pack(lba=g * self.grain, size=len(comp)) + comp
        rec += bytes(align_up(len(rec), SECTOR) - len(rec))
        if (self.pos + len(rec)) // SECTOR > MAX_SECTOR_OFFSET:
            raise VdError("stream is full: sector offsets past 2^32 cannot be recorded", self.path)
        self.file.pwrite(self.pos, rec)
        self._gt[1][g % self.gtes] = self.pos // SECTOR
        self.pos += len(rec)
        self._last = g

    def _write_gt(self) -> None:
        ti, t = self._gt
        self._gt = None
        gt_sectors = ceil_div(4 * self.gtes, SECTOR)
        self.file.pwrite(self.pos, metadata_marker(gt_sectors, MARKER_GT))
        self.pos += SECTOR
        self.file.pwrite(self.pos, le_bytes(t).ljust(gt_sectors * SECTOR, b"\0"))
        self.gd[ti] = self.pos // SECTOR
        self.pos += gt_sectors * SECTOR

    def _flush_pending(self) -> None:
        if self._pending is not None:
            g, buf = self._pending
            self._pending = None
            if buf.count(0) != len(buf):
                self.emit(g, compress_grain(buf, self.grain_bytes, self.level))

    def write(self, offset: int, mv: memoryview) -> None:
        gb = self.grain_bytes
        pos = 0
        total = len(mv)
        while pos < total:
            voff = offset + pos
            g = voff // gb
            within = voff - g * gb
            n = min(gb - within, total - pos)
            if self._pending is not None and self._pending[0] != g:
                self._flush_pending()
            if self._pending is None:
                self._order(g)
                if within == 0 and (n == gb or voff + n >= self.size):
                    piece = mv[pos:pos + n]
                    if bytes(piece).count(0) != n:
                        self.emit(g, compress_grain(piece, gb, self.level))
                    pos += n
                    continue
                self._pending = (g, bytearray(gb))
            self._pending[1][within:within + n] = mv[pos:pos + n]
            pos += n

    def write_compressed(self, offset: int, comp: bytes | None, data) -> None:
        gb = self.grain_bytes
        if offset % gb:
            self.write(offset, memoryview(data))
            return
        self._flush_pending()
        g = offset // gb
        self.emit(g, comp if comp is not None else compress_grain(data, gb, self.level))

    def write_zeroes(self, offset: int, length: int) -> None:
        # zeros are what a stream shows where it holds no grain; only a pending partial grain needs them
        if self._pending is not None:
            gb = self.grain_bytes
            g, buf = self._pending
            a = max(offset, g * gb)
            b = min(offset + length, (g + 1) * gb)
            if a < b:
                buf[a - g * gb:b - g * gb] = bytes(b - a)

    def finish(self) -> None:
        """The last grain table, the directory, the footer and the
        end-of-stream marker; the file ends there."""
        if self.finished:
            return
        self._flush_pending()
        if self._gt is not None:
            self._write_gt()
        gd_bytes = align_up(4 * self.gd_entries, SECTOR) if self.gd_entries else SECTOR
        self._put(metadata_marker(gd_bytes // SECTOR, MARKER_GD))
        gd_off = self.pos // SECTOR
        self._put(le_bytes(self.gd).ljust(gd_bytes, b"\0"))
        self._put(metadata_marker(1, MARKER_FOOTER))
        self._put(self._header(gd_off))
        self._put(metadata_marker(0, MARKER_EOS))
        self.file.truncate(self.pos)
        self.finished = True

    def _put(self, raw: bytes) -> None:
        self.file.pwrite(self.pos, raw)
        self.pos += len(raw)

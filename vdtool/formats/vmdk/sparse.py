"""VMDK hosted sparse extents (magic KDMV, versions 1-3): grain directory,
redundant grain directory, grain tables, zeroed grains, and compressed
grains with markers (streamOptimized, read here, written by ``stream``).

Offsets in the header, the directories and the tables are in 512-byte
sectors.  Every header field and directory entry is checked at open; grain
table entries are checked when used."""

from __future__ import annotations

import re
from array import array
from itertools import compress as _select
from collections.abc import Callable

from vdtool.core.backend import MapExtent, Status
from vdtool.core.bytesutil import U32, align_up, ceil_div, le_array, le_bytes
from vdtool.core.deflate import DeflateError, inflate
from vdtool.core.errors import CorruptImageError, FormatError, NotSupported, UnsupportedFeature, VdError
from vdtool.formats.vmdk.layout import (DEFAULT_DESCRIPTOR_SECTORS, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES,
                                        FLAG_COMPRESSED, FLAG_MARKERS, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END,
                                        GRAIN_MARKER, GTE_ZERO, MAGIC, MARKER_EOS, MARKER_FOOTER,
                                        MAX_SECTOR_OFFSET, METADATA_MARKER, SECTOR, SPARSE_HEADER,
                                        directory_entries, header_problems, new_header)
from vdtool.formats.vmdk.tablescan import TableScan, zero_bytes

# Runs of little-endian entries, matched from an entry's offset, four bytes
# at a time (so they stay aligned): unallocated, zeroed-grain marker, data.
_ZERO_RUN = re.compile(rb"(?:\x00\x00\x00\x00)*")
_MARK_RUN = re.compile(rb"(?:\x01\x00\x00\x00)*")
_DATA_RUN = re.compile(rb"(?:(?!\x00\x00\x00\x00)[\s\S]{4})*")
_DATA_RUN_ZG = re.compile(rb"(?:(?!\x00\x00\x00\x00|\x01\x00\x00\x00)[\s\S]{4})*")

_GT_CACHE_LIMIT = 65536  # tables kept in memory before clean ones are dropped


class SparseExtent:
    """One KDMV file.  ``capacity`` and offsets in sectors; the methods take
    byte offsets relative to the extent's start.

    Public state, read (and for resize, compact and check, changed) by the
    whole-image operations:

    - the header's fields: ``version``, ``flags``, ``capacity``, ``grain``,
      ``desc_offset``, ``desc_size``, ``gtes`` (numGTEsPerGT),
      ``rgd_offset``, ``gd_offset``, ``overhead``, ``unclean``
      (uncleanShutdown), ``compress_algorithm``; ``header_bytes()`` packs
      them, ``write_header()`` writes them;
    - from the flags: ``compressed``, ``markers``, ``zero_grain``;
    - sizes: ``grain_bytes``, ``gt_span`` (bytes of disk one table covers),
      ``gt_bytes``, ``gt_sectors``, ``gd_entries``, ``gd_area`` (entries the
      directories' sectors hold);
    - ``gd`` and ``rgd`` (None without a redundant directory): the
      directories as arrays, in step with the file after ``flush_metadata``;
    - ``next_alloc`` (where the next grain or table goes) and ``file_size``
      (the file's size when it was opened or compacted)."""

    kind = "SPARSE"

    def __init__(self, file, writable: bool):
        self.file = file
        self.path = file.path
        self.writable = writable
        self._gt_cache: dict = {}
        self._gt_dirty: set = set()
        self._gd_dirty = False
        self._released: list = []  # host byte offsets of grains released since the last flush
        self._zcache = (None, None)  # (gte, decompressed grain)
        self._scan: TableScan | None = None  # built from the directories at open, rebuilt when they change
        self._rscan: TableScan | None = None
        self.footer_used = False
        self._read_header()

    # == open ==========================================================================
    def _err(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    def _read_header(self) -> None:
        f = self.file
        fsize = f.size()
        self.file_size = fsize
        raw = f.pread(0, SECTOR)
        if len(raw) < SECTOR:
            raise FormatError(f"file of {fsize} bytes is too short for a VMDK sparse extent header", self.path)
        hdr = SPARSE_HEADER.unpack(raw)
        if hdr.magicNumber != MAGIC:
            raise FormatError(f"not a VMDK sparse extent (magic {hdr.magicNumber!r})", self.path)
        self._take_header(hdr, fsize)
        if self.gd_offset == GD_AT_END:
            if not self.markers:
                raise self._err("grain directory offset is the at-end marker but the image has no markers")
            self._read_footer(fsize)
        self._load_directories(fsize)

    def _take_header(self, hdr, fsize: int, footer: bool = False) -> None:
        problems = header_problems(hdr, fsize, "footer" if footer else "header")
        if problems:
            kind, text = problems[0]
            raise UnsupportedFeature(text, self.path) if kind == "unsupported" else self._err(text)
        flags = hdr.flags
        self.version = hdr.version
        self.flags = flags
        self.capacity = hdr.capacity
        self.grain = hdr.grainSize
        self.grain_bytes = self.grain * SECTOR
        self.desc_offset = hdr.descriptorOffset
        self.desc_size = hdr.descriptorSize
        self.gtes = hdr.numGTEsPerGT
        self.rgd_offset = hdr.rgdOffset if flags & FLAG_RGD else 0
        self.gd_offset = hdr.gdOffset
        self.overhead = hdr.overHead
        self.unclean = hdr.uncleanShutdown
        self.compress_algorithm = hdr.compressAlgorithm
        self.compressed = bool(flags & FLAG_COMPRESSED)
        self.markers = bool(flags & FLAG_MARKERS)
        self.zero_grain = bool(flags & FLAG_ZERO_GRAIN)
        self.gt_span = self.gtes * self.grain_bytes  # bytes of disk one grain table covers
        self.gt_bytes = self.gtes * 4
        self._zero_gt = zero_bytes(self.gt_bytes)
        self.gt_sectors = ceil_div(self.gt_bytes, SECTOR)
        self.gd_entries = directory_entries(self.capacity, self.grain, self.gtes)

    def _read_footer(self, fsize: int) -> None:
        # footer marker, footer, end-of-stream marker: the last three sectors
        if fsize < 4 * SECTOR:
            raise self._err(f"file of {fsize} bytes is too short for a stream footer")
        tail = self.file.pread_exact(fsize - 3 * SECTOR, 3 * SECTOR, "stream footer")
        footer_marker = METADATA_MARKER.unpack(tail, 0)
        eos = METADATA_MARKER.unpack(tail, 2 * SECTOR)
        if footer_marker.type != MARKER_FOOTER or eos.type != MARKER_EOS or eos.numSectors != 0:
            raise self._err(f"grain directory is at the end but no footer was found (marker type "
                            f"{footer_marker.type}, end-of-stream type {eos.type})")
        hdr = SPARSE_HEADER.unpack(tail, SECTOR)
        if hdr.magicNumber != MAGIC:
            raise self._err(f"stream footer has magic {hdr.magicNumber!r}")
        old_capacity = self.capacity
        self._take_header(hdr, fsize, footer=True)
        if self.gd_offset == GD_AT_END:
            raise self._err("stream footer still has the at-end grain directory offset")
        if self.capacity != old_capacity:
            raise self._err(f"stream footer capacity {self.capacity} differs from the header's {old_capacity}")
        self.footer_used = True

    def _load_directories(self, fsize: int) -> None:
        n = self.gd_entries
        self.gd = self._load_dir("grain directory", self.gd_offset, n, fsize)
        self.rgd = self._load_dir("redundant grain directory", self.rgd_offset, n, fsize) \
            if self.rgd_offset else None
        self.gd_area = ceil_div(n * 4, SECTOR) * SECTOR // 4  # entries the directory's sectors can hold
        limit = fsize // SECTOR
        self.reset_scans()
        for name, d in (("grain directory", self.gd), ("redundant grain directory", self.rgd)):
            if d is None or not n:
                continue
            scan = self._new_scan(d)
            if d is self.gd:
                self._scan = scan
            else:
                self._rscan = scan
            top = scan.top()
            if top and top + self.gt_sectors > limit:
                i = next(i for i, v in enumerate(d) if v + self.gt_sectors > limit and v)
                raise self._err(f"{name} entry {i} points to a grain table at sector {d[i]}, past the end of "
                                f"the file ({fsize} bytes)")
        self.next_alloc = align_up(fsize, SECTOR)

    def _load_dir(self, name: str, offset: int, n: int, fsize: int) -> array:
        if n == 0:
            return array(U32)
        if offset == 0 or offset * SECTOR + n * 4 > fsize:
            raise self._err(f"{name} at sector {offset} ({n} entries) lies outside the file ({fsize} bytes)")
        return le_array(self.file.pread_exact(offset * SECTOR, n * 4, name), U32)

    # == grain tables ==================================================================
    def _new_scan(self, d: array) -> TableScan:
        return TableScan(self.file, d, self.gt_sectors, self.gt_bytes, self._gt_dirty)

    def table_scan(self) -> TableScan:
        """Which primary grain tables may hold entries."""
        s = self._scan
        if s is None or s.d is not self.gd or s.n != len(self.gd):
            s = self._scan = self._new_scan(self.gd)
        return s

    def rgd_scan(self) -> TableScan | None:
        if self.rgd is None:
            return None
        s = self._rscan
        if s is None or s.d is not self.rgd or s.n != len(self.rgd):
            s = self._rscan = self._new_scan(self.rgd)
        return s

    def reset_scans(self) -> None:
        """After a directory entry changed in place (tables moved or added)."""
        self._scan = self._rscan = None

    def table_is_empty(self, t: array) -> bool:
        return t.tobytes() == self._zero_gt  # one memcmp, not 512 int compares

    def gt(self, i: int) -> array | None:
        t = self._gt_cache.get(i)
        if t is not None:
            return t
        off = self.gd[i]
        if off == 0:
            return None
        t = le_array(self.file.pread_exact(off * SECTOR, self.gt_bytes, f"grain table {i}"), U32)
        if len(self._gt_cache) > _GT_CACHE_LIMIT:
            for k in [k for k in self._gt_cache if k not in self._gt_dirty]:
                del self._gt_cache[k]
        self._gt_cache[i] = t
        return t

    def gte(self, g: int) -> int:
        t = self.gt(g // self.gtes)
        return 0 if t is None else t[g % self.gtes]

    def status_of(self, e: int) -> Status:
        """What grain table entry ``e`` makes its grain read as."""
        if e == 0:
            return Status.UNALLOCATED
        if e == GTE_ZERO and self.zero_grain:
            return Status.ZERO
        return Status.DATA

    def drop_tables_from(self, n: int) -> None:
        """Forget cached tables ``n`` and up (a shrink dropped them; they
        were flushed first)."""
        for ti in [t for t in self._gt_cache if t >= n]:
            del self._gt_cache[ti]

    def forget_tables(self) -> None:
        """Drop every cached table (they moved in the file; all were flushed)."""
        self._gt_cache.clear()
        self._gt_dirty.clear()
        self.reset_scans()

    # == reading =======================================================================
    @property
    def size(self) -> int:
        return self.capacity * SECTOR

    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self.size)
        if offset >= end:
            return Status.ZERO, length
        gb = self.grain_bytes
        span = self.gt_span
        scan = self.table_scan()
        last = ceil_div(end, span)
        pos = offset
        status = None
        while pos < end:
            ti = pos // span
            nt = scan.next_table(ti, last)
            t = self.gt(ti) if nt == ti else None
            if t is None:
                st = Status.UNALLOCATED
                nxt = max(nt, ti + 1) * span
            else:
                j = pos // gb - ti * self.gtes
                st, k = self._run(t, j)
                nxt = ti * span + k * gb
            if status is None:
                status = st
            elif st != status:
                break
            pos = nxt
        return status, min(pos, end) - offset

    def _run(self, t: array, j: int) -> tuple:
        """Status of entry ``j`` of table ``t`` and the index past the run of
        entries with that status (a regex over the table, not a loop)."""
        e = t[j]
        if e == 0:
            pat = _ZERO_RUN
        elif e == GTE_ZERO and self.zero_grain:
            pat = _MARK_RUN
        else:
            pat = _DATA_RUN_ZG if self.zero_grain else _DATA_RUN
        m = pat.match(le_bytes(t), 4 * j)
        return self.status_of(e), max(j + 1, m.end() // 4)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """Grains stored one after another are one run at their place in
        the file; compressed grains have no host offset."""
        status, n = self.block_status(offset, length)
        if status != Status.DATA:
            return MapExtent(status, n)
        if self.compressed:
            return MapExtent(Status.DATA, n, compressed=True, file=self.path)
        gb = self.grain_bytes
        g = offset // gb
        within = offset - g * gb
        e = self.gte(g)
        run = self._contiguous(g, e, within, min(gb - within, n), n)
        return MapExtent(Status.DATA, min(run, n), e * SECTOR + within, file=self.path)

    def grain_data(self, e: int, g: int) -> bytes:
        """Compressed grain ``g`` at sector ``e``, inflated (the last one cached)."""
        if self._zcache[0] == e:
            return self._zcache[1]
        out = self._inflate_grain((e, g))
        self._zcache = (e, out)
        return out

    def _fill_compressed(self, mv, pieces: list) -> None:
        """The compressed grains of one read, [(pos, within, length, gte,
        grain)...]: inflated on every core, then copied into ``mv``."""
        if len(pieces) == 1:
            pos, within, n, e, g = pieces[0]
            mv[pos:pos + n] = memoryview(self.grain_data(e, g))[within:within + n]
            return
        from vdtool.core import workers

        step = max(1, workers.BATCH_BYTES // self.grain_bytes)  # memory stays bounded for any read size
        for i in range(0, len(pieces), step):
            part = pieces[i:i + step]
            outs = workers.parallel_map(self._inflate_grain, [(p[3], p[4]) for p in part])
            for (pos, within, n, _, _), data in zip(part, outs):
                mv[pos:pos + n] = memoryview(data)[within:within + n]
        self._zcache = (pieces[-1][3], outs[-1])

    def _inflate_grain(self, where: tuple) -> bytes:
        """Grain ``g`` compressed at sector ``e`` (``where``: (e, g)), read,
        checked and inflated (no cache: runs in worker threads)."""
        e, g = where
        gb = self.grain_bytes
        off = e * SECTOR
        fsize = self.file_size
        if off >= fsize:
            raise self._err(f"compressed grain {g} at sector {e} lies past the end of the file ({fsize} bytes)")
        if self.markers:
            marker = GRAIN_MARKER.unpack(self.file.pread_exact(off, GRAIN_MARKER.size, f"grain marker of grain {g}"))
            size = marker.size
            if size == 0 or size > 2 * gb + 1024 or off + GRAIN_MARKER.size + size > fsize:
                raise self._err(f"compressed grain {g} at sector {e} has size {size}, past the end of the file "
                                f"({fsize} bytes) or larger than twice the grain")
            comp = self.file.pread(off + GRAIN_MARKER.size, size)
        else:
            comp = self.file.pread(off, min(2 * gb + 1024, fsize - off))
        try:
            out, more, _ = inflate(comp, gb)
        except DeflateError as ex:
            raise self._err(f"compressed grain {g} at sector {e} cannot be inflated: {ex}") from None
        if more and self.markers:
            raise self._err(f"compressed grain {g} at sector {e} inflates to more than the grain size {gb}")
        if len(out) < gb:
            out += bytes(gb - len(out))
        return out

    def readinto(self, offset: int, mv: memoryview) -> None:
        gb = self.grain_bytes
        pos = 0
        total = len(mv)
        limit = max(self.file_size, self.next_alloc)
        compressed = []  # (pos, within, length, gte, grain): inflated together at the end
        while pos < total:
            voff = offset + pos
            g = voff // gb
            within = voff - g * gb
            n = min(gb - within, total - pos)
            e = self.gte(g) if voff < self.size else 0
            st = self.status_of(e)
            if st != Status.DATA:
                mv[pos:pos + n] = bytes(n)
            elif self.compressed:
                compressed.append((pos, within, n, e, g))
            else:
                host = e * SECTOR + within
                if host >= limit:
                    raise self._err(f"grain {g} at sector {e} lies past the end of the file ({limit} bytes)")
                n = self._contiguous(g, e, within, n, total - pos)
                self.file.readinto(host, mv[pos:pos + n])
            pos += n
        if compressed:
            self._fill_compressed(mv, compressed)

    def _contiguous(self, g: int, e: int, within: int, n: int, left: int) -> int:
        """Bytes from ``within`` grain ``g`` (at sector ``e``, ``n`` of them
        in it) on that lie one after another in the file, up to ``left``:
        one read for grains a sequential write allocated together."""
        gb = self.grain_bytes
        run = n
        while run < left:
            g2 = g + ceil_div(within + run, gb)
            if g2 * gb >= self.size:
                break
            e2 = self.gte(g2)
            if e2 != e + (g2 - g) * self.grain or self.status_of(e2) != Status.DATA:
                break
            run += min(gb, left - run)
        return run

    def read_grain_raw(self, e: int) -> bytes:
        return self.file.pread(e * SECTOR, self.grain_bytes)

    # == writing =======================================================================
    def alloc(self, nbytes: int) -> int:
        """Byte offset of ``nbytes`` new bytes at the end of the file."""
        off = self.next_alloc
        if (off + nbytes) // SECTOR > MAX_SECTOR_OFFSET:
            raise VdError("extent file is full: sector offsets past 2^32 cannot be recorded", self.path)
        self.next_alloc = off + nbytes
        return off

    def _new_gt(self, ti: int) -> array:
        nb = self.gt_sectors * SECTOR
        off = self.alloc(nb)
        self.file.pwrite(off, bytes(nb))
        self.gd[ti] = off // SECTOR
        if self.rgd is not None:
            roff = self.alloc(nb)
            self.file.pwrite(roff, bytes(nb))
            self.rgd[ti] = roff // SECTOR
        self._gd_dirty = True
        t = array(U32, bytes(self.gt_bytes))
        self._gt_cache[ti] = t
        return t

    def set_gte(self, g: int, value: int) -> None:
        """Point grain ``g`` at ``value`` (in memory until flush_metadata);
        the grain it pointed at is released (punched at the flush)."""
        ti = g // self.gtes
        t = self.gt(ti)
        if t is None:
            t = self._new_gt(ti)
        old = t[g % self.gtes]
        if old > GTE_ZERO and not self.compressed and old != value:
            self._released.append(old * SECTOR)
        t[g % self.gtes] = value
        if value:
            # the scans may have taken this table for empty (a hole)
            for s in (self._scan, self._rscan):
                if s is not None:
                    s.note(ti)
        self._gt_dirty.add(ti)

    def forget_released(self) -> None:
        """Keep the grains released since the last flush in the file, not
        punched: the caller has moved them, reuses their space, or they lie
        past a shrunk disk's end until compact."""
        self._released.clear()

    def _refuse_stream(self) -> None:
        if self.compressed:
            raise NotSupported("writing", "vmdk", self.path,
                               "streamOptimized images are written once, in one pass, when converted")

    def write(self, offset: int, mv: memoryview, parent_read: Callable[[int, int], bytes]) -> None:
        """``parent_read(offset, length)`` takes extent-relative offsets."""
        self._refuse_stream()
        gb = self.grain_bytes
        pos = 0
        total = len(mv)
        while pos < total:
            voff = offset + pos
            g = voff // gb
            within = voff - g * gb
            n = min(gb - within, total - pos)
            e = self.gte(g)
            if self.status_of(e) == Status.DATA:
                self.file.pwrite(e * SECTOR + within, mv[pos:pos + n])
            elif within == 0 and n == gb:
                n = self._write_new_grains(g, mv[pos:], total - pos)
            else:
                self._write_partial_grain(g, e, within, mv[pos:pos + n], parent_read)
            pos += n

    def _write_new_grains(self, g: int, mv: memoryview, left: int) -> int:
        """Whole unallocated grains from ``g`` on: one allocation, one write.
        Returns the bytes written."""
        gb = self.grain_bytes
        run = gb
        while run + gb <= left and self.status_of(self.gte(g + run // gb)) != Status.DATA:
            run += gb
        host = self.alloc(run)
        self.file.pwrite(host, mv[:run])
        for k in range(run // gb):
            self.set_gte(g + k, host // SECTOR + k * self.grain)
        return run

    def _write_partial_grain(self, g: int, e: int, within: int, piece, parent_read) -> None:
        """Part of an unallocated or zeroed grain: copy-on-write from what
        the grain showed (the parent's data, or zeros)."""
        gb = self.grain_bytes
        if e == 0:
            gstart = g * gb
            avail = min(gb, self.size - gstart)
            buf = bytearray(parent_read(gstart, avail))
            if len(buf) < gb:
                buf += bytes(gb - len(buf))
        else:
            buf = bytearray(gb)
        buf[within:within + len(piece)] = piece
        host = self.alloc(gb)
        self.file.pwrite(host, buf)
        self.set_gte(g, host // SECTOR)

    def write_zeroes(self, offset: int, length: int, has_parent: bool,
                     parent_read: Callable[[int, int], bytes]) -> None:
        self._refuse_stream()
        gb = self.grain_bytes
        pos = offset
        end = offset + length
        while pos < end:
            g = pos // gb
            within = pos - g * gb
            n = min(gb - within, end - pos)
            e = self.gte(g)
            st = self.status_of(e)
            whole = within == 0 and (n == gb or pos + n >= self.size)
            if whole:
                if self.zero_grain and (has_parent or e > GTE_ZERO):
                    if e != GTE_ZERO:
                        self.set_gte(g, GTE_ZERO)
                elif not has_parent:
                    if e != 0:
                        self.set_gte(g, 0)
                elif st != Status.ZERO:
                    self.write(pos, memoryview(bytes(n)), parent_read)
            elif st == Status.DATA:
                self.file.pwrite(e * SECTOR + within, bytes(n))
            elif st == Status.UNALLOCATED and has_parent:
                self.write(pos, memoryview(bytes(n)), parent_read)
            pos += n

    # == metadata ======================================================================
    def flush_metadata(self, sync: bool = True) -> None:
        if not (self._gt_dirty or self._gd_dirty or self._released):
            return
        if sync:
            self.file.flush()  # data before the tables that point at it
        mark = sync and self.rgd is not None and not self.unclean
        if mark:
            # Primary and redundant tables are two writes: a crash between
            # them leaves them out of step.  uncleanShutdown says so (as
            # VMware uses it), and check then treats a stale redundant copy
            # as harmless (a leak that -r leaks rewrites), not as corruption.
            self.unclean = 1
            self.file.pwrite(0, self.header_bytes())
            self.file.flush()
        self._write_dirty_tables()
        if self._gd_dirty:
            if sync:
                self.file.flush()  # new tables before the directory points at them
            self.write_directories()
        if sync:
            self.file.flush()
        if mark:
            self.unclean = 0  # both copies are in step again
            self.file.pwrite(0, self.header_bytes())
            self.file.flush()
        self._punch_released()

    def _write_dirty_tables(self) -> None:
        for ti in sorted(self._gt_dirty):
            raw = le_bytes(self._gt_cache[ti])
            self.file.pwrite(self.gd[ti] * SECTOR, raw)
            if self.rgd is not None and self.rgd[ti]:
                self.file.pwrite(self.rgd[ti] * SECTOR, raw)
        self._gt_dirty.clear()

    def _punch_released(self) -> None:
        released, self._released = self._released, []
        data_start = self.overhead * SECTOR
        for off in released:
            if off >= data_start and off + self.grain_bytes <= self.file_size_now():
                self.file.punch_hole(off, self.grain_bytes)

    def write_directories(self) -> None:
        """Both directories as they are in memory (then they are in step)."""
        self.file.pwrite(self.gd_offset * SECTOR, le_bytes(self.gd))
        if self.rgd is not None:
            self.file.pwrite(self.rgd_offset * SECTOR, le_bytes(self.rgd))
        self._gd_dirty = False

    def file_size_now(self) -> int:
        return self.file.size()

    def file_truncated(self) -> None:
        """The file was cut short (compact): allocate from its new end."""
        self.file_size = self.file.size()
        self.next_alloc = align_up(self.file_size, SECTOR)

    def header_bytes(self) -> bytes:
        return SPARSE_HEADER.pack(new_header(
            version=self.version, flags=self.flags, capacity=self.capacity, grainSize=self.grain,
            descriptorOffset=self.desc_offset, descriptorSize=self.desc_size, numGTEsPerGT=self.gtes,
            rgdOffset=self.rgd_offset, gdOffset=self.gd_offset, overHead=self.overhead,
            uncleanShutdown=self.unclean, compressAlgorithm=self.compress_algorithm))

    def write_header(self) -> None:
        """The header as it is in memory, flushed."""
        self.file.pwrite(0, self.header_bytes())
        self.file.flush()

    def metadata_ranges(self) -> list:
        """Byte ranges of the file that hold metadata (header, descriptor,
        directories, grain tables): sorted and merged, so that they are
        disjoint and a grain is tested against its neighbours only."""
        r = [(0, SECTOR)]
        if self.desc_offset:
            r.append((self.desc_offset * SECTOR, (self.desc_offset + self.desc_size) * SECTOR))
        area = ceil_div(max(self.gd_entries, 1) * 4, SECTOR) * SECTOR
        r.append((self.gd_offset * SECTOR, self.gd_offset * SECTOR + area))
        if self.rgd is not None:
            r.append((self.rgd_offset * SECTOR, self.rgd_offset * SECTOR + area))
        gtb = self.gt_sectors * SECTOR
        for d, scan in ((self.gd, self.table_scan()), (self.rgd, self.rgd_scan())):
            if d is None:
                continue
            for i0, i1, first, stride in scan.segs:
                if stride == self.gt_sectors:
                    r.append((first * SECTOR, (first + (i1 - i0) * stride) * SECTOR))  # back to back: one range
                else:
                    r += [(v * SECTOR, v * SECTOR + gtb) for v in d[i0:i1] if v]
        r.sort()
        out = []
        for a, b in r:
            if out and a <= out[-1][1]:
                if b > out[-1][1]:
                    out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def all_tables(self):
        """Yield (first grain index, copy of the grain table) for every
        table with an allocated or zero entry."""
        n = self.gd_entries
        gtes = self.gtes
        scan = self.table_scan()
        ti = scan.next_table(0, n)
        while ti < n:
            t = self.gt(ti)
            if t is not None and not self.table_is_empty(t):
                yield ti * gtes, array(t.typecode, t)  # callers may change entries while they walk
            ti = scan.next_table(ti + 1, n)

    def all_gtes(self):
        """Yield (grain index, entry) for every allocated or zero entry."""
        for base, t in self.all_tables():
            yield from table_gtes(base, t)


def table_gtes(base: int, t: array):
    """(grain index, entry) for the non-zero entries of the table whose first grain is ``base``."""
    return zip(_select(range(base, base + len(t)), t), filter(None, t))


# == layout of new sparse extents (as qemu-img and VMware lay them out) ==================

def sparse_layout(capacity: int, grain: int = DEFAULT_GRAIN_SECTORS, gtes: int = DEFAULT_GTES,
                  desc_offset: int = 1, desc_size: int = DEFAULT_DESCRIPTOR_SECTORS) -> dict:
    grains = ceil_div(capacity, grain)
    gt_count = ceil_div(grains, gtes)
    gt_sectors = ceil_div(gtes * 4, SECTOR)
    gd_sectors = ceil_div(gt_count * 4, SECTOR)
    rgd = desc_offset + desc_size if desc_offset else 1
    gd = rgd + gd_sectors + gt_sectors * gt_count
    overhead = ceil_div(gd + gd_sectors + gt_sectors * gt_count, grain) * grain
    return {"gt_count": gt_count, "gt_sectors": gt_sectors, "gd_sectors": gd_sectors, "rgd": rgd, "gd": gd,
            "overhead": overhead}


def write_new_sparse(file, capacity: int, *, version: int, flags: int, desc: bytes | None,
                     desc_size: int = DEFAULT_DESCRIPTOR_SECTORS, grain: int = DEFAULT_GRAIN_SECTORS,
                     compress: int = 0) -> None:
    """Header, embedded descriptor, redundant and primary directories with
    their (empty) grain tables; the file ends at the first grain."""
    lay = sparse_layout(capacity, grain, DEFAULT_GTES, 1, desc_size)
    n = lay["gt_count"]
    gts = lay["gt_sectors"]
    rgd_tables = lay["rgd"] + lay["gd_sectors"]
    gd_tables = lay["gd"] + lay["gd_sectors"]
    # C-level: list comprehensions of 2M entries cost a third of a second
    rgd = array(U32, range(rgd_tables, rgd_tables + n * gts, gts))
    gd = array(U32, range(gd_tables, gd_tables + n * gts, gts))
    file.truncate(lay["overhead"] * SECTOR)
    file.pwrite(0, SPARSE_HEADER.pack(new_header(
        version=version, flags=flags, capacity=capacity, grainSize=grain, descriptorOffset=1,
        descriptorSize=desc_size, numGTEsPerGT=DEFAULT_GTES, rgdOffset=lay["rgd"], gdOffset=lay["gd"],
        overHead=lay["overhead"], compressAlgorithm=compress)))
    if desc is not None:
        if len(desc) > desc_size * SECTOR:
            raise VdError(f"descriptor of {len(desc)} bytes does not fit in {desc_size} sectors", file.path)
        file.pwrite(SECTOR, desc)
    if n:
        file.pwrite(lay["rgd"] * SECTOR, le_bytes(rgd))
        file.pwrite(lay["gd"] * SECTOR, le_bytes(gd))

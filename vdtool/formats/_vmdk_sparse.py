"""VMDK hosted sparse extents (magic KDMV, versions 1-3): grain directory,
redundant grain directory, grain tables, zeroed grains, compressed grains
with markers (streamOptimized), and a sequential stream writer.

Offsets in the header, the directories and the tables are in 512-byte
sectors.  Every header field and directory entry is checked at open; grain
table entries are checked when used."""

from __future__ import annotations

import bisect
import functools
import re
import struct
import sys
import zlib
from array import array
from itertools import compress as _select
from typing import Callable, Optional

from vdtool.core.backend import Status
from vdtool.core.errors import CorruptImageError, FormatError, NotSupported, UnsupportedFeature, VdError

# -- on-disk layout (VMware "Virtual Disk Format 5.0", SparseExtentHeader) ------------

SECTOR = 512
MAGIC = b"KDMV"
# magicNumber, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, singleEndLineChar, nonEndLineChar,
# doubleEndLineChar1, doubleEndLineChar2, compressAlgorithm, pad
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
assert HEADER.size == SECTOR
OFS_CAPACITY = 12
OFS_GD = 48  # rgdOffset, gdOffset
U64 = struct.Struct("<Q")
TWO_U64 = struct.Struct("<QQ")
# Stream markers: a grain marker is (lba, size) followed by the compressed data; a metadata marker is
# (numSectors, size = 0, type) padded to a sector.
GRAIN_MARKER = struct.Struct("<QI")
META_MARKER = struct.Struct("<QII")
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

NL_CHARS = b"\n \r\n"
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
FLAGS_KNOWN = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZERO = 1

MAX_CAPACITY_BYTES = 1 << 56
MAX_GRAIN_SECTORS = 1 << 16  # 32 MiB grains
MAX_GTES_PER_GT = 512  # QEMU's limit; VMware always writes 512
MAX_GD_ENTRIES = 1 << 25
MAX_DESCRIPTOR_BYTES = 1 << 20
DEFAULT_GRAIN_SECTORS = 128
DEFAULT_GTES = 512

_LITTLE = sys.byteorder == "little"
_U32 = "I" if array("I").itemsize == 4 else "L"


def le_u32_array(raw) -> array:
    a = array(_U32)
    a.frombytes(raw)
    if not _LITTLE:
        a.byteswap()
    return a


def le_u32_bytes(a: array) -> bytes:
    if not _LITTLE:
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# == which grain tables can hold entries ===================================================
#
# A 64 TiB extent has 2M grain tables, nearly all of them holes in the file
# (qemu-img, VMware and VirtualBox lay every table out at create time and
# leave it unwritten).  Reading each to learn it is empty took tens of
# seconds; TableScan asks the file where its data is instead.

SCAN_TABLES = 2048  # tables looked at per step: at most 8 MiB read at once
_SCAN_BLOCK = 32  # tables compared with zeros in one go inside a step
MIN_RUN = 32  # shorter stretches of a directory are not searched for runs


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    return bytes(n)  # shared: a split image has thousands of extents


def directory_runs(d: array, slot: int) -> list:
    """``d`` cut into stretches, in order: (i0, i1, first, stride) for a run
    of tables at a fixed stride (``d[i] == first + (i - i0) * stride``,
    ``stride >= slot`` sectors: qemu-img, VMware and VirtualBox lay every
    table out back to back, a resize appends another run), (i0, i1, 0, 0)
    for a loose stretch (zero entries, tables in any order)."""
    out: list = []
    todo = [(0, len(d))] if len(d) else []
    while todo:
        lo, hi = todo.pop()
        if hi - lo >= 2:
            first = d[lo]
            stride = d[lo + 1] - first
            # endpoints first; then one C-level compare (a Python loop over 2M entries costs a second)
            if (first and stride >= slot and d[hi - 1] == first + (hi - 1 - lo) * stride
                    and d[lo:hi] == array(d.typecode, range(first, first + (hi - lo) * stride, stride))):
                _add_stretch(out, lo, hi, first, stride)
                continue
        if hi - lo <= MIN_RUN:
            _add_stretch(out, lo, hi, 0, 0)
            continue
        mid = (lo + hi) // 2
        todo.append((mid, hi))
        todo.append((lo, mid))
    # halving leaves a loose stretch where one run ends and the next begins
    # off the halving points: give the runs back what continues them
    res: list = []
    for k, (lo, hi, first, stride) in enumerate(out):
        if not stride:
            if res and res[-1][3]:
                plo, phi, pfirst, pstride = res[-1]
                while lo < hi and d[lo] == pfirst + (lo - plo) * pstride:
                    lo += 1
                res[-1] = (plo, lo, pfirst, pstride)
            if k + 1 < len(out) and out[k + 1][3]:
                nlo, nhi, nfirst, nstride = out[k + 1]
                while hi > lo and d[hi - 1] and d[hi - 1] == nfirst - (nlo - hi + 1) * nstride:
                    hi -= 1
                out[k + 1] = (hi, nhi, nfirst - (nlo - hi) * nstride, nstride)
            if lo == hi:
                continue
        _add_stretch(res, lo, hi, first, stride)
    return res


def _add_stretch(out: list, lo: int, hi: int, first: int, stride: int) -> None:
    if out:
        plo, phi, pfirst, pstride = out[-1]
        if pstride == stride and (not stride or pfirst + (phi - plo) * stride == first):
            out[-1] = (plo, hi, pfirst, pstride)
            return
    out.append((lo, hi, first, stride))


class TableScan:
    """The tables of one directory that may hold entries, in order.  A
    superset: a table it names may still be all zeros, one it skips is all
    zeros (a hole, zeros in the file, or a zero directory entry).

    Where the directory runs at a fixed stride (see ``directory_runs``) the
    tables of the run lie in one area of the file: only the parts of it that
    hold data (SEEK_DATA/SEEK_HOLE, once per data extent) are read, so
    walking an empty 64 TiB extent costs a few lseeks.  Loose stretches are
    read table by table.  Either way tables are looked at SCAN_TABLES at a
    time, when a walk first reaches them, and what was found is kept.

    ``dirty`` is the extent's set of tables changed in memory and not yet in
    the file; ``note`` is told of every table that gains an entry, so what
    is kept stays a superset while the image is written."""

    def __init__(self, file, d: array, step: int, table_bytes: int, dirty):
        self.file = file
        self.d = d
        self.n = len(d)
        self.step = step
        self.slot = step * SECTOR
        self.table_bytes = table_bytes
        self.dirty = dirty
        self.segs = directory_runs(d, step)
        self._seg_starts = [s[0] for s in self.segs]
        self._los: Optional[list] = None  # table ranges [lo, hi) that may hold entries: disjoint, sorted
        self._his: list = []
        self._chunks: dict = {}  # chunk -> sorted array of the table indices in it that may hold entries
        self._noted: dict = {}  # chunk not looked at yet -> tables given entries since the ranges were taken
        self._xchunks: list = []  # sorted: chunks with noted tables (they may lie outside the ranges)

    @property
    def loose_count(self) -> int:
        return sum(i1 - i0 for i0, i1, first, stride in self.segs if not stride)

    def top(self) -> int:
        """The largest entry."""
        top = 0
        for i0, i1, first, stride in self.segs:
            top = max(top, d_max(self.d, i0, i1) if not stride else self.d[i1 - 1])
        return top

    def _ranges(self) -> None:
        los, his = [], []

        def add(lo, hi):
            if his and lo <= his[-1]:
                his[-1] = max(his[-1], hi)
            else:
                los.append(lo)
                his.append(hi)

        f, slot = self.file, self.slot
        for i0, i1, first, stride in self.segs:
            if not stride:
                add(i0, i1)  # every table of a loose stretch is looked at
                continue
            base, sb = first * SECTOR, stride * SECTOR
            end = base + (i1 - i0 - 1) * sb + slot
            pos = base
            while pos < end:
                a = f.next_data(pos)
                if a >= end:
                    break
                b = min(f.next_hole(a), end)
                if b <= a:
                    b = end  # the file changed under us: take the rest as data
                add(i0 + (a - base) // sb, min(i1, i0 + ceil_div(b - base, sb)))
                pos = b
        self._los, self._his = los, his
        # tables changed in memory only: the file does not show them yet
        for ti in self.dirty:
            if 0 <= ti < self.n:
                self._noted.setdefault(ti // SCAN_TABLES, set()).add(ti)
        self._xchunks = sorted(self._noted)

    def note(self, ti: int) -> None:
        """Table ``ti`` gains an entry (it is in ``dirty`` until flushed)."""
        if self._los is None or not 0 <= ti < self.n:
            return  # _ranges() has not run: it will see the table, in the file or in ``dirty``
        c = ti // SCAN_TABLES
        arr = self._chunks.get(c)
        if arr is not None:
            j = bisect.bisect_left(arr, ti)
            if j == len(arr) or arr[j] != ti:
                arr.insert(j, ti)
        else:
            self._noted.setdefault(c, set()).add(ti)
        x = self._xchunks
        j = bisect.bisect_left(x, c)
        if j == len(x) or x[j] != c:
            x.insert(j, c)  # once per chunk: at most n / SCAN_TABLES inserts

    def next_table(self, ti: int, end: int) -> int:
        """The first table at or after ``ti`` (and before ``end``) that may
        hold entries; ``end`` when there is none."""
        if self._los is None:
            self._ranges()
        end = min(end, self.n)
        los, his, xch = self._los, self._his, self._xchunks
        while ti < end:
            # the next table the file has data for, or a noted chunk, whichever comes first
            k = bisect.bisect_right(his, ti)
            nxt = max(ti, los[k]) if k < len(los) else end
            if xch:
                j = bisect.bisect_left(xch, ti // SCAN_TABLES)
                if j < len(xch):
                    nxt = min(nxt, max(ti, xch[j] * SCAN_TABLES))
            ti = nxt
            if ti >= end:
                return end
            c = ti // SCAN_TABLES
            arr = self._chunks.get(c)
            if arr is None:
                arr = self._chunks[c] = self._scan_chunk(c)
            j = bisect.bisect_left(arr, ti)
            if j < len(arr):
                return min(arr[j], end)
            ti = (c + 1) * SCAN_TABLES
        return end

    def _scan_chunk(self, c: int) -> array:
        lo, hi = c * SCAN_TABLES, min(self.n, (c + 1) * SCAN_TABLES)
        found = self._noted.pop(c, set())
        los, his, segs = self._los, self._his, self.segs
        k = bisect.bisect_right(his, lo)
        while k < len(los) and los[k] < hi:
            a, b = max(lo, los[k]), min(hi, his[k])
            j = bisect.bisect_right(self._seg_starts, a) - 1
            while a < b:  # a range may span stretches
                i0, i1, first, stride = segs[j]
                e = min(b, i1)
                if stride and stride <= 2 * self.step:
                    found.update(self._scan_run(a, e, i0, first, stride))
                else:
                    found.update(self._scan_each(a, e))
                a = e
                j += 1
            k += 1
        return array("q", sorted(found))

    def _scan_run(self, a: int, b: int, i0: int, first: int, stride: int) -> list:
        """Tables a..b of a run, in one read (at most SCAN_TABLES strides)."""
        slot, sb = self.slot, stride * SECTOR
        buf = self.file.pread((first + (a - i0) * stride) * SECTOR, (b - a - 1) * sb + slot)
        # tables past the end of the file are not empty: gt() reports them
        out = list(range(a + ceil_div(len(buf), sb), b))
        if buf.count(0) == len(buf):
            return out
        zslot = _zeros(slot)
        if sb != slot:
            out += [a + k for k in range(ceil_div(len(buf), sb)) if not buf.startswith(zslot, k * sb)]
            return out
        zblock = _zeros(slot * _SCAN_BLOCK)
        bl = len(zblock)
        for off in range(0, len(buf), bl):
            if buf.startswith(zblock, off):
                continue
            for o in range(off, min(off + bl, len(buf)), slot):
                if not buf.startswith(zslot, o):  # a short tail counts as not empty
                    out.append(a + o // slot)
        return out

    def _scan_each(self, a: int, b: int) -> list:
        d, f, tb = self.d, self.file, self.table_bytes
        z = _zeros(tb)
        # a short read (past the end of the file) is not empty: gt() reports it
        return [t for t in _select(range(a, b), d[a:b]) if f.pread(d[t] * SECTOR, tb) != z]


def d_max(d: array, i0: int, i1: int) -> int:
    return max(d[i0:i1]) if i1 > i0 else 0


# Runs of little-endian entries, matched from an entry's offset, four bytes
# at a time (so they stay aligned): unallocated, zeroed-grain marker, data.
_ZERO_RUN = re.compile(rb"(?:\x00\x00\x00\x00)*")
_MARK_RUN = re.compile(rb"(?:\x01\x00\x00\x00)*")
_DATA_RUN = re.compile(rb"(?:(?!\x00\x00\x00\x00)[\s\S]{4})*")
_DATA_RUN_ZG = re.compile(rb"(?:(?!\x00\x00\x00\x00|\x01\x00\x00\x00)[\s\S]{4})*")


def pad_sector(n: int) -> int:
    return ceil_div(n, SECTOR) * SECTOR


def pack_header(*, version: int, flags: int, capacity: int, grain: int, desc_offset: int, desc_size: int,
                gtes: int, rgd: int, gd: int, overhead: int, compress: int, unclean: int = 0) -> bytes:
    return HEADER.pack(MAGIC, version, flags, capacity, grain, desc_offset, desc_size, gtes, rgd, gd, overhead,
                       unclean, NL_CHARS, compress)


def compress_grain(data, grain_bytes: int, level: int = 6) -> bytes:
    """One grain as VMware stores it: zlib stream (RFC 1950) of the whole grain."""
    if len(data) < grain_bytes:
        data = bytes(data) + bytes(grain_bytes - len(data))
    return zlib.compress(data, level)


def probe_header(head: bytes) -> int:
    if len(head) < HEADER.size or head[:4] != MAGIC:
        return 0
    version = struct.unpack_from("<I", head, 4)[0]
    return 100 if 1 <= version <= 3 else 90


class SparseExtent:
    """One KDMV file.  ``capacity`` and offsets in sectors; the methods take
    byte offsets relative to the extent's start."""

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
        self._scan: Optional[TableScan] = None  # built from the directories at open, rebuilt when they change
        self._rscan: Optional[TableScan] = None
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
        h = HEADER.unpack(raw)
        if h[0] != MAGIC:
            raise FormatError(f"not a VMDK sparse extent (magic {h[0]!r})", self.path)
        self._parse_fields(h, fsize)
        if self.gd_offset == GD_AT_END:
            if not self.markers:
                raise self._err("grain directory offset is the at-end marker but the image has no markers")
            self._read_footer(fsize)
        self._check_tables(fsize)

    def _parse_fields(self, h, fsize: int, footer: bool = False) -> None:
        (_, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead, unclean, nl,
         compress) = h
        what = "footer" if footer else "header"
        if version < 1 or version > 3:
            raise UnsupportedFeature(f"VMDK sparse extent version {version} is not supported (1 to 3 are)",
                                     self.path)
        if flags & FLAG_NL_DETECT and nl != NL_CHARS:
            raise self._err(f"{what} newline check characters are {nl!r}, not {NL_CHARS!r} (the file was "
                            f"transferred in text mode)")
        if grain == 0 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
            raise self._err(f"grain size {grain} sectors is not a power of two between 1 and "
                            f"{MAX_GRAIN_SECTORS}")
        if gtes == 0 or gtes > MAX_GTES_PER_GT:
            raise self._err(f"numGTEsPerGT {gtes} is not between 1 and {MAX_GTES_PER_GT}")
        if capacity * SECTOR > MAX_CAPACITY_BYTES:
            raise self._err(f"capacity {capacity} sectors is beyond the limit of 2^56 bytes")
        if flags & FLAG_COMPRESSED and compress != COMPRESSION_DEFLATE:
            raise UnsupportedFeature(f"compression algorithm {compress} is not supported (1, deflate, is)",
                                     self.path)
        if not flags & FLAG_COMPRESSED and compress not in (0, 1):
            raise UnsupportedFeature(f"compression algorithm {compress} is not supported", self.path)
        if desc_off or desc_size:
            if desc_size * SECTOR > MAX_DESCRIPTOR_BYTES:
                raise self._err(f"descriptor size {desc_size} sectors is larger than 1 MiB")
            if desc_off == 0 or desc_off > fsize // SECTOR or (desc_off + desc_size) * SECTOR > max(fsize, SECTOR):
                raise self._err(f"descriptor at sector {desc_off} ({desc_size} sectors) lies outside the file "
                                f"({fsize} bytes)")
        self.version = version
        self.flags = flags
        self.capacity = capacity
        self.grain = grain
        self.grain_bytes = grain * SECTOR
        self.desc_offset = desc_off
        self.desc_size = desc_size
        self.gtes = gtes
        self.rgd_offset = rgd if flags & FLAG_RGD else 0
        self.gd_offset = gd
        self.overhead = overhead
        self.unclean = unclean
        self.compress_algorithm = compress
        self.compressed = bool(flags & FLAG_COMPRESSED)
        self.markers = bool(flags & FLAG_MARKERS)
        self.zero_grain = bool(flags & FLAG_ZERO_GRAIN)
        self.gt_span = gtes * self.grain_bytes  # bytes of disk one grain table covers
        self.gt_bytes = gtes * 4
        self._zero_gt = _zeros(self.gt_bytes)
        self.gt_sectors = ceil_div(self.gt_bytes, SECTOR)
        self.gd_entries = ceil_div(capacity * SECTOR, self.gt_span) if capacity else 0
        if self.gd_entries > MAX_GD_ENTRIES:
            raise self._err(f"grain directory of {self.gd_entries} entries is larger than {MAX_GD_ENTRIES}")

    def _read_footer(self, fsize: int) -> None:
        # footer marker, footer, end-of-stream marker: the last three sectors
        if fsize < 4 * SECTOR:
            raise self._err(f"file of {fsize} bytes is too short for a stream footer")
        tail = self.file.pread_exact(fsize - 3 * SECTOR, 3 * SECTOR, "stream footer")
        n, size, mtype = META_MARKER.unpack_from(tail, 0)
        en, esize, etype = META_MARKER.unpack_from(tail, 2 * SECTOR)
        if mtype != MARKER_FOOTER or etype != MARKER_EOS or en != 0:
            raise self._err(f"grain directory is at the end but no footer was found (marker type {mtype}, "
                            f"end-of-stream type {etype})")
        h = HEADER.unpack_from(tail, SECTOR)
        if h[0] != MAGIC:
            raise self._err(f"stream footer has magic {h[0]!r}")
        old_capacity = self.capacity
        self._parse_fields(h, fsize, footer=True)
        if self.gd_offset == GD_AT_END:
            raise self._err("stream footer still has the at-end grain directory offset")
        if self.capacity != old_capacity:
            raise self._err(f"stream footer capacity {self.capacity} differs from the header's {old_capacity}")
        self.footer_used = True

    def _check_tables(self, fsize: int) -> None:
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
        self.next_alloc = pad_sector(fsize)

    def _load_dir(self, name: str, offset: int, n: int, fsize: int) -> array:
        if n == 0:
            return array(_U32)
        if offset == 0 or offset * SECTOR + n * 4 > fsize:
            raise self._err(f"{name} at sector {offset} ({n} entries) lies outside the file ({fsize} bytes)")
        return le_u32_array(self.file.pread_exact(offset * SECTOR, n * 4, name))

    # == grain tables ==================================================================
    def _new_scan(self, d: array) -> TableScan:
        return TableScan(self.file, d, self.gt_sectors, self.gt_bytes, self._gt_dirty)

    def table_scan(self) -> TableScan:
        """Which primary grain tables may hold entries."""
        s = self._scan
        if s is None or s.d is not self.gd or s.n != len(self.gd):
            s = self._scan = self._new_scan(self.gd)
        return s

    def rgd_scan(self) -> Optional[TableScan]:
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

    def gt(self, i: int) -> Optional[array]:
        t = self._gt_cache.get(i)
        if t is not None:
            return t
        off = self.gd[i]
        if off == 0:
            return None
        t = le_u32_array(self.file.pread_exact(off * SECTOR, self.gt_bytes, f"grain table {i}"))
        if len(self._gt_cache) > 65536:
            for k in [k for k in self._gt_cache if k not in self._gt_dirty]:
                del self._gt_cache[k]
        self._gt_cache[i] = t
        return t

    def gte(self, g: int) -> int:
        t = self.gt(g // self.gtes)
        return 0 if t is None else t[g % self.gtes]

    def _status_of(self, e: int) -> Status:
        if e == 0:
            return Status.UNALLOCATED
        if e == GTE_ZERO and self.zero_grain:
            return Status.ZERO
        return Status.DATA

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
        m = pat.match(le_u32_bytes(t), 4 * j)
        return self._status_of(e), max(j + 1, m.end() // 4)

    def _grain_data(self, e: int, g: int) -> bytes:
        """A compressed grain, decompressed (the last one cached)."""
        if self._zcache[0] == e:
            return self._zcache[1]
        gb = self.grain_bytes
        off = e * SECTOR
        fsize = self.file_size
        if off >= fsize:
            raise self._err(f"compressed grain {g} at sector {e} lies past the end of the file ({fsize} bytes)")
        if self.markers:
            head = self.file.pread_exact(off, GRAIN_MARKER.size, f"grain marker of grain {g}")
            lba, size = GRAIN_MARKER.unpack(head)
            if size == 0 or size > 2 * gb + 1024 or off + GRAIN_MARKER.size + size > fsize:
                raise self._err(f"compressed grain {g} at sector {e} has size {size}, past the end of the file "
                                f"({fsize} bytes) or larger than twice the grain")
            comp = self.file.pread(off + GRAIN_MARKER.size, size)
        else:
            comp = self.file.pread(off, min(2 * gb + 1024, fsize - off))
        try:
            d = zlib.decompressobj()
            out = d.decompress(comp, gb)
            if d.unconsumed_tail and self.markers:
                raise self._err(f"compressed grain {g} at sector {e} inflates to more than the grain size {gb}")
        except zlib.error as ex:
            raise self._err(f"compressed grain {g} at sector {e} cannot be inflated: {ex}") from None
        if len(out) < gb:
            out += bytes(gb - len(out))
        self._zcache = (e, out)
        return out

    def readinto(self, offset: int, mv: memoryview) -> None:
        gb = self.grain_bytes
        pos = 0
        total = len(mv)
        limit = max(self.file_size, self.next_alloc)
        while pos < total:
            voff = offset + pos
            g = voff // gb
            within = voff - g * gb
            n = min(gb - within, total - pos)
            e = self.gte(g) if voff < self.size else 0
            st = self._status_of(e)
            if st != Status.DATA:
                mv[pos:pos + n] = bytes(n)
            elif self.compressed:
                mv[pos:pos + n] = memoryview(self._grain_data(e, g))[within:within + n]
            else:
                host = e * SECTOR + within
                if host >= limit:
                    raise self._err(f"grain {g} at sector {e} lies past the end of the file ({limit} bytes)")
                # merge grains that lie one after another in the file
                run = n
                while pos + run < total:
                    g2 = g + ceil_div(within + run, gb)
                    if g2 * gb >= self.size:
                        break
                    e2 = self.gte(g2)
                    if e2 != e + (g2 - g) * self.grain or self._status_of(e2) != Status.DATA:
                        break
                    run += min(gb, total - pos - run)
                self.file.readinto(host, mv[pos:pos + run])
                n = run
            pos += n

    # == writing =======================================================================
    def _alloc(self, nbytes: int) -> int:
        off = self.next_alloc
        if (off + nbytes) // SECTOR > 0xFFFFFFFF:
            raise VdError("extent file is full: sector offsets past 2^32 cannot be recorded", self.path)
        self.next_alloc = off + nbytes
        return off

    def _new_gt(self, ti: int) -> array:
        nb = self.gt_sectors * SECTOR
        off = self._alloc(nb)
        self.file.pwrite(off, bytes(nb))
        self.gd[ti] = off // SECTOR
        if self.rgd is not None:
            roff = self._alloc(nb)
            self.file.pwrite(roff, bytes(nb))
            self.rgd[ti] = roff // SECTOR
        self._gd_dirty = True
        t = array(_U32, bytes(self.gt_bytes))
        self._gt_cache[ti] = t
        return t

    def _set_gte(self, g: int, value: int) -> None:
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

    def write(self, offset: int, mv: memoryview, parent_read: Callable[[int, int], bytes]) -> None:
        """``parent_read(offset, length)`` takes extent-relative offsets."""
        if self.compressed:
            raise NotSupported("writing", "vmdk", self.path,
                               "streamOptimized images are written once, in one pass, when converted")
        gb = self.grain_bytes
        pos = 0
        total = len(mv)
        while pos < total:
            voff = offset + pos
            g = voff // gb
            within = voff - g * gb
            n = min(gb - within, total - pos)
            e = self.gte(g)
            if self._status_of(e) == Status.DATA:
                host = e * SECTOR + within
                self.file.pwrite(host, mv[pos:pos + n])
                pos += n
                continue
            if within == 0 and n == gb:
                # whole unallocated grains: one allocation, one write
                run = gb
                while pos + run + gb <= total and self._status_of(self.gte(g + run // gb)) != Status.DATA:
                    run += gb
                host = self._alloc(run)
                self.file.pwrite(host, mv[pos:pos + run])
                for k in range(run // gb):
                    self._set_gte(g + k, host // SECTOR + k * self.grain)
                pos += run
                continue
            # partial grain: copy-on-write from what the grain showed
            if e == 0:
                gstart = g * gb
                avail = min(gb, self.size - gstart)
                buf = bytearray(parent_read(gstart, avail))
                if len(buf) < gb:
                    buf += bytes(gb - len(buf))
            else:
                buf = bytearray(gb)
            buf[within:within + n] = mv[pos:pos + n]
            host = self._alloc(gb)
            self.file.pwrite(host, buf)
            self._set_gte(g, host // SECTOR)
            pos += n

    def write_zeroes(self, offset: int, length: int, has_parent: bool,
                     parent_read: Callable[[int, int], bytes]) -> None:
        if self.compressed:
            raise NotSupported("writing", "vmdk", self.path,
                               "streamOptimized images are written once, in one pass, when converted")
        gb = self.grain_bytes
        pos = offset
        end = offset + length
        while pos < end:
            g = pos // gb
            within = pos - g * gb
            n = min(gb - within, end - pos)
            e = self.gte(g)
            st = self._status_of(e)
            whole = within == 0 and (n == gb or pos + n >= self.size)
            if whole:
                if self.zero_grain and (has_parent or e > GTE_ZERO):
                    if e != GTE_ZERO:
                        self._set_gte(g, GTE_ZERO)
                elif not has_parent:
                    if e != 0:
                        self._set_gte(g, 0)
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
        for ti in sorted(self._gt_dirty):
            raw = le_u32_bytes(self._gt_cache[ti])
            self.file.pwrite(self.gd[ti] * SECTOR, raw)
            if self.rgd is not None and self.rgd[ti]:
                self.file.pwrite(self.rgd[ti] * SECTOR, raw)
        self._gt_dirty.clear()
        if self._gd_dirty:
            if sync:
                self.file.flush()  # new tables before the directory points at them
            self.write_directories()
            self._gd_dirty = False
        if sync:
            self.file.flush()
        if mark:
            self.unclean = 0  # both copies are in step again
            self.file.pwrite(0, self.header_bytes())
            self.file.flush()
        released, self._released = self._released, []
        data_start = self.overhead * SECTOR
        for off in released:
            if off >= data_start and off + self.grain_bytes <= self.file_size_now():
                self.file.punch_hole(off, self.grain_bytes)

    def write_directories(self) -> None:
        self.file.pwrite(self.gd_offset * SECTOR, le_u32_bytes(self.gd))
        if self.rgd is not None:
            self.file.pwrite(self.rgd_offset * SECTOR, le_u32_bytes(self.rgd))

    def file_size_now(self) -> int:
        return self.file.size()

    def header_bytes(self) -> bytes:
        flags = self.flags
        return pack_header(version=self.version, flags=flags, capacity=self.capacity, grain=self.grain,
                           desc_offset=self.desc_offset, desc_size=self.desc_size, gtes=self.gtes,
                           rgd=self.rgd_offset, gd=self.gd_offset, overhead=self.overhead,
                           compress=self.compress_algorithm, unclean=self.unclean)

    def all_gtes(self):
        """Yield (grain index, entry) for every allocated or zero entry."""
        n = self.gd_entries
        gtes = self.gtes
        scan = self.table_scan()
        ti = scan.next_table(0, n)
        while ti < n:
            t = self.gt(ti)
            if t is not None and not self.table_is_empty(t):
                t = array(t.typecode, t)  # callers may change entries while they walk
                base = ti * gtes
                yield from zip(_select(range(base, base + len(t)), t), filter(None, t))
            ti = scan.next_table(ti + 1, n)

    def read_grain_raw(self, e: int) -> bytes:
        return self.file.pread(e * SECTOR, self.grain_bytes)


# == layout of new sparse extents (as qemu-img and VMware lay them out) ==================

def sparse_layout(capacity: int, grain: int = DEFAULT_GRAIN_SECTORS, gtes: int = DEFAULT_GTES,
                  desc_offset: int = 1, desc_size: int = 20) -> dict:
    grains = ceil_div(capacity, grain)
    gt_count = ceil_div(grains, gtes)
    gt_sectors = ceil_div(gtes * 4, SECTOR)
    gd_sectors = ceil_div(gt_count * 4, SECTOR)
    rgd = desc_offset + desc_size if desc_offset else 1
    gd = rgd + gd_sectors + gt_sectors * gt_count
    overhead = ceil_div(gd + gd_sectors + gt_sectors * gt_count, grain) * grain
    return {"gt_count": gt_count, "gt_sectors": gt_sectors, "gd_sectors": gd_sectors, "rgd": rgd, "gd": gd,
            "overhead": overhead}


def write_new_sparse(file, capacity: int, *, version: int, flags: int, desc: Optional[bytes],
                     desc_size: int = 20, grain: int = DEFAULT_GRAIN_SECTORS, compress: int = 0) -> None:
    """Header, embedded descriptor, redundant and primary directories with
    their (empty) grain tables; the file ends at the first grain."""
    lay = sparse_layout(capacity, grain, DEFAULT_GTES, 1, desc_size)
    n = lay["gt_count"]
    gts = lay["gt_sectors"]
    rgd_tables = lay["rgd"] + lay["gd_sectors"]
    gd_tables = lay["gd"] + lay["gd_sectors"]
    # C-level: list comprehensions of 2M entries cost a third of a second
    rgd = array(_U32, range(rgd_tables, rgd_tables + n * gts, gts))
    gd = array(_U32, range(gd_tables, gd_tables + n * gts, gts))
    file.truncate(lay["overhead"] * SECTOR)
    file.pwrite(0, pack_header(version=version, flags=flags, capacity=capacity, grain=grain, desc_offset=1,
                               desc_size=desc_size, gtes=DEFAULT_GTES, rgd=lay["rgd"], gd=lay["gd"],
                               overhead=lay["overhead"], compress=compress))
    if desc is not None:
        if len(desc) > desc_size * SECTOR:
            raise VdError(f"descriptor of {len(desc)} bytes does not fit in {desc_size} sectors", file.path)
        file.pwrite(SECTOR, desc)
    if n:
        file.pwrite(lay["rgd"] * SECTOR, le_u32_bytes(rgd))
        file.pwrite(lay["gd"] * SECTOR, le_u32_bytes(gd))


class StreamWriter:
    """streamOptimized in one sequential pass, as VMware lays it out: header
    (gdOffset at end), descriptor, then grains (marker + zlib data) in
    increasing order, each grain table after its grains, the directory, a
    footer and the end-of-stream marker."""

    kind = "STREAM"

    def __init__(self, file, capacity: int, desc: bytes, grain: int = DEFAULT_GRAIN_SECTORS):
        self.file = file
        self.path = file.path
        self.capacity = capacity
        self.grain = grain
        self.grain_bytes = grain * SECTOR
        self.gtes = DEFAULT_GTES
        self.gt_span = self.gtes * self.grain_bytes
        self.gd_entries = ceil_div(capacity * SECTOR, self.gt_span) if capacity else 0
        self.desc_size = max(1, ceil_div(len(desc), SECTOR))
        self.overhead = ceil_div(1 + self.desc_size, grain) * grain
        self.gd = array(_U32, bytes(4 * self.gd_entries))
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
        return pack_header(version=3, flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
                           capacity=self.capacity, grain=self.grain, desc_offset=1, desc_size=self.desc_size,
                           gtes=self.gtes, rgd=0, gd=gd, overhead=self.overhead, compress=COMPRESSION_DEFLATE)

    def _meta(self, sectors: int, mtype: int) -> bytes:
        return META_MARKER.pack(sectors, 0, mtype).ljust(SECTOR, b"\0")

    def _order(self, g: int) -> None:
        if g <= self._last:
            raise NotSupported("writing out of order", "vmdk", self.path,
                               f"streamOptimized is written in one sequential pass; grain {g} comes after "
                               f"grain {self._last}")

    def _emit(self, g: int, comp: bytes) -> None:
        self._order(g)
        ti = g // self.gtes
        if self._gt is not None and self._gt[0] != ti:
            self._write_gt()
        if self._gt is None:
            self._gt = (ti, array(_U32, bytes(4 * self.gtes)))
        rec = GRAIN_MARKER.pack(g * self.grain, len(comp)) + comp
        rec += bytes(pad_sector(len(rec)) - len(rec))
        if (self.pos + len(rec)) // SECTOR > 0xFFFFFFFF:
            raise VdError("stream is full: sector offsets past 2^32 cannot be recorded", self.path)
        self.file.pwrite(self.pos, rec)
        self._gt[1][g % self.gtes] = self.pos // SECTOR
        self.pos += len(rec)
        self._last = g

    def _write_gt(self) -> None:
        ti, t = self._gt
        self._gt = None
        gt_sectors = ceil_div(4 * self.gtes, SECTOR)
        self.file.pwrite(self.pos, self._meta(gt_sectors, MARKER_GT))
        self.pos += SECTOR
        self.file.pwrite(self.pos, le_u32_bytes(t).ljust(gt_sectors * SECTOR, b"\0"))
        self.gd[ti] = self.pos // SECTOR
        self.pos += gt_sectors * SECTOR

    def _flush_pending(self) -> None:
        if self._pending is not None:
            g, buf = self._pending
            self._pending = None
            if buf.count(0) != len(buf):
                self._emit(g, compress_grain(buf, self.grain_bytes))

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
                        self._emit(g, compress_grain(piece, gb))
                    pos += n
                    continue
                self._pending = (g, bytearray(gb))
            self._pending[1][within:within + n] = mv[pos:pos + n]
            pos += n

    def write_compressed(self, offset: int, comp: Optional[bytes], data) -> None:
        gb = self.grain_bytes
        if offset % gb:
            self.write(offset, memoryview(data))
            return
        self._flush_pending()
        g = offset // gb
        self._emit(g, comp if comp is not None else compress_grain(data, gb))

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
        if self.finished:
            return
        self._flush_pending()
        if self._gt is not None:
            self._write_gt()
        gd_bytes = pad_sector(4 * self.gd_entries) if self.gd_entries else SECTOR
        self.file.pwrite(self.pos, self._meta(gd_bytes // SECTOR, MARKER_GD))
        self.pos += SECTOR
        gd_off = self.pos // SECTOR
        self.file.pwrite(self.pos, le_u32_bytes(self.gd).ljust(gd_bytes, b"\0"))
        self.pos += gd_bytes
        self.file.pwrite(self.pos, self._meta(1, MARKER_FOOTER))
        self.pos += SECTOR
        self.file.pwrite(self.pos, self._header(gd_off))
        self.pos += SECTOR
        self.file.pwrite(self.pos, self._meta(0, MARKER_EOS))
        self.pos += SECTOR
        self.file.truncate(self.pos)
        self.finished = True

"""VDI, VirtualBox's native format: normal (dynamic), fixed, undo and
differencing images, header versions 0 and 1.1 (with and without the LCHS
geometry of "1.1+").

Layout: a 72-byte pre-header (text, signature, version), the header, the
block map (one little-endian u32 per block: a data index, FREE or ZERO) and
the data blocks, each ``cbBlockExtra + cbBlock`` bytes, stored in allocation
order from ``offData``.  A differencing image names its parent only by UUID
(uuidLinkage) and the parent's modification UUID at the time it was linked.

Invariants kept on writing (qemu-img check counts violations as
corruptions): every allocated entry is below cBlocksAllocated, no two entries
share a data block, and cBlocksAllocated equals the number of allocated
entries -- a released block is filled by moving the last one into it."""

from __future__ import annotations

import operator
import struct
import sys
import uuid as uuidlib
from array import array
from collections import deque
from itertools import repeat
from typing import Optional

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, ParentRef, ParentSpec, Status
from vdtool.core.errors import (FormatError, NotSupported, ReadOnlyError, UnsupportedFeature,
                                UsageError, VdError)
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress

# -- on-disk structures (VDICore.h names) ------------------------------------------------------
VDIPREHEADER = struct.Struct("<64sII")  # szFileInfo, u32Signature, u32Version
# u32Type, fFlags, szComment, LegacyGeometry(cCylinders, cHeads, cSectors, cbSector), cbDisk, cbBlock,
# cBlocks, cBlocksAllocated, uuidCreate, uuidModify, uuidLinkage
VDIHEADER0 = struct.Struct("<II256sIIIIQIII16s16s16s")
# cbHeader, u32Type, fFlags, szComment, offBlocks, offData, LegacyGeometry, u32Dummy, cbDisk, cbBlock,
# cbBlockExtra, cBlocks, cBlocksAllocated, uuidCreate, uuidModify, uuidLinkage, uuidParentModify
VDIHEADER1 = struct.Struct("<III256sIIIIIIIQIIII16s16s16s16s")
VDIHEADER1PLUS = struct.Struct("<III256sIIIIIIIQIIII16s16s16s16sIIII")  # + LCHSGeometry

VDI_IMAGE_FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
VDI_IMAGE_SIGNATURE = 0xBEDA107F
VDI_IMAGE_VERSION = 0x00010001
VDI_IMAGE_VERSION_OLD = 0x00000002  # header version 0
VDI_GEOMETRY_SECTOR_SIZE = 512
VDI_DATA_ALIGN = 1 << 20
VDI_IMAGE_DEFAULT_BLOCK_SIZE = 1 << 20
VDI_IMAGE_COMMENT_SIZE = 256
VDI_IMAGE_BLOCK_FREE = 0xFFFFFFFF
VDI_IMAGE_BLOCK_ZERO = 0xFFFFFFFE

VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_TYPE_DIFF = 1, 2, 3, 4
TYPE_NAMES = {1: "normal", 2: "fixed", 3: "undo", 4: "diff"}
# fFlags as VirtualBox accepts them: zero-expand (1) and the VD fixed/diff flags shifted down by 8
VDI_FLAGS_VALID = 0x301

MIN_BLOCK = 512
MAX_BLOCK = 1 << 30
MAX_DISK = 1 << 56
NULL_UUID = bytes(16)

# Where vdtool keeps the name of a parent that has no UUID (qcow2, raw): the
# padding between header and block map, which VirtualBox and QEMU ignore.
HINT_OFFSET = 512
HINT_MAGIC = b"vdtool-parent\0\0\0"
HINT = struct.Struct("<16sI")
MAX_HINT_NAME = 4096

_ZERO_CHUNK = bytes(1 << 20)
_LITTLE = sys.byteorder == "little"


def _uuid_str(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes_le=raw))


def _parse_uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(str(text).strip().strip("{}")).bytes_le
    except ValueError:
        raise UsageError(f"invalid UUID {text!r}") from None


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _zeros(n: int):
    return memoryview(_ZERO_CHUNK)[:n] if n <= len(_ZERO_CHUNK) else bytes(n)


# -- scanning the block map without a Python step per entry ------------------------------------
# A 64 TiB image has 2^26 entries.  Runs of one marker are passed over with
# memcmp (bytearray.startswith against a run of the marker), whole chunks at a
# time.  In a chunk that is not uniform, bytes.translate marks the bytes that
# are not 0xff and bytes.find jumps from one marked entry to the next; where
# that finds many, the rest of the chunk is sieved with SWAR arithmetic on one
# big int (32-bit lanes), which yields a flag byte per entry for bytes.find.
# Only the allocated entries then cost Python steps.
_SCAN = 1 << 14  # entries per chunk
_NOT_FF = bytes([1] * 255 + [0])  # translate table: 1 for every byte value but 0xff
_FIND_STEPS = 64  # entries taken one find at a time before a chunk is sieved whole
_FREE_RUN = memoryview(struct.pack("=I", VDI_IMAGE_BLOCK_FREE) * _SCAN)
_ZERO_RUN = memoryview(struct.pack("=I", VDI_IMAGE_BLOCK_ZERO) * _SCAN)
_LANE_ALL = (1 << (32 * _SCAN)) - 1
_LANE_BIT0 = int.from_bytes(b"\x01\0\0\0" * _SCAN, "little")
_LANE_LOW31 = int.from_bytes(b"\xff\xff\xff\x7f" * _SCAN, "little")
_LANE_BIT31 = int.from_bytes(b"\0\0\0\x80" * _SCAN, "little")
_TOP_BYTE = 3 if _LITTLE else 0  # the byte of a native u32 that holds bit 31
_DATA_WINDOW = 64  # first window when measuring a run of allocated entries
_DATA_RUN_CAP = 1 << 13  # a DATA run is reported in pieces of about this many blocks at most


def _frag(prev: Optional[int], vals: list) -> int:
    """Entries of ``vals`` whose block does not follow the one before (``prev``
    for the first)."""
    n = sum(map(operator.ne, vals[1:], map((1).__add__, vals)))
    return n + (prev is not None and vals[0] != prev + 1)


class _MapTally:
    """Allocated entries and fragmented ones (see _map_stats), fed the
    allocated entries chunk by chunk in map order."""

    __slots__ = ("count", "frag", "prev")

    def __init__(self):
        self.count = self.frag = 0
        self.prev: Optional[int] = None

    def add(self, vals: list) -> None:
        self.count += len(vals)
        self.frag += _frag(self.prev, vals)
        self.prev = vals[-1]

    def result(self) -> tuple:
        return self.count, self.frag


def _alloc_flags(seg) -> bytes:
    """One byte per u32 entry of ``seg`` (native order): 0x80 where the entry
    is allocated (below ZERO), 0 where it is a marker."""
    m = len(seg)
    mask = _LANE_ALL if m == 4 * _SCAN else (1 << (8 * m)) - 1
    # a lane is zero exactly where the entry is FREE or ZERO: entry | 1 == 0xffffffff
    z = (int.from_bytes(seg, sys.byteorder) | (_LANE_BIT0 & mask)) ^ mask
    low = _LANE_LOW31 & mask
    # per lane: adding 0x7fffffff to the low 31 bits carries into bit 31 unless they are all zero,
    # and never into the next lane; or-ing z keeps bit 31 itself
    nz = (((z & low) + low) | z) & _LANE_BIT31
    return nz.to_bytes(m, sys.byteorder)[_TOP_BYTE::4]


class VdiBackend(ImageBackend):
    name = "vdi"
    extensions = (".vdi",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID | Cap.ZERO_MARKER)
    variants = ("dynamic", "fixed")
    options = (
        FormatOption("uuid", str, None, "image UUID (default: a new random one)"),
        FormatOption("comment", str, None, "image comment (at most 255 bytes of UTF-8)"),
        FormatOption("static", bool, False, "preallocated image, as qemu-img's static=on (same as --variant fixed)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self._dirty: set = set()
        self._hdr_dirty = False
        self._modified = False  # the modification UUID was renewed in this session
        self._map_problems: list = []
        self._hint: Optional[str] = None
        self._hint_synthetic = False
        self._tail = b""  # header bytes beyond what vdtool knows (cbHeader > 400), kept as is

    # == class level ==============================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if len(head) >= VDIPREHEADER.size:
            _, sig, ver = VDIPREHEADER.unpack_from(head)
            if sig == VDI_IMAGE_SIGNATURE:
                return 100 if (ver >> 16) == 1 or ver == VDI_IMAGE_VERSION_OLD else 90
        return 0

    def _load_image(self, options: dict) -> None:
        self._load(lenient=bool(options.get("check") or options.get("repair")))

    # == parsing ===================================================================================
    def _load(self, lenient: bool) -> None:
        try:
            self._parse_header()
            self._read_map(lenient)
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError) as e:
            raise self._corrupt(f"malformed VDI header ({e})") from None

    def _parse_header(self) -> None:
        f = self.file
        fsize = f.size()
        self._fsize = fsize
        if fsize < VDIPREHEADER.size + VDIHEADER0.size:
            raise FormatError(f"file is only {fsize} bytes, too small for a VDI header", self.path)
        head = f.pread_exact(0, min(fsize, 72 + 65536), "VDI header")
        info, sig, ver = VDIPREHEADER.unpack_from(head)
        if sig != VDI_IMAGE_SIGNATURE:
            raise FormatError(f"signature 0x{sig:08x} is not the VDI signature 0x{VDI_IMAGE_SIGNATURE:08x}", self.path)
        self.u32Version = ver
        self.szFileInfo = info
        if ver == VDI_IMAGE_VERSION_OLD:
            (self.u32Type, self.fFlags, self.szComment, c, h, s, bs, self.cbDisk, self.cbBlock, self.cBlocks,
             self.cBlocksAllocated, self.uuidCreate, self.uuidModify, self.uuidLinkage) = VDIHEADER0.unpack_from(head, 72)
            self.LegacyGeometry = (c, h, s, bs)
            self.cbHeader = VDIHEADER0.size
            self.offBlocks = 72 + VDIHEADER0.size
            self.offData = self.offBlocks + 4 * self.cBlocks
            self.cbBlockExtra = 0
            self.u32Dummy = 0
            self.uuidParentModify = NULL_UUID
            self.LCHSGeometry = None
        elif ver >> 16 == 1:
            cb = struct.unpack_from("<I", head, 72)[0]
            if cb < VDIHEADER1.size:
                raise self._corrupt(f"header size {cb} is smaller than the VDI 1.1 header ({VDIHEADER1.size} bytes)")
            if cb > 65536 or 72 + cb > fsize:
                raise self._corrupt(f"header size {cb} runs past the end of the file (file size {fsize})")
            plus = cb >= VDIHEADER1PLUS.size
            fields = (VDIHEADER1PLUS if plus else VDIHEADER1).unpack_from(head, 72)
            (self.cbHeader, self.u32Type, self.fFlags, self.szComment, self.offBlocks, self.offData, c, h, s, bs,
             self.u32Dummy, self.cbDisk, self.cbBlock, self.cbBlockExtra, self.cBlocks, self.cBlocksAllocated,
             self.uuidCreate, self.uuidModify, self.uuidLinkage, self.uuidParentModify) = fields[:20]
            self.LegacyGeometry = (c, h, s, bs)
            self.LCHSGeometry = tuple(fields[20:24]) if plus else None
            if plus and cb > VDIHEADER1PLUS.size:
                self._tail = head[72 + VDIHEADER1PLUS.size:72 + cb]
        else:
            raise FormatError(f"unsupported VDI version {ver >> 16}.{ver & 0xffff} (0x{ver:08x}); "
                              f"vdtool reads 0.2 and 1.x", self.path)
        self._validate(fsize)
        if self.u32Type == VDI_IMAGE_TYPE_DIFF and self.u32Version >> 16 == 1:
            self._read_hint(head)

    def _validate(self, fsize: int) -> None:
        v1 = self.u32Version >> 16 == 1
        if self.u32Type not in TYPE_NAMES:
            raise UnsupportedFeature(f"unknown image type {self.u32Type} (1 normal, 2 fixed, 3 undo, 4 diff)",
                                     self.path)
        if self.fFlags & ~VDI_FLAGS_VALID:
            raise UnsupportedFeature(f"unknown image flags 0x{self.fFlags:08x}", self.path)
        if self.LegacyGeometry[3] != VDI_GEOMETRY_SECTOR_SIZE and (v1 or self.LegacyGeometry[3] != 0):
            raise UnsupportedFeature(f"sector size {self.LegacyGeometry[3]} is not {VDI_GEOMETRY_SECTOR_SIZE}",
                                     self.path)
        if self.LCHSGeometry is not None and self.LCHSGeometry[3] != VDI_GEOMETRY_SECTOR_SIZE:
            raise UnsupportedFeature(f"LCHS sector size {self.LCHSGeometry[3]} is not {VDI_GEOMETRY_SECTOR_SIZE}",
                                     self.path)
        bsz = self.cbBlock
        if not _pow2(bsz):
            raise self._corrupt(f"block size {bsz} is not a power of two")
        if bsz < MIN_BLOCK or bsz > MAX_BLOCK:
            raise UnsupportedFeature(f"block size {bsz} is outside {MIN_BLOCK}..{MAX_BLOCK}", self.path)
        if self.cbBlockExtra and (not _pow2(self.cbBlockExtra) or self.cbBlockExtra > MAX_BLOCK):
            raise self._corrupt(f"extra block size {self.cbBlockExtra} is not a power of two up to {MAX_BLOCK}")
        if self.cbDisk > MAX_DISK:
            raise self._corrupt(f"disk size {self.cbDisk} is above the limit of 2^56 bytes")
        if self.cBlocks * bsz < self.cbDisk:
            raise self._corrupt(f"disk size {self.cbDisk} is more than {self.cBlocks} blocks of {bsz} bytes hold")
        if self.cBlocks == 0 and self.cbDisk:
            raise self._corrupt(f"block count 0 for disk size {self.cbDisk}")
        if self.cBlocksAllocated > self.cBlocks:
            raise self._corrupt(f"allocated block count {self.cBlocksAllocated} is above the block count "
                                f"{self.cBlocks}")
        if v1:
            hdr_end = 72 + self.cbHeader
            if self.offBlocks < hdr_end:
                raise self._corrupt(f"block map offset {self.offBlocks} lies inside the header "
                                    f"(header size {self.cbHeader} ends at {hdr_end})")
            if self.offBlocks % 512:
                raise self._corrupt(f"block map offset {self.offBlocks} is not a multiple of 512")
            if self.offData % 512:
                raise self._corrupt(f"data offset {self.offData} is not a multiple of 512")
        map_end = self.offBlocks + 4 * self.cBlocks
        if map_end > fsize:
            raise self._corrupt(f"block map of {self.cBlocks} entries at offset {self.offBlocks} runs past the end "
                                f"of the file (file size {fsize})")
        if self.offData < map_end:
            raise self._corrupt(f"data offset {self.offData} lies inside the block map "
                                f"(offset {self.offBlocks}, {self.cBlocks} blocks, ends at {map_end})")
        if self.offData > fsize:
            raise self._corrupt(f"data offset {self.offData} is past the end of the file (file size {fsize})")
        if self.uuidCreate == NULL_UUID:
            raise self._corrupt("image UUID is zero")
        if self.uuidModify == NULL_UUID:
            raise self._corrupt("modification UUID is zero")

    def _read_hint(self, head: bytes) -> None:
        if self.offBlocks < HINT_OFFSET + HINT.size or len(head) < HINT_OFFSET + HINT.size:
            return
        magic, n = HINT.unpack_from(head, HINT_OFFSET)
        if magic != HINT_MAGIC or not n & 0x7FFFFFFF:
            return
        length = n & 0x7FFFFFFF
        if length > MAX_HINT_NAME or HINT_OFFSET + HINT.size + length > min(self.offBlocks, len(head)):
            raise self._corrupt(f"parent name of {length} bytes runs into the block map")
        self._hint = head[HINT_OFFSET + HINT.size:HINT_OFFSET + HINT.size + length].decode("utf-8", "replace")
        self._hint_synthetic = bool(n & 0x80000000)

    def _read_map(self, lenient: bool) -> None:
        size = 4 * self.cBlocks
        raw = bytearray(size)  # read in place: a 64 TiB image has a 256 MiB map, copies cost
        if self.file.readinto(self.offBlocks, raw) != size:
            raw = bytearray(self.file.pread_exact(self.offBlocks, size, "block map"))  # raises: map cut short
        self._raw = raw
        self._mv = memoryview(raw).cast("I")
        if not _LITTLE:  # pragma: no cover - the map is little-endian on disk
            a = array("I", raw)
            a.byteswap()
            self._raw = bytearray(a.tobytes())
            self._mv = memoryview(self._raw).cast("I")
        if lenient:
            self._map_problems = None  # check scans anyway: not twice (see _problems)
        else:
            self._scan_map(lenient)

    def _problems(self) -> list:
        if self._map_problems is None:
            self._scan_map(lenient=True)
        return self._map_problems

    def _scan_map(self, lenient: bool) -> tuple:
        """Entries past the file are refused at open (reading them would give
        whatever lies there); a wrong count or shared blocks only stop writing
        until ``check -r all`` repairs them.  Returns _map_stats()."""
        n = self.cBlocksAllocated
        total = self._total
        limit = (self._fsize - self.offData) // total if self._fsize > self.offData else 0
        if self._fsize > self.offData and (self._fsize - self.offData) % total:
            limit += 1  # a short last block reads its missing tail as zeros
        # The usual case, decided without a Python step per entry: every entry
        # below the count and the file end, none shared.  Any doubt and the
        # exact per-entry pass below decides (and words) what is wrong.
        bound = min(n, limit)
        seen = bytearray(max(n, 0))
        tally = _MapTally()
        for idx, vals in self._allocated_chunks():
            if max(vals) >= bound or len(set(vals)) != len(vals) or any(map(seen.__getitem__, vals)):
                break
            deque(map(seen.__setitem__, vals, repeat(1)), 0)
            tally.add(vals)
        else:
            self._map_problems = []
            return tally.result()
        problems = []
        seen = bytearray(max(n, 0))
        tally = _MapTally()
        for idx, vals in self._allocated_chunks():
            tally.add(vals)
            for i, e in zip(idx, vals):
                if e >= limit or e >= self.cBlocks:
                    if not lenient:
                        raise self._corrupt(f"block map entry {i} points to data block {e}, past the end of the "
                                            f"file (room for {limit} blocks)")
                    problems.append(("eof", i, e))
                elif e >= n:
                    problems.append(("count", i, e))
                elif seen[e]:
                    problems.append(("dup", i, e))
                else:
                    seen[e] = 1
        self._map_problems = problems
        return tally.result()

    def _chunk_allocated(self, c: int, d: int) -> list:
        """Indices of the allocated entries in [c, d), in order."""
        raw, mv = self._raw, self._mv
        marked = raw[4 * c:4 * d].translate(_NOT_FF)
        idx: list = []
        p = marked.find(1)
        steps = 0
        while p >= 0:
            i = c + (p >> 2)
            if steps == _FIND_STEPS:  # dense: sieve the rest in one go
                flags = _alloc_flags(raw[4 * i:4 * d])
                k = flags.count(0x80)
                if k == d - i:
                    idx.extend(range(i, d))
                elif k:
                    q = flags.find(0x80)
                    while q >= 0:
                        idx.append(i + q)
                        q = flags.find(0x80, q + 1)
                break
            steps += 1
            if mv[i] < VDI_IMAGE_BLOCK_ZERO:
                idx.append(i)
            p = marked.find(1, (i + 1 - c) << 2)
        return idx

    def _allocated_chunks(self, lo: int = 0, hi: Optional[int] = None):
        """(indices, entries) of the allocated map entries in [lo, hi), one
        chunk at a time in map order (memory stays bounded on a hostile map
        full of entries), never empty; the cost follows their number, not the
        map's size.  Changing entries of a chunk already yielded is safe."""
        hi = self.cBlocks if hi is None else hi
        raw, mv = self._raw, self._mv
        for c in range(lo, hi, _SCAN):
            d = min(c + _SCAN, hi)
            k = 4 * (d - c)
            if raw.startswith(_FREE_RUN[:k], 4 * c) or raw.startswith(_ZERO_RUN[:k], 4 * c):
                continue
            idx = self._chunk_allocated(c, d)
            if len(idx) == d - c:
                yield idx, mv[c:d].tolist()
            elif idx:
                yield idx, list(map(mv.__getitem__, idx))

    def _allocated(self, lo: int = 0, hi: Optional[int] = None) -> tuple:
        """([index], [entry]) of all allocated entries in [lo, hi)."""
        idx: list = []
        vals: list = []
        for i, v in self._allocated_chunks(lo, hi):
            idx.extend(i)
            vals.extend(v)
        return idx, vals

    def _map_stats(self) -> tuple:
        """(allocated entries, fragmented ones: allocated entries, in map
        order, whose data block does not follow the previous one's)."""
        tally = _MapTally()
        for _, vals in self._allocated_chunks():
            tally.add(vals)
        return tally.result()

    # == facts =====================================================================================
    @property
    def _total(self) -> int:
        return self.cbBlockExtra + self.cbBlock

    def _block_pos(self, idx: int) -> int:
        return self.offData + idx * self._total

    @property
    def virtual_size(self) -> int:
        # QEMU rounds a size that is not whole sectors up; VirtualBox down.
        return _align(self.cbDisk, 512)

    @property
    def block_size(self) -> int:
        return self.cbBlock

    @property
    def _shift(self) -> int:
        return self.cbBlock.bit_length() - 1

    @property
    def variant(self) -> str:
        return "fixed" if self.u32Type == VDI_IMAGE_TYPE_FIXED else "dynamic"

    @property
    def uuid(self) -> str:
        return _uuid_str(self.uuidCreate)

    @property
    def modification_uuid(self) -> str:
        return _uuid_str(self.uuidModify)

    @property
    def is_diff(self) -> bool:
        return self.u32Type in (VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_UNDO) and (
            self.uuidLinkage != NULL_UUID or self._hint is not None)

    @property
    def parent(self) -> Optional[ParentRef]:
        if not self.is_diff:
            return None
        extra: dict = {}
        pmod = None
        if self.uuidParentModify != NULL_UUID:
            pmod = _uuid_str(self.uuidParentModify)
            extra["expect"] = {"modification_uuid": pmod}
        if self._hint is not None:
            return ParentRef(filename=self._hint, uuid=None if self._hint_synthetic else _uuid_str(self.uuidLinkage),
                             modification_uuid=pmod, extra=extra)
        return ParentRef(filename=None, uuid=_uuid_str(self.uuidLinkage), modification_uuid=pmod, extra=extra)

    def external_references(self) -> list:
        if not self.is_diff:
            return []
        if self._hint is not None:
            return [self._hint]
        return ["{" + _uuid_str(self.uuidLinkage) + "}"]

    def _allocated_count(self) -> int:
        return sum(len(idx) for idx, _ in self._allocated_chunks())

    def info(self) -> dict:
        ver = self.u32Version
        d: dict = {
            "image-type": TYPE_NAMES[self.u32Type],
            "version": f"{ver >> 16}.{ver & 0xffff}",
            "header-size": self.cbHeader,
            "block-size": self.cbBlock,
            "blocks": self.cBlocks,
            "allocated-blocks": self.cBlocksAllocated,
            "offset-blocks": self.offBlocks,
            "offset-data": self.offData,
            "uuid": self.uuid,
            "modification-uuid": self.modification_uuid,
            "comment": _cstr(self.szComment),
            "geometry": "%d/%d/%d" % self.LegacyGeometry[:3],
        }
        if self.LCHSGeometry is not None:
            d["lchs-geometry"] = "%d/%d/%d" % self.LCHSGeometry[:3]
        if self.cbBlockExtra:
            d["block-extra"] = self.cbBlockExtra
        if self.fFlags & 1:
            d["zero-expand"] = True
        if self.uuidLinkage != NULL_UUID:
            d["parent-uuid"] = _uuid_str(self.uuidLinkage)
        if self.uuidParentModify != NULL_UUID:
            d["parent-modification-uuid"] = _uuid_str(self.uuidParentModify)
        if self._hint is not None:
            d["parent-name"] = self._hint
        if self._problems():
            d["block-map-errors"] = len(self._map_problems)
        return d

    # == reading ===================================================================================
    def _entry(self, b: int) -> int:
        return self._mv[b]

    def _status_of(self, e: int) -> Status:
        if e == VDI_IMAGE_BLOCK_FREE:
            return Status.UNALLOCATED
        if e == VDI_IMAGE_BLOCK_ZERO:
            return Status.ZERO
        return Status.DATA

    def block_status(self, offset: int, length: int) -> tuple:
        size = self.virtual_size
        if offset >= size or length <= 0:
            return Status.ZERO, max(length, 1)
        end = min(offset + length, size)
        shift = self._shift
        b = offset >> shift
        last = (end - 1) >> shift
        e = self._mv[b]
        status = self._status_of(e)
        if status == Status.DATA:
            nb = self._data_run_end(b + 1, last + 1)
        else:
            nb = self._marker_run_end(b + 1, last + 1, e)
        run_end = min(nb << shift, end)
        return status, run_end - offset

    def _marker_run_end(self, lo: int, hi: int, e: int) -> int:
        """First entry in [lo, hi) that is not the marker ``e``, or hi."""
        raw = self._raw
        run = _FREE_RUN if e == VDI_IMAGE_BLOCK_FREE else _ZERO_RUN
        c = lo
        while c < hi:
            d = min(c + _SCAN, hi)
            if not raw.startswith(run[:4 * (d - c)], 4 * c):
                # the first d - c entries differ: halve the prefix that is all marker (memcmp each time)
                good, bad = 0, d - c
                while bad - good > 1:
                    mid = (good + bad) // 2
                    if raw.startswith(run[:4 * mid], 4 * c):
                        good = mid
                    else:
                        bad = mid
                return c + good
            c = d
        return hi

    def _data_run_end(self, lo: int, hi: int) -> int:
        """First entry in [lo, hi) that is not allocated, or hi; or an earlier
        end after about _DATA_RUN_CAP entries.  Callers (convert) cut DATA runs
        into buffer-sized pieces and ask again from each: measuring the whole
        run every time would make a fully allocated map cost quadratic time.
        The windows grow, so a short run costs little."""
        raw = self._raw
        c = lo
        w = _DATA_WINDOW
        while c < hi and c - lo < _DATA_RUN_CAP:
            d = min(c + w, hi, lo + _DATA_RUN_CAP)
            p = _alloc_flags(raw[4 * c:4 * d]).find(0)
            if p >= 0:
                return c + p
            c = d
            w = min(4 * w, _SCAN)
        return c

    def _data_pos(self, b: int, e: int) -> int:
        if e >= self.cBlocks:
            raise self._corrupt(f"block map entry {b} points to data block {e}, past the end of the image")
        return self.offData + e * self._total + self.cbBlockExtra

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        total = len(mv)
        bs = self.cbBlock
        shift = self._shift
        pos = 0
        while pos < total:
            off = offset + pos
            b = off >> shift
            within = off & (bs - 1)
            n = min(bs - within, total - pos)
            if b >= self.cBlocks:
                mv[pos:pos + n] = _zeros(n)
            else:
                e = self._mv[b]
                if e < VDI_IMAGE_BLOCK_ZERO:
                    self.file.readinto(self._data_pos(b, e) + within, mv[pos:pos + n])
                else:
                    mv[pos:pos + n] = _zeros(n)
            pos += n

    # == writing ===================================================================================
    def _begin_write(self, content: bool = True) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if self._problems():
            raise self._corrupt(f"block map has {len(self._map_problems)} inconsistent entries (first: entry "
                                f"{self._map_problems[0][1]} -> block {self._map_problems[0][2]}); "
                                f"'vdtool check -r all' repairs it")
        if self.u32Version >> 16 == 1 and self.cbHeader < VDIHEADER1PLUS.size \
                and self.offBlocks >= 72 + VDIHEADER1PLUS.size:
            # VirtualBox turns 1.1 headers into 1.1+ (LCHS geometry) when it writes
            self.cbHeader = VDIHEADER1PLUS.size
            self.LCHSGeometry = (0, 0, 0, VDI_GEOMETRY_SECTOR_SIZE)
            self._hdr_dirty = True
        if content and not self._modified:
            # a new modification UUID once per write session, as VirtualBox's VD layer does
            self._modified = True
            self.uuidModify = uuidlib.uuid4().bytes_le
            self._hdr_dirty = True

    def defer_identity_change(self) -> None:
        self._modified = True  # no new modification UUID for this session's writes

    def change_identity(self) -> None:
        self.uuidModify = uuidlib.uuid4().bytes_le
        self._hdr_dirty = True

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {self.virtual_size})",
                          self.path)

    def _set_entry(self, b: int, value: int) -> None:
        self._mv[b] = value
        self._dirty.add(b)

    def _header_bytes(self) -> bytes:
        if self.u32Version == VDI_IMAGE_VERSION_OLD:
            c, h, s, bs = self.LegacyGeometry
            return VDIHEADER0.pack(self.u32Type, self.fFlags, self.szComment, c, h, s, bs, self.cbDisk, self.cbBlock,
                                   self.cBlocks, self.cBlocksAllocated, self.uuidCreate, self.uuidModify,
                                   self.uuidLinkage)
        fields = (self.cbHeader, self.u32Type, self.fFlags, self.szComment, self.offBlocks, self.offData,
                  *self.LegacyGeometry, self.u32Dummy, self.cbDisk, self.cbBlock, self.cbBlockExtra, self.cBlocks,
                  self.cBlocksAllocated, self.uuidCreate, self.uuidModify, self.uuidLinkage, self.uuidParentModify)
        if self.cbHeader >= VDIHEADER1PLUS.size:
            return VDIHEADER1PLUS.pack(*fields, *self.LCHSGeometry)
        return VDIHEADER1.pack(*fields)

    def _map_bytes(self, lo: int, hi: int) -> bytes:
        if _LITTLE:
            return bytes(memoryview(self._raw)[4 * lo:4 * hi])  # one copy, not two
        a = array("I", self._mv[lo:hi])  # pragma: no cover
        a.byteswap()
        return a.tobytes()

    def _sync_metadata(self) -> None:
        """Data first, then the map entries and header that point at it."""
        if not self._dirty and not self._hdr_dirty:
            return
        self.file.flush()
        dirty = sorted(self._dirty)
        if len(dirty) > 4096:
            self.file.pwrite(self.offBlocks, self._map_bytes(0, self.cBlocks))
        else:
            i = 0
            while i < len(dirty):
                j = i
                while j + 1 < len(dirty) and dirty[j + 1] == dirty[j] + 1:
                    j += 1
                self.file.pwrite(self.offBlocks + 4 * dirty[i], self._map_bytes(dirty[i], dirty[j] + 1))
                i = j + 1
        self.file.pwrite(72, self._header_bytes())
        self.file.flush()
        self._dirty.clear()
        self._hdr_dirty = False

    def _alloc(self, b: int, block) -> None:
        """Store a whole new block for virtual block ``b``: data, then (at the
        next sync) the map entry."""
        idx = self.cBlocksAllocated
        if idx >= self.cBlocks:
            raise self._corrupt(f"no room for another block: {idx} of {self.cBlocks} are allocated")
        pos = self._block_pos(idx)
        if self.cbBlockExtra:
            self.file.pwrite(pos, bytes(self.cbBlockExtra))
        self.file.pwrite(pos + self.cbBlockExtra, block)
        self.cBlocksAllocated = idx + 1
        self._hdr_dirty = True
        self._set_entry(b, idx)
        if len(self._dirty) >= 4096:
            self._sync_metadata()

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not len(mv):
            return
        self._begin_write()
        bs = self.cbBlock
        shift = self._shift
        pos = 0
        total = len(mv)
        while pos < total:
            off = offset + pos
            b = off >> shift
            within = off & (bs - 1)
            n = min(bs - within, total - pos)
            e = self._mv[b]
            if e < VDI_IMAGE_BLOCK_ZERO:
                self.file.pwrite(self._data_pos(b, e) + within, mv[pos:pos + n])
            elif n == bs:
                self._alloc(b, mv[pos:pos + n])
            else:
                block = bytearray(bs)
                if e == VDI_IMAGE_BLOCK_FREE:
                    start = b << shift
                    inside = max(0, min(bs, self.virtual_size - start))
                    if inside:
                        block[:inside] = self.parent_read(start, inside)
                block[within:within + n] = mv[pos:pos + n]
                self._alloc(b, block)
            pos += n

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._check_range(offset, length)
        if not length:
            return
        self._begin_write()
        bs = self.cbBlock
        shift = self._shift
        fixed = self.u32Type == VDI_IMAGE_TYPE_FIXED
        diff = self.is_diff
        vsize = self.virtual_size
        freed = False
        pos, end = offset, offset + length
        while pos < end:
            b = pos >> shift
            within = pos & (bs - 1)
            n = min(bs - within, end - pos)
            e = self._mv[b]
            allocated = e < VDI_IMAGE_BLOCK_ZERO
            whole = within == 0 and (n == bs or pos + n >= vsize)
            if allocated and (not whole or fixed or not unmap):
                self._pwrite_zeros(self._data_pos(b, e) + within, n)
            elif whole:
                marker = VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE
                if e != marker and not (e == VDI_IMAGE_BLOCK_ZERO and not diff):
                    self._set_entry(b, marker)
                    freed = freed or allocated
            elif e == VDI_IMAGE_BLOCK_FREE and diff:
                start = b << shift
                inside = min(bs, self.virtual_size - start)
                if self.parent_read(start + within, n) != bytes(n):
                    block = bytearray(self.parent_read(start, inside))
                    block[within:within + n] = bytes(n)
                    block.extend(bytes(bs - len(block)))
                    self._alloc(b, block)
            pos += n
        if freed:
            self._close_holes()

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def _pwrite_zeros(self, pos: int, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZERO_CHUNK))
            self.file.pwrite(pos, _zeros(k))
            pos += k
            n -= k

    def flush(self) -> None:
        if self.writable:
            self._sync_metadata()
            self.file.flush()

    def close(self) -> None:
        if getattr(self.file, "_closed", False):
            return
        try:
            if self.writable:
                self._sync_metadata()
        finally:
            self._mv.release()
            self.file.close()

    # == block moving ==============================================================================
    def _reverse(self) -> array:
        """data index -> virtual block (-1: unused) for indices below cBlocksAllocated."""
        n = self.cBlocksAllocated
        rev = array("q", [-1]) * n
        for idx, vals in self._allocated_chunks():
            for i, e in zip(idx, vals):
                if e < n:
                    rev[e] = i
        return rev

    def _close_holes(self, progress: Progress = NO_PROGRESS) -> int:
        """Move the last data blocks into unused slots, shrink the allocated
        count, truncate.  Map entries that freed the slots reach the disk
        before any block moves into them; moved data is flushed before the map
        points at its new place.  Returns the number of slots reclaimed."""
        n = self.cBlocksAllocated
        rev = self._reverse()
        holes = [i for i in range(n) if rev[i] < 0]
        new_n = n - len(holes)
        if holes:
            self._sync_metadata()
            dst = [h for h in holes if h < new_n]
            src = [i for i in range(n - 1, new_n - 1, -1) if rev[i] >= 0]
            total = self._total
            buf = bytearray(total)
            for k, (s, d) in enumerate(zip(src, dst)):
                self.file.readinto(self._block_pos(s), buf)
                self.file.pwrite(self._block_pos(d), buf)
                progress.update(k + 1, len(src))
            if src:
                self.file.flush()
            for s, d in zip(src, dst):
                self._set_entry(rev[s], d)
            self.cBlocksAllocated = new_n
            self._hdr_dirty = True
            self._sync_metadata()
        end = self._block_pos(new_n)
        if self.file.size() > end:
            self.file.truncate(max(end, self.offData))
        self._fsize = self.file.size()
        return len(holes)

    # == create ====================================================================================
    @classmethod
    def create(cls, path: str, size: int, *, variant: Optional[str] = None, block_size: Optional[int] = None,
               parent: Optional[ParentSpec] = None, options: Optional[dict] = None,
               progress: Progress = NO_PROGRESS) -> "VdiBackend":
        opts = dict(options or {})
        variant = variant or ("fixed" if opts.get("static") else "dynamic")
        if variant not in cls.variants:
            raise UsageError(f"vdi has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        if parent is not None and variant == "fixed":
            raise UsageError("a differencing VDI is always dynamic; --variant fixed cannot have a parent")
        bs = VDI_IMAGE_DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
        if not _pow2(bs) or bs < MIN_BLOCK or bs > MAX_BLOCK:
            raise UsageError(f"VDI block size {bs} must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
        if size < 0 or size > MAX_DISK:
            raise UsageError(f"VDI disk size {size} is outside 0..2^56")
        size = _align(size, 512)
        blocks = (size + bs - 1) // bs
        if blocks > 0xFFFFFFF0:
            raise UsageError(f"{size} bytes need {blocks} blocks of {bs}; a VDI holds at most 2^32 - 16")
        off_blocks = _align(VDIPREHEADER.size + VDIHEADER1PLUS.size, VDI_DATA_ALIGN)
        off_data = _align(off_blocks + 4 * blocks, VDI_DATA_ALIGN)
        if off_data > 0xFFFFFFFF:
            raise UsageError(f"a block map of {blocks} entries does not fit in a VDI; use a larger block size")
        comment = opts.get("comment") or ""
        cbytes = comment.encode("utf-8")
        if len(cbytes) >= VDI_IMAGE_COMMENT_SIZE:
            raise UsageError(f"VDI comment is {len(cbytes)} bytes; at most {VDI_IMAGE_COMMENT_SIZE - 1} fit")
        image_uuid = _parse_uuid(opts["uuid"]) if opts.get("uuid") else uuidlib.uuid4().bytes_le
        if image_uuid == NULL_UUID:
            raise UsageError("the image UUID cannot be all zeros")

        f = ImageFile(path, create=True)
        try:
            self = cls(f)
            self.u32Version = VDI_IMAGE_VERSION
            self.szFileInfo = VDI_IMAGE_FILE_INFO
            self.cbHeader = VDIHEADER1PLUS.size
            self.u32Type = {"dynamic": VDI_IMAGE_TYPE_NORMAL, "fixed": VDI_IMAGE_TYPE_FIXED}[variant]
            self.fFlags = 0
            self.szComment = cbytes
            self.offBlocks = off_blocks
            self.offData = off_data
            self.LegacyGeometry = (0, 0, 0, VDI_GEOMETRY_SECTOR_SIZE)
            self.u32Dummy = 0
            self.cbDisk = size
            self.cbBlock = bs
            self.cbBlockExtra = 0
            self.cBlocks = blocks
            self.cBlocksAllocated = 0
            self.uuidCreate = image_uuid
            self.uuidModify = uuidlib.uuid4().bytes_le
            self.uuidLinkage = NULL_UUID
            self.uuidParentModify = NULL_UUID
            self.LCHSGeometry = (0, 0, 0, VDI_GEOMETRY_SECTOR_SIZE)
            self._modified = True  # a new image needs no second modification UUID
            if variant == "fixed":
                a = array("I", range(blocks))
                self.cBlocksAllocated = blocks
                if not _LITTLE:  # pragma: no cover
                    a.byteswap()
                self._raw = bytearray(a.tobytes())
            else:
                self._raw = bytearray(b"\xff") * (4 * blocks)  # all FREE, without an array and two copies
            self._mv = memoryview(self._raw).cast("I")
            end = off_data + (blocks * bs if variant == "fixed" else 0)
            f.truncate(end)
            f.pwrite(0, VDIPREHEADER.pack(VDI_IMAGE_FILE_INFO, VDI_IMAGE_SIGNATURE, VDI_IMAGE_VERSION))
            f.pwrite(72, self._header_bytes())
            f.pwrite(off_blocks, self._raw if _LITTLE else self._map_bytes(0, blocks))  # no copy of a big map
            if variant == "fixed":
                step = 64 << 20
                total = blocks * bs
                for p in range(0, total, step):
                    f.preallocate(off_data + p, min(step, total - p))
                    progress.update(min(p + step, total), total)
            self._fsize = f.size()
            if parent is not None:
                self._write_parent(parent)
            return self
        except BaseException:
            f.close()
            raise

    # == parent ====================================================================================
    def _write_parent(self, parent: Optional[ParentSpec]) -> None:
        hint = None
        synthetic = False
        if parent is None:
            if self.u32Type in (VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_UNDO):
                self.u32Type = VDI_IMAGE_TYPE_NORMAL
            self.uuidLinkage = NULL_UUID
            self.uuidParentModify = NULL_UUID
        else:
            if self.u32Version == VDI_IMAGE_VERSION_OLD:
                raise NotSupported("recording a parent", "vdi", self.path, "VDI 0.2 headers have no room for it")
            puuid = None
            if parent.uuid:
                try:
                    puuid = _parse_uuid(parent.uuid)
                except UsageError:
                    puuid = None
            if puuid is None or puuid == NULL_UUID:
                # the parent has no UUID of its own (qcow2, raw): keep its name beside the header
                hint, synthetic = parent.recorded_name, True
                puuid = uuidlib.uuid4().bytes_le
            pmod = NULL_UUID
            if parent.modification_uuid:
                try:
                    pmod = _parse_uuid(parent.modification_uuid)
                except UsageError:
                    pmod = NULL_UUID
            self.u32Type = VDI_IMAGE_TYPE_DIFF
            self.uuidLinkage = puuid
            self.uuidParentModify = pmod
        self._store_hint(hint, synthetic)
        self._hdr_dirty = True
        self._sync_metadata()

    def _store_hint(self, name: Optional[str], synthetic: bool) -> None:
        if self.u32Version >> 16 != 1:
            return
        room = self.offBlocks - HINT_OFFSET - HINT.size
        if name is None:
            if self._hint is not None and room >= 0:
                self.file.pwrite(HINT_OFFSET, bytes(HINT.size + len(self._hint.encode("utf-8"))))
            self._hint = None
            self._hint_synthetic = False
            return
        raw = name.encode("utf-8")
        if len(raw) > MAX_HINT_NAME or len(raw) > room:
            raise NotSupported("recording this parent", "vdi", self.path,
                               f"it has no UUID and its {len(raw)}-byte name does not fit before the block map")
        old = len(self._hint.encode("utf-8")) if self._hint is not None else 0
        blob = HINT.pack(HINT_MAGIC, len(raw) | (0x80000000 if synthetic else 0)) + raw
        self.file.pwrite(HINT_OFFSET, blob + bytes(max(0, HINT.size + old - len(blob))))
        self._hint = name
        self._hint_synthetic = synthetic

    def set_parent(self, parent: Optional[ParentSpec]) -> None:
        self._begin_write(content=False)
        self._sync_metadata()
        self._write_parent(parent)

    # == resize ====================================================================================
    def resize(self, new_size: int) -> None:
        if new_size < 0 or new_size > MAX_DISK:
            raise UsageError(f"VDI disk size {new_size} is outside 0..2^56")
        self._begin_write()
        new_size = _align(new_size, 512)
        bs = self.cbBlock
        new_blocks = (new_size + bs - 1) // bs
        old_size = self.virtual_size
        if new_size < old_size:
            # The smaller size goes into the header first: a crash while the
            # blocks past it are released then leaves the new content (and
            # leaked blocks at worst), never the old size with its end gone.
            self.cbDisk = new_size
            self._hdr_dirty = True
            self._sync_metadata()
            self.file.flush()
            # bytes past the new end inside the last kept block must read as zeros if the disk grows again
            if new_size & (bs - 1) and new_blocks <= self.cBlocks:
                b = new_blocks - 1
                e = self._mv[b]
                if e < VDI_IMAGE_BLOCK_ZERO:
                    within = new_size & (bs - 1)
                    self._pwrite_zeros(self._data_pos(b, e) + within, bs - within)
            freed = False
            for b in range(new_blocks, self.cBlocks):
                if self._mv[b] < VDI_IMAGE_BLOCK_ZERO:
                    freed = True
                self._set_entry(b, VDI_IMAGE_BLOCK_FREE)
            self.cbDisk = new_size
            self._hdr_dirty = True
            if freed:
                self._close_holes()
            # only now that no entry points past it: the map ends at the new count
            self.cBlocks = new_blocks
            self._dirty = {b for b in self._dirty if b < new_blocks}
            self._hdr_dirty = True
            self._sync_metadata()
            self._shrink_map(new_blocks)
            return
        if new_blocks > self.cBlocks:
            self._grow_map(new_blocks)
        self.cbDisk = new_size
        self._hdr_dirty = True
        self._sync_metadata()

    def _shrink_map(self, n: int) -> None:
        self._mv.release()
        del self._raw[4 * n:]
        self._mv = memoryview(self._raw).cast("I")

    def _grow_map(self, new_blocks: int) -> None:
        if new_blocks > 0xFFFFFFF0:
            raise UsageError(f"{new_blocks} blocks do not fit in a VDI block map")
        old_blocks = self.cBlocks
        need_end = self.offBlocks + 4 * new_blocks
        if need_end > self.offData:
            if self.u32Version == VDI_IMAGE_VERSION_OLD:
                raise NotSupported("growing", "vdi", self.path, "a VDI 0.2 header cannot move its data")
            self._relocate_for_map(need_end)
        fixed = self.u32Type == VDI_IMAGE_TYPE_FIXED
        self._mv.release()
        ext = array("I", [VDI_IMAGE_BLOCK_FREE]) * (new_blocks - old_blocks)
        self._raw.extend(ext.tobytes())
        self._mv = memoryview(self._raw).cast("I")
        self.cBlocks = new_blocks
        if fixed:
            # a fixed image stays fully allocated: the new blocks come zeroed, in order
            first = self.cBlocksAllocated
            count = new_blocks - old_blocks
            self.file.truncate(self._block_pos(first + count))
            self.file.preallocate(self._block_pos(first), count * self._total)
            for k in range(count):
                self._set_entry(old_blocks + k, first + k)
            self.cBlocksAllocated = first + count
        self._dirty.update(range(old_blocks, new_blocks))
        self._hdr_dirty = True

    def _relocate_for_map(self, need_end: int) -> None:
        """Make room for a larger block map: the data area starts k blocks
        later, and the blocks that lived in those k slots move to the end."""
        total = self._total
        k = (need_end - self.offData + total - 1) // total
        if self.offData + k * total > 0xFFFFFFFF:
            raise UnsupportedFeature("the block map cannot grow further: the data offset would pass 4 GiB",
                                     self.path)
        n = self.cBlocksAllocated
        rev = self._reverse()
        base = max(n, k)  # first slot that is past the new data offset and free
        buf = bytearray(total)
        moved = {}
        for j in range(min(k, n)):
            if rev[j] < 0:
                continue
            self.file.readinto(self._block_pos(j), buf)
            self.file.pwrite(self._block_pos(base + j), buf)
            moved[j] = base + j
        self.file.flush()
        mv = self._mv
        for idx, vals in self._allocated_chunks():
            for i, e in zip(idx, vals):
                mv[i] = moved.get(e, e) - k
        self.offData += k * total
        self.cBlocksAllocated = base + min(k, n) - k
        self._dirty.update(range(self.cBlocks))
        self._hdr_dirty = True
        self._sync_metadata()
        self._close_holes()

    # == compact ===================================================================================
    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        if self.u32Type == VDI_IMAGE_TYPE_FIXED:
            raise NotSupported("compact", "vdi", self.path, "a fixed image stays fully allocated")
        self._begin_write(content=False)
        bs = self.cbBlock
        zero = bytes(bs)
        buf = bytearray(bs)
        diff = self.is_diff
        size = self.virtual_size
        scan = progress.sub(0, 70)
        for idx, vals in self._allocated_chunks():
            for b, e in zip(idx, vals):
                self.file.readinto(self._data_pos(b, e), buf)
                if buf == zero:
                    marker = VDI_IMAGE_BLOCK_FREE
                    if diff:
                        start = b * bs
                        inside = max(0, min(bs, size - start))
                        if inside and self.parent_read(start, inside) != zero[:inside]:
                            marker = VDI_IMAGE_BLOCK_ZERO
                    self._set_entry(b, marker)
                scan.update(b + 1, self.cBlocks)
        scan.update(self.cBlocks, self.cBlocks)
        self._close_holes(progress.sub(70, 30))
        self._sync_metadata()

    # == check =====================================================================================
    def check(self, repair: Optional[str] = None, progress: Progress = NO_PROGRESS) -> CheckResult:
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"check repair mode must be None, 'leaks' or 'all', not {repair!r}")
        if repair and not self.writable:
            raise ReadOnlyError("image is opened read-only; it must be opened for writing to repair it", self.path)
        res = CheckResult()
        try:
            self._check(res, repair)
        except VdError as e:
            res.check_errors += 1
            res.messages.append(f"ERROR: {e}")
        return res

    def _check(self, res: CheckResult, repair: Optional[str]) -> None:
        if self.writable:
            self._sync_metadata()
        fsize = self.file.size()
        self._fsize = fsize
        count, frag = self._scan_map(lenient=True)
        problems = list(self._map_problems)
        n = self.cBlocksAllocated
        # data blocks below the count that some entry points at (without problems: every entry, once)
        used = count
        if problems:
            seen = bytearray(n)
            for _, vals in self._allocated_chunks():
                for e in vals:
                    if e < n:
                        seen[e] = 1
            used = n - seen.count(0)
        leaks = n - used
        for kind, b, e in problems:
            if kind == "eof":
                res.messages.append(f"ERROR: block map entry {b} points to data block {e}, past the end of the file")
            elif kind == "count":
                res.messages.append(f"ERROR: block map entry {b} points to data block {e}, not below the "
                                    f"allocated count {n}")
            else:
                res.messages.append(f"ERROR: block map entry {b} points to data block {e}, which another entry uses")
        res.corruptions = len(problems)
        short = bool(n) and fsize < self._block_pos(n) and used > 0
        if short:
            res.corruptions += 1
            res.messages.append(f"ERROR: the file ends at {fsize}, inside the {n} allocated blocks "
                                f"(they end at {self._block_pos(n)})")
        if leaks:
            res.leaks = leaks
            res.messages.append(f"Leaked block(s): {leaks} of the {n} allocated blocks are not in the block map")
        if self.u32Type == VDI_IMAGE_TYPE_FIXED and count != self.cBlocks:
            res.messages.append("warning: a fixed image with unallocated blocks")
        if repair == "all" and (problems or short):
            self._repair_map(problems)
            if short:
                self.file.truncate(self._block_pos(self.cBlocksAllocated))
            res.corruptions_fixed = res.corruptions
            self._map_problems = []
        if repair in ("leaks", "all") and not self._map_problems:
            self._begin_write(content=False)
            reclaimed = self._close_holes()
            res.leaks_fixed = min(res.leaks, reclaimed)
        if repair:
            self._sync_metadata()
            count, frag = self._map_stats()
        res.total_clusters = self.cBlocks
        res.allocated_clusters, res.fragmented_clusters = count, frag
        res.image_end_offset = self._block_pos(self.cBlocksAllocated)

    def _repair_map(self, problems: list) -> None:
        diff = self.is_diff
        self._map_problems = []
        counts = [e for kind, _, e in problems if kind == "count"]
        if counts:
            # blocks that lie in the file but above the count: take them in
            self.cBlocksAllocated = max(max(counts) + 1, self.cBlocksAllocated)
            self._hdr_dirty = True
        for kind, b, e in problems:
            if kind == "eof":
                self._set_entry(b, VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE)
        self._sync_metadata()
        dups = [(b, e) for kind, b, e in problems if kind == "dup"]
        if not dups:
            return
        # a shared block is copied (into an unused slot first) so both entries keep reading what they read
        used = bytearray(self.cBlocksAllocated)
        for _, vals in self._allocated_chunks():
            for e in vals:
                if e < self.cBlocksAllocated:
                    used[e] = 1
        holes = [i for i, u in enumerate(used) if not u]
        buf = bytearray(self._total)
        for b, e in dups:
            if holes:
                dst = holes.pop(0)
            elif self.cBlocksAllocated < self.cBlocks:
                dst = self.cBlocksAllocated
                self.cBlocksAllocated += 1
                self._hdr_dirty = True
            else:
                self._set_entry(b, VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE)
                continue
            self.file.readinto(self._block_pos(e), buf)
            self.file.pwrite(self._block_pos(dst), buf)
            self.file.flush()
            self._set_entry(b, dst)
        self._sync_metadata()

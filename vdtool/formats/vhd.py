"""VHD images (Connectix / Microsoft Virtual PC, Hyper-V, Azure): fixed,
dynamic and differencing disks.

Layout per Microsoft's "Virtual Hard Disk Image Format Specification" 1.0;
struct field names below are spelled as that document spells them.  All
integers are big-endian.

- fixed:        data (current size bytes), footer
- dynamic/diff: footer copy, dynamic disk header, BAT, [parent locator data],
                blocks (sector bitmap padded to 512 bytes, then block data), footer

Choices worth knowing:

- Which size is the disk's size.  Virtual PC (creator "vpc ", Virtual Server
  "vs  ") sizes the disk by its CHS geometry, and so does QEMU's "qemu"
  creator (which makes both agree by rounding the size to a geometry);
  Hyper-V ("win "), Disk2vhd ("d2v "), XenServer ("tap\\0"), XenConverter
  ("CTXS"), QEMU's force_size ("qem2"), VirtualBox ("vbox") and anything
  unknown use the current size.  A geometry at its maximum (65535/16/255),
  a zero geometry, or one claiming more than the current size falls back to
  the current size.  ``info`` shows both.
- Creator application of vdtool's images: "qem2".  It is the code QEMU
  (all versions since 2.5) reads as "current size is the disk's size",
  which is exactly vdtool's rule: the current size is what was asked for
  and the geometry is the specification's (rounded down) CHS, stored for
  BIOS-style readers but not used to cut the size.  Any code of our own
  ("vdtl") would make qemu-img size the disk by that geometry and lose the
  tail.
- Sector bitmaps are honoured on read: a clear bit reads the parent (zeros
  in a dynamic disk), as VirtualBox does; QEMU ignores them but always sets
  whole bitmaps, so the two agree on every image QEMU writes.
- Metadata (BAT, bitmaps, footer) is cached write-back.  flush() orders the
  writes: data, fsync, bitmaps, BAT, header, footer copy and footer, fsync.
  A crash leaves unreferenced space at worst, or a footer missing at the end
  of the file, which the copy at offset 0 stands in for (check -r restores).
- open(options={"force": True}) accepts wrong checksums (the CLI's --force);
  a bad footer at the end with a good copy at the start opens without it.
- Broken BAT entries (past the end of the file, over metadata, over other
  blocks) do not stop open, so check can report and repair them; reading or
  writing such a block is refused."""

from __future__ import annotations

import os
import struct
import sys
import time
import uuid as uuidlib
from array import array
from collections import OrderedDict
from typing import Optional
from urllib.parse import unquote, urlparse

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, ParentRef, ParentSpec, Status
from vdtool.core.errors import (CorruptImageError, FormatError, NotSupported, ReadOnlyError, UnsupportedFeature,
                                UsageError, VdError)
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress

# -- on-disk layout -----------------------------------------------------------------

# Hard disk footer (512 bytes): Cookie, Features, File Format Version, Data Offset, Time Stamp, Creator
# Application, Creator Version, Creator Host OS, Original Size, Current Size, Disk Geometry (cylinders,
# heads, sectors per track), Disk Type, Checksum, Unique Id, Saved State, Reserved
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
# Dynamic disk header (1024 bytes): Cookie, Data Offset, Table Offset, Header Version, Max Table Entries,
# Block Size, Checksum, Parent Unique ID, Parent Time Stamp, Reserved, Parent Unicode Name, Parent Locator
# Entries (8 x 24 bytes), Reserved
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
# Parent locator entry: Platform Code, Platform Data Space, Platform Data Length, Reserved, Platform Data Offset
LOCATOR = struct.Struct(">4sIIIQ")
U32 = struct.Struct(">I")

FOOTER_SIZE = 512
HEADER_SIZE = 1024
SECTOR = 512
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
OFS_CHECKSUM = 64
HDR_OFS_CHECKSUM = 36
HDR_OFS_LOCATORS = 576
VERSION_1_0 = 0x00010000
FEATURE_RESERVED = 0x2
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED = 0xFFFFFFFF

TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}

PLAT_W2RU, PLAT_W2KU = b"W2ru", b"W2ku"
PLAT_MAC, PLAT_MACX = b"Mac ", b"MacX"
PLAT_WI2R, PLAT_WI2K = b"Wi2r", b"Wi2k"

# 2000-01-01 00:00:00 UTC, the epoch of every VHD time stamp
VHD_EPOCH = 946684800

CREATOR_APP = b"qem2"  # see the module docstring
CREATOR_HOST_OS = b"Wi2k"
CHS_CREATORS = (b"vpc ", b"vs  ", b"qemu")

MAX_CHS = 65535 * 16 * 255
MAX_DYNAMIC_SIZE = 0xFF000000 * SECTOR  # 2040 GiB, the specification's limit
MAX_SIZE = 1 << 56
MIN_BLOCK = SECTOR
MIN_CREATE_BLOCK = 4096
MAX_BLOCK = 1 << 28
DEFAULT_BLOCK = 2 << 20
MAX_LOCATOR_DATA = 1 << 16  # a UTF-16 path of 32K characters
AZURE_ALIGN = 1 << 20

BITMAP_CACHE = 8192
_ZERO_CHUNK = bytes(1 << 21)
_LITTLE = sys.byteorder == "little"


def _zeros(n: int):
    return memoryview(_ZERO_CHUNK)[:n] if n <= len(_ZERO_CHUNK) else bytes(n)


def _is_zero(buf, start: int = 0, n: Optional[int] = None) -> bool:
    if n is None:
        n = len(buf) - start
    pos = 0
    while pos < n:
        k = min(len(_ZERO_CHUNK), n - pos)
        if not buf.startswith(_ZERO_CHUNK[:k], start + pos):
            return False
        pos += k
    return True


def vhd_checksum(data) -> int:
    """One's complement of the byte sum; the checksum field must read as zero."""
    return ~sum(data) & 0xFFFFFFFF


def _with_checksum(raw: bytearray, at: int) -> bytearray:
    raw[at:at + 4] = bytes(4)
    raw[at:at + 4] = U32.pack(vhd_checksum(raw))
    return raw


def _stored_checksum_ok(raw: bytes, at: int) -> bool:
    stored = U32.unpack_from(raw, at)[0]
    tmp = bytearray(raw)
    tmp[at:at + 4] = bytes(4)
    return vhd_checksum(tmp) == stored


def chs_geometry(size: int) -> tuple:
    """(cylinders, heads, sectors per track) by the specification's
    appendix algorithm; the product never exceeds ``size``."""
    total = min(size // SECTOR, MAX_CHS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_now() -> int:
    return max(0, min(int(time.time()) - VHD_EPOCH, 0xFFFFFFFF))


def _uuid_bytes(value) -> bytes:
    if not value:
        return bytes(16)
    try:
        return uuidlib.UUID(str(value)).bytes
    except ValueError:
        return bytes(16)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _be_u32_array(raw) -> array:
    a = array("I")
    if a.itemsize != 4:  # pragma: no cover - exotic platforms
        a = array("L")
    a.frombytes(raw)
    if _LITTLE:
        a.byteswap()
    return a


def _u32_array_be(a: array) -> bytes:
    if _LITTLE:
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def _decode_utf16(raw: bytes, encoding: str) -> str:
    # names end at the first NUL character
    n = len(raw) - len(raw) % 2
    for i in range(0, n, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            n = i
            break
    return raw[:n].decode(encoding, errors="replace")


def _native_path(name: str) -> str:
    """A Windows-style locator path as this system spells it."""
    if os.sep == "/":
        name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


class _Footer:
    """The hard disk footer as named fields."""

    __slots__ = ("cookie", "features", "file_format_version", "data_offset", "time_stamp", "creator_application",
                 "creator_version", "creator_host_os", "original_size", "current_size", "cylinders", "heads",
                 "sectors_per_track", "disk_type", "checksum", "unique_id", "saved_state", "reserved")

    @classmethod
    def parse(cls, raw: bytes) -> "_Footer":
        f = cls()
        for name, value in zip(cls.__slots__, FOOTER.unpack_from(raw)):
            setattr(f, name, value)
        return f

    def pack(self) -> bytes:
        raw = bytearray(FOOTER.pack(*(getattr(self, n) for n in self.__slots__)))
        return bytes(_with_checksum(raw, OFS_CHECKSUM))


class VhdBackend(ImageBackend):
    name = "vhd"
    extensions = (".vhd", ".vpc")
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID)
    variants = ("dynamic", "fixed")
    options = (
        FormatOption("azure", bool, False,
                     "make an image Azure accepts: fixed, size rounded up to a whole MiB (needs --variant fixed)"),
        FormatOption("uuid", str, None, "unique ID of the new image (default: a random one)"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self._force = False
        self.footer: Optional[_Footer] = None
        self._footer_raw = b""
        self._footer_copy_raw = b""  # what offset 0 holds (dynamic/diff)
        self._problems: list = []  # (kind, message) found at open: reported by check and info
        self._size = 0
        self._type = TYPE_FIXED
        self._data_end = 0  # fixed: where the footer starts
        # dynamic / differencing
        self._hdr_raw = b""
        self._hdr_fields: dict = {}
        self._block = DEFAULT_BLOCK
        self._bitmap_size = SECTOR
        self._spb = DEFAULT_BLOCK // SECTOR
        self._slot = DEFAULT_BLOCK + SECTOR
        self._bat = array("I")
        self._max_entries = 0
        self._table_offset = 0
        self._header_offset = 0
        self._locators: list = []  # dicts: code, space, length, offset, path
        self._parent_uid = bytes(16)
        self._parent_ts = 0
        self._parent_name = ""
        self._bad: dict = {}  # block index -> why its BAT entry cannot be used
        self._next_free = 0
        self._bitmaps: OrderedDict = OrderedDict()
        self._bm_dirty: set = set()
        self._bat_dirty: set = set()  # BAT sector numbers (entry // 128)
        self._data_dirty = False
        self._footer_dirty = False
        self._header_dirty = False
        self._full_mask = 0
        self.notices: list = []
        self._closed = False

    # == class level ======================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        score = 0
        for raw in (tail[-FOOTER_SIZE:] if len(tail) >= FOOTER_SIZE else b"",
                    tail[-511:] + b"\0" if len(tail) >= 511 else b""):
            if raw[:8] == COOKIE:
                score = max(score, 100 if _stored_checksum_ok(raw, OFS_CHECKSUM) else 90)
        if len(head) >= FOOTER_SIZE and head[:8] == COOKIE:
            dtype = U32.unpack_from(head, 60)[0]
            if dtype in (TYPE_DYNAMIC, TYPE_DIFF):
                score = max(score, 100 if _stored_checksum_ok(head[:FOOTER_SIZE], OFS_CHECKSUM) else 90)
        return score

    def _load_image(self, options: dict) -> None:
        # check must be able to open what it reports on and repairs
        self._force = bool(options.get("force") or options.get("check"))
        try:
            self._load()
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError) as e:
            raise CorruptImageError(f"malformed VHD metadata ({e})", self.path) from None

    # == parsing ==========================================================================
    def _load(self) -> None:
        f = self.file
        fsize = f.size()
        if fsize < FOOTER_SIZE:
            raise FormatError(f"file is only {fsize} bytes, too small for a VHD footer (512 bytes)", self.path)
        end_raw = f.pread_exact(fsize - FOOTER_SIZE, FOOTER_SIZE, "VHD footer")
        end_at = fsize - FOOTER_SIZE
        if end_raw[:8] != COOKIE:
            # Virtual PC before 2004 wrote a 511-byte footer
            alt = f.pread(fsize - 511, 511)
            if alt[:8] == COOKIE:
                end_raw, end_at = alt + b"\0", fsize - 511
        head_raw = f.pread(0, FOOTER_SIZE)
        end_ok = end_raw[:8] == COOKIE and _stored_checksum_ok(end_raw, OFS_CHECKSUM)
        head_is_copy = (len(head_raw) == FOOTER_SIZE and head_raw[:8] == COOKIE
                        and U32.unpack_from(head_raw, 60)[0] in (TYPE_DYNAMIC, TYPE_DIFF))
        head_ok = head_is_copy and _stored_checksum_ok(head_raw, OFS_CHECKSUM)
        end_type = U32.unpack_from(end_raw, 60)[0] if end_raw[:8] == COOKIE else None

        if end_raw[:8] == COOKIE and (end_ok or not head_ok or end_type == TYPE_FIXED):
            if not end_ok:
                if not self._force:
                    raise self._corrupt(
                        f"footer checksum is {U32.unpack_from(end_raw, OFS_CHECKSUM)[0]:#010x}, expected "
                        f"{vhd_checksum(end_raw[:OFS_CHECKSUM] + bytes(4) + end_raw[OFS_CHECKSUM + 4:]):#010x} "
                        f"(--force reads it anyway)")
                self._problems.append(("footer-checksum", "footer checksum is wrong"))
            raw, self._data_end = end_raw, end_at
            footer_at_end = True
        elif head_is_copy:
            if not head_ok and not self._force:
                raise self._corrupt("no valid footer: the footer at the end is missing and the copy at offset 0 "
                                    "has a wrong checksum (--force reads it anyway)")
            raw, self._data_end = head_raw, fsize
            footer_at_end = False
            what = "has a wrong checksum" if end_raw[:8] == COOKIE else "is missing (file truncated or not closed)"
            self._problems.append(("footer-missing", f"the footer at the end of the file {what}; "
                                                     f"the copy at offset 0 was used"))
        else:
            raise FormatError(f"no VHD footer: cookie at the end is {end_raw[:8]!r}, expected {COOKIE!r}",
                              self.path)
        self._footer_raw = bytes(raw)
        ft = self.footer = _Footer.parse(raw)
        self._validate_footer(ft, fsize)
        self._type = ft.disk_type
        if self._type == TYPE_FIXED:
            self._size = self._chosen_size(ft)
            if ft.current_size > self._data_end:
                raise self._corrupt(f"fixed disk of current size {ft.current_size} but the file holds only "
                                    f"{self._data_end} bytes before its footer")
            return
        if not footer_at_end:
            self._footer_copy_raw = bytes(raw)
        else:
            self._footer_copy_raw = bytes(head_raw)
            if head_raw != end_raw:
                why = "is not a VHD footer" if not head_is_copy else (
                    "has a wrong checksum" if not head_ok else "differs from the footer")
                self._problems.append(("footer-copy", f"the footer copy at offset 0 {why}"))
        self._size = self._chosen_size(ft)
        self._load_dynamic(ft, fsize)

    def _validate_footer(self, ft: _Footer, fsize: int) -> None:
        if ft.file_format_version >> 16 != 1:
            raise UnsupportedFeature(f"file format version {ft.file_format_version >> 16}."
                                     f"{ft.file_format_version & 0xFFFF} (only 1.x is known)", self.path)
        if ft.disk_type not in TYPE_NAMES:
            raise UnsupportedFeature(f"disk type {ft.disk_type} is not fixed (2), dynamic (3) or "
                                     f"differencing (4)", self.path)
        if ft.current_size > MAX_SIZE:
            raise self._corrupt(f"current size {ft.current_size} is larger than 2^56")
        if ft.disk_type != TYPE_FIXED:
            if ft.current_size > MAX_DYNAMIC_SIZE:
                raise self._corrupt(f"current size {ft.current_size} of a {TYPE_NAMES[ft.disk_type]} disk is "
                                    f"above the format's limit of 2040 GiB ({MAX_DYNAMIC_SIZE})")
            if ft.data_offset < FOOTER_SIZE or ft.data_offset > fsize - HEADER_SIZE:
                raise self._corrupt(f"dynamic disk header offset {ft.data_offset} is outside the file "
                                    f"(file size {fsize})")

    def _chosen_size(self, ft: _Footer) -> int:
        chs = ft.cylinders * ft.heads * ft.sectors_per_track
        cur = ft.current_size // SECTOR * SECTOR
        if ft.creator_application in CHS_CREATORS and 0 < chs < MAX_CHS and chs * SECTOR <= cur:
            return chs * SECTOR
        return cur

    @property
    def size_source(self) -> str:
        ft = self.footer
        chs = ft.cylinders * ft.heads * ft.sectors_per_track * SECTOR
        if self._size == chs and self._size != ft.current_size // SECTOR * SECTOR:
            return "geometry"
        return "current size"

    def _load_dynamic(self, ft: _Footer, fsize: int) -> None:
        f = self.file
        self._header_offset = ft.data_offset
        raw = f.pread_exact(ft.data_offset, HEADER_SIZE, "dynamic disk header")
        vals = DYN_HEADER.unpack(raw)
        names = ("cookie", "data_offset", "table_offset", "header_version", "max_table_entries", "block_size",
                 "checksum", "parent_unique_id", "parent_time_stamp", "reserved", "parent_unicode_name",
                 "parent_locator_entries", "reserved2")
        h = dict(zip(names, vals))
        if h["cookie"] != DYN_COOKIE:
            raise self._corrupt(f"dynamic disk header cookie at offset {ft.data_offset} is {h['cookie']!r}, "
                                f"expected {DYN_COOKIE!r}")
        if not _stored_checksum_ok(raw, HDR_OFS_CHECKSUM):
            if not self._force:
                raise self._corrupt(f"dynamic disk header checksum is {h['checksum']:#010x}, expected "
                                    f"{vhd_checksum(raw[:36] + bytes(4) + raw[40:]):#010x} "
                                    f"(--force reads it anyway)")
            self._problems.append(("header-checksum", "dynamic disk header checksum is wrong"))
        if h["header_version"] >> 16 != 1:
            raise UnsupportedFeature(f"dynamic disk header version {h['header_version'] >> 16}."
                                     f"{h['header_version'] & 0xFFFF} (only 1.x is known)", self.path)
        bs = h["block_size"]
        if bs == 0 or bs & (bs - 1):
            raise self._corrupt(f"block size {bs} is not a power of two")
        if not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise self._corrupt(f"block size {bs} is outside {MIN_BLOCK}..{MAX_BLOCK}")
        self._hdr_raw = bytes(raw)
        self._hdr_fields = h
        self._set_block(bs)
        n = h["max_table_entries"]
        needed = -(-self._size // bs)
        if n < needed:
            raise self._corrupt(f"max table entries {n} cover {n * bs} bytes but the disk is {self._size} bytes")
        if n > -(-MAX_DYNAMIC_SIZE // bs):
            raise self._corrupt(f"max table entries {n} with block size {bs} is beyond the format's 2040 GiB")
        to = h["table_offset"]
        if to < FOOTER_SIZE or to + n * 4 > fsize:
            raise self._corrupt(f"BAT at offset {to} with {n} entries ({n * 4} bytes) runs past the end of the "
                                f"file (file size {fsize})")
        if to < ft.data_offset + HEADER_SIZE and ft.data_offset < to + n * 4:
            raise self._corrupt(f"BAT at offset {to} overlaps the dynamic disk header at {ft.data_offset}")
        self._table_offset = to
        self._max_entries = n
        self._bat = _be_u32_array(f.pread_exact(to, n * 4, "BAT"))
        self._parent_uid = h["parent_unique_id"]
        self._parent_ts = h["parent_time_stamp"]
        self._parent_name = _decode_utf16(h["parent_unicode_name"], "utf-16-be")
        self._locators = []
        if self._type == TYPE_DIFF:
            self._load_locators(h["parent_locator_entries"], fsize)
        self._validate_bat(fsize)

    def _set_block(self, bs: int) -> None:
        self._block = bs
        self._spb = bs // SECTOR
        self._bitmap_size = _round_up(-(-self._spb // 8), SECTOR)
        self._slot = self._bitmap_size + bs
        self._full_mask = (1 << self._spb) - 1

    def _load_locators(self, raw: bytes, fsize: int) -> None:
        for i in range(8):
            code, space, length, _res, offset = LOCATOR.unpack_from(raw, i * LOCATOR.size)
            if code == bytes(4) or length == 0:
                continue
            if length > MAX_LOCATOR_DATA:
                raise self._corrupt(f"parent locator {i} ({code!r}) claims {length} bytes of data "
                                    f"(at most {MAX_LOCATOR_DATA})")
            if offset + length > fsize:
                raise self._corrupt(f"parent locator {i} ({code!r}) data at offset {offset} (length {length}) "
                                    f"runs past the end of the file (file size {fsize})")
            if offset < FOOTER_SIZE or (offset < self._header_offset + HEADER_SIZE
                                        and self._header_offset < offset + length):
                raise self._corrupt(f"parent locator {i} ({code!r}) data at offset {offset} overlaps the "
                                    f"footer copy or the dynamic disk header")
            # The specification counts Platform Data Space in sectors; Hyper-V and
            # VirtualBox write bytes.  Small values can only be sectors.
            space_bytes = space if space >= SECTOR else space * SECTOR
            data = self.file.pread_exact(offset, length, f"parent locator {i}")
            self._locators.append({"code": code, "space": max(space_bytes, _round_up(length, SECTOR)),
                                   "length": length, "offset": offset, "path": self._locator_path(code, data)})

    @staticmethod
    def _locator_path(code: bytes, data: bytes) -> Optional[str]:
        if code in (PLAT_W2RU, PLAT_W2KU):
            name = _decode_utf16(data, "utf-16-le")
        elif code in (PLAT_WI2R, PLAT_WI2K):
            name = data.split(b"\0", 1)[0].decode("latin-1")
        elif code == PLAT_MACX:
            text = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
            url = urlparse(text)
            name = unquote(url.path) if url.scheme == "file" else text
            return name or None
        elif code == PLAT_MAC:
            # a Mac OS alias record; its target's name is a Pascal string at byte 50
            if len(data) > 51 and 0 < data[50] <= 63 and 51 + data[50] <= len(data):
                return data[51:51 + data[50]].decode("mac-roman", errors="replace").replace("/", ":") or None
            return None
        else:
            return None
        name = name.strip()
        return _native_path(name) if name else None

    def _meta_ranges(self) -> list:
        """(start, end, what) of every metadata structure inside the file."""
        out = [(0, FOOTER_SIZE, "footer copy"),
               (self._header_offset, self._header_offset + HEADER_SIZE, "dynamic disk header"),
               (self._table_offset, self._table_offset + _round_up(self._max_entries * 4, SECTOR), "BAT")]
        for loc in self._locators:
            out.append((loc["offset"], loc["offset"] + loc["length"], f"parent locator {loc['code'].decode('latin-1')}"))
        return out

    def _meta_end(self) -> int:
        return _round_up(max(e for _, e, _ in self._meta_ranges()), SECTOR)

    def _validate_bat(self, fsize: int) -> None:
        """Mark unusable BAT entries (check reports and repairs them) and find
        where new blocks go."""
        bad = self._bad = {}
        meta = sorted(self._meta_ranges())
        slot = self._slot
        bat = self._bat
        used = []
        cur = max(self._size, self.footer.current_size)
        for i, e in enumerate(bat):
            if e == UNUSED:
                continue
            off = e * SECTOR
            need = self._bitmap_size + min(self._block, max(cur - i * self._block, 0))
            if off + need > self._data_end:
                bad[i] = (f"BAT entry {i}: block at offset {off} (length {need}) runs past the end of the data "
                          f"(file size {fsize})")
                continue
            for s, e2, what in meta:
                if off < e2 and s < off + slot:
                    bad[i] = f"BAT entry {i}: block at offset {off} overlaps the {what} at {s}"
                    break
            else:
                used.append((off, i))
        # of blocks that overlap, the first in the file stays usable
        used.sort()
        keep_end, keep_i = -1, -1
        for o, i in used:
            if o < keep_end:
                bad[i] = f"BAT entry {i}: block at offset {o} overlaps block {keep_i} at {keep_end - slot}"
            else:
                keep_end, keep_i = o + slot, i
        top = max([o + slot for o, _ in used] + [self._meta_end(), self._data_end])
        self._next_free = _round_up(top, SECTOR)

    # == create ===========================================================================
    @classmethod
    def create(cls, path: str, size: int, *, variant: Optional[str] = None, block_size: Optional[int] = None,
               parent: Optional[ParentSpec] = None, options: Optional[dict] = None,
               progress: Progress = NO_PROGRESS) -> "VhdBackend":
        opts = {o.name: o.default for o in cls.options}
        opts.update(options or {})
        variant = variant or "dynamic"
        if variant not in cls.variants:
            raise UsageError(f"vhd has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        notices = []
        if size < 0:
            raise UsageError(f"size {size} is negative")
        if opts.get("azure"):
            if variant != "fixed":
                raise UsageError("vhd option azure=on needs --variant fixed (Azure takes only fixed VHDs)")
            rounded = _round_up(size, AZURE_ALIGN)
            if rounded != size:
                notices.append(f"size rounded up from {size} to {rounded} bytes (a whole MiB, as Azure requires)")
            size = rounded
        if size % SECTOR:
            rounded = _round_up(size, SECTOR)
            notices.append(f"size rounded up from {size} to {rounded} bytes (whole 512-byte sectors)")
            size = rounded
        if parent is not None and variant == "fixed":
            raise UsageError("a fixed VHD cannot have a parent; differencing VHDs are dynamic")
        if size > MAX_SIZE:
            raise UsageError(f"size {size} is larger than a VHD can describe (2^56)")
        if variant != "fixed" and size > MAX_DYNAMIC_SIZE:
            raise UsageError(f"size {size} is above the 2040 GiB ({MAX_DYNAMIC_SIZE} bytes) a dynamic VHD "
                             f"can hold; use --variant fixed or VHDX")
        bs = DEFAULT_BLOCK if block_size is None else block_size
        # Blocks under 4 KiB read fine, but QEMU sizes their bitmaps as 0 bytes
        # (it rounds sectors / 8 down) and would misread such an image
        if variant != "fixed" and (bs <= 0 or bs & (bs - 1) or not MIN_CREATE_BLOCK <= bs <= MAX_BLOCK):
            raise UsageError(f"block size {bs} must be a power of two from {MIN_CREATE_BLOCK} to {MAX_BLOCK}")
        uid = _uuid_bytes(opts.get("uuid")) if opts.get("uuid") else uuidlib.uuid4().bytes
        if opts.get("uuid") and uid == bytes(16):
            raise UsageError(f"vhd option uuid: {opts.get('uuid')!r} is not a UUID")
        cyl, heads, spt = chs_geometry(size)
        from vdtool import __version__

        try:
            major, minor = (int(x) for x in __version__.split(".")[:2])
        except ValueError:
            major, minor = 0, 1
        ft = _Footer()
        ft.cookie, ft.features, ft.file_format_version = COOKIE, FEATURE_RESERVED, VERSION_1_0
        ft.data_offset = NO_OFFSET if variant == "fixed" else FOOTER_SIZE
        ft.time_stamp = vhd_now()
        ft.creator_application, ft.creator_version = CREATOR_APP, (major << 16) | minor
        ft.creator_host_os = CREATOR_HOST_OS
        ft.original_size = ft.current_size = size
        ft.cylinders, ft.heads, ft.sectors_per_track = cyl, heads, spt
        ft.disk_type = TYPE_FIXED if variant == "fixed" else (TYPE_DIFF if parent else TYPE_DYNAMIC)
        ft.checksum, ft.unique_id, ft.saved_state, ft.reserved = 0, uid, 0, bytes(427)
        f = ImageFile(path, create=True)
        try:
            footer = ft.pack()
            if variant == "fixed":
                f.truncate(size)
                f.pwrite(size, footer)
            else:
                n = -(-size // bs)
                bat_bytes = _round_up(n * 4, SECTOR)
                f.pwrite(0, footer)
                table_offset = FOOTER_SIZE + HEADER_SIZE
                f.pwrite(table_offset, b"\xff" * bat_bytes)
                hdr = cls._header_bytes(table_offset, n, bs, bytes(16), 0, "", b"")
                f.pwrite(FOOTER_SIZE, hdr)
                f.pwrite(table_offset + bat_bytes, footer)
            img = cls(f)
            img._load()
            img.notices = notices
            if parent is not None:
                img.set_parent(parent)
            progress.update(1, 1)
        except BaseException:
            f.close()
            raise
        return img

    @staticmethod
    def _header_bytes(table_offset: int, entries: int, block: int, parent_uid: bytes, parent_ts: int,
                      parent_name: str, locator_entries: bytes) -> bytes:
        name = parent_name.encode("utf-16-be")[:512]
        raw = bytearray(DYN_HEADER.pack(DYN_COOKIE, NO_OFFSET, table_offset, VERSION_1_0, entries, block, 0,
                                        parent_uid, parent_ts, 0, name.ljust(512, b"\0"),
                                        locator_entries.ljust(192, b"\0"), bytes(256)))
        return bytes(_with_checksum(raw, HDR_OFS_CHECKSUM))

    # == facts ============================================================================
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return 4096 if self._type == TYPE_FIXED else self._block

    @property
    def variant(self) -> str:
        return TYPE_NAMES[self._type]

    @property
    def uuid(self) -> Optional[str]:
        uid = self.footer.unique_id
        return str(uuidlib.UUID(bytes=uid)) if uid != bytes(16) else None

    @property
    def timestamp(self) -> int:
        """The footer's time stamp: seconds since 2000-01-01 UTC."""
        return self.footer.time_stamp

    @property
    def parent(self) -> Optional[ParentRef]:
        if self._type != TYPE_DIFF:
            return None
        names = []
        by_code = {}
        for loc in self._locators:
            if loc["path"]:
                by_code.setdefault(loc["code"], loc["path"])
        for code in (PLAT_W2RU, PLAT_WI2R, PLAT_W2KU, PLAT_WI2K, PLAT_MACX, PLAT_MAC):
            if code in by_code:
                names.append(by_code[code])
        if self._parent_name:
            pn = _native_path(self._parent_name)
            names += [pn, os.path.basename(pn)] if os.sep == "/" and "/" in pn else [pn]
        seen, uniq = set(), []
        for n in names:
            if n and n not in seen:
                seen.add(n)
                uniq.append(n)
        uid = self._parent_uid
        return ParentRef(filename=uniq[0] if uniq else None, format=None,
                         uuid=str(uuidlib.UUID(bytes=uid)) if uid != bytes(16) else None,
                         extra={"candidates": uniq[1:], "parent-timestamp": self._parent_ts})

    def _ts_text(self, ts: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(VHD_EPOCH + ts))

    def info(self) -> dict:
        ft = self.footer
        chs = ft.cylinders * ft.heads * ft.sectors_per_track * SECTOR
        d = {
            "disk-type": TYPE_NAMES[self._type],
            "current-size": ft.current_size,
            "original-size": ft.original_size,
            "geometry": f"{ft.cylinders}/{ft.heads}/{ft.sectors_per_track}",
            "geometry-size": chs,
            "size-from": self.size_source,
            "creator-application": ft.creator_application.decode("latin-1"),
            "creator-version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator-host-os": ft.creator_host_os.decode("latin-1"),
            "timestamp": self._ts_text(ft.time_stamp),
            "saved-state": bool(ft.saved_state),
            "unique-id": self.uuid,
        }
        if ft.features & 1:
            d["temporary"] = True
        if self._type != TYPE_FIXED:
            d["block-size"] = self._block
            d["max-table-entries"] = self._max_entries
            d["allocated-blocks"] = sum(1 for e in self._bat if e != UNUSED)
        if self._type == TYPE_DIFF:
            d["parent-unique-id"] = str(uuidlib.UUID(bytes=self._parent_uid))
            d["parent-timestamp"] = self._ts_text(self._parent_ts)
            d["parent-unicode-name"] = self._parent_name
            d["parent-locators"] = [f"{loc['code'].decode('latin-1')}: {loc['path']}" for loc in self._locators]
        if self._problems or self._bad:
            d["problems"] = [m for _, m in self._problems] + list(self._bad.values())[:16]
        return d

    # == block helpers ======================================================================
    def _bitmap(self, idx: int) -> bytearray:
        bm = self._bitmaps.get(idx)
        if bm is not None:
            self._bitmaps.move_to_end(idx)
            return bm
        off = self._bat[idx] * SECTOR
        bm = bytearray(self.file.pread_exact(off, self._bitmap_size, f"sector bitmap of block {idx}"))
        self._bitmaps[idx] = bm
        if len(self._bitmaps) > BITMAP_CACHE:
            if self._bm_dirty:
                self._write_bitmaps()
            while len(self._bitmaps) > BITMAP_CACHE // 2:
                self._bitmaps.popitem(last=False)
        return bm

    def _bits(self, idx: int) -> int:
        """The block's bitmap as an int whose most significant of ``spb`` bits is sector 0."""
        bm = self._bitmap(idx)
        return int.from_bytes(bm, "big") >> (len(bm) * 8 - self._spb)

    def _set_bits(self, idx: int, first: int, end: int) -> None:
        bm = self._bitmap(idx)
        nbits = len(bm) * 8
        v = int.from_bytes(bm, "big")
        nv = v | (((1 << (end - first)) - 1) << (nbits - end))
        if nv != v:
            bm[:] = nv.to_bytes(len(bm), "big")
            self._bm_dirty.add(idx)

    def _run(self, bits: int, sector: int, limit: int) -> tuple:
        """(is_set, count) of the run of equal bits from ``sector`` up to ``limit``."""
        w = limit - sector
        x = (bits >> (self._spb - limit)) & ((1 << w) - 1)
        is_set = bool(x >> (w - 1))
        if is_set:
            x = ~x & ((1 << w) - 1)
        return is_set, w - x.bit_length()

    def _check_block(self, idx: int) -> None:
        why = self._bad.get(idx)
        if why is not None:
            raise self._corrupt(why + " (vdtool check -r all drops it)")

    def _block_data_offset(self, idx: int) -> int:
        return self._bat[idx] * SECTOR + self._bitmap_size

    # == data ===============================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self._size)
        if offset >= end:
            return Status.ZERO, max(length, 1)
        if self._type == TYPE_FIXED:
            data = self.file.next_data(offset)
            if data > offset:
                return Status.ZERO, min(data, end) - offset
            hole = self.file.next_hole(offset)
            return Status.DATA, max(1, min(hole, end) - offset)
        bs = self._block
        bat = self._bat
        status = None
        pos = offset
        while pos < end:
            idx = pos // bs
            bstart = idx * bs
            bend = min(bstart + bs, end)
            e = bat[idx]
            if e == UNUSED:
                st = Status.UNALLOCATED
                # skip whole runs of unallocated blocks quickly
                j = idx + 1
                last = (end - 1) // bs
                while j <= last and bat[j] == UNUSED:
                    j += 1
                bend = min(j * bs, end)
                n = bend - pos
            else:
                self._check_block(idx)
                bits = self._bits(idx)
                s = (pos - bstart) // SECTOR
                if bits == self._full_mask:
                    st, n = Status.DATA, bend - pos
                else:
                    limit = -(-(bend - bstart) // SECTOR)
                    is_set, cnt = self._run(bits, s, limit)
                    st = Status.DATA if is_set else Status.UNALLOCATED
                    n = min(bstart + (s + cnt) * SECTOR, bend) - pos
            if status is None:
                status = st
            elif st != status:
                break
            pos += n
            if pos < bend:
                break  # the run changed inside a block
        return status, pos - offset

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        total = len(mv)
        if self._type == TYPE_FIXED:
            inside = max(0, min(total, self._size - offset))
            if inside:
                self.file.readinto(offset, mv[:inside])
            if inside < total:
                mv[inside:] = _zeros(total - inside)
            return
        bs = self._block
        done = 0
        while done < total:
            pos = offset + done
            idx = pos // bs
            bstart = idx * bs
            n = min(bstart + bs - pos, total - done)
            if pos >= self._size or idx >= self._max_entries or self._bat[idx] == UNUSED:
                mv[done:done + n] = _zeros(n)
                done += n
                continue
            self._check_block(idx)
            base = self._block_data_offset(idx) - bstart
            bits = self._bits(idx)
            if bits == self._full_mask:
                self.file.readinto(base + pos, mv[done:done + n])
                done += n
                continue
            stop = pos + n
            while pos < stop:
                s = (pos - bstart) // SECTOR
                limit = -(-(stop - bstart) // SECTOR)
                is_set, cnt = self._run(bits, s, limit)
                k = min(bstart + (s + cnt) * SECTOR, stop) - pos
                if is_set:
                    self.file.readinto(base + pos, mv[done:done + k])
                else:
                    mv[done:done + k] = _zeros(k)
                done += k
                pos += k

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {self._size})", self.path)

    def write(self, offset: int, data) -> None:
        self._require_writable()
        mv = memoryview(data).cast("B")
        total = len(mv)
        self._check_range(offset, total)
        if self._type == TYPE_FIXED:
            self.file.pwrite(offset, mv)
            return
        bs = self._block
        done = 0
        while done < total:
            pos = offset + done
            idx = pos // bs
            bstart = idx * bs
            n = min(bstart + bs - pos, total - done)
            self._write_in_block(idx, pos - bstart, mv[done:done + n])
            done += n

    def _allocate(self, idx: int) -> None:
        off = self._next_free
        if (off // SECTOR) >= UNUSED:
            raise VdError(f"the file would grow past what a BAT entry can address (offset {off})", self.path)
        self._next_free = off + self._slot
        self._bat[idx] = off // SECTOR
        self._bat_dirty.add(idx // 128)
        self._bitmaps[idx] = bytearray(self._bitmap_size)
        self._bm_dirty.add(idx)
        self._footer_dirty = True
        # Only the old footer can lie here, inside the bitmap written at
        # flush; anything past it would be stale data that must read as zeros
        if self.file.size() > off + self._bitmap_size:
            self.file.zero_range(off + self._bitmap_size, self._block)

    def _write_in_block(self, idx: int, inb: int, data: memoryview) -> None:
        if self._bat[idx] == UNUSED:
            self._allocate(idx)
        self._check_block(idx)
        n = len(data)
        s0, s1 = inb // SECTOR, (inb + n - 1) // SECTOR  # first and last sector touched
        base = self._block_data_offset(idx)
        bstart = idx * self._block
        head_cut = inb % SECTOR
        tail_cut = (inb + n) % SECTOR
        bits = None
        if head_cut or tail_cut:
            bits = self._bits(idx)

        def sector_content(s: int) -> bytearray:
            if (bits >> (self._spb - 1 - s)) & 1:
                return bytearray(self.file.pread(base + s * SECTOR, SECTOR).ljust(SECTOR, b"\0"))
            return bytearray(self.parent_read(bstart + s * SECTOR, SECTOR))

        if s0 == s1 and (head_cut or tail_cut):
            sec = sector_content(s0)
            sec[head_cut:head_cut + n] = data
            self.file.pwrite(base + s0 * SECTOR, sec)
        else:
            pos = 0
            if head_cut:
                sec = sector_content(s0)
                k = SECTOR - head_cut
                sec[head_cut:] = data[:k]
                self.file.pwrite(base + s0 * SECTOR, sec)
                pos = k
            body_end = n - tail_cut if tail_cut else n
            if body_end > pos:
                self.file.pwrite(base + inb + pos, data[pos:body_end])
            if tail_cut:
                sec = sector_content(s1)
                sec[:tail_cut] = data[body_end:]
                self.file.pwrite(base + s1 * SECTOR, sec)
        self._set_bits(idx, s0, s1 + 1)
        self._data_dirty = True

    def _release(self, idx: int) -> None:
        off = self._bat[idx] * SECTOR
        self._bat[idx] = UNUSED
        self._bat_dirty.add(idx // 128)
        self._bitmaps.pop(idx, None)
        self._bm_dirty.discard(idx)
        self._bad.pop(idx, None)
        self._data_dirty = True
        if off + self._slot <= self.file.size():
            self.file.punch_hole(off, self._slot)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._require_writable()
        self._check_range(offset, length)
        if self._type == TYPE_FIXED:
            if not (unmap and self.file.punch_hole(offset, length)):
                pos, end = offset, offset + length
                while pos < end:
                    k = min(len(_ZERO_CHUNK), end - pos)
                    self.file.pwrite(pos, _zeros(k))
                    pos += k
            return
        bs = self._block
        diff = self._type == TYPE_DIFF
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // bs
            bstart = idx * bs
            n = min(bstart + bs - pos, end - pos)
            whole = pos == bstart and (n == bs or pos + n >= self._size)
            allocated = self._bat[idx] != UNUSED
            parent_zero = True
            if diff:
                pdata = self.parent_read(pos, n)
                parent_zero = _is_zero(pdata)
            if allocated and whole and unmap and parent_zero:
                self._release(idx)
            elif allocated or not parent_zero:
                k = 0
                while k < n:
                    m = min(len(_ZERO_CHUNK), n - k)
                    self._write_in_block(idx, pos + k - bstart, _zeros(m))
                    k += m
            pos += n

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    # == metadata write-back =================================================================
    def _write_bitmaps(self) -> None:
        for idx in sorted(self._bm_dirty, key=lambda i: self._bat[i]):
            if self._bat[idx] != UNUSED:
                self.file.pwrite(self._bat[idx] * SECTOR, self._bitmaps[idx])
        self._bm_dirty.clear()

    def _write_bat(self, sectors=None) -> None:
        per = SECTOR // 4
        n = self._max_entries
        if sectors is None:
            raw = _u32_array_be(self._bat)
            pad = _round_up(len(raw), SECTOR) - len(raw)
            self.file.pwrite(self._table_offset, raw + b"\xff" * pad)
        else:
            for s in sorted(sectors):
                chunk = self._bat[s * per:min((s + 1) * per, n)]
                raw = _u32_array_be(chunk)
                self.file.pwrite(self._table_offset + s * SECTOR, raw + b"\xff" * (SECTOR - len(raw)))
        self._bat_dirty.clear()

    def _write_footer(self) -> None:
        raw = self.footer.pack()
        self._footer_raw = raw
        if self._type == TYPE_FIXED:
            self.file.pwrite(self._data_end, raw)
            return
        self.file.pwrite(self._next_free, raw)
        if self.file.size() > self._next_free + FOOTER_SIZE:
            self.file.truncate(self._next_free + FOOTER_SIZE)
        self._data_end = self._next_free
        self.file.pwrite(0, raw)
        self._footer_copy_raw = raw
        self._problems = [p for p in self._problems if p[0] not in ("footer-missing", "footer-copy",
                                                                    "footer-checksum")]
        self._footer_dirty = False

    def _write_header(self) -> None:
        locs = b"".join(LOCATOR.pack(l["code"], l["space"], l["length"], 0, l["offset"]) for l in self._locators)
        raw = self._header_bytes(self._table_offset, self._max_entries, self._block, self._parent_uid,
                                 self._parent_ts, self._parent_name, locs)
        self.file.pwrite(self._header_offset, raw)
        self._hdr_raw = raw
        self._problems = [p for p in self._problems if p[0] != "header-checksum"]
        self._header_dirty = False

    def flush(self) -> None:
        if not self.writable:
            return
        if self._type == TYPE_FIXED:
            self.file.flush()
            return
        if not (self._data_dirty or self._bm_dirty or self._bat_dirty or self._footer_dirty or self._header_dirty):
            return
        self.file.flush()  # data before the metadata that points at it
        self._write_bitmaps()
        if self._bat_dirty:
            self._write_bat(self._bat_dirty)
        if self._header_dirty:
            self._write_header()
        if self._footer_dirty or self._data_end != self._next_free:
            self._write_footer()
        self.file.flush()
        self._data_dirty = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable:
                self.flush()
        finally:
            self.file.close()

    # == parent ============================================================================
    def set_parent(self, parent: Optional[ParentSpec]) -> None:
        self._require_writable()
        if self._type == TYPE_FIXED:
            raise NotSupported("a parent image", "vhd", self.path, "fixed VHDs cannot be differencing disks")
        self.flush()
        if parent is None:
            # Footer first: once it says "dynamic" the parent fields of the
            # header are ignored, so a crash between the two writes leaves a
            # standalone disk.  (Header first left a differencing disk whose
            # parent UUID was zero: it no longer opened.)
            self._type = TYPE_DYNAMIC
            self.footer.disk_type = TYPE_DYNAMIC
            self._write_footer()
            self.file.flush()
            self._parent_uid, self._parent_ts, self._parent_name = bytes(16), 0, ""
            self._locators = []
            self._write_header()
            self.file.flush()
            return
        pimg = parent.image
        if pimg is not None and pimg.name == "vhd":
            uid = _uuid_bytes(pimg.uuid)
            ts = pimg.timestamp
        else:
            uid = _uuid_bytes(parent.uuid)
            ts = max(0, min(int(parent.mtime) - VHD_EPOCH, 0xFFFFFFFF)) if parent.mtime else 0
        abs_path = os.path.abspath(parent.path)
        rel = parent.recorded_name
        datas = []
        if rel and not os.path.isabs(rel):
            win = rel.replace("/", "\\")
            if not win.startswith(".\\") and not win.startswith("..\\"):
                win = ".\\" + win
            datas.append((PLAT_W2RU, win.encode("utf-16-le")))
        datas.append((PLAT_W2KU, abs_path.encode("utf-16-le")))
        for code, data in datas:
            if len(data) > MAX_LOCATOR_DATA:
                raise UsageError(f"parent path {abs_path!r} is too long for a VHD parent locator")
        # locator data goes right after the BAT (and the header, should that
        # come later); blocks in the way move to the end
        start = _round_up(max(self._table_offset + self._max_entries * 4, self._header_offset + HEADER_SIZE),
                          SECTOR)
        if self._type == TYPE_DIFF:
            # Never overwrite the locators the header on disk points at: a
            # crash before the new header is written would leave the old
            # header naming half-written paths.  The new data goes past them.
            for loc in self._locators:
                start = max(start, _round_up(loc["offset"] + loc["space"], SECTOR))
        spaces = [_round_up(max(len(d), SECTOR), SECTOR) for _, d in datas]
        need_end = start + sum(spaces)
        self._make_room(start, need_end)
        locs = []
        pos = start
        for (code, data), space in zip(datas, spaces):
            self.file.pwrite(pos, data.ljust(space, b"\0"))
            locs.append({"code": code, "space": space, "length": len(data), "offset": pos,
                         "path": self._locator_path(code, data)})
            pos += space
        self.file.flush()
        self._locators = locs
        self._parent_uid, self._parent_ts = uid, ts
        self._parent_name = os.path.basename(abs_path)[:256]
        self._next_free = max(self._next_free, _round_up(need_end, SECTOR))
        self._write_header()
        self.file.flush()
        self._type = TYPE_DIFF
        self.footer.disk_type = TYPE_DIFF
        self._write_footer()
        self.file.flush()

    def _make_room(self, start: int, end: int) -> None:
        """Move every block that overlaps [start, end) to the end of the file,
        flushed before the BAT points at the new place."""
        slot = self._slot
        movers = [i for i, e in enumerate(self._bat)
                  if e != UNUSED and i not in self._bad and e * SECTOR < end and start < e * SECTOR + slot]
        self._next_free = max(self._next_free, _round_up(end, SECTOR))
        if not movers:
            return
        buf = bytearray(slot)
        moved = {}
        for i in movers:
            old = self._bat[i] * SECTOR
            self.file.readinto(old, buf)
            new = self._next_free
            # the block and a footer behind it in one write: the block lands
            # where the end footer was, and a crash before the footer is
            # written again must not leave the file without one
            self.file.pwrite(new, bytes(buf) + self.footer.pack())
            self._next_free = new + slot
            moved[i] = new
        self._write_footer()
        self.file.flush()
        for i, new in moved.items():
            self._bat[i] = new // SECTOR
        self._write_bat()
        self.file.flush()

    # == whole-image operations =============================================================
    def resize(self, new_size: int) -> None:
        self._require_writable()
        if new_size < 0:
            raise UsageError(f"size {new_size} is negative")
        new_size = _round_up(new_size, SECTOR)
        if new_size > MAX_SIZE:
            raise UsageError(f"size {new_size} is larger than a VHD can describe (2^56)")
        ft = self.footer
        if self._type == TYPE_FIXED:
            self.file.flush()
            old_end = self._data_end
            self._set_size_fields(new_size)
            raw = ft.pack()
            self.file.pwrite(new_size, raw)
            self.file.flush()
            if new_size > old_end:
                # the old footer now lies inside the disk: it must read as zeros
                self.file.zero_range(old_end, min(FOOTER_SIZE, new_size - old_end))
            else:
                self.file.truncate(new_size + FOOTER_SIZE)
            self.file.flush()
            self._data_end = new_size
            self._footer_raw = raw
            self._size = new_size
            return
        if new_size > MAX_DYNAMIC_SIZE:
            raise UsageError(f"size {new_size} is above the 2040 GiB ({MAX_DYNAMIC_SIZE} bytes) a dynamic VHD "
                             f"can hold")
        bs = self._block
        need = -(-new_size // bs)
        if new_size < self._size:
            old_size = self._size
            # The smaller size goes into the footer first: from then on the
            # part past the new end is out of sight, so a crash while it is
            # zeroed and its blocks released leaves the new content (and at
            # worst leaked blocks), never a disk that reads neither old nor
            # new, or a header whose table no longer covers the old size.
            self.flush()
            self._set_size_fields(new_size)
            self._size = new_size
            self._write_footer()
            self.file.flush()
            if new_size % bs:
                idx = new_size // bs
                if self._bat[idx] != UNUSED and idx not in self._bad:
                    cut = min((idx + 1) * bs, old_size)
                    k = new_size
                    while k < cut:
                        m = min(len(_ZERO_CHUNK), cut - k)
                        self._write_in_block(idx, k - idx * bs, _zeros(m))
                        k += m
            for i in range(need, self._max_entries):
                if self._bat[i] != UNUSED:
                    self._release(i)
            self.flush()
            del self._bat[need:]
            self._max_entries = need
            self._write_bat()
            self._write_header()
            self.file.flush()
        elif need > self._max_entries:
            self.flush()
            self._grow_bat(need)
        self._set_size_fields(new_size)
        self._size = new_size
        self._trim_tail()
        self._write_footer()
        self.file.flush()

    def _set_size_fields(self, new_size: int) -> None:
        ft = self.footer
        ft.current_size = new_size
        ft.cylinders, ft.heads, ft.sectors_per_track = chs_geometry(new_size)
        if ft.creator_application in CHS_CREATORS:
            # the geometry would cut the new size: say the current size counts
            ft.creator_application = CREATOR_APP

    def _grow_bat(self, need: int) -> None:
        to = self._table_offset
        new_bat_end = _round_up(to + need * 4, SECTOR)
        old_end = _round_up(to + self._max_entries * 4, SECTOR)
        if to < self._header_offset < new_bat_end:
            raise NotSupported("growing", "vhd", self.path, "the dynamic disk header follows the BAT")
        # locators in the way of the larger table move behind everything
        in_way = [loc for loc in self._locators if loc["offset"] < new_bat_end and to < loc["offset"] + loc["space"]]
        end = new_bat_end
        if in_way:
            end = _round_up(max([new_bat_end] + [l["offset"] + l["space"] for l in self._locators]), SECTOR)
            datas = [self.file.pread_exact(l["offset"], l["length"], "parent locator") for l in in_way]
            pos0 = end
            end += sum(_round_up(len(d), SECTOR) for d in datas)
        self._make_room(old_end, end)
        if in_way:
            pos = pos0
            for loc, data in zip(in_way, datas):
                space = _round_up(len(data), SECTOR)
                self.file.pwrite(pos, data.ljust(space, b"\0"))
                loc["offset"], loc["space"] = pos, space
                pos += space
            self.file.flush()
            self._write_header()  # still the old table size: the old BAT stays valid
            self.file.flush()
        self._bat.extend([UNUSED] * (need - self._max_entries))
        self._max_entries = need
        self._write_bat()
        self.file.flush()
        self._write_header()
        self.file.flush()

    def _trim_tail(self) -> None:
        """Pull the end of the file back to the last block in use."""
        ends = [e * SECTOR + self._slot for e in self._bat if e != UNUSED and e * SECTOR < self._next_free]
        top = _round_up(max(ends + [self._meta_end()]), SECTOR)
        if top < self._next_free:
            self._next_free = top

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        self._require_writable()
        if self._type == TYPE_FIXED:
            self._compact_fixed(progress)
            return
        if self._bad:
            raise self._corrupt(f"{len(self._bad)} BAT entries are unusable ({next(iter(self._bad.values()))}); "
                                f"run check -r all first")
        self.flush()
        bs, slot = self._block, self._slot
        allocated = [i for i, e in enumerate(self._bat) if e != UNUSED]
        total = len(allocated) or 1
        buf = bytearray(bs)
        released = 0
        scan = progress.sub(0, 60)
        for k, idx in enumerate(allocated):
            bstart = idx * bs
            n = min(bs, self._size - bstart)
            view = memoryview(buf)[:n]
            self.file.readinto(self._block_data_offset(idx), view)
            bits = self._bits(idx)
            zero = True
            s, limit = 0, -(-n // SECTOR)
            while s < limit and zero:
                is_set, cnt = self._run(bits, s, limit)
                if is_set:
                    a, b = s * SECTOR, min((s + cnt) * SECTOR, n)
                    zero = _is_zero(buf, a, b - a)
                    if zero and self._type == TYPE_DIFF:
                        zero = _is_zero(self.parent_read(bstart + a, b - a))
                s += cnt
            if zero:
                self._bat[idx] = UNUSED
                self._bitmaps.pop(idx, None)
                released += 1
            scan.update(k + 1, total)
        if released:
            self._write_bat()
            self.file.flush()
        # close the holes: blocks not in their final slot move into free
        # slots, the highest first; each copy lands on space nothing uses
        blocks = sorted((e * SECTOR, i) for i, e in enumerate(self._bat) if e != UNUSED)
        first = self._meta_end()
        count = len(blocks)
        region_end = first + count * slot
        placed = set()
        misplaced = []
        for off, i in blocks:
            k, r = divmod(off - first, slot)
            if off >= first and r == 0 and k < count:
                placed.add(k)
            else:
                misplaced.append((off, i))
        move = progress.sub(60, 40)
        sbuf = bytearray(slot)
        # blocks straddling the target area go to the end first
        straddle = [(o, i) for o, i in misplaced if o < region_end]
        if straddle:
            relocated = {}
            for o, i in straddle:
                self.file.readinto(o, sbuf)
                self.file.pwrite(self._next_free, sbuf)
                relocated[i] = self._next_free
                self._next_free += slot
            self.file.flush()
            for i, new in relocated.items():
                self._bat[i] = new // SECTOR
            self._write_bat()
            self.file.flush()
            misplaced = [(relocated.get(i, o), i) for o, i in misplaced]
        free = [k for k in range(count) if k not in placed]
        misplaced.sort(reverse=True)
        assign = {}
        for (o, i), k in zip(misplaced, free):
            self.file.readinto(o, sbuf)
            self.file.pwrite(first + k * slot, sbuf)
            assign[i] = first + k * slot
            move.update(len(assign), len(free) or 1)
        if assign:
            self.file.flush()
            for i, new in assign.items():
                self._bat[i] = new // SECTOR
            self._write_bat()
            self.file.flush()
        self._bitmaps.clear()
        self._next_free = region_end
        self._write_footer()
        self.file.flush()

    def _compact_fixed(self, progress: Progress) -> None:
        step = 1 << 16
        buf = bytearray(step)
        pos = 0
        while pos < self._size:
            status, n = self.block_status(pos, self._size - pos)
            if status == Status.DATA:
                start = pos // step * step
                stop = pos + n
                while start < stop:
                    m = min(step, self._size - start)
                    view = memoryview(buf)[:m]
                    self.file.readinto(start, view)
                    if _is_zero(buf, 0, m):
                        self.file.punch_hole(start, m)
                    start += step
                pos = max(start, pos + n)
            else:
                pos += n
            progress.update(min(pos, self._size), self._size)

    def check(self, repair: Optional[str] = None, progress: Progress = NO_PROGRESS) -> CheckResult:
        r = CheckResult()
        if repair:
            self._require_writable()
        fix_all = repair == "all"
        ft = self.footer
        stale = 0
        for kind, msg in self._problems:
            if kind == "footer-copy" and self._type != TYPE_FIXED:
                # The footer at the end is good and is the one used; the copy
                # at offset 0 is written after it, so a crash between the two
                # writes leaves it stale: harmless, rewritten by -r leaks.
                stale += 1
                r.leaks += 1
                r.messages.append(msg + " (stale copy; the footer at the end is used)")
                continue
            r.corruptions += 1
            r.messages.append(msg)
        chs = ft.cylinders * ft.heads * ft.sectors_per_track
        if self._type == TYPE_FIXED:
            r.image_end_offset = self._data_end + FOOTER_SIZE
            if fix_all and self._problems:
                self._write_footer()
                self.file.flush()
                r.corruptions_fixed += len(self._problems)
                self._problems = []
            return r
        if chs == 0 and ft.current_size:
            r.messages.append("note: the disk geometry is 0/0/0")
        if self._bad:
            for why in list(self._bad.values())[:50]:
                r.messages.append(why)
            r.corruptions += len(self._bad)
        leaks = []
        full = (1 << (self._bitmap_size * 8)) - 1
        for i, e in enumerate(self._bat):
            if e == UNUSED or i in self._bad:
                continue
            if not int.from_bytes(self._bitmap(i), "big") & full:
                leaks.append(i)
        if leaks:
            r.leaks += len(leaks)
            r.messages.append(f"{len(leaks)} allocated blocks have no sector in use (first: block {leaks[0]})")
        r.total_clusters = self._max_entries
        r.allocated_clusters = sum(1 for e in self._bat if e != UNUSED) - len(self._bad)
        if repair:
            if fix_all and self._bad:
                for i in list(self._bad):
                    self._bat[i] = UNUSED
                    self._bitmaps.pop(i, None)
                    self._bm_dirty.discard(i)
                    r.corruptions_fixed += 1
                self._bad = {}
                self._write_bat()
                self.file.flush()
            for i in leaks:
                self._release(i)
                r.leaks_fixed += 1
            if stale:
                r.leaks_fixed += stale
                self._footer_dirty = True
            if fix_all and len(self._problems) > stale:
                if any(k == "header-checksum" for k, _ in self._problems):
                    self._write_header()
                r.corruptions_fixed += len(self._problems) - stale
                self._footer_dirty = True
            if fix_all or leaks or stale:
                self._trim_tail()
                self.flush()
                self._write_footer()
                self.file.flush()
                self._problems = []
        r.image_end_offset = self._next_free + FOOTER_SIZE
        return r

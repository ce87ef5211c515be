"""VHD on-disk structures, constants and pure rules (no I/O).

Field names are the specification's ("Virtual Hard Disk Image Format
Specification" 1.0), in snake case; its Disk Geometry field is split into
its three parts.  Every integer is big-endian."""

from __future__ import annotations

import time

from vdtool.core import bytesutil
from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.layout import Layout, Record

# -- structures ----------------------------------------------------------------------

# Hard disk footer: at the end of every VHD, and copied to offset 0 of
# dynamic and differencing disks.
FOOTER = Layout("vhd footer", ">", (
    ("cookie", "8s"), ("features", "I"), ("file_format_version", "I"), ("data_offset", "Q"),
    ("time_stamp", "I"), ("creator_application", "4s"), ("creator_version", "I"), ("creator_host_os", "4s"),
    ("original_size", "Q"), ("current_size", "Q"),
    ("cylinders", "H"), ("heads", "B"), ("sectors_per_track", "B"),  # Disk Geometry
    ("disk_type", "I"), ("checksum", "I"), ("unique_id", "16s"), ("saved_state", "B"),
    ("reserved", "427s"),  # kept as read: a rewritten footer changes only what it means to
))

# Dynamic disk header (dynamic and differencing disks), at the footer's data_offset.
DYNAMIC_HEADER = Layout("vhd dynamic disk header", ">", (
    ("cookie", "8s"), ("data_offset", "Q"), ("table_offset", "Q"), ("header_version", "I"),
    ("max_table_entries", "I"), ("block_size", "I"), ("checksum", "I"), ("parent_unique_id", "16s"),
    ("parent_time_stamp", "I"), (None, "4x"), ("parent_unicode_name", "512s"),
    ("parent_locator_entries", "192s"),  # LOCATOR_SLOTS x PARENT_LOCATOR
    (None, "256x"),
))

# One of the eight parent locator entries inside the dynamic disk header.
PARENT_LOCATOR = Layout("vhd parent locator entry", ">", (
    ("platform_code", "4s"), ("platform_data_space", "I"), ("platform_data_length", "I"), (None, "4x"),
    ("platform_data_offset", "Q"),
))
LOCATOR_SLOTS = 8

FOOTER_SIZE = FOOTER.size  # 512
HEADER_SIZE = DYNAMIC_HEADER.size  # 1024
SECTOR = 512
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
VERSION_1_0 = 0x00010000
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # the specification says always set
FEATURES_KNOWN = FEATURE_TEMPORARY | FEATURE_RESERVED
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED = 0xFFFFFFFF  # a BAT entry of an unallocated block
BAT_PER_SECTOR = SECTOR // 4  # BAT entries in one sector of the table

TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFF = 2, 3, 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}

# parent locator platform codes
PLAT_W2RU, PLAT_W2KU = b"W2ru", b"W2ku"  # relative / absolute UTF-16LE path
PLAT_MAC, PLAT_MACX = b"Mac ", b"MacX"  # Mac OS alias / file URL
PLAT_WI2R, PLAT_WI2K = b"Wi2r", b"Wi2k"  # relative / absolute single-byte path (deprecated)

# 2000-01-01 00:00:00 UTC, the epoch of every VHD time stamp
VHD_EPOCH = 946684800

# Creator application of vdtool's images: the code QEMU (since 2.5) reads as
# "the current size is the disk's size", vdtool's rule (see backend).
CREATOR_APP = b"qem2"
CREATOR_HOST_OS = b"Wi2k"
# creators whose disks are as large as their CHS geometry
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

# Problem kinds of the validation functions: which error the backend raises.
CORRUPT, UNSUPPORTED = "corrupt", "unsupported"


# -- checksums -------------------------------------------------------------------------

def vhd_checksum(data) -> int:
    """One's complement of the byte sum; the checksum field must read as zero."""
    return ~sum(data) & 0xFFFFFFFF


def expected_checksum(raw, layout: Layout) -> int:
    """The checksum ``raw`` (one ``layout`` structure) should carry."""
    at, n = layout.span("checksum")
    return vhd_checksum(bytes(raw[:at]) + bytes(n) + bytes(raw[at + n:layout.size]))


def checksum_ok(raw, layout: Layout) -> bool:
    return layout.unpack(raw).checksum == expected_checksum(raw, layout)


def with_checksum(raw: bytearray, layout: Layout) -> bytearray:
    """``raw`` with its checksum field set (changed in place)."""
    at, n = layout.span("checksum")
    raw[at:at + n] = bytes(n)
    raw[at:at + n] = vhd_checksum(raw).to_bytes(n, "big")
    return raw


def pack_with_checksum(layout: Layout, rec: Record) -> bytes:
    """The structure's bytes with the checksum computed (``rec.checksum``
    is not looked at, nor changed)."""
    return bytes(with_checksum(bytearray(layout.pack(rec)), layout))


# -- footer -----------------------------------------------------------------------------

def is_footer(raw) -> bool:
    return len(raw) == FOOTER_SIZE and raw[:len(COOKIE)] == COOKIE


def has_footer_copy(raw) -> bool:
    """Whether ``raw`` (the first 512 bytes) is the footer copy a dynamic or
    differencing disk keeps at offset 0."""
    return is_footer(raw) and FOOTER.unpack(raw).disk_type in (TYPE_DYNAMIC, TYPE_DIFF)


def footer_problems(ft: Record, file_size: int) -> list:
    """(kind, message) of what makes the footer unusable, in the order they
    are reported."""
    out = []
    ver = ft.file_format_version
    if ver >> 16 != 1:
        out.append((UNSUPPORTED, f"file format version {ver >> 16}.{ver & 0xFFFF} (only 1.x is known)"))
    if ft.disk_type not in TYPE_NAMES:
        out.append((UNSUPPORTED, f"disk type {ft.disk_type} is not fixed (2), dynamic (3) or differencing (4)"))
    if ft.current_size > MAX_SIZE:
        out.append((CORRUPT, f"current size {ft.current_size} is larger than 2^56"))
    if ft.disk_type in (TYPE_DYNAMIC, TYPE_DIFF):
        if ft.current_size > MAX_DYNAMIC_SIZE:
            out.append((CORRUPT, f"current size {ft.current_size} of a {TYPE_NAMES[ft.disk_type]} disk is "
                                 f"above the format's limit of 2040 GiB ({MAX_DYNAMIC_SIZE})"))
        if ft.data_offset < FOOTER_SIZE or ft.data_offset > file_size - HEADER_SIZE:
            out.append((CORRUPT, f"dynamic disk header offset {ft.data_offset} is outside the file "
                                 f"(file size {file_size})"))
    return out


def geometry_sectors(ft: Record) -> int:
    return ft.cylinders * ft.heads * ft.sectors_per_track


def disk_size(ft: Record) -> int:
    """The disk's size: its CHS geometry for the creators that size disks
    that way (unless the geometry is zero, at its maximum, or larger than
    the current size), else the current size in whole sectors."""
    chs = geometry_sectors(ft)
    cur = ft.current_size // SECTOR * SECTOR
    if ft.creator_application in CHS_CREATORS and 0 < chs < MAX_CHS and chs * SECTOR <= cur:
        return chs * SECTOR
    return cur


def size_source(ft: Record, size: int) -> str:
    """What ``size`` (the disk's size) was taken from, for ``info``."""
    if size == geometry_sectors(ft) * SECTOR and size != ft.current_size // SECTOR * SECTOR:
        return "geometry"
    return "current size"


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


def uuid_bytes(value) -> bytes:
    """A UUID given as text as the 16 bytes a VHD stores (zeros for none or
    for text that is not a UUID)."""
    if not value:
        return bytes(16)
    try:
        import uuid as uuidlib  # here: the uuid module costs 3 ms of start-up

        return uuidlib.UUID(str(value)).bytes
    except ValueError:
        return bytes(16)


def uuid_text(raw: bytes) -> str | None:
    return bytesutil.uuid_text(raw) if raw != bytes(16) else None


# -- time stamps -------------------------------------------------------------------------

def vhd_time(unix_seconds: float) -> int:
    """A Unix time as a VHD time stamp (clamped to what the field holds)."""
    return max(0, min(int(unix_seconds) - VHD_EPOCH, 0xFFFFFFFF))


def vhd_now() -> int:
    return vhd_time(time.time())


def time_stamp_text(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(VHD_EPOCH + ts))


# -- dynamic disk header -------------------------------------------------------------------

def bitmap_bytes(block_size: int) -> int:
    """Bytes of a block's sector bitmap: a bit per sector, padded to sectors."""
    return align_up(ceil_div(block_size // SECTOR, 8), SECTOR)


def header_problems(hdr: Record, disk_bytes: int, header_offset: int, file_size: int) -> list:
    """(kind, message) of what makes the dynamic disk header unusable, past
    its cookie and checksum (which the loader judges first), in the order
    they are reported."""
    ver = hdr.header_version
    if ver >> 16 != 1:
        return [(UNSUPPORTED, f"dynamic disk header version {ver >> 16}.{ver & 0xFFFF} (only 1.x is known)")]
    bs = hdr.block_size
    if bs == 0 or bs & (bs - 1):
        return [(CORRUPT, f"block size {bs} is not a power of two")]
    if not MIN_BLOCK <= bs <= MAX_BLOCK:
        return [(CORRUPT, f"block size {bs} is outside {MIN_BLOCK}..{MAX_BLOCK}")]
    out = []
    n = hdr.max_table_entries
    if n < ceil_div(disk_bytes, bs):
        out.append((CORRUPT, f"max table entries {n} cover {n * bs} bytes but the disk is {disk_bytes} bytes"))
    if n > ceil_div(MAX_DYNAMIC_SIZE, bs):
        out.append((CORRUPT, f"max table entries {n} with block size {bs} is beyond the format's 2040 GiB"))
    to = hdr.table_offset
    if to < FOOTER_SIZE or to + n * 4 > file_size:
        out.append((CORRUPT, f"BAT at offset {to} with {n} entries ({n * 4} bytes) runs past the end of the "
                             f"file (file size {file_size})"))
    if to < header_offset + HEADER_SIZE and header_offset < to + n * 4:
        out.append((CORRUPT, f"BAT at offset {to} overlaps the dynamic disk header at {header_offset}"))
    return out


def locator_entries(hdr: Record) -> list:
    """(slot, PARENT_LOCATOR record) of the header's entries that are in use."""
    raw = hdr.parent_locator_entries
    out = []
    for i in range(LOCATOR_SLOTS):
        e = PARENT_LOCATOR.unpack(raw, i * PARENT_LOCATOR.size)
        if e.platform_code != bytes(4) and e.platform_data_length:
            out.append((i, e))
    return out


def locator_problem(slot: int, e: Record, header_offset: int, file_size: int):
    """Why a parent locator entry's data cannot be read, or None."""
    code, length, offset = e.platform_code, e.platform_data_length, e.platform_data_offset
    if length > MAX_LOCATOR_DATA:
        return f"parent locator {slot} ({code!r}) claims {length} bytes of data (at most {MAX_LOCATOR_DATA})"
    if offset + length > file_size:
        return (f"parent locator {slot} ({code!r}) data at offset {offset} (length {length}) runs past the end "
                f"of the file (file size {file_size})")
    if offset < FOOTER_SIZE or (offset < header_offset + HEADER_SIZE and header_offset < offset + length):
        return (f"parent locator {slot} ({code!r}) data at offset {offset} overlaps the footer copy or the "
                f"dynamic disk header")
    return None


def locator_space(e: Record) -> int:
    """Bytes reserved for a locator's data.  The specification counts
    Platform Data Space in sectors; Hyper-V and VirtualBox write bytes.
    Small values can only be sectors."""
    space = e.platform_data_space
    space_bytes = space if space >= SECTOR else space * SECTOR
    return max(space_bytes, align_up(e.platform_data_length, SECTOR))


def dynamic_header(table_offset: int, max_table_entries: int, block_size: int, *,
                   parent_unique_id: bytes = bytes(16), parent_time_stamp: int = 0, parent_unicode_name: str = "",
                   parent_locator_entries: bytes = b"") -> bytes:
    """A dynamic disk header's bytes, checksum included."""
    rec = DYNAMIC_HEADER.new(
        cookie=DYN_COOKIE, data_offset=NO_OFFSET, table_offset=table_offset, header_version=VERSION_1_0,
        max_table_entries=max_table_entries, block_size=block_size, parent_unique_id=parent_unique_id,
        parent_time_stamp=parent_time_stamp, parent_unicode_name=parent_unicode_name.encode("utf-16-be")[:512],
        parent_locator_entries=parent_locator_entries)
    return pack_with_checksum(DYNAMIC_HEADER, rec)


# -- probing and --untrusted ----------------------------------------------------------------

def _end_footers(tail: bytes) -> tuple:
    """The footer at the end, and the 511-byte footer Virtual PC wrote
    before 2004 (padded), as far as ``tail`` holds them."""
    return (tail[-FOOTER_SIZE:] if len(tail) >= FOOTER_SIZE else b"",
            tail[-511:] + b"\0" if len(tail) >= 511 else b"")


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when the magic says VHD: "conectix" at the end (512- or 511-byte
    footer) or a footer copy at offset 0; else 0."""
    if head[:8] == COOKIE or any(raw[:8] == COOKIE for raw in _end_footers(tail)):
        return 100
    return 0


def probe_score(head: bytes, tail: bytes, size: int) -> int:
    """The backend's probe: 100 for a footer with a good checksum, 90 for
    one with a bad checksum (open says why), 0 without."""
    score = 0
    for raw in _end_footers(tail):
        if raw[:8] == COOKIE:
            score = max(score, 100 if checksum_ok(raw, FOOTER) else 90)
    if len(head) >= FOOTER_SIZE and has_footer_copy(head[:FOOTER_SIZE]):
        score = max(score, 100 if checksum_ok(head[:FOOTER_SIZE], FOOTER) else 90)
    return score


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) for --untrusted from the footer alone: unknown
    feature bits and a differencing disk's parent.  Not complete: the
    parent's names are in the locators, which the backend reads."""
    out = []
    for raw in (tail[-FOOTER_SIZE:], head[:FOOTER_SIZE]):
        if is_footer(raw):
            ft = FOOTER.unpack(raw)
            if ft.features & ~FEATURES_KNOWN:
                out.append(("unknown-features", f"vhd footer features 0x{ft.features & ~FEATURES_KNOWN:x}"))
            if ft.disk_type == TYPE_DIFF:
                out.append(("external-reference", "differencing image: its parent is another file "
                                                  "(parent locators)"))
            break
    return out, False

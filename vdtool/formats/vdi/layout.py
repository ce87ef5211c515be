"""VDI's on-disk structures, spelled as VirtualBox's VDICore.h spells them,
the format's constants and limits, and pure functions over header bytes (no
I/O): recognising the format, an image's UUID, decoding and validating the
header, vdtool's parent-name hint, and what ``--untrusted`` finds."""

from __future__ import annotations

from vdtool.core.bytesutil import ceil_div, uuid_text
from vdtool.core.errors import UsageError
from vdtool.core.layout import Layout, Record

# -- structures ------------------------------------------------------------------------------------
PREHEADER = Layout("vdi preheader", "<", (("szFileInfo", "64s"), ("u32Signature", "I"), ("u32Version", "I")))
HEADER_OFFSET = PREHEADER.size  # the header follows the pre-header (72)

# VDIDISKGEOMETRY, flattened: the legacy geometry of every version ...
_LEGACY_GEOMETRY = (("cCylinders", "I"), ("cHeads", "I"), ("cSectors", "I"), ("cbSector", "I"))
# ... and the LCHS geometry that 1.1+ headers add (prefixed: same struct, other field)
_LCHS_GEOMETRY = (("LCHS_cCylinders", "I"), ("LCHS_cHeads", "I"), ("LCHS_cSectors", "I"),
                  ("LCHS_cbSector", "I"))

HEADER0 = Layout("vdi header v0", "<", (
    ("u32Type", "I"), ("fFlags", "I"), ("szComment", "256s"), *_LEGACY_GEOMETRY, ("cbDisk", "Q"),
    ("cbBlock", "I"), ("cBlocks", "I"), ("cBlocksAllocated", "I"),
    ("uuidCreate", "16s"), ("uuidModify", "16s"), ("uuidLinkage", "16s")))
_HEADER1_FIELDS = (
    ("cbHeader", "I"), ("u32Type", "I"), ("fFlags", "I"), ("szComment", "256s"), ("offBlocks", "I"),
    ("offData", "I"), *_LEGACY_GEOMETRY, ("u32Dummy", "I"), ("cbDisk", "Q"), ("cbBlock", "I"),
    ("cbBlockExtra", "I"), ("cBlocks", "I"), ("cBlocksAllocated", "I"),
    ("uuidCreate", "16s"), ("uuidModify", "16s"), ("uuidLinkage", "16s"), ("uuidParentModify", "16s"))
HEADER1 = Layout("vdi header v1", "<", _HEADER1_FIELDS)
HEADER1PLUS = Layout("vdi header v1plus", "<", _HEADER1_FIELDS + _LCHS_GEOMETRY)

# -- constants -------------------------------------------------------------------------------------
VDI_IMAGE_FILE_INFO = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
VDI_IMAGE_SIGNATURE = 0xBEDA107F
VDI_IMAGE_VERSION = 0x00010001
VDI_IMAGE_VERSION_OLD = 0x00000002  # header version 0
VDI_GEOMETRY_SECTOR_SIZE = 512
VDI_DATA_ALIGN = 1 << 20
VDI_IMAGE_DEFAULT_BLOCK_SIZE = 1 << 20
VDI_IMAGE_COMMENT_SIZE = 256
VDI_IMAGE_BLOCK_FREE = 0xFFFFFFFF
VDI_IMAGE_BLOCK_ZERO = 0xFFFFFFFE  # entries below this are data block indices

VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_TYPE_FIXED, VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_TYPE_DIFF = 1, 2, 3, 4
TYPE_NAMES = {1: "normal", 2: "fixed", 3: "undo", 4: "diff"}
VARIANTS = ("dynamic", "fixed")  # vdtool's names for normal and fixed; the first is the default
VDI_IMAGE_FLAGS_ZERO_EXPAND = 0x01
# fFlags as VirtualBox accepts them: zero-expand (1) and the VD fixed/diff flags shifted down by 8
VDI_FLAGS_VALID = 0x301

MIN_BLOCK = 512
MAX_BLOCK = 1 << 30
MAX_DISK = 1 << 56
MAX_BLOCKS = 0xFFFFFFF0  # 2^32 - 16: entries from there up are markers
MAX_OFFSET = 0xFFFFFFFF  # offBlocks and offData are u32
MAX_HEADER = 65536  # largest cbHeader vdtool reads
NULL_UUID = bytes(16)

# Where vdtool keeps the name of a parent that has no UUID (qcow2, raw): the
# padding between header and block map, which VirtualBox and QEMU ignore.
HINT_OFFSET = 512
HINT = Layout("vdtool parent hint", "<", (("magic", "16s"), ("cbName", "I")))  # then cbName bytes of UTF-8
HINT_MAGIC = b"vdtool-parent\0\0\0"
HINT_SYNTHETIC = 0x80000000  # in cbName: the parent had no UUID, uuidLinkage was made up
MAX_HINT_NAME = 4096

# what an open reads: the pre-header and a header of up to MAX_HEADER bytes
HEAD_READ = HEADER_OFFSET + MAX_HEADER
MIN_FILE_SIZE = HEADER_OFFSET + HEADER0.size

# -- small helpers ---------------------------------------------------------------------------------


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def is_v1(version: int) -> bool:
    return version >> 16 == 1


def has_lchs(hdr: Record) -> bool:
    """Whether the header is a 1.1+ one (its LCHS fields are real)."""
    return hdr.cbHeader >= HEADER1PLUS.size


def uuid_str(raw: bytes) -> str:
    return uuid_text(raw, little=True)


def parse_uuid(text: str) -> bytes:
    """A UUID given by a user or another format, as VDI stores it."""
    import uuid  # here: importing the layout stays cheap for probing

    try:
        return uuid.UUID(str(text).strip().strip("{}")).bytes_le
    except ValueError:
        raise UsageError(f"invalid UUID {text!r}") from None


def random_uuid() -> bytes:
    import uuid  # here: importing the layout stays cheap for probing

    return uuid.uuid4().bytes_le


def cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def blocks_in_file(fsize: int, off_data: int, total: int) -> int:
    """How many data blocks of ``total`` bytes the file holds from
    ``off_data`` (a short last block counts: its missing tail reads as zeros)."""
    return ceil_div(fsize - off_data, total) if fsize > off_data else 0


def _padded(head) -> bytes:
    """The pre-header and the largest header from ``head``, zeros where it is
    shorter: callers read only fields that they made sure ``head`` holds."""
    n = HEADER_OFFSET + HEADER1PLUS.size
    return bytes(head[:n]).ljust(n, b"\0")


def _header_size(head) -> int:
    """cbHeader of a 1.1 header, from the 4 bytes it takes (a file too short
    for the rest is refused by what it says)."""
    off, n = HEADER1.span("cbHeader")
    return int.from_bytes(head[HEADER_OFFSET + off:HEADER_OFFSET + off + n], "little")


# -- recognising a VDI (probing, untrusted images, finding a parent by UUID) ---------------------------

def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when the pre-header carries the VDI signature, else 0."""
    if len(head) >= PREHEADER.size and PREHEADER.unpack(head).u32Signature == VDI_IMAGE_SIGNATURE:
        return 100
    return 0


def probe_score(head: bytes) -> int:
    """The backend's probe: 100 for a version vdtool reads, 90 for another one
    (the backend then names the version it refuses)."""
    if len(head) >= PREHEADER.size:
        pre = PREHEADER.unpack(head)
        if pre.u32Signature == VDI_IMAGE_SIGNATURE:
            ver = pre.u32Version
            return 100 if is_v1(ver) or ver == VDI_IMAGE_VERSION_OLD else 90
    return 0


def image_uuid(head: bytes) -> str | None:
    """The image UUID (uuidCreate) from a file's first bytes; None when they
    are not a VDI header of a version vdtool reads (at least 420 bytes)."""
    if len(head) < HEADER_OFFSET + HEADER0.size:
        return None
    buf = _padded(head)
    pre = PREHEADER.unpack(buf)
    if pre.u32Signature != VDI_IMAGE_SIGNATURE:
        return None
    if is_v1(pre.u32Version):
        raw = HEADER1.unpack(buf, HEADER_OFFSET).uuidCreate
    elif pre.u32Version == VDI_IMAGE_VERSION_OLD:
        raw = HEADER0.unpack(buf, HEADER_OFFSET).uuidCreate
    else:
        return None
    return uuid_str(raw)


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) for ``--untrusted``: flags vdtool does not know,
    and whether the image is a differencing one (its parent is found by
    UUID, which the header alone cannot name).  ``read`` is not needed."""
    out: list = []
    if len(head) < HEADER_OFFSET + 16:  # the pre-header, type and flags (0x58: as it always asked)
        return out, False
    buf = _padded(head)
    ver = PREHEADER.unpack(buf).u32Version
    if is_v1(ver):
        hdr = HEADER1.unpack(buf, HEADER_OFFSET)
    elif ver == VDI_IMAGE_VERSION_OLD:
        hdr = HEADER0.unpack(buf, HEADER_OFFSET)
    else:
        return out, False
    unknown = hdr.fFlags & ~VDI_FLAGS_VALID
    if unknown:
        out.append(("unknown-features", f"vdi image flags 0x{unknown:x}"))
    if hdr.u32Type in (VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_TYPE_DIFF):
        out.append(("external-reference", "differencing image: its parent is another file (found by UUID)"))
    return out, False


# -- decoding and validating a header ----------------------------------------------------------------

FORMAT, UNSUPPORTED, CORRUPT = "format", "unsupported", "corrupt"


class Problem:
    """A reason to refuse a header: ``kind`` is FORMAT (not a VDI vdtool
    reads), UNSUPPORTED (a feature vdtool lacks) or CORRUPT.  (A plain
    class: typing.NamedTuple costs a millisecond of import time.)"""

    __slots__ = ("kind", "text")

    def __init__(self, kind: str, text: str):
        self.kind = kind
        self.text = text

    def __eq__(self, other):
        return isinstance(other, Problem) and (other.kind, other.text) == (self.kind, self.text)

    def __repr__(self) -> str:
        return f"Problem({self.kind!r}, {self.text!r})"


def preheader_problems(head: bytes, fsize: int) -> list:
    """What stops the header from being decoded at all: a file too small, a
    wrong signature, a version vdtool does not read, a 1.1 header size out
    of bounds.  ``head`` is the file's first HEAD_READ bytes (or all of it);
    at most one problem, as each check needs the one before to pass."""
    if fsize < MIN_FILE_SIZE:
        return [Problem(FORMAT, f"file is only {fsize} bytes, too small for a VDI header")]
    pre = PREHEADER.unpack(head)
    if pre.u32Signature != VDI_IMAGE_SIGNATURE:
        return [Problem(FORMAT, f"signature 0x{pre.u32Signature:08x} is not the VDI signature "
                                f"0x{VDI_IMAGE_SIGNATURE:08x}")]
    ver = pre.u32Version
    if ver == VDI_IMAGE_VERSION_OLD:
        return []
    if not is_v1(ver):
        return [Problem(FORMAT, f"unsupported VDI version {ver >> 16}.{ver & 0xffff} (0x{ver:08x}); "
                                f"vdtool reads 0.2 and 1.x")]
    cb = _header_size(head)
    if cb < HEADER1.size:
        return [Problem(CORRUPT, f"header size {cb} is smaller than the VDI 1.1 header ({HEADER1.size} bytes)")]
    if cb > MAX_HEADER or HEADER_OFFSET + cb > fsize:
        return [Problem(CORRUPT, f"header size {cb} runs past the end of the file (file size {fsize})")]
    return []


def decode_header(head: bytes) -> tuple:
    """(u32Version, header) from bytes that passed preheader_problems.  The
    header is a HEADER1PLUS record whatever the version: a version 0 one
    gets the offsets it implies (the map right after the header, the data
    right after the map), a 1.1 one LCHS fields of zero (``has_lchs`` tells).
    Header bytes past HEADER1PLUS (cbHeader > 400) are not read: writing
    the header leaves them as they are."""
    version = PREHEADER.unpack(head).u32Version
    if version == VDI_IMAGE_VERSION_OLD:
        h0 = HEADER0.unpack(head, HEADER_OFFSET)
        off_blocks = HEADER_OFFSET + HEADER0.size
        return version, HEADER1PLUS.new(**h0.asdict(), cbHeader=HEADER0.size, offBlocks=off_blocks,
                                        offData=off_blocks + 4 * h0.cBlocks, uuidParentModify=NULL_UUID)
    if _header_size(head) >= HEADER1PLUS.size:
        return version, HEADER1PLUS.unpack(head, HEADER_OFFSET)
    return version, HEADER1PLUS.new(**HEADER1.unpack(head, HEADER_OFFSET).asdict())


def encode_header(version: int, hdr: Record) -> bytes:
    """The header as its version stores it (written after the pre-header)."""
    if version == VDI_IMAGE_VERSION_OLD:
        layout = HEADER0
    elif has_lchs(hdr):
        return HEADER1PLUS.pack(hdr)
    else:
        layout = HEADER1
    return layout.pack(**{name: getattr(hdr, name) for name in layout.fields})


def header_problems(version: int, hdr: Record, fsize: int) -> list:
    """What is wrong with a decoded header, in the order vdtool has always
    checked it: an open refuses the image with the first."""
    return _feature_problems(version, hdr) + _size_problems(hdr) + _placement_problems(version, hdr, fsize)


def _feature_problems(version: int, hdr: Record) -> list:
    out = []
    if hdr.u32Type not in TYPE_NAMES:
        out.append(Problem(UNSUPPORTED, f"unknown image type {hdr.u32Type} (1 normal, 2 fixed, 3 undo, 4 diff)"))
    if hdr.fFlags & ~VDI_FLAGS_VALID:
        out.append(Problem(UNSUPPORTED, f"unknown image flags 0x{hdr.fFlags:08x}"))
    # version 0 headers may leave the sector size 0
    if hdr.cbSector != VDI_GEOMETRY_SECTOR_SIZE and (is_v1(version) or hdr.cbSector != 0):
        out.append(Problem(UNSUPPORTED, f"sector size {hdr.cbSector} is not {VDI_GEOMETRY_SECTOR_SIZE}"))
    if has_lchs(hdr) and hdr.LCHS_cbSector != VDI_GEOMETRY_SECTOR_SIZE:
        out.append(Problem(UNSUPPORTED, f"LCHS sector size {hdr.LCHS_cbSector} is not {VDI_GEOMETRY_SECTOR_SIZE}"))
    return out


def _size_problems(hdr: Record) -> list:
    out = []
    bsz = hdr.cbBlock
    if not is_pow2(bsz):
        out.append(Problem(CORRUPT, f"block size {bsz} is not a power of two"))
    if bsz < MIN_BLOCK or bsz > MAX_BLOCK:
        out.append(Problem(UNSUPPORTED, f"block size {bsz} is outside {MIN_BLOCK}..{MAX_BLOCK}"))
    if hdr.cbBlockExtra and (not is_pow2(hdr.cbBlockExtra) or hdr.cbBlockExtra > MAX_BLOCK):
        out.append(Problem(CORRUPT, f"extra block size {hdr.cbBlockExtra} is not a power of two up to {MAX_BLOCK}"))
    if hdr.cbDisk > MAX_DISK:
        out.append(Problem(CORRUPT, f"disk size {hdr.cbDisk} is above the limit of 2^56 bytes"))
    if hdr.cBlocks * bsz < hdr.cbDisk:
        out.append(Problem(CORRUPT, f"disk size {hdr.cbDisk} is more than {hdr.cBlocks} blocks of {bsz} bytes hold"))
    if hdr.cBlocks == 0 and hdr.cbDisk:
        out.append(Problem(CORRUPT, f"block count 0 for disk size {hdr.cbDisk}"))
    if hdr.cBlocksAllocated > hdr.cBlocks:
        out.append(Problem(CORRUPT, f"allocated block count {hdr.cBlocksAllocated} is above the block count "
                                    f"{hdr.cBlocks}"))
    return out


def _placement_problems(version: int, hdr: Record, fsize: int) -> list:
    out = []
    if is_v1(version):  # version 0 offsets follow from the header
        hdr_end = HEADER_OFFSET + hdr.cbHeader
        if hdr.offBlocks < hdr_end:
            out.append(Problem(CORRUPT, f"block map offset {hdr.offBlocks} lies inside the header "
                                        f"(header size {hdr.cbHeader} ends at {hdr_end})"))
        if hdr.offBlocks % 512:
            out.append(Problem(CORRUPT, f"block map offset {hdr.offBlocks} is not a multiple of 512"))
        if hdr.offData % 512:
            out.append(Problem(CORRUPT, f"data offset {hdr.offData} is not a multiple of 512"))
    map_end = hdr.offBlocks + 4 * hdr.cBlocks
    if map_end > fsize:
        out.append(Problem(CORRUPT, f"block map of {hdr.cBlocks} entries at offset {hdr.offBlocks} runs past "
                                    f"the end of the file (file size {fsize})"))
    if hdr.offData < map_end:
        out.append(Problem(CORRUPT, f"data offset {hdr.offData} lies inside the block map "
                                    f"(offset {hdr.offBlocks}, {hdr.cBlocks} blocks, ends at {map_end})"))
    if hdr.offData > fsize:
        out.append(Problem(CORRUPT, f"data offset {hdr.offData} is past the end of the file (file size {fsize})"))
    if hdr.uuidCreate == NULL_UUID:
        out.append(Problem(CORRUPT, "image UUID is zero"))
    if hdr.uuidModify == NULL_UUID:
        out.append(Problem(CORRUPT, "modification UUID is zero"))
    return out


# -- vdtool's parent-name hint -----------------------------------------------------------------------

class Hint:
    """A parent name vdtool recorded; ``synthetic``: uuidLinkage was made
    up, the parent has no UUID."""

    __slots__ = ("name", "synthetic")

    def __init__(self, name: str, synthetic: bool):
        self.name = name
        self.synthetic = synthetic


def decode_hint(head: bytes, off_blocks: int) -> tuple:
    """(Hint or None, Problem or None) from the header bytes of a
    differencing image: the parent's name where vdtool recorded one."""
    if off_blocks < HINT_OFFSET + HINT.size or len(head) < HINT_OFFSET + HINT.size:
        return None, None
    rec = HINT.unpack(head, HINT_OFFSET)
    length = rec.cbName & ~HINT_SYNTHETIC
    if rec.magic != HINT_MAGIC or not length:
        return None, None
    start = HINT_OFFSET + HINT.size
    if length > MAX_HINT_NAME or start + length > min(off_blocks, len(head)):
        return None, Problem(CORRUPT, f"parent name of {length} bytes runs into the block map")
    name = head[start:start + length].decode("utf-8", "replace")
    return Hint(name, bool(rec.cbName & HINT_SYNTHETIC)), None


def encode_hint(name: bytes, synthetic: bool) -> bytes:
    """The hint for a parent name (UTF-8), written at HINT_OFFSET."""
    return HINT.pack(magic=HINT_MAGIC, cbName=len(name) | (HINT_SYNTHETIC if synthetic else 0)) + name


def hint_room(off_blocks: int) -> int:
    """Bytes of name that fit between the hint and the block map (< 0: no hint fits)."""
    return off_blocks - HINT_OFFSET - HINT.size

"""VHDX's on-disk structures, spelled as MS-VHDX spells them, the format's
GUIDs, constants and limits, and pure functions over bytes (no I/O):
recognising the format, validating one header, choosing the current header,
and what ``--untrusted`` finds.

Every integer is little-endian; GUIDs are stored as Microsoft lays them
out (the first three fields little-endian: Python's ``UUID.bytes_le``)."""

from __future__ import annotations

from vdtool.core.bytesutil import uuid_text
from vdtool.core.layout import Layout

KiB, MiB = 1 << 10, 1 << 20

# -- structures ------------------------------------------------------------------------------------
FILE_IDENTIFIER = Layout("vhdx file identifier", "<", (("Signature", "8s"), ("Creator", "512s")))

HEADER = Layout("vhdx header", "<", (
    ("Signature", "4s"), ("Checksum", "I"), ("SequenceNumber", "Q"), ("FileWriteGuid", "16s"),
    ("DataWriteGuid", "16s"), ("LogGuid", "16s"), ("LogVersion", "H"), ("Version", "H"),
    ("LogLength", "I"), ("LogOffset", "Q")))

REGION_TABLE_HEADER = Layout("vhdx region table header", "<", (
    ("Signature", "4s"), ("Checksum", "I"), ("EntryCount", "I"), (None, "4x")))
REGION_TABLE_ENTRY = Layout("vhdx region table entry", "<", (
    ("Guid", "16s"), ("FileOffset", "Q"), ("Length", "I"), ("Required", "I")))

METADATA_TABLE_HEADER = Layout("vhdx metadata table header", "<", (
    ("Signature", "8s"), (None, "2x"), ("EntryCount", "H"), (None, "20x")))
METADATA_TABLE_ENTRY = Layout("vhdx metadata table entry", "<", (
    ("ItemId", "16s"), ("Offset", "I"), ("Length", "I"), ("Flags", "I"), (None, "4x")))

FILE_PARAMETERS = Layout("vhdx file parameters", "<", (("BlockSize", "I"), ("Flags", "I")))
VIRTUAL_DISK_SIZE = Layout("vhdx virtual disk size", "<", (("VirtualDiskSize", "Q"),))
PAGE_83_DATA = Layout("vhdx page 83 data", "<", (("Page83Data", "16s"),))
LOGICAL_SECTOR_SIZE = Layout("vhdx logical sector size", "<", (("LogicalSectorSize", "I"),))
PHYSICAL_SECTOR_SIZE = Layout("vhdx physical sector size", "<", (("PhysicalSectorSize", "I"),))
PARENT_LOCATOR_HEADER = Layout("vhdx parent locator header", "<", (
    ("LocatorType", "16s"), (None, "2x"), ("KeyValueCount", "H")))
PARENT_LOCATOR_ENTRY = Layout("vhdx parent locator entry", "<", (
    ("KeyOffset", "I"), ("ValueOffset", "I"), ("KeyLength", "H"), ("ValueLength", "H")))

LOG_ENTRY_HEADER = Layout("vhdx log entry header", "<", (
    ("Signature", "4s"), ("Checksum", "I"), ("EntryLength", "I"), ("Tail", "I"), ("SequenceNumber", "Q"),
    ("DescriptorCount", "I"), (None, "4x"), ("LogGuid", "16s"), ("FlushedFileOffset", "Q"),
    ("LastFileOffset", "Q")))
LOG_ZERO_DESCRIPTOR = Layout("vhdx log zero descriptor", "<", (
    ("ZeroSignature", "4s"), (None, "4x"), ("ZeroLength", "Q"), ("FileOffset", "Q"), ("SequenceNumber", "Q")))
LOG_DATA_DESCRIPTOR = Layout("vhdx log data descriptor", "<", (
    ("DataSignature", "4s"), ("TrailingBytes", "4s"), ("LeadingBytes", "8s"), ("FileOffset", "Q"),
    ("SequenceNumber", "Q")))
LOG_DATA_SECTOR = Layout("vhdx log data sector", "<", (
    ("DataSignature", "4s"), ("SequenceHigh", "I"), ("Data", "4084s"), ("SequenceLow", "I")))

# -- signatures and fixed places -------------------------------------------------------------------
FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DESC_SIGNATURE = b"desc"
DATA_SIGNATURE = b"data"

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SECTION = MiB  # the file identifier, headers and region tables, then the first object
HEADER_BYTES = 4 * KiB  # the header's checksummed size
REGION_TABLE_BYTES = 64 * KiB
METADATA_TABLE_BYTES = 64 * KiB
LOG_SECTOR = 4 * KiB
CHECKSUM_OFFSET = 4  # in headers, region tables and log entries alike
DESCRIPTORS_IN_FIRST_SECTOR = (LOG_SECTOR - LOG_ENTRY_HEADER.size) // LOG_DATA_DESCRIPTOR.size  # 126
DESCRIPTORS_PER_SECTOR = LOG_SECTOR // LOG_DATA_DESCRIPTOR.size  # 128

VERSION = 1
LOG_VERSION = 0

# -- GUIDs -----------------------------------------------------------------------------------------


def guid(text: str) -> bytes:
    """A GUID as VHDX stores it."""
    import uuid  # here: importing the layout stays cheap for probing

    return uuid.UUID(text).bytes_le


def known_guid(text: str) -> bytes:
    """A GUID of the specification (8-4-4-4-12 hex digits) as VHDX stores
    it, without the uuid module (3 ms of start-up, at every probe)."""
    raw = bytes.fromhex(text.replace("-", ""))
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


def guid_text(raw: bytes) -> str:
    return uuid_text(raw, little=True)


def random_guid() -> bytes:
    import uuid

    return uuid.uuid4().bytes_le


NULL_GUID = bytes(16)
BAT_GUID = known_guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = known_guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_REGIONS = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}

FILE_PARAMETERS_GUID = known_guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = known_guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_DATA_GUID = known_guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = known_guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = known_guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = known_guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = known_guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
KNOWN_METADATA = {
    FILE_PARAMETERS_GUID: "file parameters", VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    PAGE_83_DATA_GUID: "page 83 data", LOGICAL_SECTOR_SIZE_GUID: "logical sector size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical sector size", PARENT_LOCATOR_GUID: "parent locator",
}

# -- flags, states, limits --------------------------------------------------------------------------
REGION_REQUIRED = 0x1
META_IS_USER, META_IS_VIRTUAL_DISK, META_IS_REQUIRED = 0x1, 0x2, 0x4
LEAVE_BLOCK_ALLOCATED, HAS_PARENT = 0x1, 0x2

BAT_STATE_MASK = 0x7
BAT_OFFSET_SHIFT = 20  # FileOffsetMB: bits 20..63
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5  # the 0.95 draft's value, which qemu still writes and reads
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
STATE_NAMES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED", 5: "UNMAPPED", 6: "FULLY_PRESENT",
               7: "PARTIALLY_PRESENT"}

MIN_BLOCK, MAX_BLOCK = MiB, 256 * MiB
SECTOR_SIZES = (512, 4096)
MAX_DISK = 64 << 40  # 64 TiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = MiB
SECTORS_PER_BITMAP = 1 << 23  # one sector bitmap block (1 MiB) has a bit per sector of 2^23 sectors
BITMAP_BLOCK = MiB
MAX_LOG_READ = 256 * MiB  # largest log vdtool reads into memory to replay
PARENT_KEYS = ("parent_linkage", "parent_linkage2", "relative_path", "volume_path", "absolute_win32_path")

# -- small facts -----------------------------------------------------------------------------------


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks per sector bitmap block."""
    return SECTORS_PER_BITMAP * logical_sector // block_size


def bat_entries(size: int, block_size: int, logical_sector: int, has_parent: bool) -> tuple:
    """(payload blocks, BAT entries): a sector bitmap entry follows every
    chunk of payload entries; a differencing image has one for the last,
    partial chunk too, the others only between whole chunks."""
    ratio = chunk_ratio(block_size, logical_sector)
    blocks = -(-size // block_size)
    chunks = -(-blocks // ratio)
    if has_parent:
        return blocks, chunks * (ratio + 1)
    return blocks, blocks + max(blocks - 1, 0) // ratio


def bat_index(block: int, ratio: int) -> int:
    """The BAT entry of payload block ``block``."""
    return block + block // ratio


def bitmap_index(chunk: int, ratio: int) -> int:
    """The BAT entry of the sector bitmap block of ``chunk``."""
    return chunk * (ratio + 1) + ratio


def bat_state(entry: int) -> int:
    return entry & BAT_STATE_MASK


def bat_offset(entry: int) -> int:
    return (entry >> BAT_OFFSET_SHIFT) << 20


def bat_entry(state: int, offset: int) -> int:
    return (offset >> 20) << BAT_OFFSET_SHIFT | state


# -- recognising a VHDX -------------------------------------------------------------------------------

def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when the file identifier's signature is there."""
    return 100 if head[:8] == FILE_SIGNATURE else 0


# -- headers --------------------------------------------------------------------------------------------

def header_checksum(raw: bytes) -> int:
    from vdtool.formats.vhdx.crc import with_zeroed_field

    return with_zeroed_field(raw[:HEADER_BYTES], CHECKSUM_OFFSET)


def header_problems(raw: bytes, file_size: int) -> list:
    """Why one 4 KiB header is not valid (empty: it is).  A header that is
    not valid is ignored while the other one is."""
    if len(raw) < HEADER_BYTES:
        return ["it lies past the end of the file"]
    hdr = HEADER.unpack(raw)
    if hdr.Signature != HEADER_SIGNATURE:
        return [f"signature {hdr.Signature!r} is not {HEADER_SIGNATURE!r}"]
    out = []
    crc = header_checksum(raw)
    if crc != hdr.Checksum:
        out.append(f"checksum 0x{hdr.Checksum:08x} does not match its contents (0x{crc:08x})")
    if hdr.Version != VERSION:
        out.append(f"version {hdr.Version} is not {VERSION}")
    if hdr.LogGuid != NULL_GUID and hdr.LogVersion != LOG_VERSION:
        out.append(f"log version {hdr.LogVersion} is not {LOG_VERSION}")
    if hdr.LogLength % MiB or hdr.LogOffset % MiB:
        out.append(f"log at offset {hdr.LogOffset}, length {hdr.LogLength}: not multiples of 1 MiB")
    elif hdr.LogLength and (hdr.LogOffset < HEADER_SECTION or hdr.LogOffset + hdr.LogLength > file_size):
        out.append(f"log at offset {hdr.LogOffset}, length {hdr.LogLength} lies outside the file "
                   f"(file size {file_size})")
    return out


def current_header(raws: tuple, file_size: int) -> tuple:
    """(index of the current header, [problems of each]): the valid header
    with the higher sequence number; -1 when neither is valid.  Two valid
    headers with the same sequence number must be the same header (Disk2VHD
    writes two identical ones, which qemu accepts too)."""
    problems = [header_problems(r, file_size) for r in raws]
    valid = [i for i in (0, 1) if not problems[i]]
    if not valid:
        return -1, problems
    if len(valid) == 1:
        return valid[0], problems
    h = [HEADER.unpack(r) for r in raws]
    if h[0].SequenceNumber == h[1].SequenceNumber and h[0] != h[1]:
        problems[1] = [f"sequence number {h[1].SequenceNumber} equals the other header's, contents differ"]
        return 0, problems
    return (0 if h[0].SequenceNumber >= h[1].SequenceNumber else 1), problems


def region_table_checksum(raw: bytes) -> int:
    from vdtool.formats.vhdx.crc import with_zeroed_field

    return with_zeroed_field(raw[:REGION_TABLE_BYTES], CHECKSUM_OFFSET)


def region_entries(raw: bytes) -> tuple:
    """(entries, problem or None) of a 64 KiB region table."""
    if len(raw) < REGION_TABLE_BYTES:
        return [], "it lies past the end of the file"
    rh = REGION_TABLE_HEADER.unpack(raw)
    if rh.Signature != REGION_SIGNATURE:
        return [], f"signature {rh.Signature!r} is not {REGION_SIGNATURE!r}"
    crc = region_table_checksum(raw)
    if crc != rh.Checksum:
        return [], f"checksum 0x{rh.Checksum:08x} does not match its contents (0x{crc:08x})"
    if rh.EntryCount > MAX_REGION_ENTRIES:
        return [], f"entry count {rh.EntryCount} is above {MAX_REGION_ENTRIES}"
    base = REGION_TABLE_HEADER.size
    return [REGION_TABLE_ENTRY.unpack(raw, base + i * REGION_TABLE_ENTRY.size) for i in range(rh.EntryCount)], None


# -- --untrusted ---------------------------------------------------------------------------------------

def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete): unknown required regions and metadata items,
    and a differencing image (HasParent: its parent is another file, named
    in the parent locator, which the backend reads)."""
    out: list = []
    entries, problem = region_entries(read(REGION_TABLE_OFFSETS[0], REGION_TABLE_BYTES))
    if problem:
        entries, problem = region_entries(read(REGION_TABLE_OFFSETS[1], REGION_TABLE_BYTES))
    for e in entries:
        if e.Guid not in KNOWN_REGIONS and e.Required & REGION_REQUIRED:
            out.append(("unknown-features", f"vhdx required region {guid_text(e.Guid)}"))
    meta = [e for e in entries if e.Guid == METADATA_GUID]
    if not meta or meta[0].FileOffset >= size:
        return out, False
    table = read(meta[0].FileOffset, METADATA_TABLE_BYTES)
    if len(table) < METADATA_TABLE_BYTES or METADATA_TABLE_HEADER.unpack(table).Signature != METADATA_SIGNATURE:
        return out, False
    count = min(METADATA_TABLE_HEADER.unpack(table).EntryCount, MAX_METADATA_ENTRIES)
    for i in range(count):
        m = METADATA_TABLE_ENTRY.unpack(table, (i + 1) * METADATA_TABLE_ENTRY.size)
        if m.ItemId not in KNOWN_METADATA and m.Flags & META_IS_REQUIRED:
            out.append(("unknown-features", f"vhdx required metadata item {guid_text(m.ItemId)}"))
        if m.ItemId == FILE_PARAMETERS_GUID and m.Length >= FILE_PARAMETERS.size:
            raw = read(meta[0].FileOffset + m.Offset, FILE_PARAMETERS.size)
            if len(raw) == FILE_PARAMETERS.size and FILE_PARAMETERS.unpack(raw).Flags & HAS_PARENT:
                out.append(("external-reference", "differencing image: its parent is another file "
                                                  "(parent locator)"))
    return out, False

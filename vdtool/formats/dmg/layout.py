"""DMG (UDIF) on-disk structures, spelled as Apple's UDIF headers spell
them (all big-endian), chunk types and limits, and pure functions over the
file's last bytes (no I/O)."""

from __future__ import annotations

from vdtool.core.layout import Layout

KOLY = Layout("udif trailer", ">", (
    ("Signature", "4s"), ("Version", "I"), ("HeaderSize", "I"), ("Flags", "I"),
    ("RunningDataForkOffset", "Q"), ("DataForkOffset", "Q"), ("DataForkLength", "Q"),
    ("RsrcForkOffset", "Q"), ("RsrcForkLength", "Q"), ("SegmentNumber", "I"), ("SegmentCount", "I"),
    ("SegmentID", "16s"), ("DataChecksumType", "I"), ("DataChecksumSize", "I"), ("DataChecksum", "128s"),
    ("XMLOffset", "Q"), ("XMLLength", "Q"), (None, "120x"), ("ChecksumType", "I"), ("ChecksumSize", "I"),
    ("Checksum", "128s"), ("ImageVariant", "I"), ("SectorCount", "Q"), (None, "12x")))
MISH = Layout("blkx table", ">", (
    ("Signature", "4s"), ("Version", "I"), ("SectorNumber", "Q"), ("SectorCount", "Q"), ("DataOffset", "Q"),
    ("BuffersNeeded", "I"), ("BlockDescriptors", "I"), (None, "24x"), ("ChecksumType", "I"),
    ("ChecksumSize", "I"), ("Checksum", "128s"), ("NumberOfBlockChunks", "I")))
CHUNK = Layout("blkx chunk", ">", (
    ("EntryType", "I"), ("Comment", "I"), ("SectorNumber", "Q"), ("SectorCount", "Q"),
    ("CompressedOffset", "Q"), ("CompressedLength", "Q")))
RSRC_HEADER = Layout("resource fork header", ">", (
    ("DataOffset", "I"), ("MapOffset", "I"), ("DataLength", "I"), ("MapLength", "I")))

KOLY_MAGIC = b"koly"
MISH_MAGIC = b"mish"
SECTOR = 512

# chunk entry types
ZERO, RAW, IGNORE = 0x00000000, 0x00000001, 0x00000002
ADC, ZLIB, BZIP2, LZFSE, LZMA = 0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008
COMMENT, TERMINATOR = 0x7FFFFFFE, 0xFFFFFFFF
TYPE_NAMES = {ZERO: "zero", RAW: "raw", IGNORE: "ignore", ADC: "adc", ZLIB: "zlib", BZIP2: "bzip2",
              LZFSE: "lzfse", LZMA: "lzma"}
ZERO_TYPES = (ZERO, IGNORE)
SKIPPED_TYPES = (COMMENT, TERMINATOR)

# limits (QEMU's for one chunk; the rest keep tables and parsing bounded)
MAX_CHUNK_BYTES = 64 << 20  # decoded size and stored length of one chunk
MAX_CHUNK_SECTORS = MAX_CHUNK_BYTES // SECTOR
MAX_XML = 16 << 20  # the property list
MAX_RSRC = 64 << 20  # the binary resource fork
MAX_CHUNKS = 1 << 22  # chunks in all partitions together
MAX_PARTITIONS = 1 << 16
MAX_SECTORS = 1 << 47  # 64 PiB: beyond any disk


def type_name(t: int) -> str:
    return f"0x{t:08x} ({TYPE_NAMES[t]})" if t in TYPE_NAMES else f"0x{t:08x}"


def trailer_offset(tail: bytes, size: int) -> int:
    """Where the koly trailer starts, from the file's last bytes (``tail``
    ends at ``size``), or -1.  At the last 512 bytes; as QEMU does, an odd
    file size is allowed for by looking a few bytes further."""
    if size < KOLY.size or len(tail) < KOLY.size:
        return -1
    if tail[-KOLY.size:-KOLY.size + 4] == KOLY_MAGIC:
        return size - KOLY.size
    window = tail[-(KOLY.size + 511):]
    at = window.rfind(KOLY_MAGIC, 0, max(0, len(window) - KOLY.size + 4))
    if at < 0:
        return -1
    return size - len(window) + at


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when a koly trailer with a plausible header size ends the file."""
    at = trailer_offset(tail, size)
    if at < 0 or size - at < KOLY.size:
        return 0
    start = len(tail) - (size - at)
    koly = KOLY.unpack(tail, start)
    return 100 if koly.HeaderSize == KOLY.size else 0


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) for ``--untrusted``: a UDIF image names no other
    file (segmented images, which do, are refused when opened)."""
    return [], True

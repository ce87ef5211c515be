"""Bochs redolog images: the header (versions 1 and 2, field names as Bochs'
hdimage.h spells them), constants and limits, and pure functions over the
header bytes (no I/O): recognising the format, validating a header, and what
``--untrusted`` finds.

A "Growing" image is a whole disk; "Undoable" and "Volatile" redologs are
journals over a flat base image that Bochs names ``BASE.redolog`` (the base
name is not recorded in the file)."""

from __future__ import annotations

from collections.abc import Iterator

from vdtool.core.layout import Layout, Record

# -- structures ------------------------------------------------------------------------------------
_COMMON = (("magic", "32s"), ("type", "16s"), ("subtype", "16s"), ("version", "I"), ("header", "I"),
           ("catalog", "I"), ("bitmap", "I"), ("extent", "I"))
# version 2 (0x00020000): a timestamp (the base image's modification time,
# FAT date and time) comes before the disk size
HEADER = Layout("bochs header", "<", (*_COMMON, ("timestamp", "I"), ("disk", "Q")))
# version 1 (0x00010000): the disk size follows the extent size
HEADER_V1 = Layout("bochs header v1", "<", (*_COMMON, ("disk", "Q")))

# -- constants -------------------------------------------------------------------------------------
MAGIC = b"Bochs Virtual HD Image"
TYPE_REDOLOG = b"Redolog"
SUBTYPE_GROWING = b"Growing"
SUBTYPE_UNDOABLE = b"Undoable"
SUBTYPE_VOLATILE = b"Volatile"
JOURNALS = (SUBTYPE_UNDOABLE, SUBTYPE_VOLATILE)  # redologs over a base image
VERSION_1 = 0x00010000
VERSION_2 = 0x00020000
STANDARD_HEADER_SIZE = 512
SECTOR = 512
CATALOG_FREE = 0xFFFFFFFF  # an extent not (yet) in the file
REDOLOG_SUFFIX = ".redolog"  # Bochs names an undoable disk's journal BASE.redolog

# Limits (as QEMU's): 1M catalog entries are what bximage's largest disk
# needs (~8 TB), extents are powers of two from 512 bytes to 8 MiB.
MAX_CATALOG = 0x100000
MIN_EXTENT = SECTOR
MAX_EXTENT = 0x800000
# what an open reads of the header (the rest of the 512 bytes is padding)
HEAD_READ = STANDARD_HEADER_SIZE

FORMAT, UNSUPPORTED, CORRUPT = "format", "unsupported", "corrupt"


def cstr(raw: bytes) -> bytes:
    """A fixed-size C string field up to its first NUL (Bochs compares with strcmp)."""
    return raw.split(b"\0", 1)[0]


def decode(head: bytes) -> Record:
    """The header from at least HEADER.size bytes, as a version 2 record
    whatever the version (a version 1 header gets timestamp 0)."""
    hdr = HEADER.unpack(head)
    if hdr.version == VERSION_1:
        v1 = HEADER_V1.unpack(head)
        return HEADER.new(**v1.asdict(), timestamp=0)
    return hdr


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 for a Bochs redolog header of any subtype or version (the
    backend names what it refuses), else 0."""
    if len(head) < HEADER.size:
        return 0
    hdr = HEADER.unpack(head)
    return 100 if cstr(hdr.magic) == MAGIC and cstr(hdr.type) == TYPE_REDOLOG else 0


def extent_blocks(nbytes: int) -> int:
    """Sectors a field of ``nbytes`` takes (Bochs rounds bitmap and extent up to sectors)."""
    return max(1, -(-nbytes // SECTOR))


def data_offset(hdr: Record) -> int:
    """Where the first extent's bitmap starts: after the header and the catalog."""
    return hdr.header + 4 * hdr.catalog


def extent_span(hdr: Record) -> int:
    """Bytes each allocated extent takes in the file: its bitmap, then its sectors."""
    return SECTOR * (extent_blocks(hdr.bitmap) + extent_blocks(hdr.extent))


def header_problems(hdr: Record, file_size: int) -> Iterator[tuple]:
    """(kind, text) for each reason to refuse the header; stops at the
    first one later checks depend on."""
    if cstr(hdr.magic) != MAGIC or cstr(hdr.type) != TYPE_REDOLOG:
        yield FORMAT, "not a Bochs redolog image (magic or type)"
        return
    sub = cstr(hdr.subtype)
    if sub != SUBTYPE_GROWING and sub not in JOURNALS:
        yield UNSUPPORTED, f"unknown Bochs redolog subtype {sub.decode('latin-1')!r}"
        return
    if hdr.version not in (VERSION_1, VERSION_2):
        yield UNSUPPORTED, f"unknown Bochs redolog version {hdr.version:#010x} (vdtool reads 1 and 2)"
        return
    if hdr.header < STANDARD_HEADER_SIZE:
        yield CORRUPT, f"header size {hdr.header} is smaller than the {STANDARD_HEADER_SIZE}-byte header"
        return
    if hdr.catalog > MAX_CATALOG:
        yield CORRUPT, f"catalog of {hdr.catalog} entries is larger than the limit of {MAX_CATALOG}"
        return
    ext = hdr.extent
    if ext < MIN_EXTENT or ext > MAX_EXTENT or ext & (ext - 1):
        yield CORRUPT, f"extent size {ext} is not a power of two from {MIN_EXTENT} to {MAX_EXTENT}"
        return
    if hdr.bitmap * 8 < ext // SECTOR:
        yield CORRUPT, f"bitmap of {hdr.bitmap} bytes is too small for {ext // SECTOR} sectors per extent"
        return
    if hdr.bitmap > MAX_EXTENT:
        yield CORRUPT, f"bitmap size {hdr.bitmap} is larger than the limit of {MAX_EXTENT}"
        return
    sectors = hdr.disk // SECTOR
    if hdr.catalog < -(-sectors // (ext // SECTOR)):
        yield CORRUPT, (f"catalog of {hdr.catalog} entries of {ext} bytes is too small for the disk size "
                        f"{hdr.disk}")
        return
    if data_offset(hdr) > file_size:
        yield CORRUPT, (f"catalog ({hdr.catalog} entries at offset {hdr.header}) runs past the end of the file "
                        f"({file_size} bytes)")


def journal_base_name(path: str) -> str | None:
    """The base image an Undoable or Volatile redolog at ``path`` belongs
    to, by Bochs' naming (``BASE.redolog``); None when the name does not
    follow it."""
    import os

    name = os.path.basename(path)
    if name.endswith(REDOLOG_SUFFIX) and len(name) > len(REDOLOG_SUFFIX):
        return name[:-len(REDOLOG_SUFFIX)]
    return None


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) for ``--untrusted``: a journal redolog makes
    readers open its base image."""
    if len(head) < HEADER.size:
        return [], False
    hdr = HEADER.unpack(head)
    if cstr(hdr.subtype) in JOURNALS:
        return [("external-reference", f"bochs {cstr(hdr.subtype).decode()} redolog: reads its base image "
                                       f"(BASE for BASE.redolog)")], True
    return [], True

"""VMDK on-disk structures, constants and checks of them that do no I/O.

Field names as VMware's "Virtual Disk Format 5.0" spells them: the hosted
sparse extent header (magic KDMV, versions 1-3) and the stream-optimized
grain and metadata markers.  Offsets in the header, the grain directories
and the grain tables are in 512-byte sectors.

Also what core modules ask of the format before any backend is loaded:
``sniff`` (is the magic VMDK's), ``probe_score`` (the backend's probe) and
``inspect_untrusted`` (the references and unknown flags the header and the
descriptor text name, for ``--untrusted``)."""

from __future__ import annotations

import os
import re

from vdtool.core.bytesutil import ceil_div
from vdtool.core.layout import Layout

SECTOR = 512
MAGIC = b"KDMV"  # hosted sparse extent (SPARSE_MAGICNUMBER as bytes)
COWD_MAGIC = b"COWD"  # ESX vmfsSparse extent: recognised, not read
DESCRIPTOR_SIGNATURE = b"# Disk DescriptorFile"

SPARSE_HEADER = Layout("vmdk sparse header", "<", (
    ("magicNumber", "4s"),
    ("version", "I"),
    ("flags", "I"),
    ("capacity", "Q"),  # sectors of disk the extent holds
    ("grainSize", "Q"),  # sectors
    ("descriptorOffset", "Q"),  # embedded descriptor (sectors), 0 if none
    ("descriptorSize", "Q"),
    ("numGTEsPerGT", "I"),
    ("rgdOffset", "Q"),  # redundant grain directory
    ("gdOffset", "Q"),  # GD_AT_END: in the footer (streamOptimized)
    ("overHead", "Q"),  # sectors before the first grain
    ("uncleanShutdown", "B"),
    # newline check characters: a file transferred in text mode changes them
    ("singleEndLineChar", "c"),
    ("nonEndLineChar", "c"),
    ("doubleEndLineChar1", "c"),
    ("doubleEndLineChar2", "c"),
    ("compressAlgorithm", "H"),
    (None, "433x"),
))
assert SPARSE_HEADER.size == SECTOR

# streamOptimized: a compressed grain is a marker and its zlib data; every
# metadata block (grain table, directory, footer, end of stream) follows a
# marker sector with size 0 and its type.
GRAIN_MARKER = Layout("vmdk grain marker", "<", (("lba", "Q"), ("size", "I")))
METADATA_MARKER = Layout("vmdk metadata marker", "<", (
    ("numSectors", "Q"), ("size", "I"), ("type", "I"), (None, "496x")))
assert METADATA_MARKER.size == SECTOR
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

NL_CHARS = b"\n \r\n"  # singleEndLineChar .. doubleEndLineChar2
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
FLAGS_KNOWN = FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS
COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZERO = 1  # grain table entry of a zeroed grain (FLAG_ZERO_GRAIN)
MAX_SECTOR_OFFSET = 0xFFFFFFFF  # grain table and directory entries are 32-bit sectors

MAX_CAPACITY_BYTES = 1 << 56
MAX_GRAIN_SECTORS = 1 << 16  # 32 MiB grains
MAX_GTES_PER_GT = 512  # QEMU's limit; VMware always writes 512
MAX_GD_ENTRIES = 1 << 25
MAX_DESCRIPTOR_BYTES = 1 << 20
DEFAULT_GRAIN_SECTORS = 128
DEFAULT_GTES = 512
DEFAULT_DESCRIPTOR_SECTORS = 20
SPLIT_SECTORS = 4194304  # 2 GiB per part of a twoGbMaxExtent* image, as qemu-img writes them


def new_header(**fields):
    """A sparse extent header record: magic and newline characters set,
    the rest as given (zero otherwise)."""
    return SPARSE_HEADER.new(magicNumber=MAGIC, singleEndLineChar=NL_CHARS[0:1], nonEndLineChar=NL_CHARS[1:2],
                             doubleEndLineChar1=NL_CHARS[2:3], doubleEndLineChar2=NL_CHARS[3:4], **fields)


def newline_chars(hdr) -> bytes:
    return hdr.singleEndLineChar + hdr.nonEndLineChar + hdr.doubleEndLineChar1 + hdr.doubleEndLineChar2


def metadata_marker(sectors: int, mtype: int) -> bytes:
    """One marker sector announcing ``sectors`` of metadata of ``mtype``."""
    return METADATA_MARKER.pack(numSectors=sectors, type=mtype)


def directory_entries(capacity: int, grain: int, gtes: int) -> int:
    """Grain directory entries (grain tables) a ``capacity``-sector extent needs."""
    return ceil_div(capacity * SECTOR, gtes * grain * SECTOR) if capacity else 0


def header_problems(hdr, file_size: int, what: str = "header") -> list:
    """What is wrong with a sparse extent header (``what`` = "footer" for a
    stream's footer copy), in the order it is reported: (kind, text) with
    kind "unsupported" (valid, but vdtool does not read it) or "corrupt".
    The magic is the caller's: a wrong one is not this format at all."""
    out = []
    version, flags, grain, gtes = hdr.version, hdr.flags, hdr.grainSize, hdr.numGTEsPerGT
    if version < 1 or version > 3:
        out.append(("unsupported", f"VMDK sparse extent version {version} is not supported (1 to 3 are)"))
    nl = newline_chars(hdr)
    if flags & FLAG_NL_DETECT and nl != NL_CHARS:
        out.append(("corrupt", f"{what} newline check characters are {nl!r}, not {NL_CHARS!r} (the file was "
                               f"transferred in text mode)"))
    grain_ok = not (grain == 0 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS)
    if not grain_ok:
        out.append(("corrupt", f"grain size {grain} sectors is not a power of two between 1 and "
                               f"{MAX_GRAIN_SECTORS}"))
    if gtes == 0 or gtes > MAX_GTES_PER_GT:
        out.append(("corrupt", f"numGTEsPerGT {gtes} is not between 1 and {MAX_GTES_PER_GT}"))
    if hdr.capacity * SECTOR > MAX_CAPACITY_BYTES:
        out.append(("corrupt", f"capacity {hdr.capacity} sectors is beyond the limit of 2^56 bytes"))
    compress = hdr.compressAlgorithm
    if flags & FLAG_COMPRESSED and compress != COMPRESSION_DEFLATE:
        out.append(("unsupported", f"compression algorithm {compress} is not supported (1, deflate, is)"))
    if not flags & FLAG_COMPRESSED and compress not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        out.append(("unsupported", f"compression algorithm {compress} is not supported"))
    out += _descriptor_area_problems(hdr.descriptorOffset, hdr.descriptorSize, file_size)
    if not out:  # the directory's size needs the fields above in range
        n = directory_entries(hdr.capacity, grain, gtes)
        if n > MAX_GD_ENTRIES:
            out.append(("corrupt", f"grain directory of {n} entries is larger than {MAX_GD_ENTRIES}"))
    return out


def _descriptor_area_problems(offset: int, size: int, file_size: int) -> list:
    if not (offset or size):
        return []
    if size * SECTOR > MAX_DESCRIPTOR_BYTES:
        return [("corrupt", f"descriptor size {size} sectors is larger than 1 MiB")]
    if offset == 0 or offset > file_size // SECTOR or (offset + size) * SECTOR > max(file_size, SECTOR):
        return [("corrupt", f"descriptor at sector {offset} ({size} sectors) lies outside the file "
                            f"({file_size} bytes)")]
    return []


# -- recognising the format ---------------------------------------------------------------

def _is_descriptor_text(head: bytes) -> bool:
    return DESCRIPTOR_SIGNATURE in head[:1024] and b"createType" in head[:4096]


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when the magic says VMDK (sparse header, vmfsSparse header or a
    text descriptor), else 0."""
    if head[:4] in (MAGIC, COWD_MAGIC) or head[:len(DESCRIPTOR_SIGNATURE)] == DESCRIPTOR_SIGNATURE:
        return 100
    return 100 if _is_descriptor_text(head) else 0


def probe_score(head: bytes) -> int:
    """The backend's probe: a sparse header of a version vdtool reads is
    sure (100), another version 90; a descriptor that starts the file (after
    a byte-order mark or blank space) 100, one further in 90."""
    if head[:4] == MAGIC:
        if len(head) < SPARSE_HEADER.size:
            return 0
        return 100 if 1 <= SPARSE_HEADER.unpack(head).version <= 3 else 90
    if head[:4] == COWD_MAGIC:
        return 100
    if head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(DESCRIPTOR_SIGNATURE):
        return 100
    return 90 if _is_descriptor_text(head) else 0


# -- --untrusted ----------------------------------------------------------------------------

# patterns, not compiled here: only --untrusted needs them (re caches them)
_HINT_RE = r'^parentFileNameHint\s*=\s*"?([^"]*)"?\s*$'
_EXTENT_LINE_RE = r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)")?'


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) from the header and the descriptor text:
    unknown header flags, the parent and the extent files named.  A text
    descriptor lists every reference (complete); a sparse extent's
    embedded descriptor is looked at, the backend lists the rest."""
    out = []
    if head[:4] == MAGIC and len(head) >= SPARSE_HEADER.size:
        hdr = SPARSE_HEADER.unpack(head)
        unknown = hdr.flags & ~FLAGS_KNOWN
        if unknown:
            out.append(("unknown-features", f"vmdk sparse header flags 0x{unknown:x}"))
        off, n = hdr.descriptorOffset, hdr.descriptorSize
        if off and n and n <= MAX_DESCRIPTOR_BYTES // SECTOR:
            out += descriptor_findings(read(off * SECTOR, n * SECTOR), embedded=True)
        return out, False
    if head[:4] == COWD_MAGIC:
        return out, False
    if size > MAX_DESCRIPTOR_BYTES:
        return out, False
    out += descriptor_findings(read(0, size), embedded=False)
    return out, True


def descriptor_findings(text: bytes, embedded: bool) -> list:
    """The parent hint and (outside a sparse extent) the extent files a
    descriptor names, as --untrusted findings."""
    out = []
    text = text.split(b"\0", 1)[0].decode("utf-8", "replace")
    for line in text.split("\n"):
        s = line.strip()
        m = re.match(_HINT_RE, s)
        if m and m.group(1):
            out.append(("external-reference", f"parent image {m.group(1)!r} (parentFileNameHint)"))
        if embedded:
            continue
        m = re.match(_EXTENT_LINE_RE, s)
        if m and m.group(3).upper() != "ZERO":
            where = "absolute path" if os.path.isabs(m.group(4) or "") else "another file"
            out.append(("external-reference", f"{m.group(3).upper()} extent {m.group(4)!r} ({where})"))
    return out

"""Parallels' on-disk structures, spelled as QEMU's parallels.txt spells
them, the format's constants and limits, and pure functions over header
bytes (no I/O): recognising the format, validating the header, the
geometry it implies, and what ``--untrusted`` finds."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, ceil_div
from vdtool.core.layout import Layout, Record

HEADER = Layout("parallels header", "<", (
    ("magic", "16s"), ("version", "I"), ("heads", "I"), ("cylinders", "I"), ("tracks", "I"),
    ("bat_entries", "I"), ("nb_sectors", "Q"), ("inuse", "I"), ("data_off", "I"), ("flags", "I"),
    ("ext_off", "Q")))
BAT_OFFSET = HEADER.size  # the BAT follows the 64-byte header

MAGIC_V1 = b"WithoutFreeSpace"  # BAT entries in sectors; only the low 32 bits of nb_sectors count
MAGIC_V2 = b"WithouFreSpacExt"  # BAT entries in clusters; 64-bit nb_sectors
VERSION = 2
INUSE_MAGIC = 0x746F6E59  # "Ynot": a writer has the image open
CLOSED_MAGIC = 0x312E3276  # "v2.1": closed by Parallels' own software
FLAG_EMPTY = 0x1  # "the image should be considered clear"
KNOWN_FLAGS = FLAG_EMPTY

SECTOR = 512
DEFAULT_CLUSTER = 1 << 20
DEFAULT_HEADS, SECTORS_PER_TRACK = 16, 32  # the geometry QEMU writes
MAX_TRACKS = 0x7FFFFFFF // 513  # QEMU refuses larger clusters (sectors)
MAX_BAT = 0x7FFFFFFF // 4  # QEMU's "Catalog too large"
MAX_ENTRY = 0xFFFFFFFF
MAX_V1_SECTORS = 0xFFFFFFFF

VARIANTS = ("dynamic", "bundle")  # bundle: a .hdd folder with DiskDescriptor.xml and one image

FORMAT, UNSUPPORTED, CORRUPT = "format", "unsupported", "corrupt"


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 for either signature with version 2, 90 for another version (the
    backend then names it), else 0."""
    if len(head) < HEADER.size or head[:16] not in (MAGIC_V1, MAGIC_V2):
        return 0
    return 100 if HEADER.unpack(head).version == VERSION else 90


def is_v2(hdr: Record) -> bool:
    return hdr.magic == MAGIC_V2


def sectors(hdr: Record) -> int:
    """The disk size in sectors (a v1 image uses only the low 32 bits)."""
    return hdr.nb_sectors if is_v2(hdr) else hdr.nb_sectors & MAX_V1_SECTORS


def cluster_size(hdr: Record) -> int:
    return hdr.tracks * SECTOR


def entry_unit(hdr: Record) -> int:
    """Bytes per unit of a BAT entry."""
    return cluster_size(hdr) if is_v2(hdr) else SECTOR


def bat_end(entries: int) -> int:
    return BAT_OFFSET + 4 * entries


def data_start(hdr: Record) -> int:
    """Where the data area starts: data_off, or for a v1 image with none,
    the BAT's end rounded up to a sector."""
    if hdr.data_off:
        return hdr.data_off * SECTOR
    return align_up(bat_end(hdr.bat_entries), SECTOR)


def geometry(size: int, cluster: int) -> dict:
    """Header fields for a disk of ``size`` bytes (a multiple of 512) with
    ``cluster``-byte clusters, laid out as QEMU lays them out: the data area
    starts at the first cluster boundary after the BAT."""
    n = ceil_div(size, cluster)
    tracks = cluster // SECTOR
    data_off = align_up(ceil_div(bat_end(n), SECTOR), tracks)
    return dict(heads=DEFAULT_HEADS, cylinders=size // SECTOR // DEFAULT_HEADS // SECTORS_PER_TRACK,
                tracks=tracks, bat_entries=n, nb_sectors=size // SECTOR, data_off=data_off)


def header_problems(hdr: Record, fsize: int) -> list:
    """(kind, text) for what is wrong with a header, first things first: an
    open refuses the image with the first."""
    if hdr.magic not in (MAGIC_V1, MAGIC_V2):
        return [(FORMAT, f"signature {hdr.magic!r} is neither {MAGIC_V1!r} nor {MAGIC_V2!r}")]
    if hdr.version != VERSION:
        return [(UNSUPPORTED, f"unsupported Parallels header version {hdr.version} (vdtool reads {VERSION})")]
    out = []
    if hdr.tracks == 0:
        out.append((CORRUPT, "cluster size is 0 sectors (tracks 0)"))
    elif hdr.tracks > MAX_TRACKS:
        out.append((CORRUPT, f"cluster size of {hdr.tracks} sectors is too big (at most {MAX_TRACKS})"))
    if hdr.bat_entries > MAX_BAT:
        out.append((CORRUPT, f"BAT of {hdr.bat_entries} entries is too large (at most {MAX_BAT})"))
    elif bat_end(hdr.bat_entries) > fsize:
        out.append((CORRUPT, f"BAT of {hdr.bat_entries} entries runs past the end of the file (file size {fsize})"))
    if out:
        return out
    cs = cluster_size(hdr)
    if hdr.bat_entries * cs < sectors(hdr) * SECTOR:
        out.append((CORRUPT, f"disk size of {sectors(hdr)} sectors is more than {hdr.bat_entries} clusters of "
                             f"{cs} bytes hold"))
    start = data_start(hdr)
    if start < bat_end(hdr.bat_entries):
        out.append((CORRUPT, f"data offset {start} lies inside the BAT (it ends at {bat_end(hdr.bat_entries)})"))
    if is_v2(hdr) and (not hdr.data_off or hdr.data_off % hdr.tracks):
        out.append((CORRUPT, f"data offset of {hdr.data_off} sectors is not a non-zero multiple of the cluster "
                             f"size ({hdr.tracks} sectors)"))
    if hdr.inuse not in (0, INUSE_MAGIC, CLOSED_MAGIC):
        out.append((CORRUPT, f"in-use field 0x{hdr.inuse:08x} is none of 0, 0x{INUSE_MAGIC:08x} and "
                             f"0x{CLOSED_MAGIC:08x}"))
    return out


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete) for ``--untrusted``: a bare image names no
    other file; flags vdtool does not know and a format extension (dirty
    bitmaps, which vdtool does not read) are reported."""
    out: list = []
    if len(head) < HEADER.size:
        return out, False
    hdr = HEADER.unpack(head)
    unknown = hdr.flags & ~KNOWN_FLAGS
    if unknown:
        out.append(("unknown-features", f"parallels header flags 0x{unknown:x}"))
    if hdr.ext_off:
        out.append(("unknown-features", f"parallels format extension at sector {hdr.ext_off}"))
    return out, True

"""QED's on-disk structures as docs/interop/qed_spec.txt names them, the
format's constants and limits, and pure functions over header bytes (no
I/O): recognising the format, validating a header, and what
``--untrusted`` finds."""

from __future__ import annotations

from vdtool.core.layout import Layout, Record

# -- structures ------------------------------------------------------------------------------------
HEADER = Layout("qed header", "<", (
    ("magic", "I"), ("cluster_size", "I"), ("table_size", "I"), ("header_size", "I"),
    ("features", "Q"), ("compat_features", "Q"), ("autoclear_features", "Q"),
    ("l1_table_offset", "Q"), ("image_size", "Q"),
    ("backing_filename_offset", "I"), ("backing_filename_size", "I")))

# -- constants -------------------------------------------------------------------------------------
QED_MAGIC = 0x00444551  # "QED\0"
MAGIC_BYTES = b"QED\x00"
QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04  # the backing file is raw: do not probe it
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_COMPAT_FEATURE_MASK = 0
QED_AUTOCLEAR_FEATURE_MASK = 0

MIN_CLUSTER = 4096
MAX_CLUSTER = 64 << 20
DEFAULT_CLUSTER = 64 << 10
MIN_TABLE = 1
MAX_TABLE = 16
DEFAULT_TABLE = 4
DEFAULT_HEADER_SIZE = 1  # clusters
SECTOR = 512
MAX_HEADER_CLUSTERS = 64  # far more than any writer uses; bounds the header read

QED_CLUSTER_ZERO = 1  # an L2 entry meaning "reads as zeros" (not an offset: offsets are cluster-aligned)
MAX_BACKING_NAME = 4096
VARIANTS = ("dynamic",)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def table_entries(hdr: Record) -> int:
    return hdr.table_size * hdr.cluster_size // 8


def max_image_size(cluster_size: int, table_size: int) -> int:
    n = table_size * cluster_size // 8
    return n * n * cluster_size


def qemu_max_image_size(cluster_size: int, table_size: int) -> int:
    """The limit as QEMU computes it, in 64 bits: with 2M clusters and 16-cluster
    tables (2^65) it wraps, and QEMU refuses every size.  New sizes stay below
    both, so QEMU opens what vdtool writes."""
    return min(max_image_size(cluster_size, table_size), max_image_size(cluster_size, table_size) % (1 << 64))


# -- recognising ------------------------------------------------------------------------------------

def sniff(head: bytes, tail: bytes, size: int) -> int:
    return 100 if head[:4] == MAGIC_BYTES else 0


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete): the backing file and unknown feature bits."""
    out: list = []
    if len(head) < HEADER.size or head[:4] != MAGIC_BYTES:
        return out, False
    hdr = HEADER.unpack(head)
    if hdr.features & QED_F_BACKING_FILE:
        raw = read(hdr.backing_filename_offset, min(hdr.backing_filename_size, MAX_BACKING_NAME))
        out.append(("external-reference", f"backing file {raw.decode('utf-8', 'replace')!r}"))
    unknown = []
    for kind, bits, known in (("incompatible", hdr.features, QED_FEATURE_MASK),
                              ("compatible", hdr.compat_features, QED_COMPAT_FEATURE_MASK),
                              ("autoclear", hdr.autoclear_features, QED_AUTOCLEAR_FEATURE_MASK)):
        if bits & ~known:
            unknown.append(f"{kind} 0x{bits & ~known:x}")
    if unknown:
        out.append(("unknown-features", "qed feature bits " + ", ".join(unknown)))
    return out, True


# -- validating ----------------------------------------------------------------------------------------

CORRUPT, UNSUPPORTED = "corrupt", "unsupported"


def header_problems(hdr: Record, file_size: int) -> list:
    """(kind, text) for everything that makes the header unusable, in the
    order QEMU checks it; an open refuses the image with the first."""
    out = []
    if hdr.features & ~QED_FEATURE_MASK:
        out.append((UNSUPPORTED, f"unknown incompatible feature bits 0x{hdr.features & ~QED_FEATURE_MASK:x}"))
    cs = hdr.cluster_size
    if not is_pow2(cs) or not MIN_CLUSTER <= cs <= MAX_CLUSTER:
        out.append((CORRUPT, f"cluster size {cs} is not a power of two from {MIN_CLUSTER} to {MAX_CLUSTER}"))
        return out
    ts = hdr.table_size
    if not is_pow2(ts) or not MIN_TABLE <= ts <= MAX_TABLE:
        out.append((CORRUPT, f"table size {ts} is not a power of two from {MIN_TABLE} to {MAX_TABLE} clusters"))
        return out
    if not 1 <= hdr.header_size <= MAX_HEADER_CLUSTERS:
        out.append((CORRUPT, f"header size {hdr.header_size} clusters is outside 1..{MAX_HEADER_CLUSTERS}"))
        return out
    if hdr.image_size % SECTOR or hdr.image_size > max_image_size(cs, ts):
        out.append((CORRUPT, f"image size {hdr.image_size} is not a multiple of {SECTOR} up to "
                             f"{max_image_size(cs, ts)}"))
    l1 = hdr.l1_table_offset
    header_end = hdr.header_size * cs
    if l1 % cs or l1 < header_end or l1 + ts * cs > file_size:
        out.append((CORRUPT, f"L1 table offset {l1} is not cluster-aligned, inside the header or past the end "
                             f"of the file (file size {file_size})"))
    if hdr.features & QED_F_BACKING_FILE:
        end = hdr.backing_filename_offset + hdr.backing_filename_size
        if hdr.backing_filename_offset < HEADER.size or end > header_end or \
                hdr.backing_filename_size > MAX_BACKING_NAME:
            out.append((CORRUPT, f"backing file name ({hdr.backing_filename_size} bytes at "
                                 f"{hdr.backing_filename_offset}) lies outside the header clusters"))
    return out

"""QCOW2's on-disk structures, constants and pure checks (no I/O).

The layout follows QEMU's docs/interop/qcow2.txt; field names are spelled as
that text spells them.  Everything here takes values and returns values, so
the core's probing and --untrusted inspection can import it without the
backend."""

from __future__ import annotations

from collections.abc import Iterator

from vdtool.core.bytesutil import ceil_div
from vdtool.core.layout import Layout

MAGIC = b"QFI\xfb"

# Bytes 0-71 are every version's; 72-103 version 3's (a version 2 header
# reads as zeros there, see ``unpack_header``).
HEADER = Layout("qcow2 header", ">", (
    ("magic", "4s"), ("version", "I"), ("backing_file_offset", "Q"), ("backing_file_size", "I"),
    ("cluster_bits", "I"), ("size", "Q"), ("crypt_method", "I"), ("l1_size", "I"),
    ("l1_table_offset", "Q"), ("refcount_table_offset", "Q"), ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"), ("snapshots_offset", "Q"),
    ("incompatible_features", "Q"), ("compatible_features", "Q"), ("autoclear_features", "Q"),
    ("refcount_order", "I"), ("header_length", "I"),
))
V2_HEADER_LENGTH = HEADER.offset_of("incompatible_features")  # 72
V3_HEADER_LENGTH = HEADER.size  # 104
# Additional fields from byte 104 (kept as read, up to header_length)
ADDITIONAL_FIELDS = Layout("qcow2 additional header fields", ">", (("compression_type", "B"),))
ADDITIONAL_FIELDS_V3 = 8  # what qemu-img 7.2 writes: compression_type and padding
# compression_type values (incompatible feature bit 3 is set for any but zlib)
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Header extension framing: type, length (data follows, padded to 8)
EXTENSION = Layout("qcow2 header extension", ">", (("type", "I"), ("length", "I")))
# Feature name table entry: type (0 incompatible, 1 compatible, 2 autoclear), bit number, name
FEATURE_NAME = Layout("qcow2 feature name", ">", (("type", "B"), ("bit", "B"), ("name", "46s")))
SNAPSHOT_ENTRY = Layout("qcow2 snapshot entry", ">", (
    ("l1_table_offset", "Q"), ("l1_size", "I"), ("id_str_size", "H"), ("name_size", "H"), ("date_sec", "I"),
    ("date_nsec", "I"), ("vm_clock_nsec", "Q"), ("vm_state_size", "I"), ("extra_data_size", "I"),
))
# Snapshot extra data fields, each present only if extra_data_size reaches it
SNAPSHOT_EXTRA = Layout("qcow2 snapshot extra data", ">", (
    ("vm_state_size_large", "Q"), ("disk_size", "Q"), ("icount", "Q"),
))
BITMAPS_EXTENSION = Layout("qcow2 bitmaps extension", ">", (
    ("nb_bitmaps", "I"), (None, "4x"), ("bitmap_directory_size", "Q"), ("bitmap_directory_offset", "Q"),
))
BITMAP_DIR_ENTRY = Layout("qcow2 bitmap directory entry", ">", (
    ("bitmap_table_offset", "Q"), ("bitmap_table_size", "I"), ("flags", "I"), ("type", "B"),
    ("granularity_bits", "B"), ("name_size", "H"), ("extra_data_size", "I"),
))

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_KNOWN = COMPAT_LAZY_REFCOUNTS
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_RAW_DATA = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_RAW_DATA

# The feature name table qemu-img 7.2 writes into every v3 image.
FEATURE_TABLE = (
    (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"), (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"), (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
)

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE
SUBCLUSTERS = 32
SC_ALLOC_ALL = 0xFFFFFFFF
SC_ZERO_ALL = 0xFFFFFFFF << 32

# Limits, the ones QEMU enforces so that images either tool accepts agree.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_L1_ENTRIES = MAX_L1_BYTES // 8
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE = 1024 * MAX_SNAPSHOTS
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = 1 << 61  # 2 MiB clusters and a full 32 MiB L1 table reach exactly this
MAX_BITMAPS = 65535
CHECK_MAX_CLUSTERS = 1 << 28  # in-memory refcount array of check(); 2^28 clusters is 16 TiB at 64K
SECTOR = 512

# The kinds of problem header validation finds; the backend raises
# FormatError, UnsupportedFeature or CorruptImageError for them.
NOT_QCOW2 = "not-qcow2"
UNSUPPORTED = "unsupported"
CORRUPT = "corrupt"


def pad8(n: int) -> int:
    return (n + 7) & ~7


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def unpack_header(buf):
    """The header record from the first bytes of the file; fields a short
    buffer (a version 2 header) does not reach read as zero."""
    raw = bytes(buf[:HEADER.size])
    return HEADER.unpack(raw + bytes(HEADER.size - len(raw)))


def l2_bits(cluster_bits: int, extended_l2: bool) -> int:
    """log2 of the entries in one L2 table (extended entries are 16 bytes)."""
    return cluster_bits - (4 if extended_l2 else 3)


def compressed_extent(entry: int, cluster_bits: int) -> tuple:
    """(host offset, bytes) a compressed cluster descriptor covers."""
    x = 62 - (cluster_bits - 8)
    coff = entry & ((1 << x) - 1)
    nsec = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return coff, nsec * SECTOR - (coff & (SECTOR - 1))


def compressed_entry(coff: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of compressed data at ``coff``, ``length`` bytes long."""
    x = 62 - (cluster_bits - 8)
    nb_csectors = ((coff + length - 1) >> 9) - (coff >> 9)
    return OFLAG_COMPRESSED | (nb_csectors << x) | coff


def compressed_offset_limit(cluster_bits: int) -> int:
    """The first host offset a compressed cluster descriptor cannot hold."""
    return 1 << (62 - (cluster_bits - 8))


# -- header validation ---------------------------------------------------------------------

def fixed_header_problems(hdr, file_size: int) -> Iterator[tuple]:
    """(kind, text) problems of the first 72 bytes, in the order the open
    reports them; later checks may assume earlier ones passed."""
    if file_size < V2_HEADER_LENGTH:
        yield NOT_QCOW2, f"file is only {file_size} bytes, too small for a qcow2 header (72 bytes)"
        return
    if hdr.magic != MAGIC:
        yield NOT_QCOW2, f"not a qcow2 image (magic {hdr.magic!r}, expected {MAGIC!r})"
    elif hdr.version == 1:
        yield NOT_QCOW2, "this is a qcow version 1 image (format 'qcow'), not qcow2"
    elif hdr.version not in (2, 3):
        yield UNSUPPORTED, f"qcow2 version {hdr.version} is not supported (only 2 and 3)"
    elif not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        yield CORRUPT, f"cluster_bits {hdr.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"


def version_header_problems(hdr, first_cluster_len: int, file_size: int) -> Iterator[tuple]:
    """Problems of the version 3 fields (header_length, refcount_order)."""
    cs = 1 << hdr.cluster_bits
    if hdr.version == 3:
        hl = hdr.header_length
        text = None
        if first_cluster_len < V3_HEADER_LENGTH:
            text = (f"version 3 header is truncated: file is {file_size} bytes, the header needs "
                    f"{V3_HEADER_LENGTH}")
        elif hl < V3_HEADER_LENGTH:
            text = f"header_length {hl} is less than {V3_HEADER_LENGTH}"
        elif hl > cs:
            text = f"header_length {hl} is beyond the first cluster ({cs} bytes)"
        elif hl > first_cluster_len:
            text = f"header_length {hl} runs past the end of the file ({file_size} bytes)"
        if text:
            yield CORRUPT, text
            return
    if hdr.refcount_order > 6:
        yield CORRUPT, (f"refcount_order {hdr.refcount_order} is above 6 "
                        f"(refcount_bits {1 << min(hdr.refcount_order, 64)})")


def version_defaults(hdr) -> None:
    """A version 2 header's implied version 3 fields."""
    hdr.incompatible_features = hdr.compatible_features = hdr.autoclear_features = 0
    hdr.refcount_order = 4
    hdr.header_length = V2_HEADER_LENGTH


def extensions_end(hdr, cluster_size: int) -> int:
    """Header extensions run from header_length to the backing file name (or the end of the cluster)."""
    bfo = hdr.backing_file_offset
    return bfo if 0 < bfo < cluster_size else cluster_size


def parse_extensions(hc, start: int, end: int) -> tuple:
    """([type, data] in file order, end position, problem text or None) of
    the header extensions in ``hc`` (the first cluster) from ``start``."""
    limit = min(end, len(hc))
    pos = start
    exts = []
    while pos < end:
        if pos + EXTENSION.size > limit:
            return exts, pos, (f"header extension at offset {pos} runs past the end of the header area "
                               f"({limit})")
        ext = EXTENSION.unpack(hc, pos)
        pos += EXTENSION.size
        if ext.type == EXT_END:
            break
        if ext.length > limit - pos:
            return exts, pos, (f"header extension 0x{ext.type:08x} at offset {pos - 8} with length {ext.length} "
                               f"runs past the end of the header area ({limit})")
        exts.append([ext.type, bytes(hc[pos:pos + ext.length])])
        pos += pad8(ext.length)
    return exts, pos, None


def feature_names(exts: list) -> dict:
    """{(type, bit): name} from the feature name table extension."""
    features = {}
    for etype, data in exts:
        if etype == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - FEATURE_NAME.size + 1, FEATURE_NAME.size):
                f = FEATURE_NAME.unpack(data, i)
                features[(f.type, f.bit)] = f.name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return features


def feature_table_bytes() -> bytes:
    return b"".join(FEATURE_NAME.pack(type=k, bit=bit, name=n) for k, bit, n in FEATURE_TABLE)


def compression_type(extra: bytes) -> int:
    return ADDITIONAL_FIELDS.unpack(extra).compression_type if extra else 0


def feature_problems(hdr, exts: list, features: dict, extra: bytes) -> Iterator[tuple]:
    """Problems of the extensions and feature bits."""
    for etype, data in exts:
        if etype == EXT_BACKING_FORMAT and len(data) > MAX_BACKING_NAME:
            yield CORRUPT, f"backing format name is {len(data)} bytes long (limit {MAX_BACKING_NAME})"
            return
    incompat = hdr.incompatible_features
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(f"bit {b}" + (f" ({features[(0, b)]!r})" if (0, b) in features else "") for b in bits)
        yield UNSUPPORTED, f"image uses unknown incompatible feature(s): {names}"
        return
    if incompat & INCOMPAT_DATA_FILE:
        yield UNSUPPORTED, ("image stores its data in an external data file (incompatible feature bit 2, "
                            "'external data file'), which vdtool does not support")
        return
    if hdr.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(hdr.crypt_method, f"method {hdr.crypt_method}")
        yield UNSUPPORTED, (f"image is encrypted (crypt_method {hdr.crypt_method}, {kind}); encrypted "
                            f"qcow2 images are not supported")
        return
    ctype = compression_type(extra)
    if incompat & INCOMPAT_COMPRESSION:
        if not ctype:
            yield CORRUPT, "compression type feature bit is set but compression_type is zlib or absent"
            return
    elif ctype:
        yield CORRUPT, f"compression_type {ctype} is set without the compression type feature bit"
        return
    if ctype not in COMPRESSION_NAMES:
        yield UNSUPPORTED, f"unknown compression_type {ctype}"
        return
    if incompat & INCOMPAT_EXTL2 and hdr.cluster_bits < 14:
        yield CORRUPT, f"extended L2 entries need cluster_bits 14 or more, image has {hdr.cluster_bits}"


def backing_name_problems(hdr, file_size: int) -> Iterator[tuple]:
    bfo, bfs = hdr.backing_file_offset, hdr.backing_file_size
    if not bfo:
        return
    cs = 1 << hdr.cluster_bits
    where = f"backing file name (backing_file_offset {bfo}, backing_file_size {bfs}) runs past"
    if bfs > MAX_BACKING_NAME:
        yield CORRUPT, f"backing_file_size {bfs} is above {MAX_BACKING_NAME}"
    elif bfo > cs or bfo + bfs > cs:
        yield CORRUPT, f"{where} the first cluster ({cs} bytes)"
    elif bfo + bfs > file_size:
        yield CORRUPT, f"{where} the end of the file ({file_size} bytes)"


def table_problem(field: str, offset: int, length: int, cluster_size: int, file_size: int,
                  used: bool) -> str | None:
    """Where a table the header points at must lie: aligned, and when it is
    used, past the header and inside the file."""
    if offset % cluster_size:
        return f"{field} {offset:#x} is not aligned to the cluster size ({cluster_size})"
    if not used:
        return None
    if offset == 0:
        return f"{field} is 0: the table would overlap the header"
    if offset + length > file_size:
        return f"{field} {offset:#x} with {length} bytes runs past the end of the file ({file_size} bytes)"
    return None


def table_problems(hdr, file_size: int, extended_l2: bool) -> Iterator[tuple]:
    """Problems of the virtual size, the L1 table, the refcount table and
    the snapshot table's place."""
    size, l1_size = hdr.size, hdr.l1_size
    cs = 1 << hdr.cluster_bits
    if size >= 1 << 63:
        yield CORRUPT, f"size {size} is negative as a signed 64-bit number"
        return
    if size > MAX_VIRTUAL_SIZE:
        yield CORRUPT, f"size {size} is above the limit of {MAX_VIRTUAL_SIZE} bytes (2^61)"
        return
    l1_needed = ceil_div(size, cs << l2_bits(hdr.cluster_bits, extended_l2))
    if l1_needed > MAX_L1_ENTRIES:
        yield CORRUPT, f"size {size} needs an L1 table of {l1_needed} entries, above the limit of " \
                       f"{MAX_L1_ENTRIES} (32 MiB)"
    elif l1_size > MAX_L1_ENTRIES:
        yield CORRUPT, f"l1_size {l1_size} is above the limit of {MAX_L1_ENTRIES} entries (32 MiB)"
    elif l1_size < l1_needed:
        yield CORRUPT, f"l1_size {l1_size} is too small for size {size} (needs {l1_needed})"
    else:
        yield from _as_corrupt(table_problem("l1_table_offset", hdr.l1_table_offset, l1_size * 8, cs,
                                             file_size, bool(l1_size)))
        yield from _reftable_problems(hdr, file_size)


def _reftable_problems(hdr, file_size: int) -> Iterator[tuple]:
    cs = 1 << hdr.cluster_bits
    rtc = hdr.refcount_table_clusters
    if rtc == 0:
        yield CORRUPT, "image has no refcount table (refcount_table_clusters 0)"
    elif rtc > MAX_REFTABLE_BYTES // cs:
        yield CORRUPT, (f"refcount_table_clusters {rtc} is above the limit of {MAX_REFTABLE_BYTES // cs} for "
                        f"{cs}-byte clusters (8 MiB)")
    else:
        yield from _as_corrupt(table_problem("refcount_table_offset", hdr.refcount_table_offset, rtc * cs, cs,
                                             file_size, True))
        if hdr.nb_snapshots > MAX_SNAPSHOTS:
            yield CORRUPT, f"nb_snapshots {hdr.nb_snapshots} is above the limit of {MAX_SNAPSHOTS}"
        else:
            yield from _as_corrupt(table_problem("snapshots_offset", hdr.snapshots_offset,
                                                 hdr.nb_snapshots * SNAPSHOT_ENTRY.size, cs, file_size,
                                                 bool(hdr.nb_snapshots)))


def _as_corrupt(text: str | None) -> Iterator[tuple]:
    if text:
        yield CORRUPT, text


def header_problems(hdr, hc, file_size: int) -> Iterator[tuple]:
    """Every (kind, text) problem of a header whose first 72 bytes passed
    ``fixed_header_problems``, in the order the open reports them (the
    backend raises the first).  ``hc`` is the first cluster as read;
    ``hdr`` has its version 3 fields (``version_defaults`` for version 2)."""
    cs = 1 << hdr.cluster_bits
    first = next(version_header_problems(hdr, len(hc), file_size), None)
    if first:
        yield first
        return
    extra = bytes(hc[V3_HEADER_LENGTH:hdr.header_length]) if hdr.version == 3 else b""
    exts, _, problem = parse_extensions(hc, hdr.header_length, extensions_end(hdr, cs))
    if problem:
        yield CORRUPT, problem
        return
    for gen in (feature_problems(hdr, exts, feature_names(exts), extra), backing_name_problems(hdr, file_size),
                table_problems(hdr, file_size, bool(hdr.incompatible_features & INCOMPAT_EXTL2))):
        first = next(gen, None)
        if first:
            yield first
            return


def snapshot_problem(i: int, pos: int, body: int, limit: int, file_size: int) -> str | None:
    """Whether snapshot table entry ``i`` (``body`` bytes at ``pos``; 0 for
    its fixed part only) fits in the table."""
    if pos + (body or SNAPSHOT_ENTRY.size) <= limit:
        return None
    past = "the end of the file" if limit == file_size else "the 64 MiB table limit"
    if not body:
        return f"snapshot table entry {i} at offset {pos:#x} runs past {past}"
    return f"snapshot table entry {i} at offset {pos:#x} ({body} bytes) runs past {past}"


def snapshot_l1_problem(sid: str, ent, cluster_size: int, file_size: int) -> str | None:
    if ent.l1_size > MAX_L1_ENTRIES:
        return f"snapshot {sid!r}: l1_size {ent.l1_size} is above the limit of {MAX_L1_ENTRIES}"
    off = ent.l1_table_offset
    if off % cluster_size or (ent.l1_size and (off == 0 or off + ent.l1_size * 8 > file_size)):
        return (f"snapshot {sid!r}: L1 table at {off:#x} with {ent.l1_size} entries is misaligned or outside the "
                f"file ({file_size} bytes)")
    return None


def snapshot_extra(extra: bytes) -> tuple:
    """(vm_state_size_large, disk_size, icount) from a snapshot's extra
    data; None for each field the extra data does not reach."""
    full = SNAPSHOT_EXTRA.unpack(bytes(extra[:SNAPSHOT_EXTRA.size]).ljust(SNAPSHOT_EXTRA.size, b"\0"))
    n = len(extra)
    return (full.vm_state_size_large if n >= 8 else None, full.disk_size if n >= 16 else None,
            full.icount if n >= 24 else None)


# -- writing the header --------------------------------------------------------------------

def header_bytes(hdr, extra: bytes, exts: list, backing: bytes | None) -> bytes:
    """The whole header: fields (72 bytes for version 2), additional fields,
    extensions, end marker and backing file name.  The backing file fields
    come from ``backing``, not from ``hdr``."""
    n = HEADER.size if hdr.version >= 3 else V2_HEADER_LENGTH
    out = bytearray(n)
    if hdr.version >= 3:
        out += extra
    for etype, data in exts:
        out += EXTENSION.pack(type=etype, length=len(data)) + data + bytes(pad8(len(data)) - len(data))
    out += EXTENSION.pack(type=EXT_END, length=0)
    bfo = 0
    if backing:
        bfo = len(out)
        out += backing
    out[:n] = HEADER.pack(hdr, magic=MAGIC, backing_file_offset=bfo, backing_file_size=len(backing or b""))[:n]
    return bytes(out)


def field_bytes(hdr, first: str, last: str) -> tuple:
    """(offset, bytes) of the header fields ``first`` to ``last``, for a
    rewrite in place (one pwrite, so one sector holds them all)."""
    start = HEADER.offset_of(first)
    end = HEADER.offset_of(last) + HEADER.sizes[last]
    return start, HEADER.pack(hdr)[start:end]


# -- for the core: probing and --untrusted inspection ---------------------------------------

def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 if the magic says qcow2 (a qcow2 magic with version 1 is the older
    'qcow' format, so 0), else 0."""
    if head[:4] == MAGIC and len(head) >= 8:
        return 0 if unpack_header(head).version == 1 else 100
    return 0


def probe_score(head: bytes) -> int:
    """100 for a qcow2 header of a version vdtool reads (2 or 3), else 0."""
    if head[:4] == MAGIC and len(head) >= 8:
        return 100 if unpack_header(head).version in (2, 3) else 0
    return 0


def _name(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    """(findings, complete): the external references (backing file, data
    file) and unknown feature bits the header shows; ``read(offset,
    length)`` reads the file.  The header lists every reference qcow2 can
    make, so ``complete`` is True."""
    out = []
    if len(head) < V2_HEADER_LENGTH or head[:4] != MAGIC:
        return out, False
    hdr = unpack_header(head)
    if hdr.backing_file_offset:
        bf_off = hdr.backing_file_offset
        raw = read(bf_off, min(hdr.backing_file_size, MAX_BACKING_NAME)) if bf_off < size else b""
        out.append(("external-reference", f"backing file {_name(raw)!r}"))
    if hdr.version >= 3 and len(head) >= V3_HEADER_LENGTH:
        out += _unknown_feature_findings(hdr)
        data_name = _data_file_name(head, hdr.header_length)
        if hdr.incompatible_features & INCOMPAT_DATA_FILE or data_name:
            out.append(("external-reference", f"external data file {data_name or '(name not recorded)'!r}"))
    return out, True


def _unknown_feature_findings(hdr) -> list:
    unknown = []
    for kind, bits, known in (("incompatible", hdr.incompatible_features, INCOMPAT_KNOWN),
                              ("compatible", hdr.compatible_features, COMPAT_KNOWN),
                              ("autoclear", hdr.autoclear_features, AUTOCLEAR_KNOWN)):
        extra = bits & ~known
        if extra:
            unknown.append(f"{kind} 0x{extra:x}")
    return [("unknown-features", "qcow2 feature bits " + ", ".join(unknown))] if unknown else []


def _data_file_name(head: bytes, header_length: int) -> str | None:
    """The external data file extension's name, if the first 64 header
    extensions (all in ``head``) hold one."""
    data_name = None
    pos = header_length if V3_HEADER_LENGTH <= header_length < len(head) else V3_HEADER_LENGTH
    for _ in range(64):  # bounded: a hostile header may chain extensions to the end of ``head``
        if pos + EXTENSION.size > len(head):
            break
        ext = EXTENSION.unpack(head, pos)
        if ext.type == EXT_END:
            break
        if ext.type == EXT_DATA_FILE:
            data_name = _name(head[pos + 8:pos + 8 + min(ext.length, 4096)])
        pos += 8 + (ext.length + 7) // 8 * 8
    return data_name

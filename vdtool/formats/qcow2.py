"""QCOW2 images: QEMU's copy-on-write format, versions 2 (compat 0.10) and 3 (compat 1.1).

Read (normal, zero, compressed and extended-L2 clusters, internal snapshots
parsed), write (copy-on-write against the parent, zero flags, compressed
clusters, COW of clusters shared with internal snapshots), create laid out as
qemu-img 7.2 does, resize, check/repair and compact.

The layout follows QEMU's docs/interop/qcow2.txt; struct field names below
are spelled as that text spells them.  Every header field and table entry is
checked before it is used, so a hostile file costs a VdError, never a
traceback, a hang or a huge allocation.

Metadata is cached write-back.  flush() writes in crash-safe order: data,
then refcount blocks (and refcount table), then L2 tables, then the L1 table
and header, with an fsync between the groups; clusters released by a write
are only given back (refcount decremented) after the tables that stopped
pointing at them are on disk.  A crash therefore leaks clusters at worst.

Choices worth knowing:
- open(options={"cache": "unsafe"}) / create(options={"cache": "unsafe"}):
  the same ordered writes without fsync, qemu-img convert's default; for a
  fresh convert target whose half-written state nobody keeps.
- A dirty image (lazy refcounts, not closed) reads fine; a writable open
  rebuilds its refcounts first, as QEMU does.  A corrupt-marked image opens
  read-only, or writable with options={"repair": True} for check -r.
- zstd images (compression_type 1) open; reading a compressed cluster
  raises UnsupportedFeature.  Encryption and external data files are refused
  at open.
- Writes to extended-L2 images allocate whole clusters (every subcluster
  allocated, the rest copied from what the image showed).
- Writes to images with internal snapshots copy shared L2 tables and data
  clusters (no OFLAG_COPIED) before changing them; shrink and compact refuse.
- The first write clears autoclear feature bits (persistent bitmaps), as the
  spec requires of programs that do not maintain them; their clusters then
  count as leaks, which QEMU reports the same way.
- Growing an overlay does not mark the new area as zeros: a parent larger
  than the old size shows through there (the stack decides about parents)."""

from __future__ import annotations

import bisect
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from typing import Optional

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, ParentRef, ParentSpec, Status
from vdtool.core.registry import qemu_driver_name
from vdtool.core.errors import (FormatError, NotSupported, ReadOnlyError, UnsupportedFeature,
                                UsageError, VdError)
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress

# -- on-disk layout (docs/interop/qcow2.txt) ---------------------------------------

MAGIC = b"QFI\xfb"

# Bytes 0-71, all versions: magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method, l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# Bytes 72-103, version 3: incompatible_features, compatible_features, autoclear_features, refcount_order,
# header_length
HEADER_V3 = struct.Struct(">QQQII")
HEADER_V3_LENGTH = HEADER_V2.size + HEADER_V3.size  # 104
# Header extension: type, length (data follows, padded to 8)
HEADER_EXT = struct.Struct(">II")
# Feature name table entry: type (0 incompatible, 1 compatible, 2 autoclear), bit number, name
FEATURE_NAME = struct.Struct(">BB46s")
# Snapshot table entry: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
# Snapshot extra data: vm_state_size_large, disk_size, icount
SNAPSHOT_EXTRA = struct.Struct(">QQQ")
# Bitmaps extension: nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset
BITMAPS_EXT = struct.Struct(">IIQQ")
# Bitmap directory entry: bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits, name_size,
# extra_data_size
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
# Header fields rewritten in place, one pwrite each so a sector holds them all
SIZE_AND_L1 = struct.Struct(">QIIQ")  # size, crypt_method, l1_size, l1_table_offset at byte 24
REFTABLE_FIELDS = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters at byte 48
U64 = struct.Struct(">Q")
OFS_SIZE = 24
OFS_REFTABLE = 48
OFS_INCOMPATIBLE = 72
OFS_AUTOCLEAR = 88

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
AUTOCLEAR_BITMAPS = 1 << 0

# The feature name table qemu-img 7.2 writes into every v3 image.
FEATURE_TABLE = (
    (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"), (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"), (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
)
_FEATURE_KIND = {0: "incompatible", 1: "compatible", 2: "autoclear"}

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
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

CACHE_BYTES = 32 << 20  # clean L2 tables and refcount blocks kept for reading
DIRTY_BYTES = 32 << 20  # dirty metadata above this is flushed
SECTOR = 512

_LITTLE = sys.byteorder == "little"
_U32 = "I" if array("I").itemsize == 4 else "L"
_ZERO_CHUNK = bytes(1 << 20)


def _be_array(raw, typecode: str = "Q") -> array:
    a = array(typecode)
    a.frombytes(raw)
    if _LITTLE and a.itemsize > 1:
        a.byteswap()
    return a


def _be_bytes(a: array) -> bytes:
    if _LITTLE and a.itemsize > 1:
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def _zeros(n: int):
    return memoryview(_ZERO_CHUNK)[:n] if n <= len(_ZERO_CHUNK) else bytes(n)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def compress_cluster(data, cluster_size: int, level: int = 6) -> Optional[bytes]:
    """Deflate one guest cluster the way QEMU stores it (raw deflate, 4 KiB
    window, memLevel 9); None when that would not save space.  Pure function
    on bytes: the convert engine runs it in threads (zlib drops the GIL)."""
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    c = zlib.compressobj(level, zlib.DEFLATED, -12, 9)
    out = c.compress(data) + c.flush()
    # QEMU gives the compressor cluster_size - 1 bytes: anything larger is stored plain
    return out if len(out) < cluster_size else None


class _RefCodec:
    """Refcount block entries <-> an array of ints, for refcount_bits 1..64."""

    def __init__(self, order: int, cluster_size: int):
        self.bits = 1 << order
        self.entries = cluster_size * 8 // self.bits
        self.max = (1 << self.bits) - 1
        self.typecode = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: _U32, 6: "Q"}[order]
        self.cluster_size = cluster_size
        self._per = 8 // self.bits if self.bits < 8 else 0
        if self._per:
            # bit 0 of a byte is the least significant bit (qcow2.txt)
            m = self.max
            self._dec = [bytes((v >> (j * self.bits)) & m for j in range(self._per)) for v in range(256)]
            self._enc = {d: v for v, d in enumerate(self._dec)}

    def new(self) -> array:
        return array(self.typecode, bytes(self.entries * array(self.typecode).itemsize))

    def decode(self, raw: bytes) -> array:
        if self._per:
            return array("B", b"".join(map(self._dec.__getitem__, raw)))
        return _be_array(raw, self.typecode)

    def encode(self, a: array) -> bytes:
        if self._per:
            b = a.tobytes()
            per = self._per
            return bytes(map(self._enc.__getitem__, (b[i:i + per] for i in range(0, len(b), per))))
        return _be_bytes(a)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class Qcow2Backend(ImageBackend):
    name = "qcow2"
    extensions = (".qcow2",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.COMPRESS | Cap.ZERO_MARKER)
    variants = ("sparse", "metadata", "full")
    options = (
        FormatOption("compat", str, "1.1", "qcow2 version: 0.10 (version 2) or 1.1 (version 3)",
                     ("0.10", "1.1", "v2", "v3")),
        FormatOption("cluster_size", "size", 65536, "cluster size, a power of two from 512 to 2M"),
        FormatOption("lazy_refcounts", bool, False, "postpone refcount updates (needs compat 1.1)"),
        FormatOption("refcount_bits", int, 16, "width of a refcount entry: 1, 2, 4, 8, 16, 32 or 64 "
                                               "(compat 0.10 needs 16)"),
        FormatOption("extended_l2", bool, False, "extended L2 entries with 32 subclusters (compat 1.1, "
                                                 "cluster_size 16K or more)"),
        FormatOption("compression_type", str, "zlib", "compression of compressed clusters", ("zlib",)),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self._closed = False
        # header
        self.version = 3
        self._cb = 16
        self._cs = 1 << 16
        self._size = 0
        self._l1_size = 0
        self._l1_offset = 0
        self._rt_offset = 0
        self._rt_clusters = 0
        self._nb_snapshots = 0
        self._snapshots_offset = 0
        self._snapshots_size = 0
        self._incompat = 0
        self._compat = 0
        self._autoclear = 0
        self._refcount_order = 4
        self._header_length = HEADER_V2.size
        self._header_extra = b""  # additional v3 fields (byte 104 to header_length), kept as read
        self._compression_type = 0
        self._exts: list = []  # [type, data] in file order
        self._header_used = 0  # bytes of the first cluster the header, extensions and name occupy
        self._backing_name: Optional[str] = None
        self._backing_format: Optional[str] = None
        self._features: dict = {}
        self._snapshots: list = []
        # tables
        self._l1 = array("Q")
        self._rt = array("Q")
        self._l2_cache: OrderedDict = OrderedDict()
        self._rb_cache: OrderedDict = OrderedDict()
        self._l2_dirty: set = set()
        self._rb_dirty: set = set()
        self._rt_dirty: set = set()
        self._l1_dirty: set = set()
        self._pending_free: list = []
        self._meta_index = None
        self._ccache = (None, b"")  # last decompressed cluster
        # allocation
        self._free_hint = 0
        self._alloc_end = 0  # first cluster past everything allocated or in the file
        self._free_byte_offset = 0  # where the next compressed cluster may be packed
        self._write_started = False
        self._wrote_compressed = False
        self._unsafe = False  # cache=unsafe: ordered writes but no fsync (qemu-img convert's default)
        self._set_dirty_on_write = False
        self._data_dirty = False

    # == class level ====================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if len(head) >= 8 and head[:4] == MAGIC and struct.unpack(">I", head[4:8])[0] in (2, 3):
            return 100
        return 0

    def _load_image(self, options: dict) -> None:
        self._unsafe = options.get("cache") == "unsafe"
        self._load()
        if self.writable:
            self._open_writable(bool(options.get("repair")))

    # == parsing ========================================================================
    def _load(self) -> None:
        try:
            self._parse_header()
        except (struct.error, ValueError, OverflowError, IndexError, KeyError) as e:
            raise self._corrupt(f"malformed qcow2 header ({e})") from None

    def _parse_header(self) -> None:
        f = self.file
        fsize = f.size()
        if fsize < HEADER_V2.size:
            raise FormatError(f"file is only {fsize} bytes, too small for a qcow2 header (72 bytes)", self.path)
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
         l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
         snapshots_offset) = HEADER_V2.unpack(f.pread(0, HEADER_V2.size))
        if magic != MAGIC:
            raise FormatError(f"not a qcow2 image (magic {magic!r}, expected {MAGIC!r})", self.path)
        if version == 1:
            raise FormatError("this is a qcow version 1 image (format 'qcow'), not qcow2", self.path)
        if version not in (2, 3):
            raise UnsupportedFeature(f"qcow2 version {version} is not supported (only 2 and 3)", self.path)
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._corrupt(f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        cs = 1 << cluster_bits
        self.version = version
        self._cb = cluster_bits
        self._cs = cs
        hc = f.pread(0, min(cs, fsize))  # the header lives in the first cluster
        if version == 3:
            if len(hc) < HEADER_V3_LENGTH:
                raise self._corrupt(f"version 3 header is truncated: file is {fsize} bytes, the header needs "
                                    f"{HEADER_V3_LENGTH}")
            incompat, compat, autoclear, refcount_order, header_length = HEADER_V3.unpack_from(hc, HEADER_V2.size)
            if header_length < HEADER_V3_LENGTH:
                raise self._corrupt(f"header_length {header_length} is less than {HEADER_V3_LENGTH}")
            if header_length > cs:
                raise self._corrupt(f"header_length {header_length} is beyond the first cluster ({cs} bytes)")
            if header_length > len(hc):
                raise self._corrupt(f"header_length {header_length} runs past the end of the file ({fsize} bytes)")
            extra = bytes(hc[HEADER_V3_LENGTH:header_length])
        else:
            incompat = compat = autoclear = 0
            refcount_order = 4
            header_length = HEADER_V2.size
            extra = b""
        if refcount_order > 6:
            raise self._corrupt(f"refcount_order {refcount_order} is above 6 "
                                f"(refcount_bits {1 << min(refcount_order, 64)})")
        self._incompat, self._compat, self._autoclear = incompat, compat, autoclear
        self._refcount_order = refcount_order
        self._header_length = header_length
        self._header_extra = extra
        self._compression_type = extra[0] if extra else 0

        # header extensions run from header_length to the backing file name (or the end of the cluster)
        ext_end = backing_file_offset if 0 < backing_file_offset < cs else cs
        pos = header_length
        exts = []
        while pos < ext_end:
            if pos + HEADER_EXT.size > min(ext_end, len(hc)):
                raise self._corrupt(f"header extension at offset {pos} runs past the end of the header area "
                                    f"({min(ext_end, len(hc))})")
            etype, elen = HEADER_EXT.unpack_from(hc, pos)
            pos += HEADER_EXT.size
            if etype == EXT_END:
                break
            if elen > min(ext_end, len(hc)) - pos:
                raise self._corrupt(f"header extension 0x{etype:08x} at offset {pos - 8} with length {elen} "
                                    f"runs past the end of the header area ({min(ext_end, len(hc))})")
            exts.append([etype, bytes(hc[pos:pos + elen])])
            pos += _pad8(elen)
        self._exts = exts
        self._header_used = min(pos, cs)
        features = {}
        for etype, data in exts:
            if etype == EXT_FEATURE_TABLE:
                for i in range(0, len(data) - FEATURE_NAME.size + 1, FEATURE_NAME.size):
                    kind, bit, raw = FEATURE_NAME.unpack_from(data, i)
                    features[(kind, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif etype == EXT_BACKING_FORMAT:
                if len(data) > MAX_BACKING_NAME:
                    raise self._corrupt(f"backing format name is {len(data)} bytes long (limit {MAX_BACKING_NAME})")
                self._backing_format = data.decode("utf-8", "replace") or None
        self._features = features

        # features
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            bits = [b for b in range(64) if unknown >> b & 1]
            names = ", ".join(f"bit {b}" + (f" ({features[(0, b)]!r})" if (0, b) in features else "")
                              for b in bits)
            raise UnsupportedFeature(f"image uses unknown incompatible feature(s): {names}", self.path)
        if incompat & INCOMPAT_DATA_FILE:
            raise UnsupportedFeature("image stores its data in an external data file (incompatible feature "
                                     "bit 2, 'external data file'), which vdtool does not support", self.path)
        if crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(crypt_method, f"method {crypt_method}")
            raise UnsupportedFeature(f"image is encrypted (crypt_method {crypt_method}, {kind}); encrypted "
                                     f"qcow2 images are not supported", self.path)
        if incompat & INCOMPAT_COMPRESSION:
            if not self._compression_type:
                raise self._corrupt("compression type feature bit is set but compression_type is zlib or absent")
        elif self._compression_type:
            raise self._corrupt(f"compression_type {self._compression_type} is set without the compression "
                                f"type feature bit")
        if self._compression_type not in (0, 1):
            raise UnsupportedFeature(f"unknown compression_type {self._compression_type}", self.path)
        self._extl2 = bool(incompat & INCOMPAT_EXTL2)
        if self._extl2 and cluster_bits < 14:
            raise self._corrupt(f"extended L2 entries need cluster_bits 14 or more, image has {cluster_bits}")

        # backing file name
        if backing_file_offset:
            if backing_file_size > MAX_BACKING_NAME:
                raise self._corrupt(f"backing_file_size {backing_file_size} is above {MAX_BACKING_NAME}")
            if backing_file_offset > cs or backing_file_offset + backing_file_size > cs:
                raise self._corrupt(f"backing file name (backing_file_offset {backing_file_offset}, "
                                    f"backing_file_size {backing_file_size}) runs past the first cluster ({cs} bytes)")
            if backing_file_offset + backing_file_size > fsize:
                raise self._corrupt(f"backing file name (backing_file_offset {backing_file_offset}, "
                                    f"backing_file_size {backing_file_size}) runs past the end of the file "
                                    f"({fsize} bytes)")
            if backing_file_size:
                name = hc[backing_file_offset:backing_file_offset + backing_file_size]
                self._backing_name = _decode_name(bytes(name))
                self._header_used = max(self._header_used, backing_file_offset + backing_file_size)
        if not self._backing_name:
            self._backing_name = None

        # virtual size and the L1 table
        if size >= 1 << 63:
            raise self._corrupt(f"size {size} is negative as a signed 64-bit number")
        if size > MAX_VIRTUAL_SIZE:
            raise self._corrupt(f"size {size} is above the limit of {MAX_VIRTUAL_SIZE} bytes (2^61)")
        self._l2_bits = cluster_bits - (4 if self._extl2 else 3)
        self._l2_entries = 1 << self._l2_bits
        self._l2_words = 2 if self._extl2 else 1
        l1_needed = _ceil_div(size, cs << self._l2_bits)
        if l1_needed > MAX_L1_ENTRIES:
            raise self._corrupt(f"size {size} needs an L1 table of {l1_needed} entries, above the limit of "
                                f"{MAX_L1_ENTRIES} (32 MiB)")
        if l1_size > MAX_L1_ENTRIES:
            raise self._corrupt(f"l1_size {l1_size} is above the limit of {MAX_L1_ENTRIES} entries (32 MiB)")
        if l1_size < l1_needed:
            raise self._corrupt(f"l1_size {l1_size} is too small for size {size} (needs {l1_needed})")
        self._check_table("l1_table_offset", l1_table_offset, l1_size * 8, fsize, bool(l1_size))
        self._size = size
        self._l1_size = l1_size
        self._l1_offset = l1_table_offset

        # refcount table
        if refcount_table_clusters == 0:
            raise self._corrupt("image has no refcount table (refcount_table_clusters 0)")
        if refcount_table_clusters > MAX_REFTABLE_BYTES // cs:
            raise self._corrupt(f"refcount_table_clusters {refcount_table_clusters} is above the limit of "
                                f"{MAX_REFTABLE_BYTES // cs} for {cs}-byte clusters (8 MiB)")
        self._check_table("refcount_table_offset", refcount_table_offset, refcount_table_clusters * cs, fsize, True)
        self._rt_offset = refcount_table_offset
        self._rt_clusters = refcount_table_clusters
        self._rc = _RefCodec(refcount_order, cs)
        self._rb_shift = self._rc.entries.bit_length() - 1

        # snapshots
        if nb_snapshots > MAX_SNAPSHOTS:
            raise self._corrupt(f"nb_snapshots {nb_snapshots} is above the limit of {MAX_SNAPSHOTS}")
        self._check_table("snapshots_offset", snapshots_offset, nb_snapshots * SNAPSHOT_HEADER.size, fsize,
                          bool(nb_snapshots))
        self._nb_snapshots = nb_snapshots
        self._snapshots_offset = snapshots_offset
        self._snapshots = self._read_snapshots(fsize) if nb_snapshots else []

        # tables are read only now that their sizes are known to fit in the file
        self._l1 = _be_array(f.pread_exact(l1_table_offset, l1_size * 8, "L1 table")) if l1_size else array("Q")
        self._rt = _be_array(f.pread_exact(refcount_table_offset, refcount_table_clusters * cs, "refcount table"))
        self._file_size = fsize
        self._alloc_end = _ceil_div(fsize, cs)

    def _check_table(self, field: str, offset: int, length: int, fsize: int, used: bool) -> None:
        cs = self._cs
        if offset % cs:
            raise self._corrupt(f"{field} {offset:#x} is not aligned to the cluster size ({cs})")
        if not used:
            return
        if offset == 0:
            raise self._corrupt(f"{field} is 0: the table would overlap the header")
        if offset + length > fsize:
            raise self._corrupt(f"{field} {offset:#x} with {length} bytes runs past the end of the file "
                                f"({fsize} bytes)")

    def _read_snapshots(self, fsize: int) -> list:
        cs = self._cs
        start = self._snapshots_offset
        limit = min(fsize, start + MAX_SNAPSHOT_TABLE)
        pos = start
        out = []
        for i in range(self._nb_snapshots):
            if pos + SNAPSHOT_HEADER.size > limit:
                raise self._corrupt(f"snapshot table entry {i} at offset {pos:#x} runs past "
                                    f"{'the end of the file' if limit == fsize else 'the 64 MiB table limit'}")
            (l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
             vm_state_size, extra_data_size) = SNAPSHOT_HEADER.unpack(self.file.pread(pos, SNAPSHOT_HEADER.size))
            if extra_data_size > MAX_SNAPSHOT_EXTRA:
                raise self._corrupt(f"snapshot {i}: extra_data_size {extra_data_size} is above {MAX_SNAPSHOT_EXTRA}")
            body = SNAPSHOT_HEADER.size + extra_data_size + id_str_size + name_size
            if pos + body > limit:
                raise self._corrupt(f"snapshot table entry {i} at offset {pos:#x} ({body} bytes) runs past "
                                    f"{'the end of the file' if limit == fsize else 'the 64 MiB table limit'}")
            raw = self.file.pread(pos + SNAPSHOT_HEADER.size, body - SNAPSHOT_HEADER.size)
            extra = raw[:extra_data_size]
            sid = _decode_name(raw[extra_data_size:extra_data_size + id_str_size])
            sname = _decode_name(raw[extra_data_size + id_str_size:])
            vm_large, disk_size, icount = None, None, None
            if len(extra) >= 8:
                vm_large = U64.unpack_from(extra, 0)[0]
            if len(extra) >= 16:
                disk_size = U64.unpack_from(extra, 8)[0]
            if len(extra) >= 24:
                icount = U64.unpack_from(extra, 16)[0]
            if l1_size > MAX_L1_ENTRIES:
                raise self._corrupt(f"snapshot {sid!r}: l1_size {l1_size} is above the limit of {MAX_L1_ENTRIES}")
            if l1_table_offset % cs or (l1_size and (l1_table_offset == 0 or l1_table_offset + l1_size * 8 > fsize)):
                raise self._corrupt(f"snapshot {sid!r}: L1 table at {l1_table_offset:#x} with {l1_size} entries is "
                                    f"misaligned or outside the file ({fsize} bytes)")
            out.append({"id": sid, "name": sname, "l1_table_offset": l1_table_offset, "l1_size": l1_size,
                        "vm_state_size": vm_large if vm_large is not None else vm_state_size,
                        "date_sec": date_sec, "date_nsec": date_nsec, "vm_clock_nsec": vm_clock_nsec,
                        "disk_size": disk_size, "icount": icount})
            pos = start + _pad8(pos + body - start)
        self._snapshots_size = pos - start
        return out

    def _open_writable(self, repair: bool) -> None:
        if self._incompat & INCOMPAT_CORRUPT and not repair:
            raise self._corrupt("image is marked corrupt (incompatible feature bit 1, 'corrupt bit'): it may be "
                                "opened read-only; run 'vdtool check -r all' to repair it")
        if self._incompat & INCOMPAT_DIRTY:
            # refcounts may be stale after a crash with lazy refcounts: rebuild them first, as QEMU does
            res = self.check(repair="all")
            if res.check_errors or res.corruptions > res.corruptions_fixed:
                raise self._corrupt("image was not closed cleanly (dirty bit) and its refcounts could not be "
                                    "repaired: " + "; ".join(res.messages[-3:]))
            self._set_incompat(self._incompat & ~INCOMPAT_DIRTY)

    # == facts ==========================================================================
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return self._cs

    @property
    def parent(self) -> Optional[ParentRef]:
        if not self._backing_name:
            return None
        return ParentRef(filename=self._backing_name, format=self._backing_format)

    @property
    def variant(self) -> Optional[str]:
        return None

    def info(self) -> dict:
        d: dict = {"compat": "1.1" if self.version >= 3 else "0.10",
                   "compression-type": "zstd" if self._compression_type == 1 else "zlib"}
        if self.version >= 3:
            d["lazy-refcounts"] = bool(self._compat & COMPAT_LAZY_REFCOUNTS)
        d["refcount-bits"] = 1 << self._refcount_order
        if self.version >= 3:
            d["corrupt"] = bool(self._incompat & INCOMPAT_CORRUPT)
            d["extended-l2"] = self._extl2
        snaps = []
        for s in self._snapshots:
            e = {"id": s["id"], "name": s["name"], "vm-state-size": s["vm_state_size"],
                 "date-sec": s["date_sec"], "date-nsec": s["date_nsec"],
                 "vm-clock-sec": s["vm_clock_nsec"] // 1_000_000_000,
                 "vm-clock-nsec": s["vm_clock_nsec"] % 1_000_000_000}
            if s["icount"] is not None and s["icount"] != (1 << 64) - 1:
                e["icount"] = s["icount"]
            snaps.append(e)
        d["snapshots"] = snaps
        d["dirty-flag"] = bool(self._incompat & INCOMPAT_DIRTY)
        return d

    def external_references(self) -> list:
        refs = [self._backing_name] if self._backing_name else []
        for etype, data in self._exts:
            if etype == EXT_DATA_FILE and data:
                refs.append(_decode_name(data))
        return refs

    # == metadata access ================================================================
    def _file_limit(self) -> int:
        return max(self._file_size, self._alloc_end << self._cb)

    def _meta_ranges(self):
        """(sorted offsets of one-cluster metadata, [(start, end) of the big tables])."""
        if self._meta_index is None:
            cs = self._cs
            big = []
            if self._l1_size:
                big.append((self._l1_offset, self._l1_offset + self._l1_size * 8))
            big.append((self._rt_offset, self._rt_offset + self._rt_clusters * cs))
            if self._nb_snapshots:
                big.append((self._snapshots_offset, self._snapshots_offset + self._snapshots_size))
            small = [0]
            small += [e & REFT_OFFSET_MASK for e in self._rt if e & REFT_OFFSET_MASK]
            if self._l1_size <= (1 << 20):
                small += [e & L1E_OFFSET_MASK for e in self._l1 if e & L1E_OFFSET_MASK]
            small.sort()
            self._meta_index = (small, big)
        return self._meta_index

    def _meta_add(self, off: int) -> None:
        """A new L2 table or refcount block joins the overlap index."""
        if self._meta_index is not None:
            bisect.insort(self._meta_index[0], off)

    def _guard_alloc(self, first: int, n: int) -> None:
        if self._meta_overlap(first << self._cb, n << self._cb):
            raise self._corrupt(f"refcounts mark clusters {first}..{first + n - 1} free but they hold metadata; "
                                f"repair the image with 'vdtool check -r all'")

    def _meta_overlap(self, off: int, length: int) -> bool:
        small, big = self._meta_ranges()
        i = bisect.bisect_left(small, off - self._cs + 1)
        if i < len(small) and small[i] < off + length:
            return True
        for a, b in big:
            if a < off + length and off < b:
                return True
        return False

    def _check_data_cluster(self, host: int, what: str = "data cluster") -> None:
        cs = self._cs
        if host & (cs - 1):
            raise self._corrupt(f"{what} offset {host:#x} is not aligned to the cluster size ({cs})")
        if host >= self._file_limit():
            raise self._corrupt(f"{what} offset {host:#x} is past the end of the file ({self._file_size} bytes)")
        if self._meta_overlap(host, cs):
            raise self._corrupt(f"{what} offset {host:#x} overlaps qcow2 metadata (header, L1/L2 tables, refcount "
                                f"structures or snapshot table)")

    def _l2_table(self, off: int) -> array:
        tbl = self._l2_cache.get(off)
        if tbl is not None:
            self._l2_cache.move_to_end(off)
            return tbl
        cs = self._cs
        if off & (cs - 1):
            raise self._corrupt(f"L2 table offset {off:#x} is not aligned to the cluster size ({cs})")
        if off < cs or off + cs > self._file_limit():
            raise self._corrupt(f"L2 table offset {off:#x} is outside the file ({self._file_size} bytes) or in "
                                f"the header")
        l1o = self._l1_offset
        rto = self._rt_offset
        if (self._l1_size and l1o < off + cs and off < l1o + self._l1_size * 8) or \
                (rto < off + cs and off < rto + self._rt_clusters * cs):
            raise self._corrupt(f"L2 table offset {off:#x} overlaps the L1 table or the refcount table")
        tbl = _be_array(self.file.pread_exact(off, cs, "L2 table"))
        self._l2_cache[off] = tbl
        self._trim_cache(self._l2_cache, self._l2_dirty)
        return tbl

    def _trim_cache(self, cache: OrderedDict, dirty: set) -> None:
        limit = max(16, CACHE_BYTES >> self._cb)
        if len(cache) <= limit:
            return
        for key in list(cache):
            if len(cache) <= limit:
                break
            if key not in dirty:
                del cache[key]

    def _rb_load(self, off: int) -> array:
        blk = self._rb_cache.get(off)
        if blk is not None:
            return blk
        cs = self._cs
        if off & (cs - 1) or off < cs or off + cs > self._file_limit():
            raise self._corrupt(f"refcount block offset {off:#x} is misaligned, in the header or past the end of "
                                f"the file ({self._file_size} bytes)")
        blk = self._rc.decode(self.file.pread_exact(off, cs, "refcount block"))
        self._rb_cache[off] = blk
        self._trim_cache(self._rb_cache, self._rb_dirty)
        return blk

    def _rc_get(self, ci: int) -> int:
        rti = ci >> self._rb_shift
        if rti >= len(self._rt):
            return 0
        off = self._rt[rti] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._rb_load(off)[ci & (self._rc.entries - 1)]

    # == reading ========================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self._size)
        if offset >= end:
            return Status.ZERO, max(length, 1)
        cb = self._cb
        l1_shift = cb + self._l2_bits
        l2mask = self._l2_entries - 1
        pos = offset
        status = None
        while pos < end:
            l1i = pos >> l1_shift
            reg_end = min(end, (l1i + 1) << l1_shift)
            l2off = self._l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                if status is None:
                    status = Status.UNALLOCATED
                elif status != Status.UNALLOCATED:
                    break
                pos = reg_end
                continue
            tbl = self._l2_table(l2off)
            if self._extl2:
                pos, status, stop = self._status_ext(tbl, pos, reg_end, status)
                if stop:
                    break
                continue
            while pos < reg_end:
                e = tbl[(pos >> cb) & l2mask]
                if e & OFLAG_COMPRESSED:
                    st = Status.DATA
                elif e & OFLAG_ZERO:
                    st = Status.ZERO
                elif e & L2E_OFFSET_MASK:
                    st = Status.DATA
                else:
                    st = Status.UNALLOCATED
                if status is None:
                    status = st
                elif st != status:
                    return status, pos - offset
                pos = ((pos >> cb) + 1) << cb
            if pos >= end:
                break
        return status, min(pos, end) - offset

    def _sc_status(self, e: int, bm: int, j: int) -> Status:
        if bm >> j & 1:
            if bm >> (32 + j) & 1:
                raise self._corrupt(f"L2 entry {e:#x}: subcluster {j} is marked both allocated and zero")
            if not e & L2E_OFFSET_MASK:
                raise self._corrupt(f"L2 entry {e:#x}: subcluster {j} is allocated but the cluster has no offset")
            return Status.DATA
        if bm >> (32 + j) & 1:
            return Status.ZERO
        return Status.UNALLOCATED

    def _status_ext(self, tbl, pos: int, reg_end: int, status):
        cb = self._cb
        scb = cb - 5
        l2mask = self._l2_entries - 1
        while pos < reg_end:
            idx = (pos >> cb) & l2mask
            e = tbl[2 * idx]
            bm = tbl[2 * idx + 1]
            cend = ((pos >> cb) + 1) << cb
            if e & OFLAG_COMPRESSED:
                st = Status.DATA
                if status is None:
                    status = st
                elif st != status:
                    return pos, status, True
                pos = cend
                continue
            while pos < cend and pos < reg_end:
                st = self._sc_status(e, bm, (pos >> scb) & 31)
                if status is None:
                    status = st
                elif st != status:
                    return pos, status, True
                pos = ((pos >> scb) + 1) << scb
        return pos, status, False

    def _compressed_extent(self, e: int):
        x = 62 - (self._cb - 8)
        coff = e & ((1 << x) - 1)
        nsec = ((e >> x) & ((1 << (self._cb - 8)) - 1)) + 1
        return coff, nsec * SECTOR - (coff & (SECTOR - 1))

    def _decompress(self, e: int) -> bytes:
        key = e & ~OFLAG_COPIED
        if self._ccache[0] == key:
            return self._ccache[1]
        if self._compression_type != 0:
            raise UnsupportedFeature("image has zstd-compressed clusters (compression_type 1); only zlib "
                                     "compression is supported", self.path)
        coff, csize = self._compressed_extent(e)
        cs = self._cs
        if coff < cs or coff >= self._file_limit():
            raise self._corrupt(f"compressed cluster at {coff:#x} is in the header or past the end of the file "
                                f"({self._file_size} bytes)")
        if self._meta_overlap(coff, 1):
            raise self._corrupt(f"compressed cluster at {coff:#x} overlaps qcow2 metadata")
        raw = self.file.pread(coff, csize)  # the last sector may run past the end of the file
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, cs)
        except zlib.error as ex:
            raise self._corrupt(f"compressed cluster at {coff:#x} ({csize} bytes) does not inflate: {ex}") from None
        if len(out) != cs:
            raise self._corrupt(f"compressed cluster at {coff:#x} inflates to {len(out)} bytes, not {cs}")
        self._ccache = (key, out)
        return out

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if not n:
            return
        if offset < 0 or offset + n > self._size:
            raise VdError(f"read of {n} bytes at offset {offset} is outside the disk (virtual size {self._size})",
                          self.path)
        cb = self._cb
        cs = self._cs
        l1_shift = cb + self._l2_bits
        l2mask = self._l2_entries - 1
        w = self._l2_words
        file = self.file
        run_host = run_pos = run_len = 0
        pos = 0
        while pos < n:
            v = offset + pos
            l1i = v >> l1_shift
            reg_end = min(n, ((l1i + 1) << l1_shift) - offset)
            l2off = self._l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                mv[pos:reg_end] = _zeros(reg_end - pos)
                pos = reg_end
                continue
            tbl = self._l2_table(l2off)
            while pos < reg_end:
                v = offset + pos
                inoff = v & (cs - 1)
                idx = (v >> cb) & l2mask
                chunk = min(cs - inoff, reg_end - pos)
                e = tbl[idx * w]
                host = 0
                if e & OFLAG_COMPRESSED:
                    data = self._decompress(e)
                    mv[pos:pos + chunk] = data[inoff:inoff + chunk]
                elif w == 2:
                    host = self._read_ext_piece(mv, pos, v, chunk, e, tbl[2 * idx + 1])
                    if host < 0:  # handled piecewise (zeros or mixed)
                        host = 0
                elif e & OFLAG_ZERO:
                    mv[pos:pos + chunk] = _zeros(chunk)
                else:
                    host = e & L2E_OFFSET_MASK
                    if host:
                        self._check_data_cluster(host)
                        host += inoff
                    else:
                        mv[pos:pos + chunk] = _zeros(chunk)
                if host:
                    if run_len and run_host + run_len == host and run_pos + run_len == pos:
                        run_len += chunk
                    else:
                        if run_len:
                            file.readinto(run_host, mv[run_pos:run_pos + run_len])
                        run_host, run_pos, run_len = host, pos, chunk
                pos += chunk
        if run_len:
            file.readinto(run_host, mv[run_pos:run_pos + run_len])

    def _read_ext_piece(self, mv, pos: int, v: int, chunk: int, e: int, bm: int) -> int:
        """Extended L2: one cluster's piece.  Returns the host offset when the
        whole piece is allocated data (for coalescing), else -1 after filling."""
        scb = self._cb - 5
        first = (v >> scb) & 31
        last = ((v + chunk - 1) >> scb) & 31
        alloc = (bm & SC_ALLOC_ALL) >> first
        width = last - first + 1
        mask = (1 << width) - 1
        host = e & L2E_OFFSET_MASK
        if (alloc & mask) == mask:
            for j in range(first, last + 1):
                self._sc_status(e, bm, j)
            self._check_data_cluster(host)
            return host + (v & (self._cs - 1))
        p = pos
        end = pos + chunk
        while p < end:
            vv = v + (p - pos)
            j = (vv >> scb) & 31
            step = min(end - p, (((vv >> scb) + 1) << scb) - vv)
            st = self._sc_status(e, bm, j)
            if st == Status.DATA:
                self._check_data_cluster(host)
                self.file.readinto(host + (vv & (self._cs - 1)), mv[p:p + step])
            else:
                mv[p:p + step] = _zeros(step)
            p += step
        return -1

    # == refcounts and allocation =======================================================
    def _find_free(self, n: int, start: int) -> int:
        """First cluster of a run of ``n`` clusters with refcount 0 at or after ``start``."""
        E = self._rc.entries
        shift = self._rb_shift
        rt = self._rt
        ci = start
        run_start = start
        run_len = 0
        while run_len < n:
            rti = ci >> shift
            base = rti << shift
            off = rt[rti] & REFT_OFFSET_MASK if rti < len(rt) else 0
            if not off:
                if not run_len:
                    run_start = ci
                run_len += base + E - ci
                ci = base + E
                continue
            blk = self._rb_load(off)
            i = ci - base
            while i < E and run_len < n:
                if blk[i]:
                    run_len = 0
                    try:
                        i = blk.index(0, i)
                    except ValueError:
                        i = E
                    continue
                if not run_len:
                    run_start = base + i
                lim = min(E, i + (n - run_len))
                seg = blk[i:lim]
                if seg.count(0) == lim - i:
                    run_len += lim - i
                    i = lim
                else:
                    while i < lim and not blk[i]:
                        run_len += 1
                        i += 1
            ci = base + i
        return run_start

    def _rc_update(self, ci: int, n: int, delta: int) -> list:
        """Add ``delta`` to the refcounts of clusters ci..ci+n-1; returns the
        clusters that dropped to zero."""
        freed = []
        end = ci + n
        E = self._rc.entries
        shift = self._rb_shift
        maxv = self._rc.max
        while ci < end:
            rti = ci >> shift
            off = self._rt[rti] & REFT_OFFSET_MASK if rti < len(self._rt) else 0
            if not off:
                if delta < 0:
                    ci = min(end, (rti + 1) << shift)  # nothing counted there: a stale free, skip it
                    continue
                self._new_refblock(rti)
                off = self._rt[rti] & REFT_OFFSET_MASK
            blk = self._rb_load(off)
            self._rb_dirty.add(off)
            base = rti << shift
            i0 = ci - base
            i1 = min(E, end - base)
            if delta > 0 and max(blk[i0:i1]) + delta > maxv:  # refuse before changing anything
                raise UnsupportedFeature(f"a refcount in clusters {ci}..{base + i1 - 1} would exceed {maxv} "
                                         f"(refcount_bits {self._rc.bits})", self.path)
            for i in range(i0, i1):
                v = blk[i] + delta
                if v < 0:
                    continue  # refcount already 0: an inconsistency check will report, never go negative
                blk[i] = v
                if v == 0:
                    freed.append(base + i)
                    if self._free_byte_offset >> self._cb == base + i:
                        self._free_byte_offset = 0  # never pack compressed data into a cluster reused later
            ci = base + i1
        if freed and freed[0] < self._free_hint:
            self._free_hint = freed[0]
        return freed

    def _new_refblock(self, rti: int) -> None:
        if rti >= len(self._rt):
            self._grow_reftable(rti + 1)
            if self._rt[rti] & REFT_OFFSET_MASK:
                return
        c = self._find_free(1, max(self._free_hint, 1))
        self._guard_alloc(c, 1)
        self._free_hint = c + 1
        self._alloc_end = max(self._alloc_end, c + 1)
        off = c << self._cb
        self._rb_cache[off] = self._rc.new()
        self._rb_dirty.add(off)
        self._rt[rti] = off
        self._rt_dirty.add(rti)
        self._meta_add(off)
        self._rc_update(c, 1, 1)

    def _grow_reftable(self, min_entries: int) -> None:
        """A larger refcount table, with refcount blocks covering itself,
        placed past everything allocated; switched to in crash-safe order."""
        cs = self._cs
        cb = self._cb
        E = self._rc.entries
        shift = self._rb_shift
        epc = cs // 8
        old_len = len(self._rt)
        P = max(self._alloc_end, self._free_hint)
        want = max(min_entries, old_len + old_len // 2)
        B = 0
        T = _ceil_div(want, epc)
        while True:
            end = P + B + T
            need_idx = [i for i in range(P >> shift, ((end - 1) >> shift) + 1)
                        if i >= old_len or not self._rt[i] & REFT_OFFSET_MASK]
            T2 = max(T, _ceil_div(max(want, ((end - 1) >> shift) + 1), epc))
            if len(need_idx) == B and T2 == T:
                break
            B, T = len(need_idx), T2
        if T * cs > MAX_REFTABLE_BYTES:
            raise UnsupportedFeature(f"the refcount table would need {T * cs} bytes, above QEMU's limit of "
                                     f"{MAX_REFTABLE_BYTES}; use a larger cluster size", self.path)
        new_rt = array("Q", self._rt)
        new_rt.extend(array("Q", bytes(8 * (T * epc - old_len))))
        for k, rti in enumerate(need_idx):
            off = (P + k) << cb
            new_rt[rti] = off
            self._rb_cache[off] = self._rc.new()
            self._rb_dirty.add(off)
        old_off, old_clusters = self._rt_offset, self._rt_clusters
        self._rt = new_rt
        for c in range(P, P + B + T):
            blk = self._rb_load(self._rt[c >> shift] & REFT_OFFSET_MASK)
            blk[c & (E - 1)] += 1
            self._rb_dirty.add(self._rt[c >> shift] & REFT_OFFSET_MASK)
        self._alloc_end = max(self._alloc_end, P + B + T)
        self._free_hint = max(self._free_hint, P + B + T)
        self._rt_offset = (P + B) << cb
        self._rt_clusters = T
        self._meta_index = None
        # new table and blocks on disk before the header points at them
        self._sync()
        self._write_refblocks()
        self.file.pwrite(self._rt_offset, _be_bytes(self._rt))
        self._rt_dirty.clear()
        self._note_written(self._rt_offset + T * cs)
        self._sync()
        self.file.pwrite(OFS_REFTABLE, REFTABLE_FIELDS.pack(self._rt_offset, T))
        self._sync()
        self._pending_free.append((old_off >> cb, old_clusters))

    def _alloc_clusters(self, n: int) -> int:
        first = self._find_free(n, max(self._free_hint, 1))
        self._guard_alloc(first, n)
        self._free_hint = first + n
        self._alloc_end = max(self._alloc_end, first + n)
        self._rc_update(first, n, 1)
        return first

    def _alloc_bytes(self, size: int) -> int:
        """Room for a compressed cluster, packed after the previous one as QEMU does."""
        cs = self._cs
        off = self._free_byte_offset
        if off and self._rc_get(off >> self._cb) in (0, self._rc.max):
            off = 0
        free_in = cs - (off & (cs - 1)) if off else 0
        if not off or free_in < size:
            c = self._find_free(1, max(self._free_hint, 1))
            self._guard_alloc(c, 1)
            self._free_hint = c + 1
            self._alloc_end = max(self._alloc_end, c + 1)
            if not off or _ceil_div(off, cs) != c:
                off = c << self._cb
        first = off >> self._cb
        last = (off + size - 1) >> self._cb
        self._rc_update(first, last - first + 1, 1)
        self._free_byte_offset = (off + size) if (off + size) & (cs - 1) else 0
        return off

    def _defer_free(self, ci: int, n: int) -> None:
        self._pending_free.append((ci, n))

    def _release_entry(self, e: int) -> None:
        """Give back what an L2 entry referenced (after the next metadata flush)."""
        if e & OFLAG_COMPRESSED:
            coff, csize = self._compressed_extent(e)
            first = coff >> self._cb
            self._defer_free(first, ((coff + csize - 1) >> self._cb) - first + 1)
            if self._ccache[0] == e & ~OFLAG_COPIED:
                self._ccache = (None, b"")
        else:
            host = e & L2E_OFFSET_MASK
            if host:
                self._defer_free(host >> self._cb, 1)

    def _validate_entry(self, e: int) -> None:
        """Before a write replaces or frees what an entry points at."""
        if e & OFLAG_COMPRESSED:
            coff, csize = self._compressed_extent(e)
            if coff < self._cs or coff >= self._file_limit():
                raise self._corrupt(f"compressed cluster at {coff:#x} is in the header or past the end of the file")
            return
        host = e & L2E_OFFSET_MASK
        if host:
            self._check_data_cluster(host)

    # == flushing =======================================================================
    def _note_written(self, end: int) -> None:
        if end > self._file_size:
            self._file_size = end

    def _write_refblocks(self) -> None:
        for off in sorted(self._rb_dirty):
            blk = self._rb_cache.get(off)
            if blk is not None:
                self.file.pwrite(off, self._rc.encode(blk))
                self._note_written(off + self._cs)
        self._rb_dirty.clear()
        if self._rt_dirty:
            self._sync()  # a table entry must never point at a block not yet on disk
            per = SECTOR // 8
            for sec in sorted({i // per for i in self._rt_dirty}):
                a = sec * per
                self.file.pwrite(self._rt_offset + a * 8, _be_bytes(self._rt[a:a + per]))
            self._rt_dirty.clear()

    def _flush_metadata(self) -> None:
        f = self.file
        if not (self._data_dirty or self._rb_dirty or self._rt_dirty or self._l2_dirty or self._l1_dirty
                or self._pending_free):
            return
        self._sync()  # data before the metadata that points at it
        self._data_dirty = False
        if self._rb_dirty or self._rt_dirty:
            self._write_refblocks()
            self._sync()
        if self._l2_dirty:
            for off in sorted(self._l2_dirty):
                tbl = self._l2_cache.get(off)
                if tbl is not None:
                    f.pwrite(off, _be_bytes(tbl))
                    self._note_written(off + self._cs)
            self._l2_dirty.clear()
            self._sync()
        if self._l1_dirty:
            per = SECTOR // 8
            for sec in sorted({i // per for i in self._l1_dirty}):
                a = sec * per
                f.pwrite(self._l1_offset + a * 8, _be_bytes(self._l1[a:min(a + per, self._l1_size)]))
            self._l1_dirty.clear()
            self._sync()
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            freed = []
            for ci, n in pending:
                freed += self._rc_update(ci, n, -1)
            self._write_refblocks()
            self._sync()
            self._punch(freed)
        self._trim_cache(self._l2_cache, self._l2_dirty)
        self._trim_cache(self._rb_cache, self._rb_dirty)

    def _punch(self, clusters: list) -> None:
        if not clusters:
            return
        clusters.sort()
        cb = self._cb
        limit = _ceil_div(self._file_size, self._cs)
        start = prev = clusters[0]
        for c in clusters[1:] + [None]:
            if c is not None and c == prev + 1:
                prev = c
                continue
            if start < limit:
                self.file.punch_hole(start << cb, (min(prev + 1, limit) - start) << cb)
            if c is not None:
                start = prev = c

    def flush(self) -> None:
        if self._closed or not self.writable:
            return
        self._flush_metadata()

    def _maybe_flush(self) -> None:
        if (len(self._l2_dirty) + len(self._rb_dirty)) << self._cb > DIRTY_BYTES:
            self._flush_metadata()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.writable:
                self._flush_metadata()
                end = self.file.size()
                if self._wrote_compressed and end % SECTOR:
                    # packed compressed data may end mid-sector; qemu-img pads the file for sector-based readers
                    self.file.truncate(_ceil_div(end, SECTOR) * SECTOR)
                if self._set_dirty_on_write and self._write_started:
                    self._set_incompat(self._incompat & ~INCOMPAT_DIRTY)
        finally:
            self._closed = True
            self.file.close()

    # == header writes ==================================================================
    def _sync(self) -> None:
        if not self._unsafe:
            self.file.flush()

    def _set_incompat(self, value: int) -> None:
        self.file.pwrite(OFS_INCOMPATIBLE, U64.pack(value))
        self._sync()
        self._incompat = value

    def _write_size_l1(self) -> None:
        self.file.pwrite(OFS_SIZE, SIZE_AND_L1.pack(self._size, 0, self._l1_size, self._l1_offset))
        self._sync()

    def _header_bytes(self, exts: list, backing: Optional[bytes]) -> bytes:
        out = bytearray(HEADER_V2.size)
        if self.version >= 3:
            out += HEADER_V3.pack(self._incompat, self._compat, self._autoclear, self._refcount_order,
                                  self._header_length)
            out += self._header_extra
        for etype, data in exts:
            out += HEADER_EXT.pack(etype, len(data)) + data + bytes(_pad8(len(data)) - len(data))
        out += HEADER_EXT.pack(EXT_END, 0)
        bfo = 0
        if backing:
            bfo = len(out)
            out += backing
        HEADER_V2.pack_into(out, 0, MAGIC, self.version, bfo, len(backing or b""), self._cb, self._size, 0,
                            self._l1_size, self._l1_offset, self._rt_offset, self._rt_clusters,
                            self._nb_snapshots, self._snapshots_offset)
        return bytes(out)

    def _begin_write(self) -> None:
        if self._closed:
            raise VdError("image is closed", self.path)
        if not self.writable:
            raise ReadOnlyError("image is opened read-only", self.path)
        if self._incompat & INCOMPAT_CORRUPT:
            raise self._corrupt("image is marked corrupt; repair it with 'vdtool check -r all' before writing")
        if self._write_started:
            return
        self._write_started = True
        if self._autoclear:
            # unknown autoclear features (bitmaps) become invalid once we write: clear them first
            self.file.pwrite(OFS_AUTOCLEAR, U64.pack(0))
            self._sync()
            self._autoclear = 0
        if self.version >= 3 and self._compat & COMPAT_LAZY_REFCOUNTS and not self._incompat & INCOMPAT_DIRTY:
            self._set_dirty_on_write = True
            self._set_incompat(self._incompat | INCOMPAT_DIRTY)

    # == writing ========================================================================
    def _check_write_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {self._size})", self.path)

    def write(self, offset: int, data) -> None:
        self._begin_write()
        mv = memoryview(data).cast("B")
        self._check_write_range(offset, len(mv))
        self._write(offset, mv)
        self._maybe_flush()

    def _write(self, offset: int, mv) -> None:
        l1_shift = self._cb + self._l2_bits
        pos = 0
        n = len(mv)
        while pos < n:
            v = offset + pos
            l1i = v >> l1_shift
            stop = min(n, ((l1i + 1) << l1_shift) - offset)
            self._write_region(l1i, v, mv[pos:stop])
            pos = stop
        self._data_dirty = True

    def _l2_for_write(self, l1i: int) -> array:
        e = self._l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off and e & OFLAG_COPIED:
            tbl = self._l2_table(off)
            self._l2_dirty.add(off)
            return tbl
        if off:
            tbl = array("Q", self._l2_table(off))  # shared with a snapshot: copy on write
        else:
            tbl = array("Q", bytes(self._cs))
        new = self._alloc_clusters(1) << self._cb
        self._l2_cache[new] = tbl
        self._l2_dirty.add(new)
        self._l1[l1i] = new | OFLAG_COPIED
        self._l1_dirty.add(l1i)
        if off:
            self._meta_index = None  # the old table leaves the index
            self._defer_free(off >> self._cb, 1)
        else:
            self._meta_add(new)
        return tbl

    def _inplace_host(self, tbl, idx: int) -> int:
        if self._extl2:
            e = tbl[2 * idx]
            if e & OFLAG_COPIED and not e & OFLAG_COMPRESSED and tbl[2 * idx + 1] & SC_ALLOC_ALL == SC_ALLOC_ALL:
                return e & L2E_OFFSET_MASK
            return 0
        e = tbl[idx]
        if e & OFLAG_COPIED and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
            return e & L2E_OFFSET_MASK
        return 0

    def _write_region(self, l1i: int, voff: int, mv) -> None:
        cb = self._cb
        w = self._l2_words
        tbl = self._l2_for_write(l1i)
        l2mask = self._l2_entries - 1
        vend = voff + len(mv)
        ci_end = ((vend - 1) >> cb) + 1
        i = voff >> cb
        while i < ci_end:
            host = self._inplace_host(tbl, i & l2mask)
            j = i + 1
            if host:
                self._check_data_cluster(host)
                while j < ci_end and self._inplace_host(tbl, j & l2mask) == host + ((j - i) << cb):
                    self._check_data_cluster(host + ((j - i) << cb))
                    j += 1
                start = max(voff, i << cb)
                stop = min(vend, j << cb)
                self.file.pwrite(host + (start - (i << cb)), mv[start - voff:stop - voff])
                self._note_written(host + (stop - (i << cb)))
                i = j
                continue
            self._validate_entry(tbl[(i & l2mask) * w])
            while j < ci_end and not self._inplace_host(tbl, j & l2mask):
                self._validate_entry(tbl[(j & l2mask) * w])
                j += 1
            nclu = j - i
            run0 = i << cb
            start = max(voff, run0)
            stop = min(vend, j << cb)
            if start == run0 and stop == j << cb:
                buf = mv[start - voff:stop - voff]
            else:
                # old content first: a read that fails must not leave an allocation behind
                buf = bytearray(nclu << cb)
                if start > run0:
                    k = i & l2mask
                    self._old_content(buf, 0, run0, start, tbl, k)
                if stop < j << cb:
                    k = (j - 1) & l2mask
                    lo = max(stop, (j - 1) << cb)
                    self._old_content(buf, lo - run0, lo, j << cb, tbl, k)
                buf[start - run0:stop - run0] = mv[start - voff:stop - voff]
            first = self._alloc_clusters(nclu)
            hbase = first << cb
            self.file.pwrite(hbase, buf)
            self._note_written(hbase + (nclu << cb))
            for k in range(i, j):
                idx = (k & l2mask) * w
                old = tbl[idx]
                tbl[idx] = (hbase + ((k - i) << cb)) | OFLAG_COPIED
                if w == 2:
                    tbl[idx + 1] = SC_ALLOC_ALL
                self._release_entry(old)
            i = j

    def _old_content(self, buf, bpos: int, a: int, b: int, tbl, idx: int) -> None:
        """Fill buf[bpos:bpos+(b-a)] with what virtual bytes a..b (inside one
        cluster) read as in this image, the parent showing through."""
        cs = self._cs
        lim = min(b, self._size)
        if a >= lim:
            buf[bpos:bpos + (b - a)] = _zeros(b - a)
            return
        if lim < b:
            buf[bpos + (lim - a):bpos + (b - a)] = _zeros(b - lim)
        w = self._l2_words
        e = tbl[idx * w]
        inoff = a & (cs - 1)
        n = lim - a
        if e & OFLAG_COMPRESSED:
            buf[bpos:bpos + n] = self._decompress(e)[inoff:inoff + n]
            return
        if w == 2:
            bm = tbl[idx * 2 + 1]
            scb = self._cb - 5
            p = a
            while p < lim:
                j = (p >> scb) & 31
                q = min(lim, ((p >> scb) + 1) << scb)
                st = self._sc_status(e, bm, j)
                if st == Status.DATA:
                    self._check_data_cluster(e & L2E_OFFSET_MASK)
                    self.file.readinto((e & L2E_OFFSET_MASK) + (p & (cs - 1)),
                                       memoryview(buf)[bpos + p - a:bpos + q - a])
                elif st == Status.ZERO:
                    buf[bpos + p - a:bpos + q - a] = _zeros(q - p)
                else:
                    buf[bpos + p - a:bpos + q - a] = self.parent_read(p, q - p)
                p = q
            return
        if e & OFLAG_ZERO:
            buf[bpos:bpos + n] = _zeros(n)
            return
        host = e & L2E_OFFSET_MASK
        if host:
            self._check_data_cluster(host)
            self.file.readinto(host + inoff, memoryview(buf)[bpos:bpos + n])
        else:
            buf[bpos:bpos + n] = self.parent_read(a, n)

    # -- zeroes and discard ------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self._zero_range(offset, length, "zero" if unmap else "zero-keep")

    def discard(self, offset: int, length: int) -> None:
        self._zero_range(offset, length, "discard")

    def _zero_range(self, offset: int, length: int, mode: str) -> None:
        self._begin_write()
        self._check_write_range(offset, length)
        if not length:
            return
        cs = self._cs
        end = offset + length
        a = _ceil_div(offset, cs) * cs
        b = end // cs * cs
        if end == self._size:
            b = _ceil_div(end, cs) * cs  # the short last cluster counts as whole
        if a >= b:
            self._zero_partial(offset, length)
        else:
            if offset < a:
                self._zero_partial(offset, a - offset)
            self._zero_clusters(a >> self._cb, b >> self._cb, mode)
            if b < end:
                self._zero_partial(b, end - b)
        self._maybe_flush()

    def _zero_partial(self, offset: int, length: int) -> None:
        pos, end = offset, offset + length
        standalone = not self._backing_name
        while pos < end:
            st, n = self.block_status(pos, end - pos)
            if st == Status.ZERO or (st == Status.UNALLOCATED and standalone):
                pos += n
                continue
            self._write(pos, memoryview(bytes(n)))
            pos += n

    def _zero_clusters(self, c0: int, c1: int, mode: str) -> None:
        cb = self._cb
        has_backing = bool(self._backing_name)
        zero_flag = self.version >= 3 or self._extl2
        if has_backing and not zero_flag:
            # version 2 has no zero flag: an overlay needs real zeros over its parent
            pos, end = c0 << cb, min(c1 << cb, self._size)
            while pos < end:
                n = min(1 << 20, end - pos)
                self._write(pos, memoryview(_ZERO_CHUNK)[:n])
                pos += n
            return
        unalloc = not has_backing and (mode == "discard" or not zero_flag)
        w = self._l2_words
        l2b = self._l2_bits
        l2mask = self._l2_entries - 1
        ci = c0
        while ci < c1:
            l1i = ci >> l2b
            stop = min(c1, (l1i + 1) << l2b)
            l1e = self._l1[l1i]
            if not l1e & L1E_OFFSET_MASK and not has_backing:
                ci = stop  # nothing here and nothing below: reads as zeros already
                continue
            ro = self._l2_table(l1e & L1E_OFFSET_MASK) if l1e & L1E_OFFSET_MASK else None
            changes = []
            for k in range(ci, stop):
                idx = (k & l2mask) * w
                e = ro[idx] if ro is not None else 0
                bm = ro[idx + 1] if ro is not None and w == 2 else 0
                new = self._zeroed_entry(e, bm, unalloc, mode, has_backing)
                if new is not None:
                    changes.append((idx, e, new))
            if changes:
                for _, e, _ in changes:
                    if e & (OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                        self._validate_entry(e)
                tbl = self._l2_for_write(l1i)
                for idx, e, (ne, nbm) in changes:
                    tbl[idx] = ne
                    if w == 2:
                        tbl[idx + 1] = nbm
                    moved = (ne & L2E_OFFSET_MASK) != (e & L2E_OFFSET_MASK)
                    if e & OFLAG_COMPRESSED or (e & L2E_OFFSET_MASK and moved):
                        self._release_entry(e)
            ci = stop

    def _zeroed_entry(self, e: int, bm: int, unalloc: bool, mode: str, has_backing: bool):
        """New (entry, bitmap) for a cluster made to read as zeros, or None if it already does."""
        if unalloc:
            return (0, 0) if (e or bm) else None
        if self._extl2:
            if not e & L2E_OFFSET_MASK and not e & OFLAG_COMPRESSED and bm == SC_ZERO_ALL:
                return None
            if not has_backing and e == 0 and not bm & SC_ALLOC_ALL:
                return None
            return (0, SC_ZERO_ALL)
        host = e & L2E_OFFSET_MASK
        if e & OFLAG_COMPRESSED:
            return (OFLAG_ZERO, 0)
        if e & OFLAG_ZERO and (mode == "zero-keep" or not host):
            return None
        if not has_backing and e == 0:
            return None
        if mode == "zero-keep" and host and e & OFLAG_COPIED:
            return (host | OFLAG_COPIED | OFLAG_ZERO, 0)
        return (OFLAG_ZERO, 0)

    # -- compressed clusters -----------------------------------------------------------
    def write_compressed(self, offset: int, data) -> None:
        """Write one whole guest cluster compressed (stored plain when deflate
        does not make it smaller)."""
        self.write_precompressed(offset, compress_cluster(data, self._cs), data)

    def compress_block(self, data) -> Optional[bytes]:
        """The copy engine's hook (runs in worker threads: pure, no I/O)."""
        return compress_cluster(data, self._cs)

    def write_compressed_block(self, offset: int, compressed: Optional[bytes], data) -> None:
        self.write_precompressed(offset, compressed, data)

    def write_precompressed(self, offset: int, compressed: Optional[bytes], raw_data) -> None:
        self._begin_write()
        cs = self._cs
        n = len(raw_data)
        if offset % cs or not (n == cs or (n < cs and offset + n == self._size)):
            raise VdError(f"a compressed write must cover one whole cluster ({cs} bytes at a multiple of {cs}, "
                          f"or the short last one); got {n} bytes at {offset}", self.path)
        self._check_write_range(offset, n)
        if compressed is None:
            self._write(offset, memoryview(raw_data).cast("B"))
            self._maybe_flush()
            return
        if self._compression_type != 0:
            raise UnsupportedFeature("writing zstd-compressed clusters is not supported", self.path)
        if len(compressed) >= cs:
            raise VdError(f"compressed cluster is {len(compressed)} bytes, not smaller than a cluster", self.path)
        ci = offset >> self._cb
        l1i = ci >> self._l2_bits
        w = self._l2_words
        tbl = self._l2_for_write(l1i)
        idx = (ci & (self._l2_entries - 1)) * w
        old = tbl[idx]
        self._validate_entry(old)
        coff = self._alloc_bytes(len(compressed))
        x = 62 - (self._cb - 8)
        if coff >= 1 << x:
            raise UnsupportedFeature(f"compressed cluster offset {coff:#x} is beyond what an L2 entry can hold",
                                     self.path)
        self.file.pwrite(coff, compressed)
        self._ccache = (None, b"")
        self._wrote_compressed = True
        self._note_written(coff + len(compressed))
        self._data_dirty = True
        nb_csectors = ((coff + len(compressed) - 1) >> 9) - (coff >> 9)
        tbl[idx] = OFLAG_COMPRESSED | (nb_csectors << x) | coff
        if w == 2:
            tbl[idx + 1] = 0
        self._release_entry(old)
        self._maybe_flush()

    # == create =========================================================================
    @classmethod
    def _create_opts(cls, options: Optional[dict], block_size: Optional[int]) -> dict:
        known = {o.name: o for o in cls.options}
        opts = {o.name: o.default for o in cls.options}
        for key, value in (options or {}).items():
            if key in ("preallocation", "backing_fmt", "backing_file", "cache"):
                continue
            if key not in known:
                raise UsageError(f"unknown qcow2 option {key!r} (valid options: {', '.join(sorted(known))})")
            opt = known[key]
            if isinstance(value, str) and opt.type is not str:
                value = opt.parse(value, cls.name)
            opts[key] = value
        if block_size is not None:
            given = opts["cluster_size"] if "cluster_size" in (options or {}) else None
            if given is not None and given != known["cluster_size"].default and int(given) != block_size:
                raise UsageError(f"block size {block_size} and cluster_size {given} disagree")
            opts["cluster_size"] = block_size
        compat = {"v2": "0.10", "v3": "1.1"}.get(str(opts["compat"]), str(opts["compat"]))
        if compat not in ("0.10", "1.1"):
            raise UsageError(f"qcow2 option compat: invalid value {opts['compat']!r}; choose from 0.10, 1.1")
        opts["compat"] = compat
        cs = int(opts["cluster_size"])
        if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
            raise UsageError(f"qcow2 cluster size {cs} is not a power of two from 512 to 2 MiB")
        opts["cluster_size"] = cs
        rb = int(opts["refcount_bits"])
        if rb not in (1, 2, 4, 8, 16, 32, 64):
            raise UsageError(f"qcow2 refcount_bits {rb} is not a power of two from 1 to 64")
        if compat == "0.10":
            if rb != 16:
                raise UsageError("qcow2 compat 0.10 requires refcount_bits 16")
            if opts["lazy_refcounts"]:
                raise UsageError("qcow2 lazy_refcounts needs compat 1.1")
            if opts["extended_l2"]:
                raise UsageError("qcow2 extended_l2 needs compat 1.1")
        if opts["extended_l2"] and cs < 16384:
            raise UsageError(f"qcow2 extended_l2 needs a cluster size of 16K or more (got {cs})")
        if opts.get("compression_type", "zlib") != "zlib":
            raise UsageError("only zlib compression is supported for qcow2")
        return opts

    @classmethod
    def create(cls, path: str, size: int, *, variant: Optional[str] = None, block_size: Optional[int] = None,
               parent: Optional[ParentSpec] = None, options: Optional[dict] = None,
               progress: Progress = NO_PROGRESS) -> "Qcow2Backend":
        variant = variant or "sparse"
        if variant not in cls.variants:
            raise UsageError(f"qcow2 has no variant {variant!r}; choose from {', '.join(cls.variants)}")
        opts = cls._create_opts(options, block_size)
        if (size is None or size == 0) and parent is not None and parent.size:
            size = parent.size
        size = _ceil_div(int(size or 0), SECTOR) * SECTOR  # QEMU keeps whole sectors
        if size < 0 or size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"qcow2 image size {size} is outside 0..{MAX_VIRTUAL_SIZE}")
        cs = opts["cluster_size"]
        cb = cs.bit_length() - 1
        extl2 = bool(opts["extended_l2"])
        l2_bits = cb - (4 if extl2 else 3)
        l1_size = _ceil_div(size, cs << l2_bits)
        if l1_size > MAX_L1_ENTRIES:
            raise UsageError(f"qcow2 image size {size} needs an L1 table of {l1_size} entries, above the limit of "
                             f"{MAX_L1_ENTRIES}; use a larger cluster_size")
        version = 3 if opts["compat"] == "1.1" else 2
        backing = _encode_name(parent.recorded_name) if parent is not None else None
        if backing is not None and len(backing) > MAX_BACKING_NAME:
            raise UsageError(f"backing file name is {len(backing)} bytes, above the limit of {MAX_BACKING_NAME}")

        f = ImageFile(path, create=True)
        try:
            b = cls(f)
            b._unsafe = (options or {}).get("cache") == "unsafe"
            b.version = version
            b._cb, b._cs = cb, cs
            b._extl2 = extl2
            b._l2_bits = l2_bits
            b._l2_entries = 1 << l2_bits
            b._l2_words = 2 if extl2 else 1
            b._refcount_order = opts["refcount_bits"].bit_length() - 1
            b._rc = _RefCodec(b._refcount_order, cs)
            b._rb_shift = b._rc.entries.bit_length() - 1
            b._rt_offset, b._rt_clusters = cs, 1
            if version >= 3:
                b._incompat = INCOMPAT_EXTL2 if extl2 else 0
                b._compat = COMPAT_LAZY_REFCOUNTS if opts["lazy_refcounts"] else 0
                b._header_length = HEADER_V3_LENGTH + 8  # compression_type and padding
                b._header_extra = bytes(8)
            exts = []
            if parent is not None and parent.format:
                exts.append([EXT_BACKING_FORMAT, qemu_driver_name(parent.format).encode()])
            if version >= 3 and cs > 4096:  # qemu-img 7.2 leaves the table out of small clusters
                exts.append([EXT_FEATURE_TABLE, b"".join(FEATURE_NAME.pack(k, bit, n) for k, bit, n in FEATURE_TABLE)])
            b._exts = exts
            b._backing_name = parent.recorded_name if parent is not None else None
            b._backing_format = parent.format if parent is not None and parent.format else None
            hdr = b._header_bytes(exts, backing)
            if len(hdr) > cs:
                raise UsageError(f"the qcow2 header with its backing file name needs {len(hdr)} bytes, more than "
                                 f"one {cs}-byte cluster; use a larger cluster_size or a shorter name")
            b._header_used = len(hdr)
            # header, refcount table, one refcount block (QEMU's order), then the L1 table via the allocator
            f.pwrite(0, hdr + bytes(cs - len(hdr)))
            rt = bytearray(cs)
            U64.pack_into(rt, 0, 2 * cs)
            f.pwrite(cs, rt)
            blk = b._rc.new()
            for c in range(3):
                blk[c] = 1
            f.pwrite(2 * cs, b._rc.encode(blk))
            b._rt = _be_array(bytes(rt))
            b._file_size = 3 * cs
            b._alloc_end = 3
            b._free_hint = 3
            if l1_size:
                b._resize_l1(l1_size)
            b._size = size
            b._write_size_l1()
            if variant != "sparse":
                b._preallocate(variant, progress)
            b._flush_metadata()
        except BaseException:
            f.close()
            raise
        return b

    def _preallocate(self, variant: str, progress: Progress) -> None:
        """Every cluster allocated; 'full' also has the data space allocated in the file."""
        cb = self._cb
        l2b = self._l2_bits
        total = _ceil_div(self._size, self._cs)
        w = self._l2_words
        for l1i in range(self._l1_size):
            c0 = l1i << l2b
            if c0 >= total:
                break
            n = min(total, c0 + (1 << l2b)) - c0
            tbl = self._l2_for_write(l1i)
            first = self._alloc_clusters(n)
            for k in range(n):
                tbl[k * w] = ((first + k) << cb) | OFLAG_COPIED
                if w == 2:
                    tbl[k * w + 1] = SC_ALLOC_ALL
            end = (first + n) << cb
            if variant == "full":
                self.file.preallocate(first << cb, n << cb)
            if end > self._file_size:
                self.file.truncate(end)
                self._file_size = end
            self._maybe_flush()
            progress.update(min(c0 + n, total), total)

    # == L1 table growth ================================================================
    def _resize_l1(self, new_l1_size: int) -> None:
        """Make the L1 table hold ``new_l1_size`` entries.  A table that must
        move is written in full and flushed before the header points at it."""
        old = self._l1_size
        if new_l1_size <= old:
            return
        cs = self._cs
        cb = self._cb
        if new_l1_size > MAX_L1_ENTRIES:
            raise UsageError(f"the L1 table would need {new_l1_size} entries, above the limit of {MAX_L1_ENTRIES}")
        old_clusters = _ceil_div(old * 8, cs)
        if old and new_l1_size * 8 <= old_clusters * cs:
            self.file.pwrite(self._l1_offset + old * 8, bytes((new_l1_size - old) * 8))
            self._note_written(self._l1_offset + new_l1_size * 8)
            self._l1.extend(array("Q", bytes((new_l1_size - old) * 8)))
            self._l1_size = new_l1_size
            self._sync()
            self._meta_index = None
            return
        self._flush_metadata()
        nclu = _ceil_div(new_l1_size * 8, cs)
        first = self._alloc_clusters(nclu)
        new_l1 = array("Q", self._l1)
        new_l1.extend(array("Q", bytes((new_l1_size - old) * 8)))
        self.file.pwrite(first << cb, _be_bytes(new_l1))
        self._note_written((first << cb) + new_l1_size * 8)
        self._flush_metadata()  # refcounts of the new table
        self._sync()
        old_off = self._l1_offset
        self._l1 = new_l1
        self._l1_size = new_l1_size
        self._l1_offset = first << cb
        self._l1_dirty.clear()
        self._meta_index = None
        self._write_size_l1()
        if old:
            self._defer_free(old_off >> cb, old_clusters)

    # == resize =========================================================================
    def resize(self, new_size: int) -> None:
        self._begin_write()
        new_size = _ceil_div(int(new_size), SECTOR) * SECTOR
        if new_size < 0 or new_size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"qcow2 image size {new_size} is outside 0..{MAX_VIRTUAL_SIZE}")
        old_size = self._size
        if new_size == old_size:
            return
        cs = self._cs
        cb = self._cb
        if self._nb_snapshots and (new_size < old_size or self.version < 3):
            raise NotSupported("resizing" if self.version < 3 else "shrinking", "qcow2", self.path,
                               "the image has internal snapshots")
        if new_size > old_size:
            need = _ceil_div(new_size, cs << self._l2_bits)
            if need > MAX_L1_ENTRIES:
                raise UsageError(f"qcow2 image size {new_size} needs an L1 table of {need} entries, above the "
                                 f"limit of {MAX_L1_ENTRIES}")
            tail = min(new_size, _ceil_div(old_size, cs) * cs) - old_size
            self._flush_metadata()
            self._resize_l1(need)
            self._size = new_size
            if tail:
                # bytes past the old end inside the last cluster must read as zeros
                self._zero_partial_raw(old_size, tail)
            self._flush_metadata()
            self._write_size_l1()
            return
        # shrink: the smaller size goes into the header first, so a crash
        # while the part past it is zeroed and released leaves the new
        # content (and at worst leaked clusters), never a disk of the old
        # size with part of its end already gone.
        self._flush_metadata()
        self._size = new_size
        self._write_size_l1()
        # then zero the tail of the new last cluster, drop every cluster past it
        tail = _ceil_div(new_size, cs) * cs - new_size
        if tail:
            self._size = old_size  # (the zeroing writes past the new end)
            try:
                self._zero_partial_raw(new_size, min(tail, old_size - new_size))
            finally:
                self._size = new_size
        first_gone = _ceil_div(new_size, cs)
        last = _ceil_div(old_size, cs)
        l2b = self._l2_bits
        w = self._l2_words
        l2mask = self._l2_entries - 1
        ci = first_gone
        while ci < last:
            l1i = ci >> l2b
            stop = min(last, (l1i + 1) << l2b)
            l1e = self._l1[l1i]
            off = l1e & L1E_OFFSET_MASK
            if off:
                if ci == l1i << l2b:
                    tbl = self._l2_table(off)
                    for idx in range(0, self._l2_entries * w, w):
                        if tbl[idx]:
                            self._release_entry(tbl[idx])
                    self._l1[l1i] = 0
                    self._l1_dirty.add(l1i)
                    self._meta_index = None
                    self._defer_free(off >> cb, 1)
                    self._l2_dirty.discard(off)
                    self._l2_cache.pop(off, None)
                else:
                    tbl = self._l2_for_write(l1i)
                    for k in range(ci, stop):
                        idx = (k & l2mask) * w
                        if tbl[idx]:
                            self._release_entry(tbl[idx])
                        tbl[idx] = 0
                        if w == 2:
                            tbl[idx + 1] = 0
            ci = stop
        self._size = new_size
        self._flush_metadata()
        self._write_size_l1()
        self._flush_metadata()
        self._truncate_to_used()

    def _zero_partial_raw(self, offset: int, length: int) -> None:
        st, n = self.block_status(offset, length)
        if st == Status.ZERO and n >= length:
            return
        if st == Status.UNALLOCATED and n >= length and not self._backing_name:
            return
        self._write(offset, memoryview(bytes(length)))

    def _last_used_cluster(self) -> int:
        shift = self._rb_shift
        for rti in range(len(self._rt) - 1, -1, -1):
            off = self._rt[rti] & REFT_OFFSET_MASK
            if not off:
                continue
            used = self._rb_load(off).tobytes().rstrip(b"\0")
            if used:
                return (rti << shift) + (len(used) - 1) // self._rc_itemsize()
        return 0

    def _rc_itemsize(self) -> int:
        return array(self._rc.typecode).itemsize

    def _drop_empty_refblocks(self) -> None:
        """Refcount blocks that count nothing but themselves are released, so
        the file can end where the data ends (QEMU's reftable shrink)."""
        self._flush_metadata()
        E = self._rc.entries
        shift = self._rb_shift
        dropped = []
        for rti in range(len(self._rt)):
            off = self._rt[rti] & REFT_OFFSET_MASK
            if not off or rti == 0:
                continue
            blk = self._rb_load(off)
            own = off >> self._cb
            zeros = blk.count(0)
            if zeros == E or (zeros == E - 1 and own >> shift == rti and blk[own & (E - 1)] == 1):
                self._rt[rti] = 0
                self._rt_dirty.add(rti)
                dropped.append((off, own))
        if not dropped:
            return
        self._write_refblocks()  # table entries cleared on disk before the blocks are reused
        self._sync()
        for off, own in dropped:
            self._rb_cache.pop(off, None)
            if own >> shift < len(self._rt) and self._rt[own >> shift] & REFT_OFFSET_MASK:
                self._defer_free(own, 1)
        self._meta_index = None
        self._free_hint = 1
        self._flush_metadata()

    def _truncate_to_used(self) -> None:
        self._drop_empty_refblocks()
        end = (self._last_used_cluster() + 1) << self._cb
        # only ever cut: a file qemu made may end inside the L1 table's last cluster
        if end < self._file_size:
            self.file.truncate(end)
            self._file_size = end
            self._alloc_end = _ceil_div(end, self._cs)
            self._free_hint = min(self._free_hint, self._alloc_end)

    # == parent =========================================================================
    def set_parent(self, parent: Optional[ParentSpec]) -> None:
        self._begin_write()
        self._flush_metadata()
        name = parent.recorded_name if parent is not None else None
        fmt = qemu_driver_name(parent.format) if parent is not None and parent.format else None
        backing = _encode_name(name) if name else None
        if backing is not None and len(backing) > MAX_BACKING_NAME:
            raise UsageError(f"backing file name is {len(backing)} bytes, above the limit of {MAX_BACKING_NAME}")
        exts = [list(x) for x in self._exts if x[0] != EXT_BACKING_FORMAT]
        if backing and fmt:
            exts.insert(0, [EXT_BACKING_FORMAT, fmt.encode()])
        hdr = self._header_bytes(exts, backing)
        cs = self._cs
        if len(hdr) > cs:
            raise UnsupportedFeature(f"the header with the new backing file name needs {len(hdr)} bytes, more "
                                     f"than the first cluster ({cs} bytes)", self.path)
        pad = max(0, self._header_used - len(hdr))
        self.file.pwrite(0, hdr + bytes(pad))
        self._sync()
        self._exts = exts
        self._header_used = len(hdr)
        self._backing_name = name or None
        self._backing_format = fmt if backing and fmt else None

    # == check ==========================================================================
    def check(self, repair: Optional[str] = None, progress: Progress = NO_PROGRESS) -> CheckResult:
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"check repair mode must be None, 'leaks' or 'all', not {repair!r}")
        if repair and not self.writable:
            raise ReadOnlyError("image is opened read-only; it must be opened for writing to repair it", self.path)
        res = CheckResult()
        try:
            if self.writable:
                self._flush_metadata()
            from vdtool.formats._qcow2_check import run_check

            run_check(self, res, repair, progress)
        except VdError as e:
            res.check_errors += 1
            res.messages.append(f"ERROR: {e}")
        except (struct.error, ValueError, OverflowError, IndexError, KeyError, zlib.error, MemoryError) as e:
            res.check_errors += 1
            res.messages.append(f"ERROR: internal check failure: {type(e).__name__}: {e}")
        return res

    # == compact ========================================================================
    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        self._begin_write()
        from vdtool.formats._qcow2_check import run_compact

        run_compact(self, progress)

"""The state every qcow2 piece shares: one ``Qcow2State`` per open image.

The backend owns it; the refcount, cluster, write, check, compact and
create pieces read and change these fields rather than each other's
internals.  Besides the fields, only what keeps them consistent lives here:
the metadata overlap index (a hostile table pointing data at metadata is
refused before anything is read or written there), the cache trim, the
ordered-write barrier and the in-place header field writes."""

from __future__ import annotations

import bisect
from array import array
from collections import OrderedDict

from vdtool.core.errors import CorruptImageError
from vdtool.formats.qcow2.layout import (HEADER, L1E_OFFSET_MASK, REFT_OFFSET_MASK, V2_HEADER_LENGTH,
                                         field_bytes)

CACHE_BYTES = 32 << 20  # clean L2 tables and refcount blocks kept for reading
DIRTY_BYTES = 32 << 20  # dirty metadata above this is flushed


class Qcow2State:
    """The fields of one open qcow2 image (see __init__ for each)."""

    __slots__ = (
        "file", "path", "closed",
        "version", "cb", "cs", "size", "l1_size", "l1_offset", "rt_offset", "rt_clusters", "nb_snapshots",
        "snapshots_offset", "snapshots_size", "incompat", "compat", "autoclear", "refcount_order",
        "header_length", "header_extra", "compression_type", "exts", "header_used", "backing_name",
        "backing_format", "features", "snapshots",
        "extl2", "l2_bits", "l2_entries", "l2_words", "rc", "rb_shift",
        "l1", "rt", "l2_cache", "rb_cache", "l2_dirty", "rb_dirty", "rt_dirty", "l1_dirty", "pending_free",
        "meta_index", "ccache",
        "file_size", "free_hint", "alloc_end", "free_byte_offset",
        "write_started", "wrote_compressed", "unsafe", "set_dirty_on_write", "data_dirty",
    )

    def __init__(self, file):
        self.file = file  # vdtool.core.fileio.ImageFile
        self.path: str = file.path
        self.closed = False
        # -- header, as read (or as create lays it out) --
        self.version = 3
        self.cb = 16  # cluster_bits
        self.cs = 1 << 16  # cluster size in bytes
        self.size = 0  # virtual size
        self.l1_size = 0  # entries of the active L1 table
        self.l1_offset = 0
        self.rt_offset = 0  # refcount table
        self.rt_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.snapshots_size = 0  # bytes of the snapshot table
        self.incompat = 0  # incompatible_features
        self.compat = 0  # compatible_features
        self.autoclear = 0  # autoclear_features
        self.refcount_order = 4
        self.header_length = V2_HEADER_LENGTH
        self.header_extra = b""  # additional v3 fields (byte 104 to header_length), kept as read
        self.compression_type = 0
        self.exts: list = []  # header extensions, [type, data] in file order
        self.header_used = 0  # bytes of the first cluster the header, extensions and name occupy
        self.backing_name: str | None = None
        self.backing_format: str | None = None
        self.features: dict = {}  # (type, bit) -> name, from the feature name table
        self.snapshots: list = []  # dicts, see snapshot.read_table
        # -- geometry derived from the header --
        self.extl2 = False  # extended L2 entries (16 bytes: entry and subcluster bitmap)
        self.l2_bits = 13  # log2 of the entries of one L2 table
        self.l2_entries = 1 << 13
        self.l2_words = 1  # array items per L2 entry (2 with extended L2)
        self.rc = None  # refcount.RefCodec for refcount_order
        self.rb_shift = 0  # log2 of the entries of one refcount block
        # -- tables and write-back caches --
        self.l1 = array("Q")  # the active L1 table, host order
        self.rt = array("Q")  # the refcount table
        self.l2_cache: OrderedDict = OrderedDict()  # L2 table offset -> array
        self.rb_cache: OrderedDict = OrderedDict()  # refcount block offset -> array
        self.l2_dirty: set = set()  # offsets of L2 tables to write
        self.rb_dirty: set = set()  # offsets of refcount blocks to write
        self.rt_dirty: set = set()  # refcount table indexes to write
        self.l1_dirty: set = set()  # L1 indexes to write
        self.pending_free: list = []  # (cluster, count) released once the tables stop pointing at them
        self.meta_index = None  # overlap index, rebuilt on demand (see meta_ranges)
        self.ccache = (None, b"")  # last decompressed cluster: (entry without COPIED, data)
        # -- allocation --
        self.file_size = 0  # what the file holds (as far as this process wrote it)
        self.free_hint = 0  # no free cluster below this one
        self.alloc_end = 0  # first cluster past everything allocated or in the file
        self.free_byte_offset = 0  # where the next compressed cluster may be packed
        # -- write state --
        self.write_started = False
        self.wrote_compressed = False
        self.unsafe = False  # cache=unsafe: ordered writes but no fsync (qemu-img convert's default)
        self.set_dirty_on_write = False  # lazy refcounts: the dirty bit was set by this process
        self.data_dirty = False  # data written since the last metadata flush

    # -- small helpers every piece uses ------------------------------------------------
    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    def sync(self) -> None:
        """The barrier between groups of ordered writes (none with cache=unsafe)."""
        if not self.unsafe:
            self.file.flush()

    def note_written(self, end: int) -> None:
        if end > self.file_size:
            self.file_size = end

    def file_limit(self) -> int:
        return max(self.file_size, self.alloc_end << self.cb)

    def trim_cache(self, cache: OrderedDict, dirty: set) -> None:
        limit = max(16, CACHE_BYTES >> self.cb)
        if len(cache) <= limit:
            return
        for key in list(cache):
            if len(cache) <= limit:
                break
            if key not in dirty:
                del cache[key]

    def dirty_too_much(self) -> bool:
        return (len(self.l2_dirty) + len(self.rb_dirty)) << self.cb > DIRTY_BYTES

    # -- the metadata overlap index ------------------------------------------------------
    def meta_ranges(self):
        """(sorted offsets of one-cluster metadata, [(start, end) of the big tables])."""
        if self.meta_index is None:
            cs = self.cs
            big = []
            if self.l1_size:
                big.append((self.l1_offset, self.l1_offset + self.l1_size * 8))
            big.append((self.rt_offset, self.rt_offset + self.rt_clusters * cs))
            if self.nb_snapshots:
                big.append((self.snapshots_offset, self.snapshots_offset + self.snapshots_size))
            small = [0]
            small += [e & REFT_OFFSET_MASK for e in self.rt if e & REFT_OFFSET_MASK]
            if self.l1_size <= (1 << 20):
                small += [e & L1E_OFFSET_MASK for e in self.l1 if e & L1E_OFFSET_MASK]
            small.sort()
            self.meta_index = (small, big)
        return self.meta_index

    def meta_add(self, off: int) -> None:
        """A new L2 table or refcount block joins the overlap index."""
        if self.meta_index is not None:
            bisect.insort(self.meta_index[0], off)

    def meta_overlap(self, off: int, length: int) -> bool:
        small, big = self.meta_ranges()
        i = bisect.bisect_left(small, off - self.cs + 1)
        if i < len(small) and small[i] < off + length:
            return True
        for a, b in big:
            if a < off + length and off < b:
                return True
        return False

    def guard_alloc(self, first: int, n: int) -> None:
        if self.meta_overlap(first << self.cb, n << self.cb):
            raise self.corrupt(f"refcounts mark clusters {first}..{first + n - 1} free but they hold metadata; "
                               f"repair the image with 'vdtool check -r all'")

    def check_data_cluster(self, host: int, what: str = "data cluster") -> None:
        cs = self.cs
        if host & (cs - 1):
            raise self.corrupt(f"{what} offset {host:#x} is not aligned to the cluster size ({cs})")
        if host >= self.file_limit():
            raise self.corrupt(f"{what} offset {host:#x} is past the end of the file ({self.file_size} bytes)")
        if self.meta_overlap(host, cs):
            raise self.corrupt(f"{what} offset {host:#x} overlaps qcow2 metadata (header, L1/L2 tables, refcount "
                               f"structures or snapshot table)")

    # -- header fields rewritten in place -------------------------------------------------
    def header_record(self):
        """The header's fields as this state has them (backing file fields
        and crypt_method zero: they are written with the whole header)."""
        return HEADER.new(version=self.version, cluster_bits=self.cb, size=self.size, l1_size=self.l1_size,
                          l1_table_offset=self.l1_offset, refcount_table_offset=self.rt_offset,
                          refcount_table_clusters=self.rt_clusters, nb_snapshots=self.nb_snapshots,
                          snapshots_offset=self.snapshots_offset, incompatible_features=self.incompat,
                          compatible_features=self.compat, autoclear_features=self.autoclear,
                          refcount_order=self.refcount_order, header_length=self.header_length)

    def write_header_fields(self, first: str, last: str, **changes) -> None:
        """Write header fields ``first`` to ``last`` (with ``changes`` to the
        state's values) in one pwrite, then sync; the caller updates the
        state once that worked."""
        off, raw = field_bytes(self.header_record().replace(**changes), first, last)
        self.file.pwrite(off, raw)
        self.sync()

    def set_incompat(self, value: int) -> None:
        self.write_header_fields("incompatible_features", "incompatible_features", incompatible_features=value)
        self.incompat = value

    def write_size_l1(self) -> None:
        # size, crypt_method (always 0 here), l1_size, l1_table_offset
        self.write_header_fields("size", "l1_table_offset")

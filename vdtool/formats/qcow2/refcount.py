"""QCOW2 refcounts: the refcount table and blocks, cluster allocation and
deferred frees.

Every host cluster's refcount says how many references point at it; 0 is
free.  Blocks are cached write-back in the state's ``rb_cache``; a table
entry is only written after the block it points at (``write_blocks``), and
clusters a write released are only given back (``free_pending``) after the
tables that stopped pointing at them are on disk."""

from __future__ import annotations

from array import array

from vdtool.core.bytesutil import U32, U64, be_array, be_bytes, ceil_div
from vdtool.core.errors import UnsupportedFeature
from vdtool.formats.qcow2.layout import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, SECTOR


class RefCodec:
    """Refcount block entries <-> an array of ints, for refcount_bits 1..64."""

    def __init__(self, order: int, cluster_size: int):
        self.bits = 1 << order
        self.entries = cluster_size * 8 // self.bits
        self.max = (1 << self.bits) - 1
        self.typecode = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: U32, 6: "Q"}[order]
        self.itemsize = array(self.typecode).itemsize
        self.cluster_size = cluster_size
        self._per = 8 // self.bits if self.bits < 8 else 0
        if self._per:
            # bit 0 of a byte is the least significant bit (qcow2.txt)
            m = self.max
            self._dec = [bytes((v >> (j * self.bits)) & m for j in range(self._per)) for v in range(256)]
            self._enc = {d: v for v, d in enumerate(self._dec)}

    def new(self) -> array:
        return array(self.typecode, bytes(self.entries * self.itemsize))

    def zeros(self, n: int) -> array:
        return array(self.typecode, bytes(n * self.itemsize))

    def decode(self, raw: bytes) -> array:
        if self._per:
            return array("B", b"".join(map(self._dec.__getitem__, raw)))
        return be_array(raw, self.typecode)

    def encode(self, a: array) -> bytes:
        if self._per:
            b = a.tobytes()
            per = self._per
            return bytes(map(self._enc.__getitem__, (b[i:i + per] for i in range(0, len(b), per))))
        return be_bytes(a)


class Refcounts:
    """Reading, changing and allocating through the refcount structures of
    one image (``st``: its Qcow2State)."""

    def __init__(self, st):
        self.st = st

    # -- reading ---------------------------------------------------------------------
    def block(self, off: int) -> array:
        """The refcount block at ``off`` (cached)."""
        st = self.st
        blk = st.rb_cache.get(off)
        if blk is not None:
            return blk
        cs = st.cs
        if off & (cs - 1) or off < cs or off + cs > st.file_limit():
            raise st.corrupt(f"refcount block offset {off:#x} is misaligned, in the header or past the end of "
                             f"the file ({st.file_size} bytes)")
        blk = st.rc.decode(st.file.pread_exact(off, cs, "refcount block"))
        st.rb_cache[off] = blk
        st.trim_cache(st.rb_cache, st.rb_dirty)
        return blk

    def get(self, ci: int) -> int:
        st = self.st
        rti = ci >> st.rb_shift
        if rti >= len(st.rt):
            return 0
        off = st.rt[rti] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self.block(off)[ci & (st.rc.entries - 1)]

    def stored(self, first: int, n: int) -> array:
        """The stored refcounts of clusters first..first+n-1 as one array
        (raises what reading a block raises)."""
        st = self.st
        E = st.rc.entries
        shift = st.rb_shift
        out = array(st.rc.typecode)
        c, end = first, first + n
        while c < end:
            rti = c >> shift
            stop = min(end, (rti + 1) << shift)
            off = st.rt[rti] & REFT_OFFSET_MASK if rti < len(st.rt) else 0
            if off:
                out += self.block(off)[c & (E - 1):(c & (E - 1)) + stop - c]
            else:
                out += st.rc.zeros(stop - c)
            c = stop
        return out

    def last_used_cluster(self) -> int:
        st = self.st
        shift = st.rb_shift
        for rti in range(len(st.rt) - 1, -1, -1):
            off = st.rt[rti] & REFT_OFFSET_MASK
            if not off:
                continue
            used = self.block(off).tobytes().rstrip(b"\0")
            if used:
                return (rti << shift) + (len(used) - 1) // st.rc.itemsize
        return 0

    # -- allocation -------------------------------------------------------------------
    def find_free(self, n: int, start: int) -> int:
        """First cluster of a run of ``n`` clusters with refcount 0 at or after ``start``."""
        st = self.st
        E = st.rc.entries
        shift = st.rb_shift
        rt = st.rt
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
            blk = self.block(off)
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

    def _claim(self, first: int, n: int) -> None:
        """Clusters first..first+n-1 were found free: make sure they hold
        no metadata, move the hints past them."""
        st = self.st
        st.guard_alloc(first, n)
        st.free_hint = first + n
        st.alloc_end = max(st.alloc_end, first + n)

    def alloc_clusters(self, n: int) -> int:
        first = self.find_free(n, max(self.st.free_hint, 1))
        self._claim(first, n)
        self.update(first, n, 1)
        return first

    def alloc_bytes(self, size: int) -> int:
        """Room for a compressed cluster, packed after the previous one as QEMU does."""
        st = self.st
        cs = st.cs
        off = st.free_byte_offset
        if off and self.get(off >> st.cb) in (0, st.rc.max):
            off = 0
        free_in = cs - (off & (cs - 1)) if off else 0
        if not off or free_in < size:
            c = self.find_free(1, max(st.free_hint, 1))
            self._claim(c, 1)
            if not off or ceil_div(off, cs) != c:
                off = c << st.cb
        first = off >> st.cb
        last = (off + size - 1) >> st.cb
        self.update(first, last - first + 1, 1)
        st.free_byte_offset = (off + size) if (off + size) & (cs - 1) else 0
        return off

    def update(self, ci: int, n: int, delta: int) -> list:
        """Add ``delta`` to the refcounts of clusters ci..ci+n-1; returns the
        clusters that dropped to zero."""
        st = self.st
        freed = []
        end = ci + n
        E = st.rc.entries
        shift = st.rb_shift
        maxv = st.rc.max
        while ci < end:
            rti = ci >> shift
            off = st.rt[rti] & REFT_OFFSET_MASK if rti < len(st.rt) else 0
            if not off:
                if delta < 0:
                    ci = min(end, (rti + 1) << shift)  # nothing counted there: a stale free, skip it
                    continue
                self._new_block(rti)
                off = st.rt[rti] & REFT_OFFSET_MASK
            blk = self.block(off)
            st.rb_dirty.add(off)
            base = rti << shift
            i0 = ci - base
            i1 = min(E, end - base)
            if delta > 0 and max(blk[i0:i1]) + delta > maxv:  # refuse before changing anything
                raise UnsupportedFeature(f"a refcount in clusters {ci}..{base + i1 - 1} would exceed {maxv} "
                                         f"(refcount_bits {st.rc.bits})", st.path)
            for i in range(i0, i1):
                v = blk[i] + delta
                if v < 0:
                    continue  # refcount already 0: an inconsistency check will report, never go negative
                blk[i] = v
                if v == 0:
                    freed.append(base + i)
                    if st.free_byte_offset >> st.cb == base + i:
                        st.free_byte_offset = 0  # never pack compressed data into a cluster reused later
            ci = base + i1
        if freed and freed[0] < st.free_hint:
            st.free_hint = freed[0]
        return freed

    def _new_block(self, rti: int) -> None:
        st = self.st
        if rti >= len(st.rt):
            self._grow_table(rti + 1)
            if st.rt[rti] & REFT_OFFSET_MASK:
                return
        c = self.find_free(1, max(st.free_hint, 1))
        self._claim(c, 1)
        off = c << st.cb
        st.rb_cache[off] = st.rc.new()
        st.rb_dirty.add(off)
        st.rt[rti] = off
        st.rt_dirty.add(rti)
        st.meta_add(off)
        self.update(c, 1, 1)

    def _grow_table(self, min_entries: int) -> None:
        """A larger refcount table, with refcount blocks covering itself,
        placed past everything allocated; switched to in crash-safe order."""
        st = self.st
        P = max(st.alloc_end, st.free_hint)
        need_idx, T = self._grown_table_size(P, max(min_entries, len(st.rt) + len(st.rt) // 2))
        cs, cb = st.cs, st.cb
        E = st.rc.entries
        shift = st.rb_shift
        B = len(need_idx)
        new_rt = array("Q", st.rt)
        new_rt.extend(array("Q", bytes(8 * (T * (cs // 8) - len(st.rt)))))
        for k, rti in enumerate(need_idx):
            off = (P + k) << cb
            new_rt[rti] = off
            st.rb_cache[off] = st.rc.new()
            st.rb_dirty.add(off)
        old_off, old_clusters = st.rt_offset, st.rt_clusters
        st.rt = new_rt
        for c in range(P, P + B + T):
            off = st.rt[c >> shift] & REFT_OFFSET_MASK
            self.block(off)[c & (E - 1)] += 1
            st.rb_dirty.add(off)
        st.alloc_end = max(st.alloc_end, P + B + T)
        st.free_hint = max(st.free_hint, P + B + T)
        st.rt_offset = (P + B) << cb
        st.rt_clusters = T
        st.meta_index = None
        # new table and blocks on disk before the header points at them
        st.sync()
        self.write_blocks()
        st.file.pwrite(st.rt_offset, be_bytes(st.rt))
        st.rt_dirty.clear()
        st.note_written(st.rt_offset + T * cs)
        st.sync()
        st.write_header_fields("refcount_table_offset", "refcount_table_clusters")
        st.pending_free.append((old_off >> cb, old_clusters))

    def _grown_table_size(self, P: int, want: int) -> tuple:
        """(table indexes needing a new block, table clusters) of a table of
        at least ``want`` entries placed at cluster ``P`` after its blocks."""
        st = self.st
        epc = st.cs // 8
        shift = st.rb_shift
        old_len = len(st.rt)
        B = 0
        T = ceil_div(want, epc)
        while True:
            end = P + B + T
            need_idx = [i for i in range(P >> shift, ((end - 1) >> shift) + 1)
                        if i >= old_len or not st.rt[i] & REFT_OFFSET_MASK]
            T2 = max(T, ceil_div(max(want, ((end - 1) >> shift) + 1), epc))
            if len(need_idx) == B and T2 == T:
                break
            B, T = len(need_idx), T2
        if T * st.cs > MAX_REFTABLE_BYTES:
            raise UnsupportedFeature(f"the refcount table would need {T * st.cs} bytes, above QEMU's limit of "
                                     f"{MAX_REFTABLE_BYTES}; use a larger cluster size", st.path)
        return need_idx, T

    def switch_table(self, rt: array, rt_off: int, clusters: int, end: int, order: int | None = None) -> None:
        """Use a refcount table (and its blocks) written elsewhere, already on
        disk: the header is pointed at it, the caches forget the old one.
        ``order``: the new structures have another entry width (amend), set
        in the same header write; the caller then sets the geometry."""
        st = self.st
        if order is None:
            st.write_header_fields("refcount_table_offset", "refcount_table_clusters",
                                   refcount_table_offset=rt_off, refcount_table_clusters=clusters)
        else:
            st.write_header_fields("refcount_table_offset", "refcount_order", refcount_table_offset=rt_off,
                                   refcount_table_clusters=clusters, refcount_order=order)
        st.rt = rt
        st.rt_offset = rt_off
        st.rt_clusters = clusters
        st.rb_cache.clear()
        st.rb_dirty.clear()
        st.rt_dirty.clear()
        st.meta_index = None
        st.file_size = max(st.file_size, end << st.cb)
        st.alloc_end = max(st.alloc_end, end)
        st.free_hint = 1

    # -- frees and write-back -------------------------------------------------------------
    def defer_free(self, ci: int, n: int) -> None:
        """Give clusters ci..ci+n-1 back at the next metadata flush, once
        nothing on disk points at them."""
        self.st.pending_free.append((ci, n))

    def free_pending(self) -> list:
        """Decrement what was deferred; returns the clusters now free."""
        st = self.st
        pending, st.pending_free = st.pending_free, []
        freed = []
        for ci, n in pending:
            freed += self.update(ci, n, -1)
        return freed

    def write_blocks(self) -> None:
        """Dirty blocks, then (after a sync) the dirty table sectors."""
        st = self.st
        for off in sorted(st.rb_dirty):
            blk = st.rb_cache.get(off)
            if blk is not None:
                st.file.pwrite(off, st.rc.encode(blk))
                st.note_written(off + st.cs)
        st.rb_dirty.clear()
        if st.rt_dirty:
            st.sync()  # a table entry must never point at a block not yet on disk
            per = SECTOR // 8
            for sec in sorted({i // per for i in st.rt_dirty}):
                a = sec * per
                st.file.pwrite(st.rt_offset + a * 8, be_bytes(st.rt[a:a + per]))
            st.rt_dirty.clear()

    def punch(self, clusters: list) -> None:
        """Hand freed clusters back to the file system (holes)."""
        if not clusters:
            return
        st = self.st
        clusters.sort()
        cb = st.cb
        limit = ceil_div(st.file_size, st.cs)
        start = prev = clusters[0]
        for c in clusters[1:] + [None]:
            if c is not None and c == prev + 1:
                prev = c
                continue
            if start < limit:
                st.file.punch_hole(start << cb, (min(prev + 1, limit) - start) << cb)
            if c is not None:
                start = prev = c


def write_fresh_structures(st, counts: array, codec: RefCodec, first: int) -> tuple:
    """Refcount blocks and a refcount table describing ``counts`` (one entry
    per cluster) at ``codec``'s width, written from cluster ``first`` on
    (the blocks, then the table: they count themselves) and flushed, so a
    header may name them next.  Used by check's rebuild and amend's width
    change.  Returns (table, table offset, table clusters, end cluster)."""
    cs, cb = st.cs, st.cb
    E = codec.entries
    nonzero = set()
    for rti in range(ceil_div(len(counts), E)):
        seg = counts[rti * E:(rti + 1) * E]
        if seg.count(0) != len(seg):
            nonzero.add(rti)
    idx, T = _fresh_table_size(st, E.bit_length() - 1, first, nonzero)
    end = first + len(idx) + T
    new = codec.zeros(end)
    new[:len(counts)] = array(codec.typecode, counts)
    for c in range(first, end):
        new[c] += 1
    rt = array(U64, bytes(T * cs))
    for k, rti in enumerate(idx):
        boff = (first + k) << cb
        rt[rti] = boff
        seg = new[rti * E:(rti + 1) * E]
        if len(seg) < E:
            seg.extend(codec.zeros(E - len(seg)))
        st.file.pwrite(boff, codec.encode(seg))
    rt_off = (first + len(idx)) << cb
    st.file.pwrite(rt_off, be_bytes(rt))
    st.sync()
    return rt, rt_off, T, end


def _fresh_table_size(st, shift: int, first: int, nonzero: set) -> tuple:
    """(table indexes that get a block, table clusters) of refcount
    structures placed at cluster ``first``, blocks first (they count
    themselves)."""
    B, T = 0, 1
    while True:
        end = first + B + T
        idx = sorted(nonzero | set(range(first >> shift, ((end - 1) >> shift) + 1)))
        nT = max(1, ceil_div((idx[-1] + 1) * 8, st.cs))
        if len(idx) == B and nT == T:
            break
        B, T = len(idx), nT
    if T * st.cs > MAX_REFTABLE_BYTES:
        raise UnsupportedFeature(f"the refcount table would need {T * st.cs} bytes, above QEMU's limit of "
                                 f"{MAX_REFTABLE_BYTES}", st.path)
    return idx, T

"""Guest writes to a qcow2 image: data (in place where the cluster is this
image's own, else copy-on-write into new clusters), zeros and discards
(zero flags or released clusters), and compressed clusters.

A cluster whose entry lacks OFLAG_COPIED is shared with an internal
snapshot (or is not this image's at all): it is never written in place.
Writes to extended-L2 images allocate whole clusters (every subcluster
allocated, the rest copied from what the image showed)."""

from __future__ import annotations

from array import array
from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.bytesutil import ceil_div, zeros
from vdtool.core.errors import ReadOnlyError, UnsupportedFeature, VdError
from vdtool.formats.qcow2.layout import (COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
                                         L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                                         OFLAG_ZERO, SC_ALLOC_ALL, SC_ZERO_ALL, compressed_entry,
                                         compressed_offset_limit)


class Writer:
    """Writes through one image's tables (``st``: its Qcow2State;
    ``clusters``: its cluster.ClusterMap; ``parent_read(offset, length)``:
    what the layers below show, for partly written clusters)."""

    def __init__(self, st, refcounts, clusters, parent_read: Callable[[int, int], bytes]):
        self.st = st
        self.refcounts = refcounts
        self.clusters = clusters
        self.parent_read = parent_read

    def begin(self) -> None:
        """Before the first change: refuse closed, read-only and corrupt
        images; clear autoclear bits; set the dirty bit (lazy refcounts)."""
        st = self.st
        if st.closed:
            raise VdError("image is closed", st.path)
        if not st.file.writable:
            raise ReadOnlyError("image is opened read-only", st.path)
        if st.incompat & INCOMPAT_CORRUPT:
            raise st.corrupt("image is marked corrupt; repair it with 'vdtool check -r all' before writing")
        if st.write_started:
            return
        st.write_started = True
        if st.autoclear:
            # unknown autoclear features (bitmaps) become invalid once we write: clear them first
            st.write_header_fields("autoclear_features", "autoclear_features", autoclear_features=0)
            st.autoclear = 0
        if st.version >= 3 and st.compat & COMPAT_LAZY_REFCOUNTS and not st.incompat & INCOMPAT_DIRTY:
            st.set_dirty_on_write = True
            st.set_incompat(st.incompat | INCOMPAT_DIRTY)

    def check_range(self, offset: int, length: int) -> None:
        size = self.st.size
        if offset < 0 or length < 0 or offset + length > size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {size})", self.st.path)

    # -- data ------------------------------------------------------------------------
    def write(self, offset: int, mv) -> None:
        """Write ``mv`` (bytes, checked to lie inside the disk) at ``offset``."""
        st = self.st
        l1_shift = st.cb + st.l2_bits
        pos = 0
        n = len(mv)
        while pos < n:
            v = offset + pos
            l1i = v >> l1_shift
            stop = min(n, ((l1i + 1) << l1_shift) - offset)
            self._write_region(l1i, v, mv[pos:stop])
            pos = stop
        st.data_dirty = True

    def _inplace_host(self, tbl, idx: int) -> int:
        """The host offset of entry ``idx`` if it may be written in place, else 0."""
        if self.st.extl2:
            e = tbl[2 * idx]
            if e & OFLAG_COPIED and not e & OFLAG_COMPRESSED and tbl[2 * idx + 1] & SC_ALLOC_ALL == SC_ALLOC_ALL:
                return e & L2E_OFFSET_MASK
            return 0
        e = tbl[idx]
        if e & OFLAG_COPIED and not e & (OFLAG_COMPRESSED | OFLAG_ZERO):
            return e & L2E_OFFSET_MASK
        return 0

    def _write_region(self, l1i: int, voff: int, mv) -> None:
        """Write inside one L2 table's range: runs written in place, runs
        of other clusters copied-on-write into new clusters."""
        st = self.st
        cb = st.cb
        tbl = self.clusters.l2_for_write(l1i)
        l2mask = st.l2_entries - 1
        vend = voff + len(mv)
        ci_end = ((vend - 1) >> cb) + 1
        i = voff >> cb
        while i < ci_end:
            host = self._inplace_host(tbl, i & l2mask)
            if host:
                i = self._write_in_place(tbl, i, ci_end, host, voff, mv)
            else:
                i = self._write_new(tbl, i, ci_end, voff, mv)

    def _write_in_place(self, tbl, i: int, ci_end: int, host: int, voff: int, mv) -> int:
        st = self.st
        cb = st.cb
        l2mask = st.l2_entries - 1
        st.check_data_cluster(host)
        j = i + 1
        while j < ci_end and self._inplace_host(tbl, j & l2mask) == host + ((j - i) << cb):
            st.check_data_cluster(host + ((j - i) << cb))
            j += 1
        start = max(voff, i << cb)
        stop = min(voff + len(mv), j << cb)
        st.file.pwrite(host + (start - (i << cb)), mv[start - voff:stop - voff])
        st.note_written(host + (stop - (i << cb)))
        return j

    def _write_new(self, tbl, i: int, ci_end: int, voff: int, mv) -> int:
        st = self.st
        cb = st.cb
        w = st.l2_words
        l2mask = st.l2_entries - 1
        vend = voff + len(mv)
        at = i & l2mask  # the run's first entry in the table
        # A new image's table has nothing there yet: no entry to validate or
        # give back, and the new entries go in as one slice (per-cluster
        # Python steps were a third of a big convert's own time)
        fresh = w == 1 and not any(tbl[at:at + (ci_end - i)])
        if fresh:
            j = ci_end
        else:
            self.clusters.validate_entry(tbl[at * w])
            j = i + 1
            while j < ci_end and not self._inplace_host(tbl, j & l2mask):
                self.clusters.validate_entry(tbl[(j & l2mask) * w])
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
                self._old_content(buf, 0, run0, start, tbl, i & l2mask)
            if stop < j << cb:
                lo = max(stop, (j - 1) << cb)
                self._old_content(buf, lo - run0, lo, j << cb, tbl, (j - 1) & l2mask)
            buf[start - run0:stop - run0] = mv[start - voff:stop - voff]
        first = self.refcounts.alloc_clusters(nclu)
        hbase = first << cb
        st.file.pwrite(hbase, buf)
        st.note_written(hbase + (nclu << cb))
        if fresh:
            tbl[at:at + nclu] = array(tbl.typecode, range(hbase | OFLAG_COPIED, (hbase | OFLAG_COPIED) + (nclu << cb),
                                                          1 << cb))
            return j
        for k in range(i, j):
            idx = (k & l2mask) * w
            old = tbl[idx]
            tbl[idx] = (hbase + ((k - i) << cb)) | OFLAG_COPIED
            if w == 2:
                tbl[idx + 1] = SC_ALLOC_ALL
            self.clusters.release_entry(old)
        return j

    def _old_content(self, buf, bpos: int, a: int, b: int, tbl, idx: int) -> None:
        """Fill buf[bpos:bpos+(b-a)] with what virtual bytes a..b (inside one
        cluster) read as in this image, the parent showing through."""
        st = self.st
        cs = st.cs
        lim = min(b, st.size)
        if a >= lim:
            buf[bpos:bpos + (b - a)] = zeros(b - a)
            return
        if lim < b:
            buf[bpos + (lim - a):bpos + (b - a)] = zeros(b - lim)
        w = st.l2_words
        e = tbl[idx * w]
        inoff = a & (cs - 1)
        n = lim - a
        if e & OFLAG_COMPRESSED:
            buf[bpos:bpos + n] = self.clusters.decompress(e)[inoff:inoff + n]
            return
        if w == 2:
            self._old_subclusters(buf, bpos, a, lim, e, tbl[idx * 2 + 1])
            return
        if e & OFLAG_ZERO:
            buf[bpos:bpos + n] = zeros(n)
            return
        host = e & L2E_OFFSET_MASK
        if host:
            st.check_data_cluster(host)
            st.file.readinto(host + inoff, memoryview(buf)[bpos:bpos + n])
        else:
            buf[bpos:bpos + n] = self.parent_read(a, n)

    def _old_subclusters(self, buf, bpos: int, a: int, lim: int, e: int, bm: int) -> None:
        st = self.st
        cs = st.cs
        scb = st.cb - 5
        p = a
        while p < lim:
            j = (p >> scb) & 31
            q = min(lim, ((p >> scb) + 1) << scb)
            s = self.clusters.sc_status(e, bm, j)
            if s == Status.DATA:
                st.check_data_cluster(e & L2E_OFFSET_MASK)
                st.file.readinto((e & L2E_OFFSET_MASK) + (p & (cs - 1)), memoryview(buf)[bpos + p - a:bpos + q - a])
            elif s == Status.ZERO:
                buf[bpos + p - a:bpos + q - a] = zeros(q - p)
            else:
                buf[bpos + p - a:bpos + q - a] = self.parent_read(p, q - p)
            p = q

    # -- zeroes and discard ------------------------------------------------------------
    def zero_range(self, offset: int, length: int, mode: str) -> None:
        """Make the range read as zeros: ``mode`` "zero" (may unmap),
        "zero-keep" (keeps the allocation) or "discard"."""
        self.begin()
        self.check_range(offset, length)
        if not length:
            return
        st = self.st
        cs = st.cs
        end = offset + length
        a = ceil_div(offset, cs) * cs
        b = end // cs * cs
        if end == st.size:
            b = ceil_div(end, cs) * cs  # the short last cluster counts as whole
        if a >= b:
            self.zero_partial(offset, length)
        else:
            if offset < a:
                self.zero_partial(offset, a - offset)
            self._zero_clusters(a >> st.cb, b >> st.cb, mode)
            if b < end:
                self.zero_partial(b, end - b)
        self.clusters.maybe_flush()

    def zero_partial(self, offset: int, length: int) -> None:
        """Zeros written as data where the range does not read as zeros yet."""
        pos, end = offset, offset + length
        standalone = not self.st.backing_name
        while pos < end:
            s, n = self.clusters.block_status(pos, end - pos)
            if s == Status.ZERO or (s == Status.UNALLOCATED and standalone):
                pos += n
                continue
            self.write(pos, memoryview(bytes(n)))
            pos += n

    def _zero_clusters(self, c0: int, c1: int, mode: str) -> None:
        st = self.st
        cb = st.cb
        has_backing = bool(st.backing_name)
        zero_flag = st.version >= 3 or st.extl2
        if has_backing and not zero_flag:
            # version 2 has no zero flag: an overlay needs real zeros over its parent
            pos, end = c0 << cb, min(c1 << cb, st.size)
            while pos < end:
                n = min(1 << 20, end - pos)
                self.write(pos, zeros(n))
                pos += n
            return
        unalloc = not has_backing and (mode == "discard" or not zero_flag)
        l2b = st.l2_bits
        ci = c0
        while ci < c1:
            l1i = ci >> l2b
            stop = min(c1, (l1i + 1) << l2b)
            if not st.l1[l1i] & L1E_OFFSET_MASK and not has_backing:
                ci = stop  # nothing here and nothing below: reads as zeros already
                continue
            self._zero_entries(l1i, ci, stop, unalloc, mode, has_backing)
            ci = stop

    def _zero_entries(self, l1i: int, ci: int, stop: int, unalloc: bool, mode: str, has_backing: bool) -> None:
        """Clusters ci..stop-1 of one L2 table made to read as zeros."""
        st = self.st
        w = st.l2_words
        l2mask = st.l2_entries - 1
        l1e = st.l1[l1i]
        ro = self.clusters.l2_table(l1e & L1E_OFFSET_MASK) if l1e & L1E_OFFSET_MASK else None
        changes = []
        for k in range(ci, stop):
            idx = (k & l2mask) * w
            e = ro[idx] if ro is not None else 0
            bm = ro[idx + 1] if ro is not None and w == 2 else 0
            new = self._zeroed_entry(e, bm, unalloc, mode, has_backing)
            if new is not None:
                changes.append((idx, e, new))
        if not changes:
            return
        for _, e, _ in changes:
            if e & (OFLAG_COMPRESSED | L2E_OFFSET_MASK):
                self.clusters.validate_entry(e)
        tbl = self.clusters.l2_for_write(l1i)
        for idx, e, (ne, nbm) in changes:
            tbl[idx] = ne
            if w == 2:
                tbl[idx + 1] = nbm
            moved = (ne & L2E_OFFSET_MASK) != (e & L2E_OFFSET_MASK)
            if e & OFLAG_COMPRESSED or (e & L2E_OFFSET_MASK and moved):
                self.clusters.release_entry(e)

    def _zeroed_entry(self, e: int, bm: int, unalloc: bool, mode: str, has_backing: bool):
        """New (entry, bitmap) for a cluster made to read as zeros, or None if it already does."""
        if unalloc:
            return (0, 0) if (e or bm) else None
        if self.st.extl2:
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
    def write_precompressed(self, offset: int, compressed: bytes | None, raw_data) -> None:
        """One whole guest cluster, given compressed (stored plain when
        ``compressed`` is None)."""
        self.begin()
        st = self.st
        cs = st.cs
        n = len(raw_data)
        # the last cluster may be short, and shorter still than the disk's
        # end when the source's size is not whole sectors (qcow2 rounds up)
        if offset % cs or not (n == cs or (n < cs and offset + n <= st.size <= offset + cs)):
            raise VdError(f"a compressed write must cover one whole cluster ({cs} bytes at a multiple of {cs}, "
                          f"or the short last one); got {n} bytes at {offset}", st.path)
        self.check_range(offset, n)
        if compressed is None:
            self.write(offset, memoryview(raw_data).cast("B"))
            self.clusters.maybe_flush()
            return
        if len(compressed) >= cs:
            raise VdError(f"compressed cluster is {len(compressed)} bytes, not smaller than a cluster", st.path)
        self._store_compressed(offset >> st.cb, compressed)
        self.clusters.maybe_flush()

    def _store_compressed(self, ci: int, compressed: bytes) -> None:
        st = self.st
        w = st.l2_words
        tbl = self.clusters.l2_for_write(ci >> st.l2_bits)
        idx = (ci & (st.l2_entries - 1)) * w
        old = tbl[idx]
        self.clusters.validate_entry(old)
        coff = self.refcounts.alloc_bytes(len(compressed))
        if coff >= compressed_offset_limit(st.cb):
            raise UnsupportedFeature(f"compressed cluster offset {coff:#x} is beyond what an L2 entry can hold",
                                     st.path)
        st.file.pwrite(coff, compressed)
        st.ccache = (None, b"")
        st.wrote_compressed = True
        st.note_written(coff + len(compressed))
        st.data_dirty = True
        tbl[idx] = compressed_entry(coff, len(compressed), st.cb)
        if w == 2:
            tbl[idx + 1] = 0
        self.clusters.release_entry(old)

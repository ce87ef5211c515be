"""The L1/L2 mapping of guest offsets to host clusters: the L2 cache,
block status, reads (normal, zero, compressed and extended-L2 clusters),
L2 tables made writable, L1 growth and the ordered metadata flush.

flush_metadata writes in crash-safe order: data, then refcount blocks (and
refcount table), then L2 tables, then the L1 table, with a sync between the
groups; clusters released meanwhile are given back last.  A crash therefore
leaks clusters at worst."""

from __future__ import annotations

import re
from array import array

from vdtool.core.backend import MapExtent, Status
from vdtool.core.bytesutil import be_array, be_bytes, ceil_div, zeros
from vdtool.core.errors import UsageError, VdError
from vdtool.formats.qcow2.codec import DecompressError, decompress_cluster
from vdtool.formats.qcow2.layout import (COMPRESSION_NAMES, L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_L1_ENTRIES,
                                         OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SC_ALLOC_ALL, SECTOR,
                                         compressed_extent)


_EMPTY_ENTRIES = re.compile(rb"(?:\x00{8})*")


class ClusterMap:
    """Lookups and table changes of one image's L1/L2 tables (``st``: its
    Qcow2State, ``refcounts``: its refcount.Refcounts)."""

    def __init__(self, st, refcounts):
        self.st = st
        self.refcounts = refcounts

    # -- tables ------------------------------------------------------------------------
    def l2_table(self, off: int) -> array:
        """The L2 table at ``off`` (cached; checked against the big tables)."""
        st = self.st
        tbl = st.l2_cache.get(off)
        if tbl is not None:
            st.l2_cache.move_to_end(off)
            return tbl
        cs = st.cs
        if off & (cs - 1):
            raise st.corrupt(f"L2 table offset {off:#x} is not aligned to the cluster size ({cs})")
        if off < cs or off + cs > st.file_limit():
            raise st.corrupt(f"L2 table offset {off:#x} is outside the file ({st.file_size} bytes) or in "
                             f"the header")
        l1o = st.l1_offset
        rto = st.rt_offset
        if (st.l1_size and l1o < off + cs and off < l1o + st.l1_size * 8) or \
                (rto < off + cs and off < rto + st.rt_clusters * cs):
            raise st.corrupt(f"L2 table offset {off:#x} overlaps the L1 table or the refcount table")
        tbl = be_array(st.file.pread_exact(off, cs, "L2 table"))
        st.l2_cache[off] = tbl
        st.trim_cache(st.l2_cache, st.l2_dirty)
        return tbl

    def l2_for_write(self, l1i: int) -> array:
        """The L2 table of L1 index ``l1i``, to be changed: a new one if there
        is none, a copy if it is shared with a snapshot (no OFLAG_COPIED)."""
        st = self.st
        e = st.l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off and e & OFLAG_COPIED:
            tbl = self.l2_table(off)
            st.l2_dirty.add(off)
            return tbl
        if off:
            tbl = array("Q", self.l2_table(off))  # shared with a snapshot: copy on write
        else:
            tbl = array("Q", bytes(st.cs))
        new = self.refcounts.alloc_clusters(1) << st.cb
        st.l2_cache[new] = tbl
        st.l2_dirty.add(new)
        st.l1[l1i] = new | OFLAG_COPIED
        st.l1_dirty.add(l1i)
        if off:
            st.meta_index = None  # the old table leaves the index
            self.refcounts.defer_free(off >> st.cb, 1)
        else:
            st.meta_add(new)
        return tbl

    def drop_l2(self, l1i: int, off: int) -> None:
        """L1 index ``l1i`` stops pointing at its L2 table (freed after the flush)."""
        st = self.st
        st.l1[l1i] = 0
        st.l1_dirty.add(l1i)
        st.meta_index = None
        self.refcounts.defer_free(off >> st.cb, 1)
        st.l2_dirty.discard(off)
        st.l2_cache.pop(off, None)

    # -- entries -----------------------------------------------------------------------
    def compressed_extent(self, e: int) -> tuple:
        return compressed_extent(e, self.st.cb)

    def release_entry(self, e: int) -> None:
        """Give back what an L2 entry referenced (after the next metadata flush)."""
        st = self.st
        if e & OFLAG_COMPRESSED:
            coff, csize = compressed_extent(e, st.cb)
            first = coff >> st.cb
            self.refcounts.defer_free(first, ((coff + csize - 1) >> st.cb) - first + 1)
            if st.ccache[0] == e & ~OFLAG_COPIED:
                st.ccache = (None, b"")
        else:
            host = e & L2E_OFFSET_MASK
            if host:
                self.refcounts.defer_free(host >> st.cb, 1)

    def validate_entry(self, e: int) -> None:
        """Before a write replaces or frees what an entry points at."""
        st = self.st
        if e & OFLAG_COMPRESSED:
            coff, csize = compressed_extent(e, st.cb)
            if coff < st.cs or coff >= st.file_limit():
                raise st.corrupt(f"compressed cluster at {coff:#x} is in the header or past the end of the file")
            return
        host = e & L2E_OFFSET_MASK
        if host:
            st.check_data_cluster(host)

    def sc_status(self, e: int, bm: int, j: int) -> Status:
        """Extended L2: the status of subcluster ``j``."""
        if bm >> j & 1:
            if bm >> (32 + j) & 1:
                raise self.st.corrupt(f"L2 entry {e:#x}: subcluster {j} is marked both allocated and zero")
            if not e & L2E_OFFSET_MASK:
                raise self.st.corrupt(f"L2 entry {e:#x}: subcluster {j} is allocated but the cluster has no "
                                      f"offset")
            return Status.DATA
        if bm >> (32 + j) & 1:
            return Status.ZERO
        return Status.UNALLOCATED

    def decompress(self, e: int) -> bytes:
        """The guest cluster a compressed entry holds (the last one cached)."""
        st = self.st
        key = e & ~OFLAG_COPIED
        if st.ccache[0] == key:
            return st.ccache[1]
        out = self._inflate_entry(e)
        st.ccache = (key, out)
        return out

    def _fill_compressed(self, mv, pieces: list) -> None:
        """Compressed clusters of one read, [(pos, inoff, length, entry)...]:
        inflated on every core (the libraries let go of the GIL), then
        copied into ``mv``."""
        if len(pieces) == 1:
            pos, inoff, n, e = pieces[0]
            mv[pos:pos + n] = self.decompress(e)[inoff:inoff + n]
            return
        from vdtool.core import workers

        self.st.meta_ranges()  # built once here, not raced for in the workers
        step = max(1, workers.BATCH_BYTES >> self.st.cb)  # memory stays bounded for any read size
        for i in range(0, len(pieces), step):
            part = pieces[i:i + step]
            outs = workers.parallel_map(self._inflate_entry, [p[3] for p in part])
            for (pos, inoff, n, _), data in zip(part, outs):
                mv[pos:pos + n] = data[inoff:inoff + n]
        self.st.ccache = (pieces[-1][3] & ~OFLAG_COPIED, outs[-1])

    def _inflate_entry(self, e: int) -> bytes:
        """A compressed entry's cluster, checked and inflated (no cache, no
        shared state: runs in worker threads)."""
        st = self.st
        coff, csize = compressed_extent(e, st.cb)
        cs = st.cs
        if coff < cs or coff >= st.file_limit():
            raise st.corrupt(f"compressed cluster at {coff:#x} is in the header or past the end of the file "
                             f"({st.file_size} bytes)")
        if st.meta_overlap(coff, 1):
            raise st.corrupt(f"compressed cluster at {coff:#x} overlaps qcow2 metadata")
        raw = st.file.pread(coff, csize)  # the last sector may run past the end of the file
        try:
            out = decompress_cluster(raw, cs, st.compression_type, st.path)
        except DecompressError as ex:
            raise st.corrupt(f"compressed cluster at {coff:#x} ({csize} bytes, "
                             f"{COMPRESSION_NAMES[st.compression_type]}) {ex}") from None
        return out

    # -- status and reads ----------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> tuple:
        st = self.st
        end = min(offset + length, st.size)
        if offset >= end:
            return Status.ZERO, max(length, 1)
        cb = st.cb
        l1_shift = cb + st.l2_bits
        l2mask = st.l2_entries - 1
        l1 = st.l1
        pos = offset
        status = None
        while pos < end:
            l1i = pos >> l1_shift
            reg_end = min(end, (l1i + 1) << l1_shift)
            l2off = l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                if status is None:
                    status = Status.UNALLOCATED
                elif status != Status.UNALLOCATED:
                    break
                pos = reg_end
                continue
            tbl = self.l2_table(l2off)
            if st.extl2:
                pos, status, stop = self._status_ext(tbl, pos, reg_end, status)
                if stop:
                    break
                continue
            while pos < reg_end:
                e = tbl[(pos >> cb) & l2mask]
                if e & OFLAG_COMPRESSED:
                    s = Status.DATA
                elif e & OFLAG_ZERO:
                    s = Status.ZERO
                elif e & L2E_OFFSET_MASK:
                    s = Status.DATA
                else:
                    s = Status.UNALLOCATED
                if status is None:
                    status = s
                elif s != status:
                    return status, pos - offset
                pos = ((pos >> cb) + 1) << cb
            if pos >= end:
                break
        return status, min(pos, end) - offset

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """A run of clusters (subclusters with extended L2) with the same
        status and, for data, host offsets one after another.  Compressed
        clusters and plain zero clusters have no host offset (as qemu-img
        map); zero clusters that keep a host cluster have one, and so do
        unallocated subclusters of an allocated cluster (extended L2)."""
        st = self.st
        end = min(offset + length, st.size)
        if offset >= end:
            return MapExtent(Status.ZERO, max(length, 1))
        cb = st.cb
        cmask = st.cs - 1
        scb = cb - 5
        l1_shift = cb + st.l2_bits
        l2mask = st.l2_entries - 1
        w = st.l2_words
        l1 = st.l1
        first = None  # (status, compressed) of the run
        start_host = expect = None
        pos = offset
        while pos < end:
            l1i = pos >> l1_shift
            reg_end = min(end, (l1i + 1) << l1_shift)
            l2off = l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                if first is None:
                    first = (Status.UNALLOCATED, False)
                elif first != (Status.UNALLOCATED, False) or expect is not None:
                    break
                # a run of empty L1 entries in one regex step (64 TiB: 131072 of them)
                last = min(len(l1), ((end - 1) >> l1_shift) + 1)
                stop = _EMPTY_ENTRIES.match(memoryview(l1).cast("B"), 8 * l1i, 8 * last).end() // 8
                pos = max(reg_end, min(end, stop << l1_shift))
                continue
            tbl = self.l2_table(l2off)
            while pos < reg_end:
                e = tbl[((pos >> cb) & l2mask) * w]
                step = min((((pos >> cb) + 1) << cb), reg_end)
                cluster = e & L2E_OFFSET_MASK
                comp = False
                if e & OFLAG_COMPRESSED:
                    s, host, comp = Status.DATA, None, True
                else:
                    if w == 2:
                        s = self.sc_status(e, tbl[2 * ((pos >> cb) & l2mask) + 1], (pos >> scb) & 31)
                        step = min((((pos >> scb) + 1) << scb), reg_end)
                    elif e & OFLAG_ZERO:
                        s = Status.ZERO
                    else:
                        s = Status.DATA if cluster else Status.UNALLOCATED
                    host = None
                    if cluster:  # extended L2 keeps one under unallocated subclusters too
                        if s == Status.DATA:
                            st.check_data_cluster(cluster)
                        host = cluster + (pos & cmask)
                if first is None:
                    first = (s, comp)
                    start_host = expect = host
                elif first != (s, comp) or (host is None) != (expect is None) or \
                        (host is not None and host != expect):
                    return MapExtent(first[0], pos - offset, start_host, first[1])
                if expect is not None:
                    expect += step - pos
                pos = step
        return MapExtent(first[0], min(pos, end) - offset, start_host, first[1])

    def _status_ext(self, tbl, pos: int, reg_end: int, status):
        cb = self.st.cb
        scb = cb - 5
        l2mask = self.st.l2_entries - 1
        while pos < reg_end:
            idx = (pos >> cb) & l2mask
            e = tbl[2 * idx]
            bm = tbl[2 * idx + 1]
            cend = ((pos >> cb) + 1) << cb
            if e & OFLAG_COMPRESSED:
                s = Status.DATA
                if status is None:
                    status = s
                elif s != status:
                    return pos, status, True
                pos = cend
                continue
            while pos < cend and pos < reg_end:
                s = self.sc_status(e, bm, (pos >> scb) & 31)
                if status is None:
                    status = s
                elif s != status:
                    return pos, status, True
                pos = ((pos >> scb) + 1) << scb
        return pos, status, False

    def readinto(self, offset: int, buf) -> None:
        st = self.st
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if not n:
            return
        if offset < 0 or offset + n > st.size:
            raise VdError(f"read of {n} bytes at offset {offset} is outside the disk (virtual size {st.size})",
                          st.path)
        cb = st.cb
        cs = st.cs
        l1_shift = cb + st.l2_bits
        l2mask = st.l2_entries - 1
        w = st.l2_words
        l1 = st.l1
        file = st.file
        check_data_cluster = st.check_data_cluster
        run_host = run_pos = run_len = 0
        compressed = []  # (pos, inoff, length, entry): inflated together at the end
        pos = 0
        while pos < n:
            v = offset + pos
            l1i = v >> l1_shift
            reg_end = min(n, ((l1i + 1) << l1_shift) - offset)
            l2off = l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                mv[pos:reg_end] = zeros(reg_end - pos)
                pos = reg_end
                continue
            tbl = self.l2_table(l2off)
            while pos < reg_end:
                v = offset + pos
                inoff = v & (cs - 1)
                idx = (v >> cb) & l2mask
                chunk = min(cs - inoff, reg_end - pos)
                e = tbl[idx * w]
                host = 0
                if e & OFLAG_COMPRESSED:
                    compressed.append((pos, inoff, chunk, e))
                elif w == 2:
                    host = self._read_ext_piece(mv, pos, v, chunk, e, tbl[2 * idx + 1])
                    if host < 0:  # handled piecewise (zeros or mixed)
                        host = 0
                elif e & OFLAG_ZERO:
                    mv[pos:pos + chunk] = zeros(chunk)
                else:
                    host = e & L2E_OFFSET_MASK
                    if host:
                        check_data_cluster(host)
                        host += inoff
                    else:
                        mv[pos:pos + chunk] = zeros(chunk)
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
        if compressed:
            self._fill_compressed(mv, compressed)

    def _read_ext_piece(self, mv, pos: int, v: int, chunk: int, e: int, bm: int) -> int:
        """Extended L2: one cluster's piece.  Returns the host offset when the
        whole piece is allocated data (for coalescing), else -1 after filling."""
        st = self.st
        scb = st.cb - 5
        first = (v >> scb) & 31
        last = ((v + chunk - 1) >> scb) & 31
        alloc = (bm & SC_ALLOC_ALL) >> first
        width = last - first + 1
        mask = (1 << width) - 1
        host = e & L2E_OFFSET_MASK
        if (alloc & mask) == mask:
            for j in range(first, last + 1):
                self.sc_status(e, bm, j)
            st.check_data_cluster(host)
            return host + (v & (st.cs - 1))
        p = pos
        end = pos + chunk
        while p < end:
            vv = v + (p - pos)
            j = (vv >> scb) & 31
            step = min(end - p, (((vv >> scb) + 1) << scb) - vv)
            s = self.sc_status(e, bm, j)
            if s == Status.DATA:
                st.check_data_cluster(host)
                st.file.readinto(host + (vv & (st.cs - 1)), mv[p:p + step])
            else:
                mv[p:p + step] = zeros(step)
            p += step
        return -1

    # -- L1 growth ---------------------------------------------------------------------
    def grow_l1(self, new_l1_size: int) -> None:
        """Make the L1 table hold ``new_l1_size`` entries.  A table that must
        move is written in full and flushed before the header points at it."""
        st = self.st
        old = st.l1_size
        if new_l1_size <= old:
            return
        cs = st.cs
        cb = st.cb
        if new_l1_size > MAX_L1_ENTRIES:
            raise UsageError(f"the L1 table would need {new_l1_size} entries, above the limit of {MAX_L1_ENTRIES}")
        old_clusters = ceil_div(old * 8, cs)
        if old and new_l1_size * 8 <= old_clusters * cs:
            st.file.pwrite(st.l1_offset + old * 8, bytes((new_l1_size - old) * 8))
            st.note_written(st.l1_offset + new_l1_size * 8)
            st.l1.extend(array("Q", bytes((new_l1_size - old) * 8)))
            st.l1_size = new_l1_size
            st.sync()
            st.meta_index = None
            return
        self.flush_metadata()
        nclu = ceil_div(new_l1_size * 8, cs)
        first = self.refcounts.alloc_clusters(nclu)
        new_l1 = array("Q", st.l1)
        new_l1.extend(array("Q", bytes((new_l1_size - old) * 8)))
        st.file.pwrite(first << cb, be_bytes(new_l1))
        st.note_written((first << cb) + new_l1_size * 8)
        self.flush_metadata()  # refcounts of the new table
        st.sync()
        old_off = st.l1_offset
        st.l1 = new_l1
        st.l1_size = new_l1_size
        st.l1_offset = first << cb
        st.l1_dirty.clear()
        st.meta_index = None
        st.write_size_l1()
        if old:
            self.refcounts.defer_free(old_off >> cb, old_clusters)

    # -- write-back ----------------------------------------------------------------------
    def flush_metadata(self) -> None:
        """Everything cached and dirty to disk, in crash-safe order."""
        st = self.st
        f = st.file
        if not (st.data_dirty or st.rb_dirty or st.rt_dirty or st.l2_dirty or st.l1_dirty or st.pending_free):
            return
        st.sync()  # data before the metadata that points at it
        st.data_dirty = False
        if st.rb_dirty or st.rt_dirty:
            self.refcounts.write_blocks()
            st.sync()
        if st.l2_dirty:
            for off in sorted(st.l2_dirty):
                tbl = st.l2_cache.get(off)
                if tbl is not None:
                    f.pwrite(off, be_bytes(tbl))
                    st.note_written(off + st.cs)
            st.l2_dirty.clear()
            st.sync()
        if st.l1_dirty:
            per = SECTOR // 8
            for sec in sorted({i // per for i in st.l1_dirty}):
                a = sec * per
                f.pwrite(st.l1_offset + a * 8, be_bytes(st.l1[a:min(a + per, st.l1_size)]))
            st.l1_dirty.clear()
            st.sync()
        if st.pending_free:
            freed = self.refcounts.free_pending()
            self.refcounts.write_blocks()
            st.sync()
            self.refcounts.punch(freed)
        st.trim_cache(st.l2_cache, st.l2_dirty)
        st.trim_cache(st.rb_cache, st.rb_dirty)

    def maybe_flush(self) -> None:
        if self.st.dirty_too_much():
            self.flush_metadata()

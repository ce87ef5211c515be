"""Internal snapshots created, applied (reverted to) and deleted, as
``qemu-img snapshot -c/-a/-d`` does.

Refcounts follow QEMU's model: a cluster's refcount is the number of L1
tables (the active one and each snapshot's) that reach it, an L2 table
shared by two L1 tables counting twice for each cluster it maps.
OFLAG_COPIED is set in the active L1/L2 entries exactly where that count
is 1.

Order of writes (a crash leaks clusters at worst):
- create: refcounts raised, COPIED cleared, the L1 copy and a new snapshot
  table written and flushed; only then the header points at the new table;
  the old table is freed last.
- delete: a new table without the entry is written and the header switched
  first; the refcounts of what the snapshot reached are lowered after.
- apply: refcounts of what the snapshot reaches raised and flushed, the
  active L1 overwritten (and the size set), then what the old active state
  reached is lowered.

Between a refcount write and the COPIED flag write that goes with it a
crash leaves flags QEMU's check reports (``OFLAG_COPIED``) and ``check -r
all`` fixes; the order above keeps that window where no snapshot depends on
the flag (QEMU has the same window)."""

from __future__ import annotations

import time
from array import array

from vdtool.core.bytesutil import be_bytes, ceil_div
from vdtool.core.errors import UnsupportedFeature, UsageError, VdError
from vdtool.formats.qcow2 import snapshot
from vdtool.formats.qcow2.layout import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_L1_ENTRIES, MAX_SNAPSHOT_TABLE,
                                         MAX_SNAPSHOTS, OFLAG_COMPRESSED, OFLAG_COPIED, SNAPSHOT_ENTRY,
                                         SNAPSHOT_EXTRA, encode_name, pad8)

MAX_NAME_BYTES = 0xFFFF  # name_size is 16 bits


class SnapshotNotFound(VdError):
    """No snapshot with that name (or id)."""


class SnapshotEditor:
    """Snapshot changes on one open, writable image (the backend's pieces)."""

    def __init__(self, st, refcounts, clusters, writer):
        self.st = st
        self.refcounts = refcounts
        self.clusters = clusters
        self.writer = writer

    # -- lookups ---------------------------------------------------------------------
    def find(self, name: str, by_id: bool) -> int:
        """Index of the snapshot: by id first, then by name (``by_id``, as
        qemu-img -a looks up), or by name only (as qemu-img -d does)."""
        snaps = self.st.snapshots
        if by_id:
            for i, s in enumerate(snaps):
                if s["id"] == name:
                    return i
        for i, s in enumerate(snaps):
            if s["name"] == name:
                return i
        return -1

    def new_id(self) -> str:
        """One more than the largest id that reads as a number (QEMU's numbering)."""
        top = 0
        for s in self.st.snapshots:
            digits = ""
            for ch in s["id"].lstrip():
                if not ch.isdigit() or not ch.isascii():
                    break
                digits += ch
            if digits:
                top = max(top, int(digits))
        return str(top + 1)

    # -- walking what an L1 table reaches -----------------------------------------------
    def reach(self, l1) -> list:
        """(first cluster, count) runs of every cluster an L1 table reaches:
        its L2 tables and what their entries point at.  Everything is read
        and checked before the caller changes anything."""
        st = self.st
        cb = st.cb
        w = st.l2_words
        runs: list = []

        def add(c: int, n: int) -> None:
            if runs and runs[-1][0] + runs[-1][1] == c:
                runs[-1][1] += n
            else:
                runs.append([c, n])

        for l1i, l1e in enumerate(l1):
            off = l1e & L1E_OFFSET_MASK
            if not off:
                continue
            tbl = self.clusters.l2_table(off)
            for idx in range(0, len(tbl), w):
                e = tbl[idx]
                if e & OFLAG_COMPRESSED:
                    self.clusters.validate_entry(e)
                    coff, csize = self.clusters.compressed_extent(e)
                    first = coff >> cb
                    add(first, ((coff + csize - 1) >> cb) - first + 1)
                elif e & L2E_OFFSET_MASK:
                    self.clusters.validate_entry(e)
                    add((e & L2E_OFFSET_MASK) >> cb, 1)
            add(off >> cb, 1)
        return runs

    def adjust(self, runs: list, delta: int) -> list:
        """Add ``delta`` to the refcounts of the runs; the clusters now free.
        A refcount that would overflow is refused before any is changed on
        disk (the cached blocks are dropped: they were clean before)."""
        st = self.st
        freed: list = []
        try:
            for c, n in runs:
                freed += self.refcounts.update(c, n, delta)
        except BaseException:
            if delta > 0:
                st.rb_cache.clear()
                st.rb_dirty.clear()
            raise
        return freed

    def forget(self, freed: list) -> None:
        """Freed clusters leave the caches (an L2 table freed must never be
        written back over whatever reuses its cluster)."""
        st = self.st
        for c in freed:
            off = c << st.cb
            st.l2_cache.pop(off, None)
            st.l2_dirty.discard(off)
        if freed:
            st.meta_index = None

    def fix_copied(self) -> None:
        """OFLAG_COPIED in the active L1 and L2 entries where the refcount is 1
        (QEMU's update with addend 0); compressed entries never carry it."""
        st = self.st
        cb = st.cb
        w = st.l2_words
        get = self.refcounts.get
        for l1i, l1e in enumerate(st.l1):
            off = l1e & L1E_OFFSET_MASK
            if not off:
                continue
            tbl = self.clusters.l2_table(off)
            changed = False
            for idx in range(0, len(tbl), w):
                e = tbl[idx]
                if not e & L2E_OFFSET_MASK or e & OFLAG_COMPRESSED:
                    continue
                want = (e | OFLAG_COPIED) if get((e & L2E_OFFSET_MASK) >> cb) == 1 else (e & ~OFLAG_COPIED)
                if want != e:
                    tbl[idx] = want
                    changed = True
            if changed:
                st.l2_dirty.add(off)
            want = (l1e | OFLAG_COPIED) if get(off >> cb) == 1 else (l1e & ~OFLAG_COPIED)
            if want != l1e:
                st.l1[l1i] = want
                st.l1_dirty.add(l1i)

    # -- the snapshot table ---------------------------------------------------------------
    def write_table(self, snaps: list) -> tuple:
        """Write a table of ``snaps`` to new clusters; (offset, bytes)."""
        st = self.st
        parts = []
        for s in snaps:
            sid, name = encode_name(s["id"]), encode_name(s["name"])
            ent = s["entry"].replace(l1_table_offset=s["l1_table_offset"], l1_size=s["l1_size"],
                                     id_str_size=len(sid), name_size=len(name), extra_data_size=len(s["extra"]))
            raw = ent.pack() + s["extra"] + sid + name
            parts.append(raw + bytes(pad8(len(raw)) - len(raw)))
        data = b"".join(parts)
        if len(data) > MAX_SNAPSHOT_TABLE:
            raise UnsupportedFeature(f"the snapshot table would need {len(data)} bytes, above the limit of "
                                     f"{MAX_SNAPSHOT_TABLE}", st.path)
        if not data:
            return 0, 0
        first = self.refcounts.alloc_clusters(ceil_div(len(data), st.cs))
        off = first << st.cb
        st.file.pwrite(off, data)
        st.note_written(off + len(data))
        return off, len(data)

    def switch_table(self, snaps: list, off: int, size: int) -> None:
        """Point the header at the new table (everything it needs is on
        disk), then free the old one."""
        st = self.st
        self.clusters.flush_metadata()
        st.sync()
        old_off, old_size, old_nb = st.snapshots_offset, st.snapshots_size, st.nb_snapshots
        st.write_header_fields("nb_snapshots", "snapshots_offset", nb_snapshots=len(snaps), snapshots_offset=off)
        st.nb_snapshots = len(snaps)
        st.snapshots_offset = off
        st.snapshots_size = size
        st.snapshots = snaps
        st.meta_index = None
        if old_nb and old_size:
            first = old_off >> st.cb
            self.refcounts.defer_free(first, ((old_off + old_size - 1) >> st.cb) - first + 1)

    # -- the three operations -----------------------------------------------------------------
    def create(self, name: str) -> dict:
        st = self.st
        self.writer.begin()
        raw_name = encode_name(name)
        if len(raw_name) > MAX_NAME_BYTES:
            raise UsageError(f"snapshot name is {len(raw_name)} bytes long, above the limit of {MAX_NAME_BYTES}")
        if st.nb_snapshots >= MAX_SNAPSHOTS:
            raise UnsupportedFeature(f"the image already has {st.nb_snapshots} snapshots, the most qcow2 allows",
                                     st.path)
        if st.rc.max < 2:
            raise UnsupportedFeature(f"internal snapshots need refcounts above 1; the image has refcount_bits "
                                     f"{st.rc.bits}", st.path)
        self.clusters.flush_metadata()
        self.adjust(self.reach(st.l1), +1)
        self.fix_copied()
        l1 = array("Q", st.l1)
        l1_off = 0
        if st.l1_size:
            first = self.refcounts.alloc_clusters(ceil_div(st.l1_size * 8, st.cs))
            l1_off = first << st.cb
            st.file.pwrite(l1_off, be_bytes(l1))
            st.note_written(l1_off + st.l1_size * 8)
        now = time.time_ns()
        sec = now // 1_000_000_000
        nsec = (now % 1_000_000_000) // 1000 * 1000  # microseconds, as qemu-img records them
        extra = SNAPSHOT_EXTRA.pack(vm_state_size_large=0, disk_size=st.size, icount=0)
        sn = {"id": self.new_id(), "name": name, "l1_table_offset": l1_off, "l1_size": st.l1_size,
              "vm_state_size": 0, "date_sec": sec & 0xFFFFFFFF, "date_nsec": nsec, "vm_clock_nsec": 0,
              "disk_size": st.size, "icount": 0,
              "entry": SNAPSHOT_ENTRY.new(date_sec=sec & 0xFFFFFFFF, date_nsec=nsec), "extra": extra}
        snaps = st.snapshots + [sn]
        off, size = self.write_table(snaps)
        self.switch_table(snaps, off, size)
        self.clusters.flush_metadata()
        return sn

    def delete(self, name: str) -> dict:
        st = self.st
        self.writer.begin()
        i = self.find(name, by_id=False)
        if i < 0:
            raise SnapshotNotFound(f"could not delete snapshot {name!r}: snapshot not found", st.path)
        sn = st.snapshots[i]
        self.clusters.flush_metadata()
        l1 = snapshot.l1_table(st, sn)
        runs = self.reach(l1)  # read and checked before anything changes
        snaps = st.snapshots[:i] + st.snapshots[i + 1:]
        off, size = self.write_table(snaps)
        self.switch_table(snaps, off, size)
        freed = self.adjust(runs, -1)
        if sn["l1_size"]:
            first = sn["l1_table_offset"] >> st.cb
            freed += self.adjust([(first, ceil_div(sn["l1_size"] * 8, st.cs))], -1)
        self.forget(freed)
        self.fix_copied()
        self.clusters.flush_metadata()
        self.refcounts.punch(freed)
        return sn

    def apply(self, name: str) -> dict:
        st = self.st
        self.writer.begin()
        i = self.find(name, by_id=True)
        if i < 0:
            raise SnapshotNotFound(f"could not apply snapshot {name!r}: snapshot not found", st.path)
        sn = st.snapshots[i]
        self.clusters.flush_metadata()
        snl1 = snapshot.l1_table(st, sn)
        new_runs = self.reach(snl1)
        old_runs = self.reach(st.l1)
        size = sn["disk_size"] if sn["disk_size"] is not None else st.size
        need = max(sn["l1_size"], ceil_div(size, st.cs << st.l2_bits))
        if need > MAX_L1_ENTRIES:
            raise st.corrupt(f"snapshot {sn['id']!r}: disk size {size} needs {need} L1 entries, above the limit "
                             f"of {MAX_L1_ENTRIES}")
        self.clusters.grow_l1(need)
        self.adjust(new_runs, +1)
        self.clusters.flush_metadata()
        # every L2 table it reaches is now shared with the snapshot: no COPIED (a snapshot's own copy may carry them)
        new_l1 = array("Q", (e & ~OFLAG_COPIED for e in snl1))
        new_l1.extend(array("Q", bytes(8 * (st.l1_size - len(new_l1)))))
        st.file.pwrite(st.l1_offset, be_bytes(new_l1))
        st.sync()
        st.l1 = new_l1
        st.l1_dirty.clear()
        st.meta_index = None
        st.ccache = (None, b"")
        if size != st.size:
            st.size = size
            st.write_size_l1()
        freed = self.adjust(old_runs, -1)
        self.forget(freed)
        self.fix_copied()
        self.clusters.flush_metadata()
        self.refcounts.punch(freed)
        return sn

"""Compacting a VMDK image: grains that read as zeros are released, the
rest move down and the file is cut after the last one (sparse extents);
a streamOptimized extent is rewritten; flat extents get holes punched
where they hold zeros."""

from __future__ import annotations

import os
from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.bytesutil import align_up, ceil_div, is_zero
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import Progress
from vdtool.formats.vmdk.disk import Disk
from vdtool.formats.vmdk.flat import FlatExtent
from vdtool.formats.vmdk.layout import GTE_ZERO, SECTOR
from vdtool.formats.vmdk.sparse import SparseExtent
from vdtool.formats.vmdk.stream import StreamWriter, compress_grain

_FLAT_PIECE = 1 << 16  # flat extents are tested for zeros (and punched) in pieces this large


def compact_disk(disk: Disk, has_parent: bool, parent_read: Callable[[int, int], bytes],
                 progress: Progress) -> None:
    """Every extent, each a share of ``progress`` by its size;
    ``parent_read`` takes disk offsets."""
    total = max(1, disk.virtual_size)
    for i, e in enumerate(disk.extents):
        start = disk.starts[i]
        sub = progress.sub(100 * start / total, 100 * e.size / total)
        if isinstance(e, SparseExtent):
            if e.compressed:
                _compact_stream(disk, i, e, sub)
            else:
                _compact_sparse(e, has_parent, lambda o, n, s=start: parent_read(s + o, n), sub)
        elif isinstance(e, FlatExtent):
            _compact_flat(e, sub)


def _compact_flat(e: FlatExtent, progress: Progress) -> None:
    bs = _FLAT_PIECE
    buf = bytearray(bs)
    pos = 0
    while pos < e.size:
        st, n = e.block_status(pos, e.size - pos)
        if st == Status.DATA:
            b = pos // bs * bs
            end = pos + n
            while b < end:
                m = min(bs, e.size - b)
                e.readinto(b, memoryview(buf)[:m])
                if is_zero(buf, 0, m):
                    e.file.punch_hole(e.file_offset + b, m)
                b += bs
            pos = b
        else:
            pos += n
        progress.update(min(pos, e.size), e.size)


# -- sparse extents ------------------------------------------------------------------------

def _compact_sparse(e: SparseExtent, has_parent: bool, parent_read, progress: Progress) -> None:
    _release_zero_grains(e, has_parent, parent_read, progress)
    # move the remaining grains down, lowest first
    reserved = e.metadata_ranges()
    live = sorted((v, g) for g, v in e.all_gtes() if v > GTE_ZERO)
    lead_end = 0  # the metadata at the start of the file, up to the first gap
    for a, b in reserved:
        if a <= lead_end:
            lead_end = max(lead_end, b)
    t = e.overhead * SECTOR
    t = max(t if t <= (live[0][0] * SECTOR if live else t) else 0, lead_end)
    mover = _GrainMover(e, reserved, align_up(t, SECTOR))
    for k, (v, g) in enumerate(live):
        mover.place(v, g)
        progress.update(len(live) + k, 2 * max(1, len(live)))
    mover.commit()
    _pack_metadata(e, max(mover.end, lead_end))
    _cut_file(e, mover.end, bool(live))


def _release_zero_grains(e: SparseExtent, has_parent: bool, parent_read, progress: Progress) -> None:
    """Grains that read as zeros are released: unallocated without a
    parent, a zero marker where the extent has them, else kept only where
    the parent's data there is not zeros.  The first half of ``progress``."""
    gb = e.grain_bytes
    grains = [(g, v) for g, v in e.all_gtes() if v > GTE_ZERO or not e.zero_grain]
    zero = bytes(gb)
    for k, (g, v) in enumerate(grains):
        data = e.read_grain_raw(v)
        avail = min(gb, e.size - g * gb)
        if data[:avail] == zero[:avail] or data.count(0) == len(data) and len(data) < gb:
            if not has_parent:
                e.set_gte(g, 0)
            elif e.zero_grain:
                e.set_gte(g, GTE_ZERO)
            elif parent_read(g * gb, avail).count(0) == avail:
                e.set_gte(g, 0)
        progress.update(k, 2 * max(1, len(grains)))
    e.forget_released()  # the moves below reuse their space
    e.flush_metadata()


class _GrainMover:
    """Copies grains to ``t`` and up, around the metadata in ``reserved``
    (sorted, disjoint byte ranges).  A slot freed by a move is reused only
    after the tables that stopped pointing at it are on disk (``commit``),
    so a crash leaves every table pointing at its grain's data."""

    def __init__(self, e: SparseExtent, reserved: list, t: int):
        self.e = e
        self.reserved = reserved
        self.t = t  # where the next grain goes
        self.ri = 0  # reserved ranges before this one end at or before t
        self.pending: list = []  # (grain, new sector) not yet in the tables
        self.oldest = None  # lowest old place of a pending grain
        self.end = 0  # end of the last grain, moved or not

    def _skip_metadata(self) -> None:
        gb = self.e.grain_bytes
        reserved = self.reserved
        while True:
            while self.ri < len(reserved) and reserved[self.ri][1] <= self.t:
                self.ri += 1
            clash = None
            j = self.ri
            while j < len(reserved) and reserved[j][0] < self.t + gb:
                if reserved[j][1] > self.t:
                    clash = max(clash or 0, reserved[j][1])
                j += 1
            if clash is None:
                return
            self.t = align_up(clash, SECTOR)

    def place(self, v: int, g: int) -> None:
        """Grain ``g``, now at sector ``v``: moved down if there is room."""
        e, gb = self.e, self.e.grain_bytes
        h = v * SECTOR
        self._skip_metadata()
        if self.t + gb <= h:
            if self.oldest is not None and self.t + gb > self.oldest:
                self.commit()
            e.file.pwrite(self.t, e.read_grain_raw(v))
            self.pending.append((g, self.t // SECTOR))
            self.oldest = h if self.oldest is None else min(self.oldest, h)
            self.end = max(self.end, self.t + gb)
            self.t += gb
        else:
            self.end = max(self.end, h + gb)
            self.t = max(self.t, h + gb)

    def commit(self) -> None:
        if self.pending:
            e = self.e
            e.file.flush()
            for g, nv in self.pending:
                e.set_gte(g, nv)
            e.forget_released()  # the old places are where later grains move
            e.flush_metadata()
        self.pending = []
        self.oldest = None


def _pack_metadata(e: SparseExtent, data_end: int) -> None:
    """Grain tables and directories above the last grain (appended by a
    resize) move down behind it, so the file can end there."""
    t = align_up(data_end, SECTOR)
    gtb = e.gt_sectors * SECTOR
    area = ceil_div(max(e.gd_entries, 1) * 4, SECTOR) * SECTOR
    if not any(b > t for a, b in e.metadata_ranges()):
        return
    moves = []
    for d in (e.gd, e.rgd):
        if d is None:
            continue
        for ti, v in enumerate(d):
            if v * SECTOR >= t:
                moves.append((v * SECTOR, d, ti))
    moves.sort(key=lambda m: m[0])
    pos = t
    changed = False
    for old, d, ti in moves:
        if pos + gtb <= old:
            e.file.pwrite(pos, e.file.pread(old, gtb))
            d[ti] = pos // SECTOR
            changed = True
            pos += gtb
        else:
            pos = max(pos, old + gtb)
    new_gd = e.gd_offset
    new_rgd = e.rgd_offset
    if e.gd_offset * SECTOR >= pos + area:
        new_gd = pos // SECTOR
        pos += area
    if e.rgd is not None and e.rgd_offset * SECTOR >= pos + area:
        new_rgd = pos // SECTOR
        pos += area
    if not changed and new_gd == e.gd_offset and new_rgd == e.rgd_offset:
        return
    e.file.flush()
    e.gd_offset, e.rgd_offset = new_gd, new_rgd
    e.write_directories()
    e.file.flush()
    e.write_header()
    e.forget_tables()


def _cut_file(e: SparseExtent, data_end: int, has_grains: bool) -> None:
    """The file ends after the last grain or metadata block."""
    meta_end = max(b for a, b in e.metadata_ranges())
    new_end = max(data_end, meta_end, e.overhead * SECTOR if not has_grains else 0)
    new_end = align_up(new_end, SECTOR)
    if new_end < e.file.size():
        e.file.truncate(new_end)
    e.file_truncated()
    e.file.flush()


# -- streamOptimized extents ----------------------------------------------------------------

def _compact_stream(disk: Disk, i: int, e: SparseExtent, progress: Progress) -> None:
    """A stream is rewritten: its grains (still compressed) into a new file,
    renamed over the old one."""
    path = e.file.path
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.compact-tmp")
    desc = disk.desc.render() if disk.desc_home is e else b""
    f = ImageFile(tmp, create=True)
    try:
        w = StreamWriter(f, e.capacity, desc, e.grain)
        live = sorted(e.all_gtes())
        for k, (g, v) in enumerate(live):
            if e.status_of(v) != Status.DATA:
                continue
            data = e.grain_data(v, g)
            if data.count(0) == len(data):
                continue
            w.emit(g, compress_grain(data, e.grain_bytes))
            progress.update(k, max(1, len(live)))
        w.finish()
        f.flush()
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    f.close()
    os.replace(tmp, path)
    old = e.file
    nf = ImageFile(path, writable=True)
    disk.replace_file(old, nf)
    old.close()
    ne = SparseExtent(nf, True)
    disk.extents[i] = ne
    if disk.desc_home is e:
        disk.desc_home = ne

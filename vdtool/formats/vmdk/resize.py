"""Resizing a VMDK image: the last extent grows or shrinks, a split image
gains or loses parts, the descriptor follows."""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable

from vdtool.core.backend import Status
from vdtool.core.bytesutil import ceil_div
from vdtool.core.errors import NotSupported, UsageError, VdError
from vdtool.core.fileio import ImageFile
from vdtool.formats.vmdk.descriptor import ExtentLine, part_name
from vdtool.formats.vmdk.disk import Disk
from vdtool.formats.vmdk.flat import FlatExtent
from vdtool.formats.vmdk.layout import (FLAG_COMPRESSED, FLAG_MARKERS, MAX_CAPACITY_BYTES, MAX_GD_ENTRIES,
                                        SECTOR, SPLIT_SECTORS)
from vdtool.formats.vmdk.sparse import SparseExtent, write_new_sparse


def resize_disk(disk: Disk, new_size: int, *, split: bool, begin_write: Callable[[], None]) -> None:
    """Make the disk ``new_size`` bytes (rounded up to a sector).  ``split``:
    a twoGbMaxExtent* image, whose parts hold at most 2 GiB;
    ``begin_write`` is called before the first change."""
    if new_size < 0 or new_size > MAX_CAPACITY_BYTES:
        raise UsageError(f"{disk.path}: vmdk size {new_size} is outside 0..2^56")
    new_sectors = ceil_div(new_size, SECTOR)
    sparse = _extent_kind(disk)
    if disk.desc_home != "file" and len(disk.extents) != 1:
        raise NotSupported("resize", "vmdk", disk.path)
    begin_write()
    drop = []
    while len(disk.extents) > 1 and disk.starts[-1] >= new_sectors * SECTOR:
        drop.append(disk.drop_last_extent())
    last = disk.extents[-1]
    last_start = disk.starts[-1] // SECTOR
    want = new_sectors - last_start
    extra = 0
    if split and want > SPLIT_SECTORS:
        want = max(SPLIT_SECTORS, last.capacity)
        extra = new_sectors - last_start - want
    _resize_extent(last, want, sparse)
    new_lines = _add_parts(disk, extra, sparse)
    if disk.desc_home == "file":
        keep = disk.desc.extents[:len(disk.extents) - len(new_lines)]
        disk.desc.set_extents(keep + new_lines)
    disk.sync_extent_lines()
    for f in disk.files.values():
        if f.writable:
            f.flush()
    disk.write_descriptor()
    disk.file.flush()
    _remove_dropped(disk, drop)


def _extent_kind(disk: Disk) -> bool:
    """True for an image of sparse extents, False for flat ones; anything
    else cannot be resized."""
    kinds = {type(e) for e in disk.extents}
    if len(kinds) != 1 or kinds - {SparseExtent, FlatExtent}:
        raise NotSupported("resize", "vmdk", disk.path, "the image mixes extent kinds")
    return SparseExtent in kinds


def _add_parts(disk: Disk, extra: int, sparse: bool) -> list:
    """New parts of a split image for ``extra`` sectors past the last
    one; their descriptor lines."""
    new_lines = []
    folder = os.path.dirname(os.path.abspath(disk.path))
    first = disk.extents[0]
    idx = len(disk.extents)
    while extra > 0:
        idx += 1
        n = min(SPLIT_SECTORS, extra)
        name = part_name(disk.path, "s" if sparse else "f", idx)
        p = os.path.join(folder, name)
        if os.path.exists(p):
            raise VdError(f"cannot add extent {name}: the file already exists", disk.path)
        f = ImageFile(p, create=True)
        disk.add_file(p, f)
        if sparse:
            write_new_sparse(f, n, version=first.version, flags=first.flags & ~(FLAG_COMPRESSED | FLAG_MARKERS),
                             desc=None, grain=first.grain)
            f.flush()
            e = SparseExtent(f, True)
        else:
            f.truncate(n * SECTOR)
            e = FlatExtent(f, 0, n * SECTOR, first.kind)
        disk.add_extent(e)
        new_lines.append(ExtentLine("RW", n, "SPARSE" if sparse else first.kind, name, 0))
        extra -= n
    return new_lines


def _remove_dropped(disk: Disk, drop: list) -> None:
    """Close and delete the parts a shrink left behind (after the
    descriptor stopped naming them)."""
    for e in drop:
        if e.file is not None:
            path = e.file.path
            disk.drop_file(path)
            e.file.close()
            if not any(x.file is not None and x.file.path == path for x in disk.extents) and path != disk.path:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _resize_extent(e, want: int, sparse: bool) -> None:
    if want == e.capacity:
        return
    if sparse:
        resize_sparse(e, want)
    else:
        need = e.file_offset + want * SECTOR
        if want < e.capacity:
            if e.file.size() <= e.file_offset + e.size:
                e.file.truncate(need)
        elif e.file.size() < need:
            e.file.truncate(need)
        e.capacity = want


def resize_sparse(ext: SparseExtent, new_cap: int) -> None:
    """One sparse extent to ``new_cap`` sectors."""
    ext.flush_metadata()
    new_entries = ceil_div(new_cap * SECTOR, ext.gt_span) if new_cap else 0
    if new_entries > MAX_GD_ENTRIES:
        raise UsageError(f"{ext.path}: {new_cap * SECTOR} bytes need {new_entries} grain tables, more than "
                         f"{MAX_GD_ENTRIES}")
    if new_cap < ext.capacity:
        _shrink_sparse(ext, new_cap, new_entries)
    elif new_entries > ext.gd_entries:
        _grow_directories(ext, new_entries)
    ext.capacity = new_cap
    ext.gd_entries = new_entries
    ext.reset_scans()
    ext.file.flush()
    ext.write_header()


def _shrink_sparse(ext: SparseExtent, new_cap: int, new_entries: int) -> None:
    gb = ext.grain_bytes
    new_bytes = new_cap * SECTOR
    old_cap = ext.capacity
    # The header (whose capacity is the extent's size) says so first: a
    # crash while the grains past the new end are dropped then leaves the
    # new size, never the old size with its end half gone.
    ext.capacity = new_cap
    ext.write_header()
    first_gone = ceil_div(new_bytes, gb)
    last = first_gone - 1
    if new_bytes % gb and last >= 0:
        e = ext.gte(last)
        if ext.status_of(e) == Status.DATA:
            # the tail past the new end must read as zeros if the disk grows again
            within = new_bytes - last * gb
            ext.file.pwrite(e * SECTOR + within, bytes(gb - within))
    total_grains = ceil_div(old_cap * SECTOR, gb)
    for g in range(first_gone, min(total_grains, new_entries * ext.gtes)):
        if ext.gte(g):
            ext.set_gte(g, 0)
    ext.forget_released()  # unreferenced until compact; no punching of tail grains needed
    ext.flush_metadata()
    ext.gd = ext.gd[:new_entries]
    if ext.rgd is not None:
        ext.rgd = ext.rgd[:new_entries]
    ext.drop_tables_from(new_entries)


def _grow_directories(ext: SparseExtent, new_entries: int) -> None:
    # The new tables back to back, one run per directory (so they are
    # found empty without reading them), as holes the file is extended
    # over, not cached: a million new tables cost two array builds, not
    # a million writes and 2 GB of cache.
    k = new_entries - ext.gd_entries
    gts = ext.gt_sectors
    dirs = [d for d in (ext.gd, ext.rgd) if d is not None]
    firsts = [ext.alloc(k * gts * SECTOR) // SECTOR for d in dirs]  # both, before either changes
    for d, first in zip(dirs, firsts):
        d.extend(array(d.typecode, range(first, first + k * gts, gts)))
    if new_entries > ext.gd_area:
        # the directories outgrow their sectors: new ones at the end of the file
        area = ceil_div(new_entries * 4, SECTOR) * SECTOR
        ext.gd_offset = ext.alloc(area) // SECTOR
        ext.file.pwrite(ext.gd_offset * SECTOR, bytes(area))
        if ext.rgd is not None:
            ext.rgd_offset = ext.alloc(area) // SECTOR
            ext.file.pwrite(ext.rgd_offset * SECTOR, bytes(area))
        ext.gd_area = area // 4
    if ext.next_alloc > ext.file.size():
        ext.file.truncate(ext.next_alloc)  # the new tables read as zeros
    ext.file.flush()
    ext.write_directories()

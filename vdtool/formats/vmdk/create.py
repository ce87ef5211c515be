"""New VMDK images, laid out as qemu-img and VMware write them."""

from __future__ import annotations

import os
import uuid as uuidlib

from vdtool.core.backend import ParentSpec
from vdtool.core.bytesutil import ceil_div
from vdtool.core.deflate import check_level
from vdtool.core.errors import NotSupported, UsageError
from vdtool.core.fileio import create_file
from vdtool.formats.vmdk.descriptor import (NO_PARENT_CID, ExtentLine, geometry, is_hex32, long_content_id, new_cid,
                                            new_descriptor, part_name, stem_ext)
from vdtool.formats.vmdk.disk import Disk
from vdtool.formats.vmdk.layout import (DEFAULT_DESCRIPTOR_SECTORS, DEFAULT_GRAIN_SECTORS, DEFAULT_GTES,
                                        FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, GRAIN_MARKER, MAX_CAPACITY_BYTES,
                                        SECTOR, SPLIT_SECTORS)
from vdtool.formats.vmdk.sparse import sparse_layout, write_new_sparse
from vdtool.formats.vmdk.stream import StreamWriter

NULL_UUID = "00000000-0000-0000-0000-000000000000"
# qemu-img's create options that are not VMDK's own -o keys
_GENERIC_OPTIONS = ("subformat", "backing_file", "backing_fmt", "preallocation")


def create_image(path: str, size: int, *, variant: str | None, block_size: int | None,
                 parent: ParentSpec | None, options: dict | None, variants: tuple,
                 format_options: tuple) -> Disk | None:
    """Write a new image at ``path``.  A streamOptimized image is written
    later, in one pass: its Disk is returned, the file open and its
    StreamWriter in ``stream``; for every other variant the files are
    written and closed, and None is returned (the caller opens the image).
    ``variants`` and ``format_options`` are the backend's."""
    variant = _choose_variant(variant or (options or {}).get("subformat") or "monolithicSparse", variants)
    opts = _parse_opts(format_options, options)
    if (size is None or size == 0) and parent is not None and parent.size:
        size = parent.size
    size = ceil_div(int(size or 0), SECTOR) * SECTOR
    if size < 0 or size > MAX_CAPACITY_BYTES:
        raise UsageError(f"vmdk image size {size} is outside 0..2^56")
    sparse = variant in ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized")
    grain = _grain_sectors(block_size, sparse, variant)
    if parent is not None and variant not in ("monolithicSparse", "twoGbMaxExtentSparse"):
        raise NotSupported("a parent image", "vmdk", path, f"{variant} images cannot be differencing images")
    cid = new_cid()
    pcid, hint = _parent_facts(parent)
    stream = variant == "streamOptimized"
    ddb = _ddb(size, opts, cid, opts["uuid"] or str(uuidlib.uuid4()), parent, stream)
    zeroed = bool(opts["zeroed_grain"])
    new = _NewImage(path, size // SECTOR, grain, version=2 if zeroed else 1,
                    flags=FLAG_NL_DETECT | FLAG_RGD | (FLAG_ZERO_GRAIN if zeroed else 0))
    if opts["compression_level"] is not None and not stream:
        raise UsageError(f"vmdk option compression_level: only streamOptimized images are compressed, not "
                         f"{variant}")
    if stream:
        return new.stream(new_descriptor(variant, cid, pcid, new.lines_monolithic(), ddb, hint),
                          opts["compression_level"])
    if variant == "monolithicSparse":
        new.monolithic_sparse(new_descriptor(variant, cid, pcid, new.lines_monolithic(), ddb, hint))
    else:
        parts = new.parts(variant)
        new.descriptor_file(parts, new_descriptor(variant, cid, pcid, new.lines(parts), ddb, hint))
    return None


def _choose_variant(variant, variants: tuple) -> str:
    match = [v for v in variants if v.lower() == str(variant).lower()]
    if not match:
        raise UsageError(f"vmdk has no variant {variant!r}; choose from {', '.join(variants)}")
    return match[0]


def _parse_opts(format_options: tuple, options: dict | None) -> dict:
    opts = {o.name: o.default for o in format_options}
    known = {o.name: o for o in format_options}
    for key, value in (options or {}).items():
        if key in _GENERIC_OPTIONS:
            continue
        if key not in known:
            raise UsageError(f"unknown vmdk option {key!r} (valid options: {', '.join(sorted(known))})")
        opts[key] = known[key].parse(value, "vmdk") if value is not None else None
    hw = str(opts["hwversion"])
    if not hw.isdigit() or not 1 <= int(hw) <= 99:
        raise UsageError(f"vmdk option hwversion: invalid value {hw!r} (a number from 1 to 99)")
    if opts["compat6"]:
        if "hwversion" in (options or {}) and hw != "6":
            raise UsageError("vmdk options compat6 and hwversion cannot both be given")
        opts["hwversion"] = "6"
    if opts["uuid"]:
        try:
            opts["uuid"] = str(uuidlib.UUID(str(opts["uuid"])))
        except ValueError:
            raise UsageError(f"vmdk option uuid: {opts['uuid']!r} is not a UUID") from None
    if opts["compression_level"] is not None:
        opts["compression_level"] = check_level(opts["compression_level"], "vmdk option compression_level")
    tv = str(opts["toolsversion"])
    if not tv.isdigit():
        raise UsageError(f"vmdk option toolsversion: invalid value {tv!r} (a number)")
    return opts


def _grain_sectors(block_size: int | None, sparse: bool, variant: str) -> int:
    if block_size is None:
        return DEFAULT_GRAIN_SECTORS
    if not sparse:
        raise UsageError(f"--block-size applies to sparse VMDK variants, not {variant}")
    if block_size < 4096 or block_size > (1 << 20) or block_size & (block_size - 1):
        raise UsageError(f"vmdk grain size {block_size} is not a power of two from 4K to 1M")
    return block_size // SECTOR


def _parent_facts(parent: ParentSpec | None) -> tuple:
    """(parentCID, parentFileNameHint) a child of ``parent`` records."""
    if parent is None:
        return NO_PARENT_CID, None
    pcid = NO_PARENT_CID
    pc = getattr(parent.image, "cid", None) if parent.image is not None else None
    if pc and is_hex32(pc):
        pcid = int(pc, 16)
    return pcid, parent.recorded_name


def _ddb(size: int, opts: dict, cid: int, image_uuid: str, parent: ParentSpec | None, stream: bool) -> list:
    adapter = opts["adapter_type"]
    cyl, heads, secs = geometry(size, adapter)
    ddb = [
        ("ddb.virtualHWVersion", str(opts["hwversion"])),
        ("ddb.geometry.cylinders", str(cyl)),
        ("ddb.geometry.heads", str(heads)),
        ("ddb.geometry.sectors", str(secs)),
        ("ddb.adapterType", adapter),
        ("ddb.toolsVersion", str(opts["toolsversion"])),
    ]
    if stream:
        ddb.append(("ddb.toolsInstallType", "4"))
    ddb += [
        ("ddb.longContentID", long_content_id(cid)),
        ("ddb.uuid.image", image_uuid),
        ("ddb.uuid.modification", str(uuidlib.uuid4())),
        ("ddb.uuid.parent", parent.uuid if parent is not None and parent.uuid else NULL_UUID),
        ("ddb.uuid.parentmodification", (parent.modification_uuid if parent is not None and
                                         parent.modification_uuid else NULL_UUID)),
    ]
    return ddb


class _NewImage:
    """The files of one new image: ``sectors`` of disk, sparse extents of
    ``grain`` sectors with header ``version`` and ``flags``."""

    def __init__(self, path: str, sectors: int, grain: int, *, version: int, flags: int):
        self.path = path
        self.sectors = sectors
        self.grain = grain
        self.version = version
        self.flags = flags

    def lines_monolithic(self) -> list:
        return [ExtentLine("RW", self.sectors, "SPARSE", os.path.basename(self.path), 0)]

    def parts(self, variant: str) -> list:
        """(file name, sectors, extent type) of each extent file."""
        sectors = self.sectors
        if variant in ("monolithicFlat", "vmfs"):
            stem, ext = stem_ext(self.path)
            names = [(f"{stem}-flat{ext}", sectors)]
        else:
            letter = "s" if variant == "twoGbMaxExtentSparse" else "f"
            n = max(1, ceil_div(sectors, SPLIT_SECTORS))
            names = [(part_name(self.path, letter, i + 1), min(SPLIT_SECTORS, sectors - i * SPLIT_SECTORS))
                     for i in range(n)]
        etype = {"vmfs": "VMFS", "twoGbMaxExtentSparse": "SPARSE"}.get(variant, "FLAT")
        return [(name, n, etype) for name, n in names]

    @staticmethod
    def lines(parts: list) -> list:
        return [ExtentLine("RW", n, etype, name, 0) for name, n, etype in parts]

    def stream(self, desc, level: int | None = None) -> Disk:
        f = create_file(self.path)
        try:
            disk = Disk(self.path, f)
            disk.desc = desc
            disk.desc_home = None
            disk.stream = StreamWriter(f, self.sectors, desc.render(), self.grain, level)
        except BaseException:
            f.close()
            raise
        return disk

    def monolithic_sparse(self, desc) -> None:
        with create_file(self.path) as f:
            write_new_sparse(f, self.sectors, version=self.version, flags=self.flags, desc=desc.render(),
                             grain=self.grain)
            f.flush()

    def descriptor_file(self, parts: list, desc) -> None:
        """The extent files, then the descriptor naming them."""
        folder = os.path.dirname(os.path.abspath(self.path))
        made = []
        try:
            for name, n, etype in parts:
                ef = create_file(os.path.join(folder, name))
                made.append(ef)
                if etype == "SPARSE":
                    write_new_sparse(ef, n, version=self.version, flags=self.flags, desc=None, grain=self.grain)
                else:
                    ef.truncate(n * SECTOR)
            f = create_file(self.path)
            made.append(f)
            f.pwrite(0, desc.render())
            for m in made:
                m.flush()
        finally:
            for m in made:
                m.close()


# measure names the files of a new image after this stand-in (the real
# name is the user's): 250 characters, so a descriptor that lists file
# names is measured as at least as big as any real one
_STAND_IN = "x" * 250 + ".vmdk"


def _zlib_bound(n: int) -> int:
    """The most zlib.compress may return for ``n`` bytes (zlib's compressBound)."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def measure(size: int, source, *, variant: str | None, block_size: int | None, options: dict | None,
            variants: tuple, format_options: tuple) -> dict:
    """measure's sizes, every file of the image counted.  Sparse extents:
    header, descriptor, both grain directories and every grain table (as
    create writes them), then the grains convert writes.  Flat extents:
    the disk.  A descriptor file is measured with 250-character file names.
    streamOptimized: an upper bound, each grain counted at zlib's worst
    case with its marker, and a grain table for every grain written, at
    most one per table the disk has."""
    options = dict(options or {})
    variant = _choose_variant(variant or options.get("subformat") or "monolithicSparse", variants)
    opts = _parse_opts(format_options, options)
    size = ceil_div(int(size), SECTOR) * SECTOR
    if size < 0 or size > MAX_CAPACITY_BYTES:
        raise UsageError(f"vmdk image size {size} is outside 0..2^56")
    sparse = variant in ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized")
    grain = _grain_sectors(block_size, sparse, variant)
    gbytes = grain * SECTOR
    stream = variant == "streamOptimized"
    ddb = _ddb(size, opts, 0, NULL_UUID, None, stream)
    new = _NewImage(os.path.join(os.sep, "measure", _STAND_IN), size // SECTOR, grain, version=1, flags=0)
    grains = ceil_div(size, gbytes)
    used = source.data_blocks(gbytes) if source is not None and sparse else 0
    if stream:
        return _measure_stream(new, variant, ddb, grains, used)
    if variant == "monolithicSparse":
        meta = sparse_layout(new.sectors, grain, DEFAULT_GTES, 1, DEFAULT_DESCRIPTOR_SECTORS)["overhead"] * SECTOR
        return {"required": meta + used * gbytes, "fully-allocated": meta + grains * gbytes}
    parts = new.parts(variant)
    meta = len(new_descriptor(variant, 0, NO_PARENT_CID, new.lines(parts), ddb, None).render())
    if not sparse:
        return {"required": meta + size, "fully-allocated": meta + size}
    meta += sum(sparse_layout(n, grain, DEFAULT_GTES, 1, DEFAULT_DESCRIPTOR_SECTORS)["overhead"] * SECTOR
                for _, n, _ in parts)
    return {"required": meta + used * gbytes, "fully-allocated": meta + grains * gbytes}


def _measure_stream(new: _NewImage, variant: str, ddb: list, grains: int, used: int) -> dict:
    desc = new_descriptor(variant, 0, NO_PARENT_CID, new.lines_monolithic(), ddb, None).render()
    head = ceil_div(1 + max(1, ceil_div(len(desc), SECTOR)), new.grain) * new.grain * SECTOR
    per_grain = ceil_div(GRAIN_MARKER.size + _zlib_bound(new.grain * SECTOR), SECTOR) * SECTOR
    tables = ceil_div(grains, DEFAULT_GTES)
    per_table = SECTOR + ceil_div(4 * DEFAULT_GTES, SECTOR) * SECTOR  # marker and table
    gd_bytes = ceil_div(4 * tables, SECTOR) * SECTOR if tables else SECTOR
    # directory marker and directory, footer marker and footer, end-of-stream marker
    tail = SECTOR + gd_bytes + SECTOR + SECTOR + SECTOR

    def total(n: int) -> int:
        return head + n * per_grain + min(tables, n) * per_table + tail

    return {"required": total(used), "fully-allocated": total(grains)}

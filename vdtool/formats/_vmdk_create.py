"""New VMDK images, laid out as qemu-img and VMware write them."""

from __future__ import annotations

import os
import secrets
import uuid as uuidlib
from typing import Optional

from vdtool.core.backend import ParentSpec
from vdtool.core.errors import NotSupported, UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats import _vmdk_sparse as sp
from vdtool.formats._vmdk_descriptor import ExtentLine, new_descriptor
from vdtool.formats._vmdk_sparse import SECTOR, ceil_div


def _parse_opts(cls, options: Optional[dict]) -> dict:
    opts = {o.name: o.default for o in cls.options}
    known = {o.name: o for o in cls.options}
    for key, value in (options or {}).items():
        if key in ("subformat", "backing_file", "backing_fmt", "preallocation"):
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
    tv = str(opts["toolsversion"])
    if not tv.isdigit():
        raise UsageError(f"vmdk option toolsversion: invalid value {tv!r} (a number)")
    return opts


def _ddb(cls, size: int, opts: dict, cid: int, image_uuid: str, parent: Optional[ParentSpec],
         stream: bool) -> list:
    from vdtool.formats.vmdk import _geometry

    adapter = opts["adapter_type"]
    cyl, heads, secs = _geometry(size, adapter)
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
        ("ddb.longContentID", secrets.token_hex(12) + f"{cid:08x}"),
        ("ddb.uuid.image", image_uuid),
        ("ddb.uuid.modification", str(uuidlib.uuid4())),
        ("ddb.uuid.parent", (parent.uuid if parent is not None and parent.uuid else
                             "00000000-0000-0000-0000-000000000000")),
        ("ddb.uuid.parentmodification", (parent.modification_uuid if parent is not None and
                                         parent.modification_uuid else "00000000-0000-0000-0000-000000000000")),
    ]
    return ddb


def create_image(cls, path: str, size: int, *, variant: Optional[str], block_size: Optional[int],
                 parent: Optional[ParentSpec], options: Optional[dict], progress: Progress = NO_PROGRESS):
    from vdtool.formats.vmdk import NO_PARENT_CID, SPLIT_SECTORS, VmdkBackend, _is_hex32, _new_cid, _stem_ext

    variant = variant or (options or {}).get("subformat") or "monolithicSparse"
    match = [v for v in cls.variants if v.lower() == str(variant).lower()]
    if not match:
        raise UsageError(f"vmdk has no variant {variant!r}; choose from {', '.join(cls.variants)}")
    variant = match[0]
    opts = _parse_opts(cls, options)
    if (size is None or size == 0) and parent is not None and parent.size:
        size = parent.size
    size = ceil_div(int(size or 0), SECTOR) * SECTOR
    if size < 0 or size > sp.MAX_CAPACITY_BYTES:
        raise UsageError(f"vmdk image size {size} is outside 0..2^56")
    sparse = variant in ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized")
    grain = sp.DEFAULT_GRAIN_SECTORS
    if block_size is not None:
        if not sparse:
            raise UsageError(f"--block-size applies to sparse VMDK variants, not {variant}")
        if block_size < 4096 or block_size > (1 << 20) or block_size & (block_size - 1):
            raise UsageError(f"vmdk grain size {block_size} is not a power of two from 4K to 1M")
        grain = block_size // SECTOR
    if parent is not None and variant not in ("monolithicSparse", "twoGbMaxExtentSparse"):
        raise NotSupported("a parent image", "vmdk", path, f"{variant} images cannot be differencing images")
    cid = _new_cid()
    pcid = NO_PARENT_CID
    hint = None
    if parent is not None:
        hint = parent.recorded_name
        pc = getattr(parent.image, "cid", None) if parent.image is not None else None
        if pc and _is_hex32(pc):
            pcid = int(pc, 16)
    image_uuid = opts["uuid"] or str(uuidlib.uuid4())
    stream = variant == "streamOptimized"
    ddb = _ddb(cls, size, opts, cid, image_uuid, parent, stream)
    sectors = size // SECTOR
    stem, ext = _stem_ext(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    zeroed = bool(opts["zeroed_grain"])
    version = 2 if zeroed else 1
    flags = sp.FLAG_NL_DETECT | sp.FLAG_RGD | (sp.FLAG_ZERO_GRAIN if zeroed else 0)

    made = []
    try:
        if variant in ("monolithicSparse", "streamOptimized"):
            desc = new_descriptor(variant, cid, pcid, [ExtentLine("RW", sectors, "SPARSE", base, 0)], ddb, hint)
            f = ImageFile(path, create=True)
            made.append(f)
            if stream:
                img = VmdkBackend(f)
                img._files[os.path.realpath(path)] = f
                img._desc = desc
                img._desc_home = None
                img._stream = sp.StreamWriter(f, sectors, desc.render(), grain)
                made.remove(f)
                return img
            sp.write_new_sparse(f, sectors, version=version, flags=flags, desc=desc.render(), grain=grain)
        else:
            if variant in ("monolithicFlat", "vmfs"):
                parts = [(f"{stem}-flat{ext}", sectors)]
            else:
                letter = "s" if variant == "twoGbMaxExtentSparse" else "f"
                n = max(1, ceil_div(sectors, SPLIT_SECTORS))
                parts = [(f"{stem}-{letter}{i + 1:03d}{ext}", min(SPLIT_SECTORS, sectors - i * SPLIT_SECTORS))
                         for i in range(n)]
            etype = {"vmfs": "VMFS", "twoGbMaxExtentSparse": "SPARSE"}.get(variant, "FLAT")
            lines = [ExtentLine("RW", n, etype, name, 0) for name, n in parts]
            for (name, n) in parts:
                ef = ImageFile(os.path.join(folder, name), create=True)
                made.append(ef)
                if etype == "SPARSE":
                    sp.write_new_sparse(ef, n, version=version, flags=flags, desc=None, grain=grain)
                else:
                    ef.truncate(n * SECTOR)
            desc = new_descriptor(variant, cid, pcid, lines, ddb, hint)
            f = ImageFile(path, create=True)
            made.append(f)
            f.pwrite(0, desc.render())
        for m in made:
            m.flush()
    finally:
        for m in made:
            m.close()
    return VmdkBackend.open(path, writable=True)

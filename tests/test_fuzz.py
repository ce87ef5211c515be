"""A seeded mutation fuzzer over valid images of every format and variant.

Seeds are made by vdtool itself and by qemu-img/qemu-io (qcow2, vdi, vpc,
vmdk with their subformats), with data written into them.  Mutations: byte
flips in the metadata (headers, footers, tables, descriptors), truncation at
metadata boundaries, and hostile values in each header field (sizes, counts,
shifts, offsets, overlaps, versions, feature bits) with checksums recomputed
where the format has them.  Every case runs ``info``, a read of a few
ranges, ``check`` and ``convert`` to raw (test_hostile.exercise) in a worker
process under RLIMIT_AS = 2 GiB and a per-case alarm; only VdError (and
check's exit codes) are accepted.

The quick form runs by default (a few thousand cases); the long form
(``-m slow``) runs many more seeds.  The long form is this same seeded
mutator at scale rather than hypothesis or atheris: the cases need a worker
process with a memory limit, a corpus of multi-file images and per-format
checksum fixing, which a plain seeded generator expresses directly and
reproducibly (a failing case is named by seed and index and regenerated
exactly), while hypothesis' shrinking would have to run inside the
memory-limited worker to be of use, and atheris is not installed here."""

from __future__ import annotations

import os
import random
import shutil
import struct

import pytest

import peers
import test_hostile as th
import vhdxfuzz
from vdrun import run_vdtool

SEEDS_VD = [  # (name, format, variant, extra create args), made by vdtool
    ("vd-qcow2", "qcow2", None, ["-o", "cluster_size=4096"]),
    ("vd-qcow2-v2", "qcow2", None, ["-o", "compat=0.10"]),
    ("vd-vdi", "vdi", "dynamic", []),
    ("vd-vdi-fixed", "vdi", "fixed", []),
    ("vd-vhd", "vhd", "dynamic", []),
    ("vd-vhd-fixed", "vhd", "fixed", []),
    ("vd-vmdk", "vmdk", "monolithicSparse", []),
    ("vd-vmdk-stream", "vmdk", "streamOptimized", []),
    ("vd-vmdk-flat", "vmdk", "monolithicFlat", []),
    ("vd-vmdk-2g", "vmdk", "twoGbMaxExtentSparse", []),
    ("vd-parallels", "parallels", None, ["-o", "cluster_size=65536"]),
    ("vd-qed", "qed", None, ["-o", "cluster_size=4096,table_size=2"]),
    ("vd-qcow", "qcow", None, []),
    ("vd-qcow-c", "qcow", None, ["-c"]),
    ("vd-vhdx", "vhdx", "dynamic", ["--block-size", "1M"]),
]
SEEDS_QEMU = [  # (name, qemu format, -o options)
    ("q-qcow2-c512", "qcow2", "cluster_size=512"),
    ("q-qcow2-extl2", "qcow2", "extended_l2=on,cluster_size=16384"),
    ("q-vdi", "vdi", "static=off"),
    ("q-vdi-static", "vdi", "static=on"),
    ("q-vpc", "vpc", "subformat=dynamic"),
    ("q-vpc-fixed", "vpc", "subformat=fixed"),
    ("q-vmdk", "vmdk", "subformat=monolithicSparse"),
    ("q-vmdk-stream", "vmdk", "subformat=streamOptimized"),
    ("q-vmdk-flat", "vmdk", "subformat=monolithicFlat"),
    ("q-parallels", "parallels", "cluster_size=65536"),
    ("q-qed", "qed", "cluster_size=4096"),
    ("q-qcow", "qcow", "encryption=off"),
    ("q-vhdx", "vhdx", "block_size=1M"),
]
EXT = {"qcow2": ".qcow2", "vdi": ".vdi", "vhd": ".vhd", "vpc": ".vhd", "vmdk": ".vmdk", "raw": ".img",
       "parallels": ".hds", "dmg": ".dmg", "vhdx": ".vhdx", "qed": ".qed", "qcow": ".qcow"}
SIZE = "2M"


def make_seeds(root) -> list:
    """[(name, format, folder, main file)] of valid images, each in its own folder."""
    seeds = []
    pattern = root / "pattern.img"
    pattern.write_bytes((bytes(range(256)) * 4096)[:1 << 20] + bytes(1 << 20))
    for name, fmt, variant, extra in SEEDS_VD:
        d = root / name
        d.mkdir()
        main = d / ("img" + EXT[fmt])
        args = ["convert", "-q", "-f", "raw", "-O", fmt] + (["--variant", variant] if variant else []) + extra
        run_vdtool(d, *args, pattern, main, expect=0)
        seeds.append((name, fmt, d, main))
    # differencing images (vdtool): the child is fuzzed, the parent stays valid
    for fmt in ("qcow2", "vdi", "vhd", "vmdk", "vhdx", "qed", "qcow"):
        d = root / f"vd-{fmt}-diff"
        d.mkdir()
        run_vdtool(d, "convert", "-q", "-f", "raw", "-O", fmt, pattern, "base" + EXT[fmt], expect=0)
        run_vdtool(d, "create", "-q", "-b", "base" + EXT[fmt], "img" + EXT[fmt], expect=0)
        seeds.append((f"vd-{fmt}-diff", fmt, d, d / ("img" + EXT[fmt])))
    for name, qfmt, opts in SEEDS_QEMU:
        d = root / name
        d.mkdir()
        main = d / ("img" + EXT[qfmt])
        peers.qemu_img("create", "-q", "-f", qfmt, "-o", opts, main, SIZE)
        if "stream" not in opts:
            peers.qemu_io(main, "write -P 0x41 0 64k", "write -P 0x42 300k 5k", "write -P 0x43 1000k 24k",
                          fmt=qfmt)
        seeds.append((name, "vhd" if qfmt == "vpc" else qfmt, d, main))
    seeds += _dmg_seeds(root)
    seeds += _readonly_seeds(root, pattern)
    d = root / "q-qcow2-zstd"  # zstd-compressed clusters, as qemu-img writes them
    d.mkdir()
    peers.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096", pattern,
                   d / "img.qcow2")
    seeds.append(("q-qcow2-zstd", "qcow2", d, d / "img.qcow2"))
    rawd = root / "raw"
    rawd.mkdir()
    shutil.copy(pattern, rawd / "img.img")
    seeds.append(("raw", "raw", rawd, rawd / "img.img"))
    return seeds


def _dmg_seeds(root) -> list:
    """DMGs built from the specification (no tool here makes them): every
    chunk kind with the property list, and the resource-fork form."""
    import dmgkit

    text = (bytes(range(256)) * 64)[:16384]
    layout = [("DDM", [("raw", b"\x11" * 1024)]),
              ("Apple_HFS", [("zlib", text), ("zero", bytes(4096)), ("bzip2", text[::-1]), ("adc", text),
                             ("ignore", bytes(1024)), ("raw", text[:2048])])]
    out = []
    for name, rsrc in (("dmg-plist", False), ("dmg-rsrc", True)):
        d = root / name
        d.mkdir()
        dmgkit.build(d / "img.dmg", layout, rsrc=rsrc, comments=True)
        out.append((name, "dmg", d, d / "img.dmg"))
    return out


def _readonly_seeds(root, pattern) -> list:
    """bochs (bximage: a Growing disk, and an Undoable journal over a flat
    base made from it) and cloop (create_compressed_fs: two block sizes)."""
    out = []
    for name, tool, args, fname in (
            ("bochs", "bximage", ["-func=convert", "-imgmode=growing", "-q"], "img.img"),
            ("cloop", "create_compressed_fs", ["-q", "-B", "16384"], "img.cloop"),
            ("cloop-512", "create_compressed_fs", ["-q", "-B", "512", "-L", "0"], "img.cloop")):
        d = root / name
        d.mkdir()
        peers.run(tool, *args, pattern, d / fname)
        out.append((name, name.split("-")[0], d, d / fname))
    d = root / "bochs-journal"  # BASE.redolog over BASE
    d.mkdir()
    journal = bytearray((root / "bochs" / "img.img").read_bytes())
    journal[48:64] = b"Undoable".ljust(16, b"\0")
    (d / "img.img.redolog").write_bytes(journal)
    (d / "img.img").write_bytes(bytes([0x5A]) * pattern.stat().st_size)
    out.append(("bochs-journal", "bochs", d, d / "img.img.redolog"))
    return out


# -- where the metadata is ------------------------------------------------------------------------

def metadata_spans(fmt: str, data: bytes) -> list:
    """(start, end) byte ranges holding metadata (headers, tables,
    descriptors) of a valid image, from its own header fields."""
    n = len(data)
    spans = [(0, min(n, 1024))]
    try:
        if fmt == "qcow2":
            h = th._header_fields(data)
            cs = 1 << h["cluster_bits"]
            spans.append((h["l1_table_offset"], h["l1_table_offset"] + max(8, h["l1_size"] * 8)))
            spans.append((h["refcount_table_offset"], h["refcount_table_offset"] + cs))
            for i in range(min(h["l1_size"], 4)):
                l2 = struct.unpack_from(">Q", data, h["l1_table_offset"] + 8 * i)[0] & 0x00FFFFFFFFFFFE00
                if l2:
                    spans.append((l2, l2 + min(cs, 4096)))
            rb = struct.unpack_from(">Q", data, h["refcount_table_offset"])[0]
            if rb:
                spans.append((rb, rb + min(cs, 4096)))
        elif fmt == "vdi":
            off_blocks = struct.unpack_from("<I", data, 0x154)[0]
            spans.append((0, 0x200))
            spans.append((off_blocks, off_blocks + 4096))
        elif fmt == "vhd":
            spans.append((n - 512, n))
            if data[:8] == b"conectix":
                dyn = struct.unpack_from(">Q", data, 16)[0]
                spans.append((dyn, dyn + 1024))
                bat = struct.unpack_from(">Q", data, dyn + 16)[0]
                spans.append((bat, bat + 512))
                first = struct.unpack_from(">I", data, bat)[0]
                if first != 0xFFFFFFFF:
                    spans.append((first * 512, first * 512 + 512))
        elif fmt == "vhdx":
            spans += vhdxfuzz.spans(data)
        elif fmt in ("qed", "qcow"):
            spans += _two_level_spans(fmt, data)
        elif fmt == "parallels":
            spans.append((0, min(n, 64 + 4 * struct.unpack_from("<I", data, 32)[0])))
        elif fmt == "bochs":
            spans.append((0, 512 + 4 * struct.unpack_from("<I", data, 72)[0]))  # header and catalog
        elif fmt == "cloop":
            spans.append((0, 136 + 8 * (struct.unpack_from(">I", data, 132)[0] + 1)))  # header and offsets
        elif fmt == "dmg":
            spans.append((max(0, n - 512), n))  # the koly trailer
            xml, xml_len = struct.unpack_from(">QQ", data, n - 512 + 216)
            rsrc, rsrc_len = struct.unpack_from(">QQ", data, n - 512 + 40)
            spans.append((xml, xml + xml_len) if xml_len else (rsrc, rsrc + rsrc_len))
        elif fmt == "vmdk":
            if data[:4] == b"KDMV":
                desc, dsize = struct.unpack_from("<QQ", data, 28)
                spans.append((desc * 512, (desc + dsize) * 512))
                gd = struct.unpack_from("<Q", data, 56)[0]
                if gd and gd != (1 << 64) - 1:
                    spans.append((gd * 512, gd * 512 + 512))
                    gt = struct.unpack_from("<I", data, gd * 512)[0]
                    if gt:
                        spans.append((gt * 512, gt * 512 + 2048))
                spans.append((max(0, n - 1536), n))  # stream footer, end-of-stream marker
            else:
                spans.append((0, n))  # a text descriptor: all of it
    except (struct.error, KeyError, IndexError):
        pass
    return [(max(0, a), min(n, b)) for a, b in spans if 0 <= a < n and b > a]



def _two_level_spans(fmt: str, data: bytes) -> list:
    """QED's and QCOW's L1 table and first L2 table."""
    if fmt == "qed":
        cs, ts = struct.unpack_from("<II", data, 4)
        l1 = struct.unpack_from("<Q", data, 40)[0]
        span, l2 = ts * cs, struct.unpack_from("<Q", data, l1)[0]
    else:
        l1 = struct.unpack_from(">Q", data, 40)[0]
        span, l2 = 8 << data[33], struct.unpack_from(">Q", data, l1)[0]
    out = [(l1, l1 + min(span, 4096))]
    if l2 & ((1 << 62) - 1):
        l2 &= (1 << 62) - 1
        out.append((l2, l2 + min(span, 4096)))
    return out


# -- header fields and hostile values ----------------------------------------------------------------

U64 = (1 << 64) - 1
HOSTILE_32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
HOSTILE_64 = [0, 1, 1 << 31, 1 << 40, 1 << 62, U64]

# (field, offset, struct format, values)
VDI_FIELDS = [
    ("u32Version", 0x44, "<I", [0, 0x00010000, 0x00020000, 0xFFFFFFFF]),
    ("cbHeader", 0x48, "<I", [0, 1, 0x200, 0xFFFFFFFF]),
    ("u32Type", 0x4C, "<I", [0, 3, 4, 99]),
    ("fFlags", 0x50, "<I", [0x1, 0x100, 0x10000, 0xFFFFFFFF]),
    ("offBlocks", 0x154, "<I", HOSTILE_32 + [0x150, 0x180]),
    ("offData", 0x158, "<I", HOSTILE_32 + [0x200]),
    ("cCylinders", 0x15C, "<I", HOSTILE_32),
    ("cbSector", 0x168, "<I", [0, 1, 4096, 0xFFFFFFFF]),
    ("cbDisk", 0x170, "<Q", HOSTILE_64 + [1 << 20 | 1]),
    ("cbBlock", 0x178, "<I", [0, 1, 3000, 1 << 31, 0xFFFFFFFF]),
    ("cbBlockExtra", 0x17C, "<I", [1, 512, 0xFFFFFFFF]),
    ("cBlocks", 0x180, "<I", HOSTILE_32),
    ("cBlocksAllocated", 0x184, "<I", HOSTILE_32),
]

VHD_FOOTER_FIELDS = [
    ("features", 8, ">I", [0, 1, 0xFFFFFFFF]),
    ("version", 12, ">I", [0, 0x00020000, 0xFFFFFFFF]),
    ("data_offset", 16, ">Q", HOSTILE_64 + [512, 511]),
    ("original_size", 40, ">Q", HOSTILE_64),
    ("current_size", 48, ">Q", HOSTILE_64 + [511, (2 << 40) + 1]),
    ("geometry", 56, ">I", [0, 0xFFFFFFFF, 0xFFFF10FF]),
    ("disk_type", 60, ">I", [0, 1, 2, 3, 4, 5, 6, 0xFFFFFFFF]),
]
VHD_DYN_FIELDS = [
    ("dyn.data_offset", 8, ">Q", [0, U64 - 1]),
    ("dyn.table_offset", 16, ">Q", HOSTILE_64 + [512, 0x600]),
    ("dyn.header_version", 24, ">I", [0, 0x00020000]),
    ("dyn.max_table_entries", 28, ">I", HOSTILE_32 + [2]),
    ("dyn.block_size", 32, ">I", [0, 1, 512, 3000, 1 << 31, 0xFFFFFFFF]),
    ("dyn.locator0", 576, ">4sIIIQ", None),  # special: hostile locators
]

PARALLELS_FIELDS = [
    ("version", 16, "<I", [0, 1, 3, 0xFFFFFFFF]),
    ("tracks", 28, "<I", [0, 1, 3, 0x7FFFFFFF, 0xFFFFFFFF]),
    ("bat_entries", 32, "<I", HOSTILE_32 + [2]),
    ("nb_sectors", 36, "<Q", HOSTILE_64 + [1 << 32 | 8]),
    ("inuse", 44, "<I", [0x746F6E59, 0x312E3276, 1]),
    ("data_off", 48, "<I", HOSTILE_32 + [1, 128]),
    ("flags", 52, "<I", [1, 2, 0xFFFFFFFF]),
    ("ext_off", 56, "<Q", HOSTILE_64),
]
QED_FIELDS = [
    ("cluster_size", 4, "<I", HOSTILE_32 + [4096 + 1, 1 << 27]),
    ("table_size", 8, "<I", HOSTILE_32 + [3, 32]),
    ("header_size", 12, "<I", HOSTILE_32 + [2]),
    ("features", 16, "<Q", [1, 2, 4, 8, U64]),
    ("compat_features", 24, "<Q", [1, U64]),
    ("autoclear_features", 32, "<Q", [1, U64]),
    ("l1_table_offset", 40, "<Q", HOSTILE_64 + [4096 + 8]),
    ("image_size", 48, "<Q", HOSTILE_64 + [513]),
    ("backing_filename_offset", 56, "<I", HOSTILE_32),
    ("backing_filename_size", 60, "<I", HOSTILE_32),
]
QCOW_FIELDS = [
    ("version", 4, ">I", [0, 2, 3, 0xFFFFFFFF]),
    ("backing_file_offset", 8, ">Q", HOSTILE_64 + [48]),
    ("backing_file_size", 16, ">I", HOSTILE_32 + [1023, 1024]),
    ("size", 24, ">Q", HOSTILE_64 + [513]),
    ("cluster_bits", 32, ">B", [0, 8, 17, 63, 255]),
    ("l2_bits", 33, ">B", [0, 5, 14, 63, 255]),
    ("crypt_method", 36, ">I", [1, 2, 0xFFFFFFFF]),
    ("l1_table_offset", 40, ">Q", HOSTILE_64 + [8]),
]
BOCHS_FIELDS = [
    ("version", 64, "<I", [0, 0x10000, 0x30000, 0xFFFFFFFF]),
    ("header", 68, "<I", HOSTILE_32 + [511, 4096]),
    ("catalog", 72, "<I", HOSTILE_32 + [0x100000, 2]),
    ("bitmap", 76, "<I", HOSTILE_32),
    ("extent", 80, "<I", HOSTILE_32 + [511, 3 << 12, 1 << 24]),
    ("disk", 88, "<Q", HOSTILE_64 + [511]),
]
CLOOP_FIELDS = [
    ("block_size", 128, ">I", HOSTILE_32 + [512, 1000, 64 << 20]),
    ("num_blocks", 132, ">I", HOSTILE_32 + [0x3FFFFFF]),
    ("offset[0]", 136, ">Q", HOSTILE_64 + [136]),
    ("offset[1]", 144, ">Q", HOSTILE_64 + [136]),
]
# koly trailer fields, as offsets from the trailer's start
DMG_FIELDS = [
    ("HeaderSize", 8, ">I", [0, 511, 0xFFFFFFFF]),
    ("DataForkOffset", 24, ">Q", HOSTILE_64),
    ("DataForkLength", 32, ">Q", HOSTILE_64),
    ("RsrcForkOffset", 40, ">Q", HOSTILE_64),
    ("RsrcForkLength", 48, ">Q", HOSTILE_64 + [16]),
    ("SegmentCount", 60, ">I", [0, 2, 0xFFFFFFFF]),
    ("XMLOffset", 216, ">Q", HOSTILE_64),
    ("XMLLength", 224, ">Q", HOSTILE_64 + [100]),
    ("SectorCount", 492, ">Q", HOSTILE_64 + [3]),
]

VMDK_FIELDS = [
    ("version", 4, "<I", [0, 2, 3, 4, 0xFFFFFFFF]),
    ("flags", 8, "<I", [0, 1 << 1, 1 << 16, 1 << 17, 0xFFFFFFFF]),
    ("capacity", 12, "<Q", HOSTILE_64),
    ("grainSize", 20, "<Q", [0, 1, 3, 7, 1 << 20, U64]),
    ("descriptorOffset", 28, "<Q", HOSTILE_64),
    ("descriptorSize", 36, "<Q", HOSTILE_64),
    ("numGTEsPerGT", 44, "<I", [0, 1, 513, 0xFFFFFFFF]),
    ("rgdOffset", 48, "<Q", HOSTILE_64),
    ("gdOffset", 56, "<Q", HOSTILE_64 + [U64 - 1]),
    ("overHead", 64, "<Q", HOSTILE_64),
    ("compressAlgorithm", 77, "<H", [1, 2, 0xFFFF]),
]

DESCRIPTOR_EDITS = [
    ("extent size huge", lambda t: _re_sub(r"(RW|RDONLY) \d+", r"\1 36028797018963968", t)),
    ("extent size 0", lambda t: _re_sub(r"(RW|RDONLY) \d+", r"\1 0", t)),
    ("extent size odd", lambda t: _re_sub(r"(RW|RDONLY) \d+", r"\1 3", t)),
    ("extent offset huge", lambda t: _re_sub(r'(FLAT "[^"]*") \d+', r"\1 36028797018963967", t)),
    ("extent self", lambda t: _re_sub(r'"[^"]*\.vmdk"( \d+)?\s*$', '"img.vmdk"', t, multiline=True)),
    ("extent twice", lambda t: t + "\n".join(l for l in t.splitlines() if l.startswith("RW")) + "\n"),
    ("many extents", lambda t: t + 'RW 1 ZERO\n' * 5000),
    ("extent to dir", lambda t: _re_sub(r'"[^"]*\.vmdk"', '"."', t)),
    ("extent to dev", lambda t: _re_sub(r'"[^"]*\.vmdk"', '"/dev/zero"', t)),
    ("extent missing", lambda t: _re_sub(r'"[^"]*\.vmdk"', '"nope.vmdk"', t)),
    ("parent hint self", lambda t: t + 'parentFileNameHint="img.vmdk"\n'),
    ("CID junk", lambda t: _re_sub(r"CID=\w+", "CID=zz", t)),
    ("createType junk", lambda t: _re_sub(r'createType="\w+"', 'createType="vmfsSparse"', t)),
    ("long line", lambda t: t + "x" * 70000 + "\n"),
    ("nul", lambda t: t.replace("\n", "\0", 3)),
    ("unterminated", lambda t: _re_sub(r'"[^"]*\.vmdk"', '"open', t)),
    ("geometry junk", lambda t: t + 'ddb.geometry.cylinders = "-1"\n'),
]


def _re_sub(pat, rep, text, multiline=False):
    import re

    return re.sub(pat, rep, text, flags=re.M if multiline else 0)


def _vhd_checksum(buf: bytearray, start: int, field: int, length: int) -> None:
    struct.pack_into(">I", buf, start + field, 0)
    struct.pack_into(">I", buf, start + field, ~sum(buf[start:start + length]) & 0xFFFFFFFF)


def fix_checksums(fmt: str, buf: bytearray) -> None:
    """Recompute checksums so that pokes reach the field checks."""
    if fmt == "vhdx":
        vhdxfuzz.fix_checksums(buf)
    if fmt == "vhd" and len(buf) >= 512:
        for foot in (len(buf) - 512, 0):
            if buf[foot:foot + 8] == b"conectix":
                _vhd_checksum(buf, foot, 64, 512)
        if buf[:8] == b"conectix":
            dyn = struct.unpack_from(">Q", buf, 16)[0]
            if dyn + 1024 <= len(buf) and buf[dyn:dyn + 8] == b"cxsparse":
                _vhd_checksum(buf, dyn, 36, 1024)


def field_cases(fmt: str, data: bytes) -> list:
    """[(label, mutated bytes)] of hostile values in each header field."""
    out = []

    def poke(label, off, sfmt, v, both_footers=False):
        buf = bytearray(data)
        if off + struct.calcsize(sfmt) > len(buf):
            return
        struct.pack_into(sfmt, buf, off, *(v if isinstance(v, tuple) else (v,)))
        if both_footers and buf[:8] == b"conectix":
            struct.pack_into(sfmt, buf, off - (len(buf) - 512), *(v if isinstance(v, tuple) else (v,)))
        fix_checksums(fmt, buf)
        out.append((label, bytes(buf)))

    if fmt == "qcow2":
        for f, off, sfmt, vals in th.QCOW2_POKES:
            for v in vals:
                poke(f"{f}={v:#x}", off, sfmt, v)
        h = th._header_fields(data)
        for v in (1, len(data) + 512, 1 << 56, (1 << 63) | 0x200, h["l1_table_offset"], 0):
            poke(f"L1[0]={v:#x}", h["l1_table_offset"], ">Q", v)
            poke(f"reftable[0]={v:#x}", h["refcount_table_offset"], ">Q", v)
            poke(f"L1 overlaps header={v:#x}", 40, ">Q", 0)
    elif fmt == "vdi":
        for f, off, sfmt, vals in VDI_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", off, sfmt, v)
        ob = struct.unpack_from("<I", data, 0x154)[0]
        for v in (0xFFFFFFFD, 0x7FFFFFFF, 1, 0, 0xFFFFFFFE):
            poke(f"blockmap[0]={v:#x}", ob, "<I", v)
            poke(f"blockmap[1]={v:#x}", ob + 4, "<I", v)
    elif fmt == "vhd":
        foot = len(data) - 512
        for f, off, sfmt, vals in VHD_FOOTER_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", foot + off, sfmt, v, both_footers=True)
        if data[:8] == b"conectix":
            dyn = struct.unpack_from(">Q", data, 16)[0]
            for f, off, sfmt, vals in VHD_DYN_FIELDS:
                if vals is None:
                    for code in (b"W2ku", b"W2ru", b"Mac ", b"MacX"):
                        for space, length, loff in ((1, 512, len(data) + 512), (U64 >> 32, 0xFFFFFFFF, 512),
                                                    (1, 24, dyn), (0, 0, 0)):
                            poke(f"{f} {code!r} {length}@{loff}", dyn + off, sfmt, (code, space, length, 0, loff))
                    continue
                for v in vals:
                    poke(f"{f}={v:#x}", dyn + off, sfmt, v)
            bat = struct.unpack_from(">Q", data, dyn + 16)[0]
            for v in (0, 1, 2, 0x7FFFFFFF, len(data) // 512, 0xFFFFFFFE):
                poke(f"BAT[0]={v:#x}", bat, ">I", v)
    elif fmt == "vhdx":
        vhdxfuzz.field_cases(data, poke)
    elif fmt == "parallels":
        for f, off, sfmt, vals in PARALLELS_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", off, sfmt, v)
        for v in (1, 2, 0x7FFFFFFF, 0xFFFFFFFF, struct.unpack_from("<I", data, 64)[0]):
            poke(f"BAT[0]={v:#x}", 64, "<I", v)
            poke(f"BAT[1]={v:#x}", 68, "<I", v)
    elif fmt in ("qed", "qcow"):
        for f, off, sfmt, vals in QED_FIELDS if fmt == "qed" else QCOW_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", off, sfmt, v)
        order = "<Q" if fmt == "qed" else ">Q"
        l1 = struct.unpack_from(order, data, 40)[0]
        l2 = struct.unpack_from(order, data, l1)[0] if l1 + 8 <= len(data) else 0
        for v in (1, 2, 511, len(data), len(data) + 4096, 1 << 56, U64, (1 << 63) | len(data), l1, 0):
            poke(f"L1[0]={v:#x}", l1, order, v)
            if l2:
                poke(f"L2[0]={v:#x}", l2 & ((1 << 62) - 1), order, v)
    elif fmt in ("bochs", "cloop"):
        for f, off, sfmt, vals in BOCHS_FIELDS if fmt == "bochs" else CLOOP_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", off, sfmt, v)
        if fmt == "bochs":
            for v in (0, 1, 0x7FFFFFFF, 0xFFFFFFFE):
                poke(f"catalog[0]={v:#x}", 512, "<I", v)
    elif fmt == "dmg":
        koly = len(data) - 512
        for f, off, sfmt, vals in DMG_FIELDS:
            for v in vals:
                poke(f"{f}={v:#x}", koly + off, sfmt, v)
    elif fmt == "vmdk":
        if data[:4] == b"KDMV":
            for f, off, sfmt, vals in VMDK_FIELDS:
                for v in vals:
                    poke(f"{f}={v:#x}", off, sfmt, v)
            gd = struct.unpack_from("<Q", data, 56)[0]
            if gd and gd * 512 + 4 <= len(data):
                for v in (0, 1, 0x7FFFFFFF, len(data) // 512, 0xFFFFFFFF):
                    poke(f"GD[0]={v:#x}", gd * 512, "<I", v)
                gt = struct.unpack_from("<I", data, gd * 512)[0]
                if gt:
                    for v in (1, 0x7FFFFFFF, len(data) // 512, gt):
                        poke(f"GT[0]={v:#x}", gt * 512, "<I", v)
        else:
            text = data.decode("utf-8", "replace")
            for label, edit in DESCRIPTOR_EDITS:
                out.append((label, edit(text).encode()))
    return out


# -- cases ------------------------------------------------------------------------------------------

def _case(tmp, seed, label, payload: bytes, fmt, repair: bool) -> dict:
    name, sfmt, folder, main = seed
    d = tmp / f"case-{_case.n}"
    _case.n += 1
    shutil.copytree(folder, d)
    (d / main.name).write_bytes(payload)
    return {"name": f"{name}: {label}", "path": str(d / main.name), "fmt": fmt, "repair": repair,
            "seconds": 10}


_case.n = 0


def generate(tmp, seeds, rng: random.Random, flips: int, truncs: int, fields: bool) -> list:
    cases = []
    for seed in seeds:
        name, fmt, folder, main = seed
        data = main.read_bytes()
        spans = metadata_spans(fmt, data)
        for i in range(flips):
            buf = bytearray(data)
            picks = []
            for _ in range(rng.randrange(1, 5)):
                a, b = rng.choice(spans)
                off = rng.randrange(a, b)
                buf[off] ^= (1 << rng.randrange(8)) if rng.random() < 0.6 else rng.randrange(1, 256)
                picks.append(off)
            if rng.random() < 0.5:
                fix_checksums(fmt, buf)
            cases.append(_case(tmp, seed, f"flips at {picks}", bytes(buf), rng.choice([fmt, None]),
                               repair=i % 5 == 0))
        bounds = {0, 1, 7, 8, 64, 72, 100, 104, 511, 512, 513, 1023, 1024, len(data) - 1, len(data) - 512,
                  len(data) - 511}
        for a, b in spans:
            bounds.update((a - 1, a, a + 1, a + 8, b - 1, b))
        offs = sorted(o for o in bounds if 0 <= o < len(data))
        rng.shuffle(offs)
        for off in offs[:truncs]:
            cases.append(_case(tmp, seed, f"truncated at {off}", data[:off], rng.choice([fmt, None]),
                               repair=off % 3 == 0))
        if fields:
            for label, payload in field_cases(fmt, data):
                cases.append(_case(tmp, seed, label, payload, fmt, repair=rng.random() < 0.3))
    return cases


def run_all(cases: list, batch: int = 400) -> int:
    for i in range(0, len(cases), batch):
        done = cases[i:i + batch]
        th.assert_all_ok(th.run_in_worker(done))
        for case in done:  # each case is a copy of its seed's folder: a run writes gigabytes otherwise
            folder = os.path.dirname(case["path"])
            if os.path.basename(folder).startswith("case-"):
                shutil.rmtree(folder, ignore_errors=True)
    return len(cases)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("seeds"))


def test_seeds_are_valid(seeds, tmp_path):
    """Every seed opens, reads, checks and converts without a refusal."""
    (tmp_path / "out").mkdir()
    for name, fmt, folder, main in seeds:
        r = th.run_case({"name": name, "path": str(main), "fmt": fmt}, str(tmp_path / "out"))
        no_check = ("raw", "dmg", "bochs", "cloop")
        assert r["ok"] and r["refused"] == ([] if fmt not in no_check else ["check"]), (name, r)  # no check


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vhd", "vmdk", "parallels", "dmg", "bochs", "cloop", "vhdx",
                                 "qed", "qcow"])
def test_fuzz_quick(seeds, tmp_path, fmt):
    rng = random.Random(f"quick-{fmt}")
    mine = [s for s in seeds if s[1] == fmt]
    cases = generate(tmp_path, mine, rng, flips=60, truncs=20, fields=True)
    assert len(cases) > 200
    run_all(cases)


def test_fuzz_quick_raw_probing(seeds, tmp_path):
    """Random bytes and other formats' headers, probed: never a crash."""
    rng = random.Random("raw")
    seed = [s for s in seeds if s[1] == "raw"][0]
    heads = [b"QFI\xfb", b"KDMV", b"conectix", b"# Disk DescriptorFile\n", b"<<< Oracle VM VirtualBox Disk "
             b"Image >>>\n" + bytes(24) + b"\x7f\x10\xda\xbe", b"vhdxfile", b"QED\x00", b"COWD",
             b"Bochs Virtual HD Image\0".ljust(32, b"\0") + b"Redolog\0".ljust(16, b"\0"), b"#!/bin/sh\n#V2.0 Format\n"]
    cases = []
    for i in range(60):
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 100, 511, 512, 4096])))
        payload = rng.choice(heads) + body
        if rng.random() < 0.3:
            payload += bytes(rng.randrange(0, 4096)) + b"conectix" + bytes(504)
        cases.append(_case(tmp_path, seed, f"junk {i}", payload, None, repair=False))
    run_all(cases)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(4))
def test_fuzz_long(seeds, tmp_path, round_):
    rng = random.Random(f"long-{round_}")
    cases = generate(tmp_path, seeds, rng, flips=150, truncs=40, fields=round_ == 0)
    n = run_all(cases)
    print(f"long fuzz round {round_}: {n} cases")


# -- crashes the fuzzer found, as regression tests ------------------------------------------------------

def test_regression_fileio_offsets_past_off_t(tmp_path):
    """A VMDK flat extent at sector 2^55 made os.lseek/os.pread raise
    OverflowError (a traceback); past off_t is now simply past the end."""
    from vdtool.core.fileio import ImageFile

    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    with ImageFile(str(p)) as f:
        big = 1 << 64
        assert f.next_data(big) > big and f.next_hole(big) == big
        assert f.pread(big, 10) == b""
        buf = bytearray(b"\xff" * 16)
        f.readinto(big, buf)
        assert buf == bytes(16)
        # past EOF there is no data: the answer lies beyond any range, so
        # callers step over the rest in one go (a flat extent past the end of
        # its file was walked a byte at a time)
        assert f.next_data(8192) > 1 << 62


def test_regression_fileio_character_device():
    """/dev/zero named as a flat extent: lseek on a character device said
    "hole at 0", and the extent was walked a byte at a time (a hang)."""
    from vdtool.core.fileio import ImageFile

    with ImageFile("/dev/zero") as f:
        assert f.next_data(4096) == 4096
        assert f.next_hole(4096) > 1 << 40


@pytest.mark.parametrize("edit", ["extent offset huge", "extent to dev"])
def test_regression_vmdk_descriptor_cases(seeds, tmp_path, edit):
    seed = [s for s in seeds if s[0] == "vd-vmdk-flat"][0]
    text = seed[3].read_text()
    fn = dict(DESCRIPTOR_EDITS)[edit]
    case = _case(tmp_path, seed, edit, fn(text).encode(), "vmdk", repair=False)
    (tmp_path / "out").mkdir()
    r = th.run_case(case, str(tmp_path / "out"))
    assert r["ok"], r

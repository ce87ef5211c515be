"""vdtool measure: qemu-img measure's numbers, text and JSON for qcow2 and
raw; for every format, 'required' against the files convert really makes."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from tests.helpers import poke, write_at
from tests.peers import qemu_img, qemu_io
from tests.vdrun import cli
from vdtool.core import ops
from vdtool.core.errors import VdError

MiB = 1 << 20


def qemu_measure(*args) -> dict:
    return json.loads(qemu_img("measure", "--output=json", *args).stdout)


def vd_measure(image=None, **kw) -> dict:
    return ops.measure(image, **kw)


def qcow2_opts(cs: int, compat: str = "1.1", refcount_bits: int = 16, extl2: bool = False) -> dict:
    return {"cluster_size": str(cs), "compat": compat, "refcount_bits": str(refcount_bits),
            "extended_l2": "on" if extl2 else "off"}


def qemu_o(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items())


# -- qcow2 and raw --size: qemu-img's numbers ----------------------------------------------------

QCOW2_SIZE_CASES = [
    (size, cs, compat, rb, extl2)
    for size in (0, 1, 3 * 512 + 7, 1 << 30, (100 << 30) + 123 * 512)
    for cs in (512, 4096, 65536, 2 * MiB)
    for compat, rb, extl2 in (("1.1", 16, False), ("0.10", 16, False), ("1.1", 1, False), ("1.1", 64, True))
    if not (extl2 and cs < 16384)
]


@pytest.mark.interop
@pytest.mark.parametrize("size,cs,compat,rb,extl2", QCOW2_SIZE_CASES)
def test_qcow2_size_matches_qemu(size, cs, compat, rb, extl2):
    opts = qcow2_opts(cs, compat, rb, extl2)
    want = qemu_measure("-O", "qcow2", "-o", qemu_o(opts), "--size", str(size))
    assert vd_measure(size=size, fmt="qcow2", options=opts) == want


@pytest.mark.interop
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("cs", [512, 65536, 2 * MiB])
def test_qcow2_preallocation_matches_qemu(prealloc, cs):
    opts = dict(qcow2_opts(cs), preallocation=prealloc)
    want = qemu_measure("-O", "qcow2", "-o", qemu_o(opts), "--size", str(3 << 30))
    assert vd_measure(size=3 << 30, fmt="qcow2", options=opts) == want
    variant = {"off": "sparse", "metadata": "metadata", "falloc": "full", "full": "full"}[prealloc]
    assert vd_measure(size=3 << 30, fmt="qcow2", variant=variant, options=qcow2_opts(cs)) == want


@pytest.mark.interop
@pytest.mark.parametrize("rb", [1, 2, 4, 8, 32])
def test_qcow2_refcount_bits_match_qemu(rb):
    opts = qcow2_opts(4096, refcount_bits=rb)
    want = qemu_measure("-O", "qcow2", "-o", qemu_o(opts), "--size", str(7 << 30))
    assert vd_measure(size=7 << 30, fmt="qcow2", options=opts) == want


@pytest.mark.interop
@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 30])
def test_raw_size_matches_qemu(size):
    want = qemu_measure("-O", "raw", "--size", str(size))
    assert vd_measure(size=size, fmt="raw") == want


# -- from images -----------------------------------------------------------------------------------

def _raw_source(path, size: int, pieces) -> None:
    """A sparse raw file with random data (non-zero in every 512-byte
    sector, so qemu's allocation and vdtool's zero test agree) at pieces."""
    with open(path, "wb") as f:
        f.truncate(size)
    rng = random.Random(size)
    for off, n in pieces:
        data = bytearray(rng.randbytes(n))
        data[::512] = b"\x01" * len(data[::512])
        write_at(path, off, bytes(data))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure-src")
    out = {}
    raw = d / "sparse.raw"
    # data at odd places: within a cluster, across cluster and L2 boundaries, the last block; whole 4 KiB
    # pages, since qemu counts what the file system allocates (vdtool: only blocks that are not zeros)
    _raw_source(raw, 80 * MiB + 4096, [(4096, 4096), (3 * MiB - 8192, 3 * MiB), (40 * MiB + 4096 * 3, 16384),
                                       (80 * MiB, 4096)])
    out["sparse.raw"] = (raw, "raw")
    full = d / "full.raw"
    _raw_source(full, 6 * MiB, [(0, 6 * MiB)])
    out["full.raw"] = (full, "raw")
    q = d / "mixed.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", q, str(64 * MiB))
    qemu_io(q, "write -P 0x11 0 1M", "write -z 2M 1M", "write -P 0x22 5M 12k", "write -P 0x33 10000k 3M",
            "write -z 11M 64k", "write -P 0x44 63M 1M", fmt="qcow2")
    out["mixed.qcow2"] = (q, "qcow2")
    # qemu counts a whole allocated (or compressed) source cluster; vdtool only the blocks that are not
    # zeros: these images' clusters are wholly data (zeros inside allocated data: test_allocated_zeros...)
    aligned = d / "aligned.raw"
    _raw_source(aligned, 40 * MiB, [(0, 2 * MiB), (6 * MiB, 4 * MiB), (38 * MiB, 2 * MiB)])
    c = d / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-f", "raw", aligned, c)
    out["compressed.qcow2"] = (c, "qcow2")
    top = d / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", q.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x55 30M 2M", "write -z 0 512k", fmt="qcow2")
    out["overlay.qcow2"] = (top, "qcow2")
    v2 = d / "v2.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "compat=0.10,cluster_size=2M", "-f", "raw", aligned, v2)
    out["v2.qcow2"] = (v2, "qcow2")
    return out


SOURCE_NAMES = ["sparse.raw", "full.raw", "mixed.qcow2", "compressed.qcow2", "overlay.qcow2", "v2.qcow2"]


@pytest.mark.interop
@pytest.mark.parametrize("name", SOURCE_NAMES)
@pytest.mark.parametrize("cs,compat,extl2", [(512, "1.1", False), (4096, "0.10", False), (65536, "1.1", False),
                                             (65536, "1.1", True), (2 * MiB, "1.1", False)])
def test_qcow2_from_image_matches_qemu(sources, name, cs, compat, extl2):
    path, fmt = sources[name]
    opts = qcow2_opts(cs, compat, extl2=extl2)
    want = qemu_measure("-O", "qcow2", "-o", qemu_o(opts), "-f", fmt, path)
    assert vd_measure(str(path), fmt="qcow2", src_format=fmt, options=opts) == want


@pytest.mark.interop
@pytest.mark.parametrize("name", SOURCE_NAMES)
@pytest.mark.parametrize("prealloc", ["metadata", "full"])
def test_qcow2_from_image_preallocated_matches_qemu(sources, name, prealloc):
    path, fmt = sources[name]
    want = qemu_measure("-O", "qcow2", "-o", f"preallocation={prealloc}", "-f", fmt, path)
    assert vd_measure(str(path), fmt="qcow2", options={"preallocation": prealloc}) == want


@pytest.mark.interop
@pytest.mark.parametrize("name", ["sparse.raw", "overlay.qcow2"])
def test_qcow2_with_backing_file_matches_qemu(sources, name):
    """With a new parent the data it shares is unknown: qemu counts the whole disk."""
    path, fmt = sources[name]
    want = qemu_measure("-O", "qcow2", "-o", "backing_file=elsewhere.qcow2", "-f", fmt, path)
    assert vd_measure(str(path), fmt="qcow2", options={"backing_file": "elsewhere.qcow2"}) == want


@pytest.mark.interop
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_raw_from_image_matches_qemu(sources, name):
    path, fmt = sources[name]
    assert vd_measure(str(path), fmt="raw") == qemu_measure("-O", "raw", "-f", fmt, path)


@pytest.mark.interop
def test_bitmaps_match_qemu(tmp_path):
    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(300 * MiB + 512))
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", img, "b1")
    qemu_img("bitmap", "--add", "-g", "4096", img, "a-rather-longer-bitmap-name")
    qemu_img("bitmap", "--add", "-g", "1M", img, "x")
    for cs in (512, 65536, 2 * MiB):
        opts = qcow2_opts(cs)
        got = vd_measure(str(img), fmt="qcow2", options=opts)
        assert got == qemu_measure("-O", "qcow2", "-o", qemu_o(opts), img)
        assert got["bitmaps"] > 0
    # compat 0.10 output has no bitmaps key, nor has a raw source
    assert "bitmaps" not in vd_measure(str(img), fmt="qcow2", options={"compat": "0.10"})


@pytest.mark.interop
def test_allocated_zeros_are_not_required(tmp_path):
    """qemu-img counts allocated blocks; vdtool counts what convert writes:
    a raw file whose allocated blocks hold zeros needs only the metadata,
    and a qcow2 cluster that holds a few non-zero sectors needs only the
    new image's clusters that hold them."""
    img = tmp_path / "zeros.raw"
    img.write_bytes(bytes(4 * MiB))
    q = qemu_measure("-O", "qcow2", "-f", "raw", img)
    got = vd_measure(str(img), fmt="qcow2", src_format="raw")
    assert got == vd_measure(size=4 * MiB, fmt="qcow2")
    assert got["required"] < q["required"] and got["fully-allocated"] == q["fully-allocated"]
    src = tmp_path / "sparse-data.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=2M", src, str(8 * MiB))
    qemu_io(src, "write -P 1 0 512", "write -P 2 3M 4k", fmt="qcow2")
    opts = {"cluster_size": "4096"}
    q = qemu_measure("-O", "qcow2", "-o", "cluster_size=4096", src)
    got = vd_measure(str(src), fmt="qcow2", options=opts)
    empty = vd_measure(size=8 * MiB, fmt="qcow2", options=opts)
    assert got["required"] == empty["required"] + 2 * 4096
    assert q["required"] == empty["required"] + 2 * (2 * MiB)


# -- required against what convert writes, every format and variant ----------------------------------

def _files_size(folder, skip) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n != skip)


CONVERT_CASES = [
    ("raw", "sparse", None), ("raw", "full", None),
    ("qcow2", "sparse", None), ("qcow2", "sparse", 512), ("qcow2", "sparse", 2 * MiB), ("qcow2", "full", None),
    ("vdi", "dynamic", None), ("vdi", "fixed", None), ("vdi", "dynamic", 4 * MiB),
    ("vhd", "dynamic", None), ("vhd", "fixed", None), ("vhd", "dynamic", 512 * 1024),
    ("vmdk", "monolithicSparse", None), ("vmdk", "monolithicSparse", 1 * MiB), ("vmdk", "monolithicFlat", None),
    ("vmdk", "twoGbMaxExtentSparse", None), ("vmdk", "twoGbMaxExtentFlat", None), ("vmdk", "vmfs", None),
    ("vmdk", "streamOptimized", None),
]


@pytest.fixture(scope="module")
def convert_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure-conv")
    src = d / "src.raw"
    # a little more than 2 GiB, so twoGbMaxExtent* images have two extents
    _raw_source(src, (2 << 30) + 5 * MiB + 512, [(0, 100 * 1024), (7 * MiB + 3 * 512, 2 * MiB),
                                                 (700 * MiB, 64 * 1024), ((2 << 30) + 4 * MiB, MiB + 512)])
    return src


@pytest.mark.parametrize("fmt,variant,block", CONVERT_CASES)
def test_required_covers_convert(tmp_path, convert_source, fmt, variant, block):
    got = vd_measure(str(convert_source), fmt=fmt, variant=variant, block_size=block)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / f"dst.{fmt}"
    ops.convert(str(convert_source), str(dst), fmt=fmt, variant=variant, block_size=block)
    actual = _files_size(out_dir, None)
    shutil.rmtree(out_dir)  # preallocated outputs hold 2 GiB each: give the disk back at once
    req, full = got["required"], got["fully-allocated"]
    assert req >= actual, (got, actual)
    assert full >= req
    if variant == "streamOptimized":
        return  # an upper bound: grains are counted at zlib's worst case
    unit = block or {"raw": 512, "qcow2": 65536, "vdi": MiB, "vhd": 2 * MiB, "vmdk": 65536}[fmt]
    slack = unit
    if fmt == "qcow2":
        # qemu-img's formula counts the metadata of the fully allocated image (every L2 table, the
        # refcounts of every cluster); convert writes what maps its data
        slack += full - -(-convert_source.stat().st_size // unit) * unit
    if fmt == "vmdk" and variant not in ("monolithicSparse", "streamOptimized"):
        slack += 250 * 2  # descriptor measured with 250-character file names
    assert req - actual <= slack, (got, actual)
    if variant in ("full", "fixed", "monolithicFlat", "twoGbMaxExtentFlat", "vmfs"):
        assert req == full


@pytest.mark.parametrize("fmt,variant", [("vdi", "fixed"), ("vhd", "fixed"), ("raw", "full"), ("qcow2", "full"),
                                         ("vmdk", "monolithicFlat"), ("vmdk", "twoGbMaxExtentFlat")])
def test_fully_allocated_is_a_fixed_image(tmp_path, fmt, variant):
    size = 70 * MiB + 512
    dst = tmp_path / f"new.{fmt}"
    ops.create(str(dst), size, fmt=fmt, variant=variant)
    got = vd_measure(size=size, fmt=fmt, variant=variant)
    assert got["required"] == got["fully-allocated"]
    assert got["fully-allocated"] - _files_size(tmp_path, None) in range(0, 250 * 2 + 1)


@pytest.mark.parametrize("fmt,variant", [("qcow2", "sparse"), ("vdi", "dynamic"), ("vhd", "dynamic"),
                                         ("vmdk", "monolithicSparse"), ("vmdk", "twoGbMaxExtentSparse"),
                                         ("vmdk", "streamOptimized")])
def test_empty_required_is_the_new_file(tmp_path, fmt, variant):
    size = (3 << 30) + 512
    dst = tmp_path / f"new.{fmt}"
    if variant == "streamOptimized":
        ops.convert(str(_empty_raw(tmp_path, size)), str(dst), fmt=fmt, variant=variant)
        os.unlink(tmp_path / "empty.raw")
    else:
        ops.create(str(dst), size, fmt=fmt, variant=variant)
    got = vd_measure(size=size, fmt=fmt, variant=variant)
    actual = _files_size(tmp_path, None)
    assert got["required"] >= actual
    slack = {"vmdk": 250 * 2 + (65536 if variant == "streamOptimized" else 0)}.get(fmt, 0)
    if fmt == "qcow2":  # qemu-img's formula: the metadata of the fully allocated image
        slack = got["fully-allocated"] - size - 512 + 65536
    assert got["required"] - actual <= slack, (got, actual)


def _empty_raw(folder, size):
    p = folder / "empty.raw"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


@pytest.mark.interop
@pytest.mark.parametrize("qfmt", ["vdi", "vmdk", "vpc", "vhdx"])
def test_qemu_measures_only_raw_and_qcow2(qfmt):
    """qemu-img 7.2 has no measure for the other formats vdtool writes, so
    their numbers are judged against convert's output above instead."""
    proc = qemu_img("measure", "-O", qfmt, "--size", "1G", check=False)
    assert proc.returncode == 1 and b"does not support size measurement" in proc.stderr


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=2M,preallocation=falloc", "--size", "100G"],
    ["--size", "1000"],
    ["-O", "qcow2", "SRC"],
    ["-O", "raw", "SRC"],
    ["-O", "qcow2", "-o", "compat=0.10", "SRC"],
])
@pytest.mark.parametrize("output", ["human", "json"])
def test_cli_output_is_qemus(sources, args, output):
    src, _ = sources["mixed.qcow2"]
    args = [str(src) if a == "SRC" else a for a in args]
    want = qemu_img("measure", f"--output={output}", *args).stdout.decode()
    assert cli("measure", "--output", "text" if output == "human" else output, *args, expect=0).stdout == want
    got = cli("measure", "--output", output, *args, expect=0).stdout
    assert got == want


@pytest.mark.interop
@pytest.mark.parametrize("args", [
    ["-O", "qcow2"],  # neither --size nor an image
    ["-O", "qcow2", "--size", "1G", "SRC"],  # both
    ["-O", "nosuchformat", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "2T"],  # needs too large an L1 table
    ["-O", "qcow2", "/nonexistent/image"],
])
def test_cli_errors_as_qemu(sources, args):
    src, _ = sources["mixed.qcow2"]
    args = [str(src) if a == "SRC" else a for a in args]
    q = qemu_img("measure", *args, check=False)
    got = cli("measure", *args)
    assert got.returncode == q.returncode == 1
    assert got.stdout == ""
    assert got.stderr.startswith("vdtool: error: ") and got.stderr.count("\n") == 1


def test_cli_other_formats_and_help(tmp_path):
    out = cli("measure", "-O", "vhd", "--variant", "fixed", "--size", "10M", "--output", "json", expect=0).stdout
    assert json.loads(out) == {"required": 10 * MiB + 512, "fully-allocated": 10 * MiB + 512}
    out = cli("measure", "-O", "vpc", "--size", "10M", expect=0).stdout
    assert out.splitlines()[0].startswith("required size: ")
    assert "Supported options for vdi" in cli("measure", "-O", "vdi", "-o", "help", expect=0).stdout
    out = cli("measure", "-O", "vhdx", "--size", "1G", "--output", "json", expect=0).stdout
    # header section, log, metadata and BAT: 1 MiB each
    assert json.loads(out) == {"required": 4 * MiB, "fully-allocated": 4 * MiB + 1024 * MiB}
    err = cli("measure", "-O", "qcow2", "--variant", "fixed", "--size", "1G", expect=2).stderr
    assert err.startswith("vdtool: error: ") or "Error" in err
    assert "Examples" in cli("measure", "--help", expect=0).stdout


# -- hostile sources: one error line ------------------------------------------------------------------

def _qcow2_with_data(path):
    ops.create(str(path), 8 * MiB, fmt="qcow2")
    with ops_open(path) as disk:
        disk.write(0, b"\x5a" * 65536 * 3)


def ops_open(path):
    import vdtool

    return vdtool.open(str(path), writable=True)


@pytest.mark.parametrize("damage", ["l1_past_end", "l2_entry_past_end", "truncated", "bitmaps_ext", "header"])
def test_hostile_qcow2_source(tmp_path, damage):
    img = tmp_path / "bad.qcow2"
    _qcow2_with_data(img)
    data = img.read_bytes()
    l1_off = int.from_bytes(data[40:48], "big")
    if damage == "l1_past_end":
        poke(img, 40, ">Q", 1 << 50)
    elif damage == "l2_entry_past_end":
        l2 = int.from_bytes(data[l1_off:l1_off + 8], "big") & 0x00FFFFFFFFFFFE00
        poke(img, l2 + 8, ">Q", (1 << 63) | (1 << 45))
    elif damage == "truncated":
        with open(img, "r+b") as f:
            f.truncate(len(data) - 65536)
    elif damage == "bitmaps_ext":
        _add_bogus_bitmaps_extension(img)
    elif damage == "header":
        poke(img, 20, ">I", 40)  # cluster_bits
    proc = cli("measure", "-O", "qcow2", "-f", "qcow2", img)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith("vdtool: error: ") and proc.stderr.count("\n") == 1


def _add_bogus_bitmaps_extension(img):
    """A real bitmap (qemu-img adds it), then its directory moved past the
    end of the file."""
    qemu_img("bitmap", "--add", img, "b1")
    data = img.read_bytes()
    at = data.index((0x23852875).to_bytes(4, "big"), 72, 65536)
    poke(img, at + 8 + 16, ">Q", 1 << 40)  # bitmap_directory_offset


def test_hostile_vdi_source(tmp_path):
    img = tmp_path / "bad.vdi"
    ops.create(str(img), 8 * MiB, fmt="vdi")
    with ops_open(img) as disk:
        disk.write(0, b"\x11" * MiB)
    off_blocks = int.from_bytes(img.read_bytes()[0x154:0x158], "little")
    poke(img, off_blocks, "<I", 0x7FFFFFF0)  # block 0 far past the end of the file
    proc = cli("measure", "-O", "qcow2", img)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("vdtool: error: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("fmt,damage", [("vhd", "truncated"), ("vhd", "bat_offset"), ("vmdk", "gd_offset"),
                                        ("vmdk", "grain_size")])
def test_hostile_vhd_vmdk_sources(tmp_path, fmt, damage):
    img = tmp_path / f"bad.{fmt}"
    ops.create(str(img), 16 * MiB, fmt=fmt)
    with ops_open(img) as disk:
        disk.write(MiB, b"\x22" * (3 * MiB))
    if damage == "truncated":
        with open(img, "r+b") as f:
            f.truncate(os.path.getsize(img) // 2)
    elif damage == "bat_offset":
        poke(img, 512 + 16, ">Q", 1 << 50)  # the dynamic header's table offset (its checksum now wrong too)
    elif damage == "gd_offset":
        poke(img, 56, "<Q", 1 << 40)
    elif damage == "grain_size":
        poke(img, 20, "<Q", 3)
    proc = cli("measure", "-O", "qcow2", "-f", fmt, img)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.startswith("vdtool: error: ") and proc.stderr.count("\n") == 1


def test_api_errors():
    with pytest.raises(VdError):
        ops.measure(None, fmt="qcow2")
    with pytest.raises(VdError):
        ops.measure("x", size=1, fmt="qcow2")

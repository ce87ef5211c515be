"""vdtool compare: exit status, messages and offsets judged by qemu-img
compare (7.2) on the same image pairs; JSON, errors, speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from peers import need, qemu_img, qemu_io, qemu_make
from vdrun import cli
from vdtool.core import ops

MiB = 1 << 20


make = qemu_make  # an image qemu-img makes, with qemu-io writes


def judge(folder, *args):
    """Run qemu-img compare and vdtool compare with the same arguments:
    the same exit status and the same lines on stdout."""
    q = subprocess.run([need("qemu-img"), "compare", *map(str, args)], cwd=folder, capture_output=True,
                       text=True, timeout=120)
    v = cli("compare", *args, cwd=folder)
    assert (v.returncode, v.stdout) == (q.returncode, q.stdout), f"qemu-img: {q.stdout}{q.stderr}\nvdtool: " \
                                                                 f"{v.stdout}{v.stderr}"
    return v


@pytest.fixture
def pair(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", "8M", "write -P 1 0 1M", "write -P 2 3M 64k", "write -z 5M 64k")
    b = tmp_path / "b.raw"
    qemu_img("convert", "-O", "raw", str(a), str(b))
    return a, b


@pytest.mark.interop
def test_identical_across_formats(tmp_path, pair):
    a, b = pair
    for fmt, opts in (("vdi", None), ("vmdk", None), ("vmdk", "subformat=streamOptimized"), ("vpc", None),
                      ("qcow2", "compression_type=zlib")):
        c = tmp_path / f"c.{fmt}"
        args = ["convert", "-O", fmt] + (["-o", opts] if opts else []) + [str(a), str(c)]
        qemu_img(*args)
        assert judge(tmp_path, a.name, c.name).returncode == 0
        judge(tmp_path, "-s", a.name, c.name)
    judge(tmp_path, "-f", "qcow2", "-F", "raw", a.name, b.name)
    judge(tmp_path, "-s", a.name, b.name)
    judge(tmp_path, "-s", a.name, a.name)


@pytest.mark.interop
@pytest.mark.parametrize("where", [0, 511, 512, 4097, MiB - 1, MiB, 3 * MiB + 100, 5 * MiB + 7, 8 * MiB - 1])
def test_one_byte_different(tmp_path, pair, where):
    a, b = pair
    qemu_io(b, f"write -P 0x55 {where} 1", fmt="raw")
    r = judge(tmp_path, a.name, b.name)
    assert r.returncode == 1
    assert r.stdout == f"Content mismatch at offset {where // 512 * 512}!\n"
    judge(tmp_path, b.name, a.name)
    judge(tmp_path, "-f", "qcow2", "-F", "raw", a.name, b.name)


@pytest.mark.interop
def test_data_against_data(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", "4M", "write -P 1 0 4M")
    b = make(tmp_path, "b.vmdk", "vmdk", "4M", "write -P 1 0 4M", "write -P 2 3000000 10")
    assert judge(tmp_path, a.name, b.name).stdout == "Content mismatch at offset 2999808!\n"


@pytest.mark.interop
def test_zero_against_unallocated(tmp_path):
    a = make(tmp_path, "a.qcow2", "qcow2", "4M", "write -z 0 1M", "write -z -u 2M 1M")
    b = make(tmp_path, "b.qcow2", "qcow2", "4M")
    c = make(tmp_path, "c.vdi", "vdi", "4M", "write -P 0 1M 1M")
    assert judge(tmp_path, a.name, b.name).returncode == 0
    judge(tmp_path, "-s", a.name, b.name)
    assert judge(tmp_path, a.name, c.name).returncode == 0
    judge(tmp_path, "-s", b.name, c.name)


@pytest.mark.interop
def test_different_sizes(tmp_path):
    small = make(tmp_path, "s.qcow2", "qcow2", "4M", "write -P 1 0 64k")
    big = make(tmp_path, "b.raw", "raw", "6M", "write -P 1 0 64k")
    r = judge(tmp_path, small.name, big.name)
    assert r.stdout == "Warning: Image size mismatch!\nImages are identical.\n" and r.returncode == 0
    judge(tmp_path, big.name, small.name)
    judge(tmp_path, "-s", small.name, big.name)
    qemu_io(big, "write -P 9 5000000 1", fmt="raw")
    r = judge(tmp_path, small.name, big.name)
    assert r.stdout == "Warning: Image size mismatch!\nContent mismatch at offset 4999680!\n"
    judge(tmp_path, big.name, small.name)
    # a tail written with zeros (allocated) still reads as zeros
    tail = make(tmp_path, "t.qcow2", "qcow2", "6M", "write -P 1 0 64k", "write -P 0 5M 64k", "write -z 4M 64k")
    assert judge(tmp_path, small.name, tail.name).returncode == 0
    judge(tmp_path, "-s", small.name, tail.name)


@pytest.mark.interop
def test_strict_mode_block_status(tmp_path, pair):
    a, b = pair
    r = judge(tmp_path, "-s", a.name, b.name)
    assert r.returncode == 1 and r.stdout.startswith("Strict mode: Offset ")
    c = tmp_path / "c.qcow2"
    shutil.copy(a, c)
    judge(tmp_path, "-s", a.name, c.name)
    qemu_io(c, "write -z 7M 64k")
    judge(tmp_path, "-s", a.name, c.name)
    judge(tmp_path, a.name, c.name)


@pytest.mark.interop
def test_chains(tmp_path):
    make(tmp_path, "base.vmdk", "vmdk", "8M", "write -P 1 0 2M", "write -P 2 6M 1M")
    mid = make(tmp_path, "mid.qcow2", "qcow2", "10M", "write -P 3 1M 64k", "write -z 6M 64k",
               backing="base.vmdk", backing_fmt="vmdk")
    top = make(tmp_path, "top.qcow2", "qcow2", None, "write -P 4 9M 4k", backing="mid.qcow2",
               backing_fmt="qcow2")
    flat = tmp_path / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", str(top), str(flat))
    assert judge(tmp_path, top.name, flat.name).returncode == 0
    judge(tmp_path, "-s", top.name, flat.name)
    assert judge(tmp_path, mid.name, top.name).stdout == "Content mismatch at offset 9437184!\n"
    judge(tmp_path, "base.vmdk", mid.name)


# -- errors, JSON, speed ----------------------------------------------------------------------

def test_errors_exit_2(tmp_path):
    p = tmp_path / "a.img"
    p.write_bytes(bytes(4096))
    r = cli("compare", p, tmp_path / "missing.img", expect=2)
    assert r.stderr.startswith("vdtool: error: ") and len(r.stderr.splitlines()) == 1
    cli("compare", "-f", "qcow2", p, p, expect=2)  # not a qcow2 image
    # usage errors: 2 as for every vdtool command.  qemu-img compare exits 1
    # on its usage errors, which a script cannot tell from "different";
    # vdtool keeps 2 ("error") on purpose.
    cli("compare", p, expect=2)
    cli("compare", "--bogus", p, p, expect=2)


@pytest.mark.interop
def test_qemu_usage_errors_exit_1_and_vdtool_2(tmp_path):
    assert qemu_img("compare", "x", check=False).returncode == 1
    cli("compare", "x", expect=2)


def test_json_and_quiet(tmp_path):
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    a.write_bytes(bytes(MiB))
    b.write_bytes(bytes(1000) + b"\1" + bytes(MiB - 1001))
    r = cli("compare", "--output", "json", a, b, expect=1)
    d = json.loads(r.stdout)
    assert d["identical"] is False and d["first-difference"] == 512 and d["size-a"] == d["size-b"] == MiB
    assert d["reason"] == "content"
    assert cli("compare", "-q", a, b, expect=1).stdout == ""
    d = json.loads(cli("compare", "--output", "json", a, a, expect=0).stdout)
    assert d["identical"] is True and d["first-difference"] is None
    res = ops.compare(str(a), str(b), strict=True)
    assert not res.identical and res.exit_code == 1


def test_progress_reaches_100(tmp_path):
    from vdtool.core.progress import Progress

    a = tmp_path / "a.img"
    a.write_bytes(b"\1" * (3 * MiB))
    seen = []
    ops.compare(str(a), str(a), progress=Progress(lambda pct, done, total: seen.append(pct)))
    assert seen and seen[-1] == 100.0 and seen == sorted(seen)


def test_64_tib_empty_images_are_fast(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    ops.create(str(a), 64 << 40)
    ops.create(str(b), 64 << 40)
    ops.compare(str(a), str(b))  # imports
    t = time.perf_counter()
    assert ops.compare(str(a), str(b)).identical
    assert ops.compare(str(a), str(b), strict=True).identical
    assert time.perf_counter() - t < 1.0


def test_hostile_image_is_an_error_exit_2(tmp_path):
    import struct

    a = tmp_path / "a.qcow2"
    ops.create(str(a), 4 * MiB)
    import vdtool

    with vdtool.open(str(a), writable=True) as d:
        d.write(0, b"\1" * 4096)
    with open(a, "rb") as f:
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
    with open(a, "r+b") as f:
        f.seek(l1)
        f.write(struct.pack(">Q", 0x8000_0000_0000_0000 | (1 << 50)))
    b = tmp_path / "b.img"
    b.write_bytes(bytes(4 * MiB))
    r = cli("compare", a, b, expect=2)
    assert r.stderr.startswith("vdtool: error: ") and len(r.stderr.splitlines()) == 1


@pytest.mark.interop
def test_strict_mode_end_of_disk_flag(tmp_path):
    """QEMU flags the block-status answer that reaches the end of the disk;
    drivers answering an L2 table, a grain or a block at a time flag only
    their last piece, so strict mode finds empty images of different
    formats or cluster sizes different there (vdtool says the same)."""
    make(tmp_path, "a.qcow2", "qcow2", "1G")
    make(tmp_path, "b.qcow2", "qcow2", "1G")
    make(tmp_path, "c.qcow2", "qcow2", "1G", opts="cluster_size=4k")
    make(tmp_path, "d.vmdk", "vmdk", "1G")
    make(tmp_path, "e.vdi", "vdi", "1G")
    make(tmp_path, "f.raw", "raw", "1G")
    for x, y in (("a.qcow2", "b.qcow2"), ("a.qcow2", "c.qcow2"), ("a.qcow2", "d.vmdk"), ("d.vmdk", "e.vdi"),
                 ("e.vdi", "f.raw"), ("c.qcow2", "d.vmdk")):
        judge(tmp_path, "-s", x, y)
        assert judge(tmp_path, x, y).returncode == 0

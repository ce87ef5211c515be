"""VDI backend: interop with qemu-img/qemu-io, differencing chains found by
UUID, ops, check/repair, hostile headers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid as uuidlib

import pytest

import peers
from helpers import poke, read_all
from vdrun import cli
from vdtool.core import ops
from vdtool.core.errors import ChainError, CorruptImageError, VdError
from vdtool.core.stack import open_image
from vdtool.formats.vdi.backend import VdiBackend
from vdtool.formats.vdi.layout import HEADER1PLUS

M = 1 << 20


def write(path, offset, data, **kw):
    with open_image(str(path), writable=True, **kw) as s:
        s.write(offset, data)


def header(path) -> dict:
    raw = open(path, "rb").read(72 + 400)
    names = ("cbHeader u32Type fFlags szComment offBlocks offData cyl heads secs cbSector dummy cbDisk cbBlock "
             "cbBlockExtra cBlocks cBlocksAllocated uuidCreate uuidModify uuidLinkage uuidParentModify "
             "lc lh ls lcb").split()
    d = dict(zip(names, HEADER1PLUS.unpack(raw, 72).values()))
    d["text"], d["sig"], d["ver"] = raw[:64], *struct.unpack_from("<II", raw, 64)
    return d


# -- qemu-img's images read exactly -------------------------------------------------------------

@pytest.mark.parametrize("size,static", [("10.5M", False), ("3M", True), ("64M", False), ("7680K", True),
                                         ("1M", False)])
def test_reads_qemu_images(tmp_path, size, static):
    p = tmp_path / "q.vdi"
    peers.qemu_img("create", "-q", "-f", "vdi", *(["-o", "static=on"] if static else []), p, size)
    total = peers.qemu_info(p)["virtual-size"]
    peers.qemu_io(p, "write -P 0x5a 0 4096", f"write -P 0x33 {total - 70000} 70000",
                  f"write -P 0x71 {total // 2 - 300} 1000", fmt="vdi")
    peers.qemu_to_raw(p, tmp_path / "q.raw")
    assert read_all(p) == open(tmp_path / "q.raw", "rb").read()
    with VdiBackend.open(str(p)) as b:
        assert b.variant == ("fixed" if static else "dynamic")
        assert b.uuid == peers.qemu_info(p).get("format-specific", {}).get("data", {}).get("uuid", b.uuid)
    r = cli("convert", p, tmp_path / "v.raw")
    assert r.returncode == 0, r.stderr
    peers.assert_qemu_compare(tmp_path / "q.raw", tmp_path / "v.raw", "raw", "raw")


def test_reads_qemu_convert_s0(tmp_path):
    src = tmp_path / "s.raw"
    peers.qemu_img("create", "-q", "-f", "raw", src, "6M")
    peers.qemu_io(src, "write -P 0x44 1M 1M", fmt="raw")
    peers.qemu_img("convert", "-S", "0", "-O", "vdi", src, tmp_path / "full.vdi")
    assert read_all(tmp_path / "full.vdi") == open(src, "rb").read()


# -- vdtool's images as VirtualBox writes them, judged by qemu-img -------------------------------

@pytest.mark.parametrize("variant", ["dynamic", "fixed"])
def test_created_images_pass_qemu(tmp_path, variant):
    p = tmp_path / "n.vdi"
    ops.create(str(p), 10 * M + 512 * 3, variant=variant, comment="a comment")
    h = header(p)
    assert h["text"].rstrip(b"\0") == b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    assert (h["sig"], h["ver"], h["cbHeader"]) == (0xBEDA107F, 0x00010001, 400)
    assert h["u32Type"] == (1 if variant == "dynamic" else 2)
    assert h["offBlocks"] == M and h["offData"] % M == 0 and h["cbBlock"] == M and h["cbBlockExtra"] == 0
    assert (h["cbSector"], h["lcb"]) == (512, 512)
    assert h["uuidLinkage"] == bytes(16) and h["uuidModify"] != bytes(16)
    assert h["szComment"].rstrip(b"\0") == b"a comment"
    if variant == "fixed":
        assert h["cBlocksAllocated"] == h["cBlocks"] == 11
        assert os.path.getsize(p) == h["offData"] + 11 * M
    write(p, 3 * M - 10, b"\x77" * (2 * M))
    write(p, 10 * M, b"\x01" * 1536)
    peers.assert_qemu_check_clean(p)
    raw = tmp_path / "e.raw"
    peers.qemu_to_raw(p, raw)
    expect = bytearray(10 * M + 1536)
    expect[3 * M - 10:5 * M - 10] = b"\x77" * (2 * M)
    expect[10 * M:] = b"\x01" * 1536
    assert open(raw, "rb").read() == bytes(expect)
    info = json.loads(cli("info", "--output", "json", p).stdout)
    assert info["format-specific"]["data"]["comment"] == "a comment"
    assert info["variant"] == variant


@pytest.mark.parametrize("variant", ["dynamic", "fixed"])
def test_convert_both_ways(tmp_path, variant):
    q = tmp_path / "src.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", q, "20M")
    peers.qemu_io(q, "write -P 0x10 0 3M", "write -P 0x20 9M 100K", "write -z 12M 1M", fmt="qcow2")
    d = tmp_path / "d.vdi"
    r = cli("convert", "-O", "vdi", "--variant", variant, q, d)
    assert r.returncode == 0, r.stderr
    peers.assert_qemu_check_clean(d)
    peers.assert_qemu_compare(q, d)
    if variant == "fixed":
        assert header(d)["cBlocksAllocated"] == 20
    back = tmp_path / "back.qcow2"
    assert cli("convert", d, back).returncode == 0
    peers.assert_qemu_compare(q, back)


# -- differencing chains ------------------------------------------------------------------------

def make_chain(tmp_path, folder2=None):
    a = tmp_path / "vm"
    a.mkdir(exist_ok=True)
    base = a / "base.vdi"
    ops.create(str(base), 8 * M)
    write(base, 0, b"\x11" * (3 * M))
    write(base, 5 * M + 100, b"\x12" * 5000)
    snap1 = (folder2 or a) / "snap1.vdi"
    ops.create(str(snap1), parent=str(base))
    ps = dict(parent_search=[str(a)])
    write(snap1, M, b"\x21" * M, **ps)
    write(snap1, 3 * M + 7, b"\x22" * 100, **ps)
    with open_image(str(snap1), writable=True, **ps) as s:
        s.discard(0, M)
    snap2 = (folder2 or a) / "snap2.vdi"
    ops.create(str(snap2), parent=str(snap1), parent_search=[str(a)])
    write(snap2, 6 * M, b"\x31" * (M + 10), **ps)
    write(snap2, 5 * M + 1000, b"\x32" * 10, **ps)
    expect = bytearray(8 * M)
    expect[M:2 * M] = b"\x21" * M
    expect[2 * M:3 * M] = b"\x11" * M
    expect[3 * M + 7:3 * M + 107] = b"\x22" * 100
    expect[5 * M + 100:5 * M + 5100] = b"\x12" * 5000
    expect[5 * M + 1000:5 * M + 1010] = b"\x32" * 10
    expect[6 * M:7 * M + 10] = b"\x31" * (M + 10)
    return base, snap1, snap2, bytes(expect)


def test_chain_flatten_and_found_from_elsewhere(tmp_path):
    base, snap1, snap2, expect = make_chain(tmp_path)
    assert header(snap2)["u32Type"] == 4
    assert header(snap2)["uuidLinkage"] == header(snap1)["uuidCreate"]
    assert header(snap2)["uuidParentModify"] == header(snap1)["uuidModify"]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = cli("convert", snap2, tmp_path / "flat.raw", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert open(tmp_path / "flat.raw", "rb").read() == expect
    with open_image(str(snap2)) as s:
        assert [os.path.basename(x.path) for x in s.layers] == ["base.vdi", "snap1.vdi", "snap2.vdi"]
    out = cli("info", "--chain", snap2, cwd=elsewhere).stdout
    assert "parent found at:" in out and str(snap1) in out


def test_chain_via_vbox_registry_and_parent_search(tmp_path):
    other = tmp_path / "elsewhere" / "deep"
    other.mkdir(parents=True)
    base, snap1, snap2, expect = make_chain(tmp_path, folder2=other)
    # snap1 lives two folders away from base: not found without help
    r = cli("info", snap1)
    assert r.returncode == 0 and "NOT FOUND" in r.stdout and "not found" in r.stdout
    r = cli("convert", snap2, tmp_path / "x.raw")
    assert r.returncode == 1 and "UUID" in r.stderr and "Traceback" not in r.stderr
    r = cli("convert", "--parent-search", base.parent, snap2, tmp_path / "x.raw")
    assert r.returncode == 0, r.stderr
    assert open(tmp_path / "x.raw", "rb").read() == expect
    u = {p: str(uuidlib.UUID(bytes_le=header(p)["uuidCreate"])) for p in (base, snap1, snap2)}
    (other / "vm.vbox").write_text(f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
 <Machine uuid="{{{uuidlib.uuid4()}}}" name="vm"><MediaRegistry><HardDisks>
  <HardDisk uuid="{{{u[base]}}}" location="../../vm/base.vdi" format="VDI" type="Normal">
   <HardDisk uuid="{{{u[snap1]}}}" location="snap1.vdi" format="VDI">
    <HardDisk uuid="{{{u[snap2]}}}" location="snap2.vdi" format="VDI"/>
   </HardDisk>
  </HardDisk>
 </HardDisks></MediaRegistry></Machine></VirtualBox>
""")
    r = cli("convert", snap2, tmp_path / "y.raw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert open(tmp_path / "y.raw", "rb").read() == expect


def test_modification_uuid_mismatch(tmp_path):
    base, snap1, snap2, expect = make_chain(tmp_path)
    m1 = header(snap1)["uuidModify"]
    write(snap1, 0, b"\x99" * 512)  # a write session renews it, as VirtualBox does
    m2 = header(snap1)["uuidModify"]
    assert m1 != m2 and m2 != bytes(16)
    with pytest.raises(ChainError) as ei:
        open_image(str(snap2))
    msg = str(ei.value)
    assert str(uuidlib.UUID(bytes_le=m1)) in msg and str(uuidlib.UUID(bytes_le=m2)) in msg
    r = cli("info", snap2)
    assert r.returncode == 0
    with open_image(str(snap2), force=True) as s:
        assert s.read(0, 512) == b"\x99" * 512
    # reading never changes it
    read_all(snap1)
    assert header(snap1)["uuidModify"] == m2


@pytest.mark.parametrize("into", ["parent", "child"])
def test_merge_both_ways(tmp_path, into):
    base, snap1, snap2, expect = make_chain(tmp_path)
    ops.merge(str(snap2), into=into, **({"base": str(snap1)} if into == "child" else {}))
    if into == "parent":
        assert not snap2.exists()
        assert read_all(snap1) == expect
        ops.merge(str(snap1), into="parent")
        assert read_all(base) == expect
        peers.assert_qemu_check_clean(base)
    else:
        assert read_all(snap2) == expect
        assert header(snap2)["uuidLinkage"] == header(base)["uuidCreate"]
        ops.merge(str(snap2), into="child")
        assert header(snap2)["u32Type"] == 1 and header(snap2)["uuidLinkage"] == bytes(16)
        with open_image(str(snap2)) as s:
            assert len(s.layers) == 1
        assert read_all(snap2) == expect
        peers.assert_qemu_check_clean(snap2)
        raw = tmp_path / "m.raw"
        peers.qemu_to_raw(snap2, raw)
        assert open(raw, "rb").read() == expect


def test_mixed_chain_qcow2_parent(tmp_path):
    q = tmp_path / "base.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", q, "4M")
    peers.qemu_io(q, "write -P 0x61 0 4M", fmt="qcow2")
    child = tmp_path / "child.vdi"
    ops.create(str(child), parent=str(q))
    write(child, M, b"\x62" * 1000)
    data = read_all(child)
    assert data[:M] == b"\x61" * M and data[M:M + 1000] == b"\x62" * 1000
    assert data[M + 1000:] == b"\x61" * (3 * M - 1000)
    ops.merge(str(child), into="parent")
    assert peers.qemu_to_raw(q, tmp_path / "o.raw") is None
    assert open(tmp_path / "o.raw", "rb").read() == data
    # a qcow2 overlay over a VDI base
    vb = tmp_path / "vb.vdi"
    ops.create(str(vb), 2 * M)
    write(vb, 0, b"\x71" * M)
    top = tmp_path / "top.qcow2"
    ops.create(str(top), parent=str(vb))
    write(top, M, b"\x72" * M)
    assert read_all(top) == b"\x71" * M + b"\x72" * M


def test_convert_with_parent_and_rebase(tmp_path):
    base, snap1, snap2, expect = make_chain(tmp_path)
    flat = tmp_path / "flat.qcow2"
    assert cli("convert", snap2, flat).returncode == 0
    d = tmp_path / "vm" / "delta.vdi"
    r = cli("convert", "-O", "vdi", "--parent", base, flat, d)
    assert r.returncode == 0, r.stderr
    assert read_all(d) == expect
    with VdiBackend.open(str(d)) as b:
        assert b.parent.uuid == VdiBackend.open(str(base)).uuid
    ops.rebase(str(d), None)
    assert read_all(d) == expect
    peers.assert_qemu_compare(flat, d)


# -- compact, discard, resize, check ----------------------------------------------------------

def test_compact_releases_zero_blocks(tmp_path):
    src = tmp_path / "s.raw"
    peers.qemu_img("create", "-q", "-f", "raw", src, "12M")
    peers.qemu_io(src, "write -P 0x44 1M 1M", "write -P 0x45 9M 4K", fmt="raw")
    p = tmp_path / "full.vdi"
    peers.qemu_img("convert", "-S", "0", "-O", "vdi", src, p)
    before = os.path.getsize(p)
    r = cli("compact", p)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(p) < before
    assert header(p)["cBlocksAllocated"] == 2
    peers.assert_qemu_check_clean(p)
    peers.assert_qemu_compare(src, p)


def test_compact_differencing_keeps_zeros_over_parent(tmp_path):
    base = tmp_path / "base.vdi"
    ops.create(str(base), 4 * M)
    write(base, 0, b"\x55" * (4 * M))
    child = tmp_path / "child.vdi"
    ops.create(str(child), parent=str(base))
    write(child, 0, bytes(M))  # zeros over parent data: must stay zeros
    write(child, M, b"\x66" * M)
    write(child, 2 * M, b"\x55" * 10 + bytes(M - 10))
    with VdiBackend.open(str(child), writable=True) as b:  # allocate a zero block standalone too
        b.write(3 * M, bytes(M))
    ops.compact(str(child))
    data = read_all(child)
    assert data[:M] == bytes(M)
    assert data[M:2 * M] == b"\x66" * M
    assert data[3 * M:] == bytes(M)
    with VdiBackend.open(str(child)) as b:
        assert b.state.map.mv[0] == 0xFFFFFFFE  # the ZERO marker
        assert b.state.hdr.cBlocksAllocated == 2
    assert os.path.getsize(child) == header(child)["offData"] + 2 * M


def test_discard(tmp_path):
    p = tmp_path / "d.vdi"
    ops.create(str(p), 8 * M)
    write(p, 0, b"\x01" * (8 * M))
    r = cli("discard", p, "1M:2M", "5000:100", "7M:1M")
    assert r.returncode == 0, r.stderr
    expect = bytearray(b"\x01" * (8 * M))
    expect[M:3 * M] = bytes(2 * M)
    expect[5000:5100] = bytes(100)
    expect[7 * M:] = bytes(M)
    assert read_all(p) == bytes(expect)
    assert header(p)["cBlocksAllocated"] == 5
    assert os.path.getsize(p) == header(p)["offData"] + 5 * M
    peers.assert_qemu_check_clean(p)
    raw = tmp_path / "d.raw"
    peers.qemu_to_raw(p, raw)
    assert open(raw, "rb").read() == bytes(expect)
    # in a differencing image a discarded range reads zeros, not the parent
    c = tmp_path / "c.vdi"
    ops.create(str(c), parent=str(p))
    assert cli("discard", c, "0:1M", "4M:100").returncode == 0
    d = read_all(c)
    assert d[:M] == bytes(M) and d[4 * M:4 * M + 100] == bytes(100) and d[4 * M + 100:5 * M] == b"\x01" * (M - 100)


def test_resize_grow_relocates_and_shrink(tmp_path):
    p = tmp_path / "r.vdi"
    peers.qemu_img("create", "-q", "-f", "vdi", p, "100M")  # qemu leaves room for 128 map entries only
    peers.qemu_io(p, "write -P 0x41 0 1M", "write -P 0x42 50M 2M", "write -P 0x43 99M 1M", fmt="vdi")
    peers.qemu_to_raw(p, tmp_path / "before.raw")
    r = cli("resize", p, "300M")
    assert r.returncode == 0, r.stderr
    h = header(p)
    assert h["cBlocks"] == 300 and h["offData"] >= h["offBlocks"] + 1200
    peers.assert_qemu_check_clean(p)
    peers.qemu_to_raw(p, tmp_path / "after.raw")
    after = open(tmp_path / "after.raw", "rb").read()
    assert after[:100 * M] == open(tmp_path / "before.raw", "rb").read()
    assert after[100 * M:] == bytes(200 * M)
    write(p, 250 * M, b"\x44" * 4096)
    peers.assert_qemu_check_clean(p)
    r = cli("resize", p, "60M")
    assert r.returncode == 2
    r = cli("resize", "--shrink", p, str(50 * M + 512 * 1024))
    assert r.returncode == 0, r.stderr
    h = header(p)
    assert h["cBlocks"] == 51 and h["cbDisk"] == 50 * M + 512 * 1024 and h["cBlocksAllocated"] == 2
    peers.assert_qemu_check_clean(p)
    data = read_all(p)
    assert data[:M] == b"\x41" * M and data[50 * M:] == b"\x42" * (512 * 1024)
    ops.resize(str(p), 52 * M)  # the cut part of the last block reads as zeros again
    assert read_all(p)[50 * M + 512 * 1024:] == bytes(M + 512 * 1024)
    peers.assert_qemu_check_clean(p)


def test_resize_fixed(tmp_path):
    p = tmp_path / "f.vdi"
    ops.create(str(p), 4 * M, variant="fixed")
    write(p, 3 * M, b"\x09" * M)
    ops.resize(str(p), 6 * M)
    h = header(p)
    assert h["cBlocks"] == h["cBlocksAllocated"] == 6
    assert read_all(p) == bytes(3 * M) + b"\x09" * M + bytes(2 * M)
    peers.assert_qemu_check_clean(p)
    ops.resize(str(p), 2 * M, shrink=True)
    assert header(p)["cBlocksAllocated"] == 2 and os.path.getsize(p) == h["offData"] + 2 * M
    peers.assert_qemu_check_clean(p)


def _entries(p):
    h = header(p)
    with open(p, "rb") as f:
        f.seek(h["offBlocks"])
        return h, list(struct.unpack(f"<{h['cBlocks']}I", f.read(4 * h["cBlocks"])))


def _set_entry(p, i, v):
    poke(p, header(p)["offBlocks"] + 4 * i, "<I", v)


def test_check_and_repair(tmp_path):
    p = tmp_path / "c.vdi"
    ops.create(str(p), 8 * M)
    for i in range(4):
        write(p, i * M, bytes([i + 1]) * M)
    r = cli("check", "--output", "json", p)
    assert r.returncode == 0, r.stdout + r.stderr
    # leak: a block nobody points at
    _set_entry(p, 3, 0xFFFFFFFF)
    r = cli("check", p)
    assert r.returncode == 3
    assert peers.qemu_check(p)["_exit"] != 0  # qemu-img agrees something is wrong
    r = cli("check", "-r", "leaks", p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert header(p)["cBlocksAllocated"] == 3
    peers.assert_qemu_check_clean(p)
    # duplicate and past-the-count entries
    _set_entry(p, 5, 1)
    _set_entry(p, 6, 7)
    poke(p, 72 + 4 + 4 + 4 + 256 + 4 + 4 + 16 + 4 + 8 + 4 + 4 + 4, "<I", 3)
    os.truncate(p, header(p)["offData"] + 8 * M)
    with pytest.raises(CorruptImageError):
        write(p, 0, b"x")
    r = cli("check", "--output", "json", p)
    assert r.returncode == 2
    assert json.loads(r.stdout)["corruptions"] == 2
    before = read_all(p)
    r = cli("check", "-r", "all", p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_all(p) == before
    peers.assert_qemu_check_clean(p)
    write(p, 7 * M, b"z" * 10)
    peers.assert_qemu_check_clean(p)
    # past the end of the file: refused by a normal open, reported and repaired by check
    _set_entry(p, 2, 1000)
    with pytest.raises(CorruptImageError):
        read_all(p)
    assert cli("check", p).returncode == 2
    assert cli("check", "-r", "all", p).returncode == 0
    assert read_all(p)[2 * M:3 * M] == bytes(M)
    peers.assert_qemu_check_clean(p)


# -- hostile headers ----------------------------------------------------------------------------

H = 72  # header start
OFF = {"cbHeader": H, "u32Type": H + 4, "fFlags": H + 8, "offBlocks": H + 268, "offData": H + 272,
       "cbSector": H + 288, "cbDisk": H + 296, "cbBlock": H + 304, "cbBlockExtra": H + 308, "cBlocks": H + 312,
       "cBlocksAllocated": H + 316, "uuidCreate": H + 320, "uuidModify": H + 336, "lcb": H + 396}

HOSTILE = [
    ("signature", 64, "<I", 0x12345678, "signature"),
    ("version", 68, "<I", 0x00030001, "version"),
    ("header size small", OFF["cbHeader"], "<I", 100, "header size"),
    ("header size beyond map", OFF["cbHeader"], "<I", 2 * M, "header size"),
    ("image type", OFF["u32Type"], "<I", 9, "image type"),
    ("flags", OFF["fFlags"], "<I", 0x80, "flags"),
    ("map unaligned", OFF["offBlocks"], "<I", M + 3, "not a multiple"),
    ("map inside header", OFF["offBlocks"], "<I", 0, "inside the header"),
    ("map past eof", OFF["offBlocks"], "<I", 0xFFFFFE00, "past the end"),
    ("data unaligned", OFF["offData"], "<I", 2 * M + 1, "not a multiple"),
    ("data inside map", OFF["offData"], "<I", M, "inside the block map"),
    ("data past eof", OFF["offData"], "<I", 0xFFFFFE00, "past the end"),
    ("sector size", OFF["cbSector"], "<I", 4096, "sector size"),
    ("lchs sector size", OFF["lcb"], "<I", 0, "sector size"),
    ("disk beyond blocks", OFF["cbDisk"], "<Q", 9 * M, "disk size"),
    ("disk above 2^56", OFF["cbDisk"], "<Q", 1 << 60, "disk size"),
    ("block size 0", OFF["cbBlock"], "<I", 0, "block size 0"),
    ("block size 3000", OFF["cbBlock"], "<I", 3000, "block size 3000"),
    ("block extra", OFF["cbBlockExtra"], "<I", 3, "extra block size"),
    ("block count vs file", OFF["cBlocks"], "<I", 0xFFFFFFFF, "block"),
    ("allocated above count", OFF["cBlocksAllocated"], "<I", 100, "allocated block count"),
    ("null uuid", OFF["uuidCreate"], "<16s", bytes(16), "UUID"),
    ("null modification uuid", OFF["uuidModify"], "<16s", bytes(16), "UUID"),
    ("map entry past eof", M + 4, "<I", 123456, "past the end of the file"),
    ("short file", None, None, None, "too small"),
]


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("h") / "good.vdi"
    ops.create(str(p), 8 * M)
    write(p, 0, b"\x01" * (2 * M))
    return p


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_headers(tmp_path, good_image, case):
    name, off, fmt, value, words = case
    p = tmp_path / "bad.vdi"
    shutil.copy(good_image, p)
    if off is None:
        os.truncate(p, 300)
    else:
        poke(p, off, fmt, value)
    with pytest.raises(VdError) as ei:
        with open_image(str(p), "vdi") as s:
            s.read(0, s.virtual_size)
    assert words.lower() in str(ei.value).lower(), str(ei.value)
    r = cli("convert", "-f", "vdi", p, tmp_path / "out.raw")
    assert r.returncode == 1 and r.stderr.startswith("vdtool: error: ") and str(p) in r.stderr
    assert "Traceback" not in r.stderr


def test_old_v0_header(tmp_path):
    """A hand-made VDI 0.2 (header version 0) image."""
    bs, blocks = M, 3
    pre = struct.pack("<64sII", b"<<< InnoTek VirtualBox Disk Image >>>\n", 0xBEDA107F, 2)
    hdr = struct.pack("<II256sIIIIQIII16s16s16s", 1, 0, b"old", 0, 0, 0, 512, 3 * M, bs, blocks, 1,
                      uuidlib.uuid4().bytes_le, uuidlib.uuid4().bytes_le, bytes(16))
    bmap = struct.pack("<3I", 0xFFFFFFFF, 0, 0xFFFFFFFE)
    p = tmp_path / "v0.vdi"
    p.write_bytes(pre + hdr + bmap + b"\x5e" * bs)
    assert read_all(p) == bytes(M) + b"\x5e" * M + bytes(M)
    write(p, 2 * M + 5, b"\x01")
    assert read_all(p)[2 * M + 5] == 1
    with VdiBackend.open(str(p)) as b:
        assert b.info()["version"] == "0.2" and b.info()["comment"] == "old"

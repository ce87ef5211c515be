"""QCOW (version 1) backend: images qemu-img and qemu-io write (plain, over a
backing file, compressed) read byte-exactly, tapdisk's layout (extended
header, little-endian L1 table, preallocated clusters) built from its
source's description reads and is written as tapdisk expects; what vdtool
writes reads the same in qemu-img compare (QEMU has no check for qcow);
resize (grow), compact, check, encrypted and hostile images, --untrusted."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

import peers
import tablemodel
from helpers import peek, poke, read_all
from vdrun import cli, run_vdtool
from vdtool.core import ops
from vdtool.core.bytesutil import align_up
from vdtool.core.stack import open_image
from vdtool.formats.qcow.backend import QcowBackend
from vdtool.formats.qcow.layout import (EXTHDR_L1_BIG_ENDIAN, HEADER, XEN_HEADER, XEN_HEADER_OFFSET, XEN_MAGIC,
                                        l1_checksum)

K, M = 1 << 10, 1 << 20


def qcow(tmp_path, name, size="8M", *writes, backing=None):
    return peers.qemu_make(tmp_path, name, "qcow", size, *writes, backing=backing,
                           backing_fmt="qcow" if backing and backing.endswith(".qcow") else "raw")


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- qemu-img's images read exactly ---------------------------------------------------------------

def test_reads_qemu_images(tmp_path):
    p = qcow(tmp_path, "q.qcow", "20M", "write -P 0x5a 0 100k", "write -P 0x33 12345k 300k",
             "write -P 0x71 20476k 4k")
    assert read_all(p) == peers.qemu_raw(p, tmp_path)
    b = qcow(tmp_path, "t.qcow", None, "write -P 0x22 1000 3000", "write -P 0x23 7M 100k", backing="q.qcow")
    assert peek(b, HEADER.offset_of("cluster_bits"), "B") == 9  # QEMU's choice over a backing file
    assert read_all(b) == peers.qemu_raw(b, tmp_path)


def test_reads_qemu_compressed(tmp_path):
    raw = tmp_path / "s.raw"
    data = bytearray(6 * M)
    data[100 * K:900 * K] = b"compressible " * (800 * K // 13) + b"c" * (800 * K % 13)
    data[3 * M:3 * M + 64 * K] = pattern(1, 64 * K)  # incompressible: stored plain
    raw.write_bytes(data)
    # qemu-img 7.2 writes the image but exits 1 (its qcow driver cannot write zeros compressed)
    peers.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow", raw, tmp_path / "c.qcow", check=False)
    assert read_all(tmp_path / "c.qcow") == bytes(data)
    r = json.loads(cli("check", "--output", "json", tmp_path / "c.qcow").stdout)
    assert r["compressed-clusters"] > 0 and r["corruptions"] == 0


def test_info_matches_qemu(tmp_path):
    qcow(tmp_path, "b.qcow", "4M", "write -P 0x11 0 64k")
    for p in (tmp_path / "b.qcow", qcow(tmp_path, "t.qcow", None, backing="b.qcow")):
        want = peers.qemu_info(p)
        got = json.loads(cli("info", "--output", "json", p).stdout)
        for key, val in want.items():
            if key not in ("actual-size", "filename"):
                assert got.get(key) == val, (key, got, want)


# -- tapdisk's layout ------------------------------------------------------------------------------

def make_tapdisk(path, size: int, clusters: dict, *, little_l1: bool = True, prealloc: bool = False) -> bytes:
    """A qcow image laid out as tapdisk's qcow_create and its writes do:
    header, extended header ("XEN\\xfb"), the L1 table on a 4 KiB boundary
    (little-endian in old tapdisk images), 4 KiB clusters, one-cluster L2
    tables; ``prealloc``: each L2 table is followed by all its clusters
    (min_cluster_alloc = 512).  Returns the disk's content."""
    cbits, l2bits = 12, 9
    cs, per = 1 << cbits, 1 << l2bits
    n1 = -(-size // (cs * per))
    l1_off = 4096
    end = l1_off + align_up(n1 * 8, 4096)
    l1 = [0] * n1
    l2s: dict = {}
    body = bytearray(end)
    disk = bytearray(size)
    for ci in sorted(clusters):
        i, j = divmod(ci, per)
        if not l1[i]:
            l1[i] = end
            l2s[i] = [0] * per
            end += cs
            if prealloc:
                for k in range(per):
                    l2s[i][k] = end + k * cs
                end += per * cs
        if not l2s[i][j]:
            l2s[i][j] = end
            end += cs
        disk[ci * cs:(ci + 1) * cs] = clusters[ci]
    body.extend(bytes(end - len(body)))
    for ci, data in clusters.items():
        i, j = divmod(ci, per)
        body[l2s[i][j]:l2s[i][j] + cs] = data
    for i, t in l2s.items():
        body[l1[i]:l1[i] + cs] = struct.pack(f">{per}Q", *t)
    body[l1_off:l1_off + n1 * 8] = struct.pack(f"{'<' if little_l1 else '>'}{n1}Q", *l1)
    body[0:HEADER.size] = HEADER.pack(magic=0x514649FB, version=1, size=size, cluster_bits=cbits, l2_bits=l2bits,
                                      l1_table_offset=l1_off)
    body[XEN_HEADER_OFFSET:XEN_HEADER_OFFSET + XEN_HEADER.size] = XEN_HEADER.pack(
        xmagic=XEN_MAGIC, cksum=l1_checksum(struct.pack(f">{n1}Q", *l1)), min_cluster_alloc=per if prealloc else 1,
        flags=0 if little_l1 else EXTHDR_L1_BIG_ENDIAN)
    path.write_bytes(bytes(body))
    return bytes(disk)


@pytest.mark.parametrize("little,prealloc", [(True, False), (False, False), (True, True)])
def test_tapdisk_images_read_and_write(tmp_path, little, prealloc):
    p = tmp_path / "td.qcow"
    clusters = {0: pattern(1, 4096), 7: b"\x42" * 4096, 600: pattern(2, 4096), 1500: b"\x01" * 4096}
    want = bytearray(make_tapdisk(p, 8 * M, clusters, little_l1=little, prealloc=prealloc))
    assert read_all(p) == want
    with open_image(str(p), writable=True) as s:
        s.write(7 * M + 10, b"\x77" * 9000)  # a new L2 table: the L1 table changes
        s.write(7 * 4096 + 100, b"\x78" * 100)
    want[7 * M + 10:7 * M + 9010] = b"\x77" * 9000
    want[7 * 4096 + 100:7 * 4096 + 200] = b"\x78" * 100
    assert read_all(p) == want
    # as tapdisk leaves it: L1 big-endian with its flag, the checksum right, no preallocation promised
    xen = XEN_HEADER.unpack(open(p, "rb").read(64), XEN_HEADER_OFFSET)
    assert xen.flags & EXTHDR_L1_BIG_ENDIAN and xen.min_cluster_alloc == 1
    raw_l1 = open(p, "rb").read()[4096:4096 + 8 * 4]
    assert xen.cksum == l1_checksum(raw_l1)
    (tmp_path / "want.raw").write_bytes(want)
    peers.assert_qemu_compare(tmp_path / "want.raw", p, "raw", "qcow")


# -- vdtool's images judged by qemu-img -----------------------------------------------------------

@pytest.mark.parametrize("block", [None, "512", "64K"])
def test_created_images_read_the_same_in_qemu(tmp_path, block):
    p = tmp_path / "n.qcow"
    assert cli("create", "-f", "qcow", *(["--block-size", block] if block else []), p, "30M").returncode == 0
    ref = bytearray(30 * M)
    rng = random.Random(5)
    with open_image(str(p), writable=True) as s:
        for _ in range(30):
            off, n = rng.randrange(30 * M - 200 * K), rng.randrange(1, 200 * K)
            data = pattern(off, n)
            s.write(off, data)
            ref[off:off + n] = data
        s.write_zeroes(3 * M, 2 * M)
        ref[3 * M:5 * M] = bytes(2 * M)
    (tmp_path / "ref.raw").write_bytes(ref)
    peers.assert_qemu_compare(tmp_path / "ref.raw", p, "raw", "qcow")
    assert read_all(p) == bytes(ref)
    assert cli("check", p).returncode == 0


def test_convert_compressed_and_rewrite_a_compressed_cluster(tmp_path):
    src = tmp_path / "s.raw"
    data = bytearray(4 * M)
    data[0:2 * M] = b"abcdefgh" * (2 * M // 8)
    data[3 * M:3 * M + 8 * K] = pattern(3, 8 * K)
    src.write_bytes(data)
    assert cli("convert", "-c", "-O", "qcow", src, tmp_path / "c.qcow").returncode == 0
    assert os.path.getsize(tmp_path / "c.qcow") < M
    peers.assert_qemu_compare(src, tmp_path / "c.qcow", "raw", "qcow")
    with open_image(str(tmp_path / "c.qcow"), writable=True) as s:
        s.write(4096 + 10, b"\xee" * 20)  # into a compressed cluster: it is inflated and stored plain
    data[4096 + 10:4096 + 30] = b"\xee" * 20
    src.write_bytes(data)
    peers.assert_qemu_compare(src, tmp_path / "c.qcow", "raw", "qcow")
    r = json.loads(cli("check", "--output", "json", tmp_path / "c.qcow").stdout)
    assert r["corruptions"] == 0 and r["compressed-clusters"] > 100


def test_overlay_copy_on_write(tmp_path):
    qcow(tmp_path, "b.qcow", "2M", "write -P 0x11 0 2M")
    t = tmp_path / "t.qcow"
    assert cli("create", "-f", "qcow", "-b", tmp_path / "b.qcow", "-F", "qcow", t).returncode == 0
    assert peers.qemu_info(t)["backing-filename"] == "b.qcow"
    with open_image(str(t), writable=True) as s:
        s.write(70000, b"\x99" * 1000)
        s.write_zeroes(1 * M, 100)
    peers.qemu_io(t, "read -P 0x11 0 70000", "read -P 0x99 70000 1000", "read -P 0x11 71000 10000",
                  "read -P 0 1M 100", "read -P 0x11 1048676 412", fmt="qcow")
    assert read_all(t) == peers.qemu_raw(t, tmp_path)


@pytest.mark.parametrize("new", ["10752K", "3G"])  # L1 grows in its padding; L1 moves to the end
def test_resize_grow(tmp_path, new):
    p = qcow(tmp_path, "q.qcow", "10M", "write -P 0x55 0 1M", "write -P 0x55 9M 1M")
    r = cli("resize", p, new)
    assert r.returncode == 0, r.stderr
    info = peers.qemu_info(p)
    assert info["virtual-size"] == (10752 * K if new == "10752K" else 3 << 30)
    peers.qemu_io(p, "read -P 0x55 0 1M", "read -P 0x55 9M 1M", "read -P 0 10M 512k", fmt="qcow")
    with open_image(str(p), writable=True) as s:
        s.write(s.virtual_size - 4096, b"\x12" * 4096)
    peers.qemu_io(p, f"read -P 0x12 {info['virtual-size'] - 4096} 4k", fmt="qcow")



def test_resize_shrink(tmp_path):
    p = qcow(tmp_path, "q.qcow", "4M", "write -P 0x55 0 4M")
    r = cli("resize", "--shrink", p, "3000K")
    assert r.returncode == 0, r.stderr
    assert peers.qemu_info(p)["virtual-size"] == 3000 * K
    assert cli("resize", p, "7M").returncode == 0
    peers.qemu_io(p, "read -P 0x55 0 3000k", "read -P 0 3000k 4168k", fmt="qcow")
    assert cli("check", p).returncode == 0


def test_compact_rewrites(tmp_path):
    p = qcow(tmp_path, "q.qcow", "4M", "write -P 0x55 0 2M", "write -P 0 512k 1M")
    want = peers.qemu_raw(p, tmp_path)
    before = os.path.getsize(p)
    r = cli("compact", p)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(p) <= before - M
    assert read_all(p) == want == peers.qemu_raw(p, tmp_path)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".q.qcow")]


# -- check, encrypted and hostile images ----------------------------------------------------------

def test_check_finds_and_repairs_bad_entries(tmp_path):
    p = qcow(tmp_path, "q.qcow", "4M", "write -P 1 0 64k")
    l1 = peek(p, HEADER.offset_of("l1_table_offset"), ">Q")
    l2 = peek(p, l1, ">Q")
    poke(p, l2 + 8, ">Q", 1 << 50)
    r = cli("check", p)
    assert r.returncode == 2 and "past the end" in r.stdout, r.stdout
    r = cli("convert", "-O", "raw", p, tmp_path / "o.raw")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert cli("check", "-r", "all", p).returncode == 0
    assert cli("check", p).returncode == 0
    peers.qemu_io(p, "read -P 1 0 4k", "read -P 0 4k 4k", "read -P 1 8k 56k", fmt="qcow")


def test_encrypted_image_refused(tmp_path):
    p = qcow(tmp_path, "q.qcow", "4M")
    poke(p, HEADER.offset_of("crypt_method"), ">I", 1)
    for args in (("info", p), ("convert", "-O", "raw", p, tmp_path / "o.raw"), ("check", p)):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "AES-encrypted" in lines[0], r.stderr


@pytest.mark.parametrize("field,value,words", [
    ("version", 7, "version 7"),
    ("cluster_bits", 30, "cluster_bits 30"),
    ("l2_bits", 2, "l2_bits 2"),
    ("crypt_method", 9, "encryption method 9"),
    ("size", 1 << 62, "disk size"),
    ("l1_table_offset", 1 << 40, "L1 table"),
    ("backing_file_offset", 1 << 40, "backing file name"),
    ("backing_file_size", 5000, "backing file name"),
])
def test_hostile_header(tmp_path, field, value, words):
    p = qcow(tmp_path, "q.qcow", "4M", "write -P 1 0 4k")
    if field == "backing_file_size":
        poke(p, HEADER.offset_of("backing_file_offset"), ">Q", 48)
    size = HEADER.sizes[field]
    poke(p, HEADER.offset_of(field), ">" + {1: "B", 4: "I", 8: "Q"}[size], value)
    r = cli("convert", "-f", "qcow", "-O", "raw", p, tmp_path / "o.raw")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("vdtool: error: "), r.stderr
    assert words in r.stderr, r.stderr


def test_untrusted_refuses_backing_file(tmp_path):
    d = tmp_path / "up"
    d.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"SECRET" * 1000)
    peers.qemu_img("create", "-q", "-f", "qcow", "-b", str(secret), "-F", "raw", d / "a.qcow")
    for args in (("info", "a.qcow"), ("convert", "-O", "raw", "a.qcow", "o.raw")):
        r = run_vdtool(d, args[0], "--untrusted", *args[1:], expect=1)
        assert "rule external-reference" in r.stderr and str(secret) in r.stderr, r.stderr
    assert not (d / "o.raw").exists()


def test_backend_facts(tmp_path):
    p = qcow(tmp_path, "q.qcow", "5M")
    with QcowBackend.open(str(p)) as b:
        assert (b.virtual_size, b.block_size, b.variant, b.parent) == (5 * M, 4096, "dynamic", None)


# -- model --------------------------------------------------------------------------------------------

class QcowModel(tablemodel.TableMachine):
    fmt = "qcow"


class QcowOverlayModel(tablemodel.TableMachine):
    fmt = "qcow"
    diff = True
    bs = 512


def test_model():
    tablemodel.run(QcowModel, 15)


def test_model_overlay():
    tablemodel.run(QcowOverlayModel, 10)


def test_measure_matches_convert(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(M) + b"\x01" * (3 * M) + bytes(M))
    m = ops.measure(str(src), fmt="qcow")
    ops.convert(str(src), str(tmp_path / "o.qcow"), fmt="qcow")
    assert 0 <= m["required"] - os.path.getsize(tmp_path / "o.qcow") <= 4096  # the source's count, rounded


def test_map_matches_qemu(tmp_path):
    p = qcow(tmp_path, "a.qcow", "4M", "write -P 1 0 100k", "write -P 2 3M 4k")
    want = json.loads(peers.qemu_img("map", "--output", "json", p).stdout)
    got = json.loads(cli("map", "--output", "json", p).stdout)
    assert [{k: v for k, v in e.items() if k != "compressed"} for e in got] == want

"""QED backend: images qemu-img and qemu-io write read byte-exactly; images
vdtool writes pass qemu-img check and read the same in qemu-img compare;
the need-check flag, check -r, shrink (which qemu-img refuses), compact,
chains mixing formats, hostile headers and --untrusted."""

from __future__ import annotations

import json
import os
import random

import pytest

import peers
import tablemodel
from helpers import peek, poke, read_all
from vdrun import cli, run_vdtool
from vdtool.core import ops
from vdtool.core.stack import open_image
from vdtool.formats.qed.backend import QedBackend
from vdtool.formats.qed.layout import HEADER, QED_F_NEED_CHECK

K, M = 1 << 10, 1 << 20


def qed(tmp_path, name, size="8M", *writes, opts=None, backing=None, backing_fmt=None):
    return peers.qemu_make(tmp_path, name, "qed", size, *writes, opts=opts, backing=backing,
                           backing_fmt=backing_fmt)


def features(p) -> int:
    return peek(p, HEADER.offset_of("features"), "<Q")


def write(path, offset, data, **kw):
    with open_image(str(path), writable=True, **kw) as s:
        s.write(offset, data)


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- qemu-img's images read exactly ---------------------------------------------------------------

@pytest.mark.parametrize("opts", [None, "cluster_size=4K,table_size=2", "cluster_size=1M,table_size=16"])
def test_reads_qemu_images(tmp_path, opts):
    p = qed(tmp_path, "q.qed", "20M", "write -P 0x5a 0 100k", "write -P 0x33 12345k 3000k",
            "write -z 4M 2M", "write -P 0x71 20476k 4k", opts=opts)
    assert read_all(p) == peers.qemu_raw(p, tmp_path)
    assert peers.qemu_check(p)["_exit"] == 0


def test_reads_qemu_overlays_and_zero_clusters(tmp_path):
    base = qed(tmp_path, "b.qed", "4M", "write -P 0x11 0 4M")
    top = qed(tmp_path, "t.qed", None, "write -P 0x22 64k 1k", "write -z 1M 128k", "write -z 2M 1k",
              backing="b.qed", backing_fmt="qed")
    assert read_all(top) == peers.qemu_raw(top, tmp_path)
    with open_image(str(top)) as s:
        assert s.top.parent.filename == "b.qed" and s.top.parent.format is None  # probed, as QEMU does
    raw = tmp_path / "r.raw"
    peers.qemu_to_raw(base, raw)
    over_raw = qed(tmp_path, "o.qed", None, "write -P 0x33 0 1k", backing="r.raw", backing_fmt="raw")
    assert features(over_raw) & 0x05 == 0x05  # backing file, raw (no probing)
    with open_image(str(over_raw)) as s:
        assert s.top.parent.format == "raw"
    assert read_all(over_raw) == peers.qemu_raw(over_raw, tmp_path)


def test_info_matches_qemu(tmp_path):
    base = qed(tmp_path, "b.qed", "4M", "write -P 0x11 0 64k")
    for p in (base, qed(tmp_path, "t.qed", None, backing="b.qed", backing_fmt="qed"),
              qed(tmp_path, "r.qed", None, backing="b.qed", backing_fmt="raw")):
        want = peers.qemu_info(p)
        got = json.loads(cli("info", "--output", "json", p).stdout)
        for key, val in want.items():
            if key not in ("actual-size", "filename"):
                assert got.get(key) == val, (key, got, want)
        assert "format-specific" not in got


# -- vdtool's images judged by qemu-img -----------------------------------------------------------

@pytest.mark.parametrize("block,table", [(None, None), ("4K", "2"), ("2M", "8")])
def test_created_images_pass_qemu(tmp_path, block, table):
    p = tmp_path / "n.qed"
    args = ["create", "-f", "qed", p, "30M"]
    if block:
        args[1:1] = ["--block-size", block]
    if table:
        args[1:1] = ["-o", f"table_size={table}"]
    assert cli(*args).returncode == 0
    info = peers.qemu_info(p)
    assert info["virtual-size"] == 30 * M and info["cluster-size"] == (int(block[:-1]) * (M if block[-1] == "M" else K)
                                                                       if block else 64 * K)
    ref = bytearray(30 * M)
    rng = random.Random(5)
    with open_image(str(p), writable=True) as s:
        for _ in range(40):
            off, n = rng.randrange(30 * M - 200 * K), rng.randrange(1, 200 * K)
            data = pattern(off, n)
            s.write(off, data)
            ref[off:off + n] = data
        s.write_zeroes(3 * M, 2 * M)
        ref[3 * M:5 * M] = bytes(2 * M)
    assert features(p) & QED_F_NEED_CHECK == 0
    peers.assert_qemu_check_clean(p)
    (tmp_path / "ref.raw").write_bytes(ref)
    peers.assert_qemu_compare(tmp_path / "ref.raw", p, "raw", "qed")
    assert read_all(p) == bytes(ref)


def test_table_size_1_refused_for_new_images(tmp_path):
    r = cli("create", "-f", "qed", "-o", "table_size=1", tmp_path / "n.qed", "1M")
    assert r.returncode == 2 and "QEMU cannot open" in r.stderr
    assert not (tmp_path / "n.qed").exists()


def test_convert_both_ways(tmp_path):
    src = qed(tmp_path, "q.qed", "9M", "write -P 0x5a 1M 3M", "write -P 0x7 8M 512")
    assert cli("convert", "-O", "qcow2", src, tmp_path / "a.qcow2").returncode == 0
    assert cli("convert", "-O", "qed", tmp_path / "a.qcow2", tmp_path / "b.qed").returncode == 0
    peers.assert_qemu_check_clean(tmp_path / "b.qed")
    peers.assert_qemu_compare(src, tmp_path / "b.qed", "qed", "qed", strict=True)


def test_overlay_writes_copy_on_write_and_zero_clusters(tmp_path):
    qed(tmp_path, "b.qed", "4M", "write -P 0x11 0 4M")
    assert cli("create", "-f", "qed", "-b", tmp_path / "b.qed", "-F", "qed", tmp_path / "t.qed").returncode == 0
    t = tmp_path / "t.qed"
    with open_image(str(t), writable=True) as s:
        s.write(70000, b"\x99" * 1000)  # part of a cluster: the rest comes from the base
        s.write_zeroes(1 * M, 128 * K)  # whole clusters: zero entries over the base
        s.write_zeroes(2 * M + 100, 1000)  # part of a cluster over base data: written zeros
    peers.assert_qemu_check_clean(t)
    peers.qemu_io(t, "read -P 0x11 0 70000", "read -P 0x99 70000 1000", "read -P 0x11 71000 59072",
                  "read -P 0 1M 128k", "read -P 0x11 1152k 10k", "read -P 0 2097252 1000", fmt="qed")
    assert json.loads(cli("map", "--output", "json", t).stdout)  # map runs over zero clusters
    assert read_all(t) == peers.qemu_raw(t, tmp_path)


# -- the need-check flag and check -----------------------------------------------------------------

def test_need_check_set_while_writing_and_cleared_on_close(tmp_path):
    p = qed(tmp_path, "q.qed", "4M")
    s = open_image(str(p), writable=True)
    try:
        s.write(0, b"x" * 5000)
        assert features(p) & QED_F_NEED_CHECK  # set before the first table change reaches the file
    finally:
        s.close()
    assert features(p) & QED_F_NEED_CHECK == 0
    peers.assert_qemu_check_clean(p)


def test_check_repairs_a_crashed_image(tmp_path):
    p = qed(tmp_path, "q.qed", "4M", "write -P 0x44 0 256k")
    size = os.path.getsize(p)
    # a crash after an L2 entry was written but before its data: an entry past the end,
    # a leaked cluster, and the need-check flag still set
    poke(p, HEADER.offset_of("features"), "<Q", QED_F_NEED_CHECK)
    l1 = peek(p, HEADER.offset_of("l1_table_offset"), "<Q")
    l2 = peek(p, l1, "<Q")
    poke(p, l2 + 8 * 10, "<Q", size + 64 * K * 5)
    with open(p, "r+b") as f:
        f.truncate(size + 64 * K)  # one leaked cluster
    r = cli("check", "--output", "json", p)
    res = json.loads(r.stdout)
    assert r.returncode == 2 and res["corruptions"] == 1 and res["leaks"] == 1, r.stdout
    assert peers.qemu_check(p)["_exit"] == 2
    r = cli("check", "-r", "all", p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert features(p) & QED_F_NEED_CHECK == 0
    peers.assert_qemu_check_clean(p)
    assert os.path.getsize(p) == size
    peers.qemu_io(p, "read -P 0x44 0 256k", fmt="qed")


def test_writable_open_repairs_need_check_as_qemu(tmp_path):
    p = qed(tmp_path, "q.qed", "4M", "write -P 0x44 0 64k")
    poke(p, HEADER.offset_of("features"), "<Q", QED_F_NEED_CHECK)
    assert read_all(p) == peers.qemu_raw(p, tmp_path)  # read-only: read as it is
    assert features(p) & QED_F_NEED_CHECK
    info = json.loads(cli("info", "--output", "json", p).stdout)
    assert info["dirty-flag"] is peers.qemu_info(p)["dirty-flag"] is False  # QEMU does not report need-check
    assert info["format-specific"] == {"type": "qed", "data": {"need-check": True}}
    write(p, 1 * M, b"y" * 10)
    assert features(p) & QED_F_NEED_CHECK == 0
    peers.assert_qemu_check_clean(p)


# -- resize, compact, discard ---------------------------------------------------------------------

def test_resize_grow_and_shrink(tmp_path):
    p = qed(tmp_path, "q.qed", "8M", "write -P 0x55 0 8M")
    assert peers.qemu_img("resize", "-f", "qed", "--shrink", p, "4M", check=False).returncode != 0
    r = cli("resize", "--shrink", p, "3000K")
    assert r.returncode == 0, r.stderr
    assert peers.qemu_info(p)["virtual-size"] == 3000 * K
    peers.assert_qemu_check_clean(p)
    assert os.path.getsize(p) < 8 * M
    r = cli("resize", p, "6M")
    assert r.returncode == 0, r.stderr
    peers.assert_qemu_check_clean(p)
    peers.qemu_io(p, "read -P 0x55 0 3000k", "read -P 0 3000k 3144k", fmt="qed")
    assert read_all(p) == peers.qemu_raw(p, tmp_path)


def test_compact_and_discard(tmp_path):
    p = qed(tmp_path, "q.qed", "8M", "write -P 0x55 0 8M", "write -z 1M 3M")
    before = os.path.getsize(p)
    want = peers.qemu_raw(p, tmp_path)
    r = cli("compact", p)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(p) <= before - 3 * M
    peers.assert_qemu_check_clean(p)
    assert read_all(p) == want
    assert cli("discard", p, "0:1M").returncode == 0
    peers.assert_qemu_check_clean(p)
    peers.qemu_io(p, "read -P 0 0 4M", "read -P 0x55 4M 4M", fmt="qed")


# -- chains mixing formats -----------------------------------------------------------------------

def test_mixed_chains_merge_and_rebase(tmp_path):
    base = peers.qemu_make(tmp_path, "b.qcow2", "qcow2", "4M", "write -P 0x11 0 4M")
    mid = qed(tmp_path, "m.qed", None, "write -P 0x22 1M 1M", backing="b.qcow2", backing_fmt="qcow2")
    top = peers.qemu_make(tmp_path, "t.qcow2", "qcow2", None, "write -P 0x33 2M 512k",
                          backing="m.qed", backing_fmt="qed")
    want = peers.qemu_raw(top, tmp_path)
    assert read_all(top) == want
    # rebase the qed image onto nothing: it copies what the base showed
    r = cli("rebase", "-b", "", mid)
    assert r.returncode == 0, r.stderr
    assert read_all(top) == want
    peers.assert_qemu_check_clean(mid)
    # merge the qcow2 top into its qed parent
    r = cli("merge", top)
    assert r.returncode == 0, r.stderr
    assert read_all(mid) == want
    peers.assert_qemu_check_clean(mid)
    # and a qed overlay over qcow2, merged into the child
    top2 = qed(tmp_path, "t2.qed", None, "write -P 0x44 0 64k", backing="b.qcow2", backing_fmt="qcow2")
    want2 = peers.qemu_raw(top2, tmp_path)
    r = cli("merge", "--into", "child", top2)
    assert r.returncode == 0, r.stderr
    assert peers.qemu_info(top2).get("backing-filename") is None
    assert read_all(top2) == want2
    peers.assert_qemu_check_clean(top2)


def test_rebase_onto_raw_sets_no_probe(tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\x66" * (2 * M))
    p = qed(tmp_path, "q.qed", "2M", "write -P 0x01 0 4k")
    r = cli("rebase", "-b", raw, "-F", "raw", p)
    assert r.returncode == 0, r.stderr
    assert features(p) & 0x05 == 0x05
    assert peers.qemu_info(p)["backing-filename-format"] == "raw"
    peers.qemu_io(p, "read -P 0x01 0 4k", "read -P 0 4k 2044k", fmt="qed")  # reads as before
    peers.assert_qemu_check_clean(p)


# -- hostile headers and tables -------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("cluster_size", 1000, "cluster size 1000"),
    ("cluster_size", 1 << 30, "cluster size"),
    ("table_size", 3, "table size 3"),
    ("header_size", 0, "header size 0"),
    ("features", 1 << 40, "feature bits"),
    ("image_size", 1 << 62, "image size"),
    ("image_size", 1000, "image size 1000"),
    ("l1_table_offset", 1 << 40, "L1 table offset"),
    ("l1_table_offset", 100, "L1 table offset"),
    ("backing_filename_offset", 1 << 20, "backing file name"),
])
def test_hostile_header(tmp_path, field, value, words):
    p = qed(tmp_path, "q.qed", "4M", "write -P 1 0 4k")
    code = "I" if HEADER.sizes[field] == 4 else "Q"
    if field == "backing_filename_offset":
        poke(p, HEADER.offset_of("features"), "<Q", 1)
        poke(p, HEADER.offset_of("backing_filename_size"), "<I", 10)
    poke(p, HEADER.offset_of(field), "<" + code, value)
    r = cli("convert", "-O", "raw", p, tmp_path / "o.raw")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("vdtool: error: "), r.stderr
    assert words in r.stderr, r.stderr


@pytest.mark.parametrize("where,value", [("l1", 1 << 50), ("l1", 12345), ("l2", 1 << 50), ("l2", 777)])
def test_hostile_tables(tmp_path, where, value):
    p = qed(tmp_path, "q.qed", "4M", "write -P 1 0 4k")
    l1 = peek(p, HEADER.offset_of("l1_table_offset"), "<Q")
    poke(p, l1 if where == "l1" else peek(p, l1, "<Q"), "<Q", value)
    r = cli("convert", "-O", "raw", p, tmp_path / "o.raw")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "vdtool: error: " in lines[0], r.stderr
    r = cli("check", p)
    assert r.returncode == 2, r.stdout + r.stderr
    assert cli("check", "-r", "all", p).returncode == 0
    peers.assert_qemu_check_clean(p)


def test_untrusted_refuses_backing_file(tmp_path):
    d = tmp_path / "up"
    d.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"SECRET" * 1000)
    peers.qemu_img("create", "-q", "-f", "qed", "-b", str(secret), "-F", "raw", d / "a.qed")
    for args in (("info", "a.qed"), ("convert", "-O", "raw", "a.qed", "o.raw"), ("check", "a.qed")):
        r = run_vdtool(d, args[0], "--untrusted", *args[1:], expect=1)
        assert "rule external-reference" in r.stderr and str(secret) in r.stderr, r.stderr
        assert "SECRET" not in r.stdout.replace(str(secret), "")
    assert not (d / "o.raw").exists()


def test_backend_facts(tmp_path):
    ops.create(str(tmp_path / "n.qed"), 5 * M + 1, fmt="qed")
    with QedBackend.open(str(tmp_path / "n.qed")) as b:
        assert (b.virtual_size, b.block_size, b.variant, b.parent) == (5 * M + 512, 64 * K, "dynamic", None)


# -- model --------------------------------------------------------------------------------------------

class QedModel(tablemodel.TableMachine):
    fmt = "qed"


class QedOverlayModel(tablemodel.TableMachine):
    fmt = "qed"
    diff = True


def test_model():
    tablemodel.run(QedModel, 15)


def test_model_overlay():
    tablemodel.run(QedOverlayModel, 10)


def test_measure_matches_convert(tmp_path):
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(M) + b"\x01" * (3 * M) + bytes(M))
    m = ops.measure(str(src), fmt="qed")
    ops.convert(str(src), str(tmp_path / "o.qed"), fmt="qed")
    assert m["required"] == os.path.getsize(tmp_path / "o.qed")
    assert m["fully-allocated"] >= m["required"]


def test_map_matches_qemu(tmp_path):
    qed(tmp_path, "b.qed", "4M", "write -P 0x11 0 1M")
    for p in (qed(tmp_path, "a.qed", "4M", "write -P 1 0 128k", "write -z 1M 64k", "write -P 2 3M 4k"),
              qed(tmp_path, "t.qed", None, "write -P 3 64k 64k", "write -z 2M 128k", backing="b.qed",
                  backing_fmt="qed")):
        want = json.loads(peers.qemu_img("map", "--output", "json", p).stdout)
        got = json.loads(cli("map", "--output", "json", p).stdout)
        assert [{k: v for k, v in e.items() if k != "compressed"} for e in got] == want


def test_check_counts_match_qemu(tmp_path):
    p = qed(tmp_path, "a.qed", "10M", "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 5M 300k")
    want = peers.qemu_check(p)
    got = json.loads(cli("check", "--output", "json", p).stdout)
    for key in ("total-clusters", "allocated-clusters", "check-errors"):
        assert got[key] == want[key], (key, got, want)

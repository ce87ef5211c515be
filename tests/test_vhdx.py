"""VHDX backend: qemu-img's images read byte-exactly, vdtool's images pass
qemu-img check/compare and vhdiinfo, the log (read through, replayed, and
qemu replaying vdtool's), check/repair, resize, compact, differencing
images, hostile fields."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct

import pytest

import peers
from helpers import poke, read_all
from vdrun import cli
from vdtool.core import ops
from vdtool.core.stack import open_image
from vdtool.formats.vhdx import bat as bat_mod
from vdtool.formats.vhdx.backend import VhdxBackend
from vdtool.formats.vhdx.crc import crc32c, crc32c_python
from vdtool.formats.vhdx.layout import (FILE_PARAMETERS, HEADER, HEADER_OFFSETS, LOG_ENTRY_HEADER,
                                        METADATA_TABLE_ENTRY, METADATA_TABLE_HEADER, REGION_TABLE_ENTRY,
                                        REGION_TABLE_HEADER, REGION_TABLE_OFFSETS)

M = 1 << 20


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def qemu_vhdx(tmp_path, name, size, opts=None, *writes):
    return peers.qemu_make(tmp_path, name, "vhdx", size, *writes, opts=opts)


WRITES = ("write -P 0x5a 0 4096", "write -P 0x33 5M 1500k", "write -z 9M 2M", "write -P 0x71 13M 512")


# -- qemu-img's images ---------------------------------------------------------------------------

SLOW = pytest.mark.slow


@pytest.mark.parametrize("opts", ["subformat=fixed,block_size=1M", "subformat=dynamic,block_size=32M,log_size=2M",
                                  pytest.param("subformat=dynamic", marks=SLOW),
                                  pytest.param("block_size=8M", marks=SLOW)])
def test_reads_qemu_images(tmp_path, opts):
    p = qemu_vhdx(tmp_path, "q.vhdx", "16M", opts, *WRITES)
    assert read_all(p) == peers.qemu_raw(p, tmp_path, "vhdx")
    r = cli("convert", p, tmp_path / "v.raw")  # probed
    assert r.returncode == 0, r.stderr
    peers.assert_qemu_compare(p, tmp_path / "v.raw", "vhdx", "raw")


def test_info_matches_qemu(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "100M", None, "write 0 1M")
    q = peers.qemu_info(p)
    r = cli("info", "--output", "json", p)
    assert r.returncode == 0, r.stderr
    import json

    mine = json.loads(r.stdout)
    assert mine["format"] == "vhdx" and mine["virtual-size"] == q["virtual-size"]
    assert mine["cluster-size"] == q["cluster-size"]
    assert "format-specific" not in q  # qemu has no VHDX facts; ours are vdtool's
    data = mine["format-specific"]["data"]
    assert data["block-size"] == q["cluster-size"] and data["allocated-blocks"] == 1


def test_crc32c_both_ways():
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283


# -- vdtool's images -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,bs", [("dynamic", None), ("fixed", "1M"), pytest.param("dynamic", "1M", marks=SLOW),
                                        pytest.param("dynamic", "32M", marks=SLOW)])
def test_created_images_pass_qemu(tmp_path, variant, bs):
    p = tmp_path / "n.vhdx"
    args = ["create", "-f", "vhdx", "--variant", variant] + (["--block-size", bs] if bs else []) + [p, "40M"]
    assert cli(*args).returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")
    with open_image(str(p), writable=True) as s:
        s.write(3 * M - 100, b"\x44" * 300000)
        s.write(39 * M, b"\x55" * M)
        s.write_zeroes(3 * M, 2 * M)
    peers.assert_qemu_check_clean(p, "vhdx")
    peers.qemu_io(p, "write -P 0x66 20M 64k", fmt="vhdx")
    assert read_all(p) == peers.qemu_raw(p, tmp_path, "vhdx")
    out = peers.run("vhdiinfo", p).stdout.decode()
    assert "VHDX" in out and "41943040" in out


def test_4k_sectors_read_back(tmp_path):
    p = tmp_path / "n.vhdx"
    assert cli("create", "-f", "vhdx", "-o", "logical_sector_size=4096", "-o", "physical_sector_size=512",
               p, "10M").returncode == 0
    with open_image(str(p), writable=True) as s:
        s.write(8192, b"\x12" * 4096)
    with VhdxBackend.open(str(p)) as b:
        assert (b.state.logical_sector, b.state.physical_sector) == (4096, 512)
        assert b.read(8192, 4096) == b"\x12" * 4096
    out = peers.run("vhdiinfo", p).stdout.decode()
    assert "4096 bytes" in out


def test_convert_both_ways(tmp_path):
    src = qemu_vhdx(tmp_path, "q.vhdx", "16M", None, *WRITES)
    assert cli("convert", "-O", "qcow2", src, tmp_path / "a.qcow2").returncode == 0
    assert cli("convert", "-O", "vhdx", tmp_path / "a.qcow2", tmp_path / "b.vhdx").returncode == 0
    peers.assert_qemu_check_clean(tmp_path / "b.vhdx", "vhdx")
    peers.assert_qemu_compare(src, tmp_path / "b.vhdx", "vhdx", "vhdx")


def test_discard_gives_zero_blocks(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "16M", "block_size=1M", "write -P 0x11 0 16M")
    assert cli("discard", p, "2M:3M").returncode == 0
    with VhdxBackend.open(str(p)) as b:
        assert [b.state.entry(i) & 7 for i in (1, 2, 3, 4, 5)] == [6, 2, 2, 2, 6]
    peers.assert_qemu_check_clean(p, "vhdx")
    data = peers.qemu_raw(p, tmp_path, "vhdx")
    assert data[2 * M:5 * M] == bytes(3 * M) and data[:2 * M] == b"\x11" * (2 * M)


# -- the log ------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def _crash():
    raise Crash()


def pending_log_image(tmp_path):
    """A qemu-made image whose last metadata update is only in the log."""
    p = qemu_vhdx(tmp_path, "p.vhdx", "16M", "block_size=1M", "write -P 0x11 0 1M")
    b = VhdxBackend.open(str(p), writable=True)
    b.write(3 * M, b"\x5a" * 8192)
    with pytest.raises(Crash):
        bat_mod.flush(b.state, b.bitmaps, crash_hook=_crash)
    b.file.close()
    return p


def test_read_only_open_reads_through_log(tmp_path):
    p = pending_log_image(tmp_path)
    before = sha(p)
    with VhdxBackend.open(str(p)) as b:
        assert b.info()["log-pending"] is True
        assert b.read(3 * M, 8192) == b"\x5a" * 8192
    assert sha(p) == before  # nothing written
    r = peers.qemu_check(p, "vhdx")
    assert r["_exit"] != 0 and "log" in r["_stderr"]
    assert cli("check", p).returncode == 3  # a leak: a harmless leftover the next writable open replays
    r = cli("check", "-r", "leaks", p)
    assert r.returncode == 0, r.stdout + r.stderr
    peers.assert_qemu_check_clean(p, "vhdx")
    assert peers.qemu_raw(p, tmp_path, "vhdx")[3 * M:3 * M + 8192] == b"\x5a" * 8192


def test_qemu_replays_vdtools_log(tmp_path):
    p = pending_log_image(tmp_path)
    peers.qemu_img("check", "-r", "all", "-f", "vhdx", p)
    peers.assert_qemu_check_clean(p, "vhdx")
    data = peers.qemu_raw(p, tmp_path, "vhdx")
    assert data[3 * M:3 * M + 8192] == b"\x5a" * 8192 and data[:M] == b"\x11" * M


def test_writable_open_replays(tmp_path):
    p = pending_log_image(tmp_path)
    with VhdxBackend.open(str(p), writable=True) as b:
        assert b.state.log_replayed and b.info()["log-pending"] is False
    peers.assert_qemu_check_clean(p, "vhdx")


def test_log_entry_pointing_outside_is_refused(tmp_path):
    p = pending_log_image(tmp_path)
    with VhdxBackend.open(str(p)) as b:
        log_off = b.state.hdr.LogOffset
    # a descriptor's FileOffset (first descriptor, after the 64-byte entry header) into the headers
    poke(p, log_off + LOG_ENTRY_HEADER.size + 16, "<Q", 64 * 1024)
    r = cli("info", p)
    assert r.returncode == 0  # the entry's checksum fails: no valid log, nothing to replay
    raw = bytearray(open(p, "rb").read()[log_off:log_off + 8192])
    from vdtool.formats.vhdx.crc import with_zeroed_field

    struct.pack_into("<I", raw, 4, with_zeroed_field(raw, 4))
    with open(p, "r+b") as f:
        f.seek(log_off)
        f.write(raw)
    r = cli("info", p)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "log entry" in r.stderr, r.stderr


# -- check, resize, compact ----------------------------------------------------------------------

def test_check_bat_past_eof_and_repair(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "16M", "block_size=1M", "write -P 0x11 0 2M")
    with VhdxBackend.open(str(p)) as b:
        bat_off = b.state.bat_offset
    poke(p, bat_off + 8, "<Q", (4096 << 20) | 6)  # block 1 at 4 GiB
    r = cli("check", p)
    assert r.returncode == 2 and "past the end of the file" in r.stdout, r.stdout
    r = cli("convert", p, tmp_path / "x.raw")
    assert r.returncode == 1 and "damaged" in r.stderr
    assert cli("check", "-r", "all", p).returncode == 0
    assert cli("check", p).returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")


def test_check_leak_at_end(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "16M", "block_size=1M", "write -P 0x11 0 2M")
    size = os.path.getsize(p)
    os.truncate(p, size + 3 * M)
    assert cli("check", p).returncode == 3
    assert cli("check", "-r", "leaks", p).returncode == 0
    assert os.path.getsize(p) == size


def test_overlapping_blocks_are_corrupt(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "16M", "block_size=1M", "write -P 0x11 0 2M")
    with VhdxBackend.open(str(p)) as b:
        e0, bat_off = b.state.bat[0], b.state.bat_offset
    poke(p, bat_off + 8, "<Q", e0)
    r = cli("check", p)
    assert r.returncode == 2 and "same place" in r.stdout, r.stdout


@pytest.mark.parametrize("variant", ["dynamic", pytest.param("fixed", marks=SLOW)])
def test_resize_both_ways(tmp_path, variant):
    p = tmp_path / "r.vhdx"
    ops.create(str(p), 20 * M, fmt="vhdx", variant=variant, block_size=M)
    with open_image(str(p), writable=True) as s:
        s.write(0, b"\x11" * (20 * M))
    big = "130G" if variant == "dynamic" else "200M"  # 130G: a BAT that must move
    assert cli("resize", p, big).returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")
    assert peers.qemu_info(p)["virtual-size"] == (130 << 30 if variant == "dynamic" else 200 * M)
    assert cli("resize", "--shrink", p, "10M").returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")
    assert cli("resize", p, "12M").returncode == 0
    data = peers.qemu_raw(p, tmp_path, "vhdx")
    assert data == b"\x11" * (10 * M) + bytes(2 * M)


def test_compact_reclaims(tmp_path):
    p = qemu_vhdx(tmp_path, "q.vhdx", "32M", "block_size=1M", "write -P 0x11 0 32M")
    peers.qemu_io(p, "write -P 0 2M 20M", fmt="vhdx")
    before = os.path.getsize(p)
    want = peers.qemu_raw(p, tmp_path, "vhdx")
    assert cli("compact", p).returncode == 0
    assert os.path.getsize(p) <= before - 20 * M
    peers.assert_qemu_check_clean(p, "vhdx")
    assert peers.qemu_raw(p, tmp_path, "vhdx") == want


# -- differencing images ---------------------------------------------------------------------------

def test_differencing_chain(tmp_path):
    base = qemu_vhdx(tmp_path, "base.vhdx", "64M", None, "write -P 0x11 0 20M")
    child = tmp_path / "child.vhdx"
    assert cli("create", "-f", "vhdx", "-b", base, child).returncode == 0
    with open_image(str(child), writable=True) as s:
        s.write(5 * M, b"\x22" * 100000)
        s.write(40 * M, b"\x33" * 5000)
        s.write_zeroes(8 * M, 8 * M)  # a whole ZERO block over parent data
    want = bytearray(64 * M)
    want[:20 * M] = b"\x11" * (20 * M)
    want[8 * M:16 * M] = bytes(8 * M)
    want[5 * M:5 * M + 100000] = b"\x22" * 100000
    want[40 * M:40 * M + 5000] = b"\x33" * 5000
    assert read_all(child) == bytes(want)
    out = peers.run("vhdiinfo", child).stdout.decode()
    assert "Differential" in out and "base.vhdx" in out
    with VhdxBackend.open(str(base)) as b, VhdxBackend.open(str(child)) as c:
        assert c.state.locator["parent_linkage"].strip("{}") == b.data_write_guid
    assert cli("convert", child, tmp_path / "flat.raw").returncode == 0
    assert open(tmp_path / "flat.raw", "rb").read() == bytes(want)
    r = cli("info", "--untrusted", child)
    assert r.returncode == 1 and "parent" in r.stderr.lower()
    # the parent moved: found by --parent-search, and by relative path when moved together
    os.mkdir(tmp_path / "elsewhere")
    shutil.move(str(base), tmp_path / "elsewhere" / "base.vhdx")
    assert cli("info", child).returncode in (0, 1)
    assert read_all(child, parent_search=[str(tmp_path / "elsewhere")]) == bytes(want)


def test_partially_present_blocks(tmp_path):
    base = tmp_path / "base.vhdx"
    ops.create(str(base), 8 * M, fmt="vhdx", block_size=M)
    with open_image(str(base), writable=True) as s:
        s.write(0, b"\x11" * (8 * M))
    child = tmp_path / "c.vhdx"
    assert cli("create", "-f", "vhdx", "--block-size", "1M", "-b", base, child).returncode == 0
    # craft: block 2 PARTIALLY_PRESENT with sectors 8..15 present, via the public write path
    with open_image(str(child), writable=True) as s:
        s.write(2 * M, b"\x99" * M)
    with VhdxBackend.open(str(child), writable=True) as c:
        st = c.state
        i = 2
        e = st.bat[i]
        bm_off = ((os.path.getsize(child) + M - 1) // M) * M
        c.file.truncate(bm_off + M)
        st.fsize = bm_off + M
        c.file.pwrite(bm_off + (2 * M // 512) // 8 + 1, b"\xff")  # sectors 8..15 of block 2
        st.set_entry(st.ratio, (bm_off >> 20) << 20 | 6)
        st.set_entry(i, (e & ~7) | 7)
    data = read_all(child)
    assert data[2 * M:2 * M + 4096] == b"\x11" * 4096
    assert data[2 * M + 4096:2 * M + 8192] == b"\x99" * 4096
    assert data[2 * M + 8192:3 * M] == b"\x11" * (M - 8192)
    with open_image(str(child), writable=True) as s:  # a write sets more bits
        s.write(2 * M + 512 * 20, b"\x77" * 512)
    assert read_all(child)[2 * M + 512 * 20:2 * M + 512 * 21] == b"\x77" * 512
    assert cli("check", child).returncode == 0


def test_rebase_and_merge(tmp_path):
    base = qemu_vhdx(tmp_path, "base.vhdx", "16M", "block_size=1M", "write -P 0x11 0 8M")
    mid = tmp_path / "mid.vhdx"
    top = tmp_path / "top.vhdx"
    assert cli("create", "-f", "vhdx", "-b", base, mid).returncode == 0
    with open_image(str(mid), writable=True) as s:
        s.write(M, b"\x22" * M)
    assert cli("create", "-f", "vhdx", "-b", mid, top).returncode == 0
    with open_image(str(top), writable=True) as s:
        s.write(3 * M, b"\x33" * 4096)
    want = read_all(top)
    r = cli("rebase", "-b", base, top)
    assert r.returncode == 0, r.stderr
    assert read_all(top) == want
    r = cli("rebase", "-b", "", top)
    assert r.returncode == 0, r.stderr
    assert read_all(top) == want
    peers.assert_qemu_check_clean(top, "vhdx")
    assert peers.qemu_raw(top, tmp_path, "vhdx") == want


# -- hostile fields ---------------------------------------------------------------------------------

def _both_headers(field):
    return [(HEADER_OFFSETS[0] + HEADER.offset_of(field)), (HEADER_OFFSETS[1] + HEADER.offset_of(field))]


CASES = [
    ("signature", [(0, "<Q", 0x1234)], "file identifier"),
    ("header signatures", [(o, "<I", 0) for o in _both_headers("Signature")], "neither vhdx header"),
    ("header checksums", [(o, "<I", 1) for o in _both_headers("Checksum")], "neither vhdx header"),
    ("region count", [(o + REGION_TABLE_HEADER.offset_of("EntryCount"), "<I", 99999)
                      for o in REGION_TABLE_OFFSETS], "region table"),
]


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return peers.qemu_make(d, "g.vhdx", "vhdx", "16M", "write -P 0x11 0 1M", opts="block_size=1M")


def _meta_entry(path, index):
    with VhdxBackend.open(str(path)) as b:
        return b.state.meta_offset, b.state.meta_entries[index], b.state.bat_offset


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_headers(tmp_path, good_image, case):
    name, pokes, words = case
    p = tmp_path / "bad.vhdx"
    shutil.copy(good_image, p)
    for off, fmt, value in pokes:
        poke(p, off, fmt, value)
    r = cli("convert", "-f", "vhdx", p, tmp_path / "out.raw")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert words.lower() in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("what", ["metadata count", "item offset", "block size", "unknown required item",
                                  "bat offset", "truncated"])
def test_hostile_metadata(tmp_path, good_image, what):
    p = tmp_path / "bad.vhdx"
    shutil.copy(good_image, p)
    meta_off, e0, bat_off = _meta_entry(p, 0)
    if what == "metadata count":
        poke(p, meta_off + METADATA_TABLE_HEADER.offset_of("EntryCount"), "<H", 4000)
    elif what == "item offset":
        poke(p, meta_off + METADATA_TABLE_ENTRY.size + METADATA_TABLE_ENTRY.offset_of("Offset"), "<I", 0xFFFFF000)
    elif what == "block size":
        poke(p, meta_off + e0.Offset + FILE_PARAMETERS.offset_of("BlockSize"), "<I", 3 << 30)
    elif what == "unknown required item":
        poke(p, meta_off + METADATA_TABLE_ENTRY.size, "<16s", b"\x01" * 16)
    elif what == "bat offset":
        off = REGION_TABLE_HEADER.size + REGION_TABLE_ENTRY.offset_of("FileOffset")
        for t in REGION_TABLE_OFFSETS:  # (the checksums then fail: both tables invalid)
            poke(p, t + off, "<Q", 1 << 50)
    else:
        os.truncate(p, bat_off + 100)
    r = cli("info", "-f", "vhdx", p)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_sequence_numbers_pick_current(tmp_path, good_image):
    p = tmp_path / "s.vhdx"
    shutil.copy(good_image, p)
    with VhdxBackend.open(str(p), writable=True) as b:
        b.write(0, b"\x01" * 512)  # header updates
        seq = b.state.hdr.SequenceNumber
    with VhdxBackend.open(str(p)) as b:
        assert b.state.hdr.SequenceNumber == seq
        assert b.read(0, 512) == b"\x01" * 512
    peers.assert_qemu_check_clean(p, "vhdx")


def test_probe_and_untrusted_plain(tmp_path, good_image):
    r = cli("info", "--untrusted", "-f", "vhdx", good_image)
    assert r.returncode == 0, r.stderr
    r = cli("info", good_image)
    assert r.returncode == 0 and "vhdx" in r.stdout


@pytest.mark.parametrize("which", ["header", "region table", "duplicate region"])
def test_check_repairs_second_copy(tmp_path, good_image, which):
    p = tmp_path / "c.vhdx"
    shutil.copy(good_image, p)
    with VhdxBackend.open(str(p)) as b:
        other = 1 - b.state.cur
    if which == "duplicate region":  # table 1: a valid checksum over the BAT entry twice
        import vhdxfuzz

        buf = bytearray(open(p, "rb").read())
        e = REGION_TABLE_OFFSETS[0] + REGION_TABLE_HEADER.size
        buf[e + REGION_TABLE_ENTRY.size:e + 2 * REGION_TABLE_ENTRY.size] = buf[e:e + REGION_TABLE_ENTRY.size]
        vhdxfuzz.fix_checksums(buf)
        open(p, "wb").write(buf)
        which = "appears twice"
    else:
        off = (HEADER_OFFSETS[other] + HEADER.offset_of("Checksum") if which == "header"
               else REGION_TABLE_OFFSETS[1] + 4)
        poke(p, off, "<I", 0x1234)
    r = cli("check", p)
    assert r.returncode == 2 and which in r.stdout, r.stdout
    assert read_all(p)[:M] == b"\x11" * M  # still reads (the other copy)
    assert cli("check", "-r", "all", p).returncode == 0
    assert cli("check", p).returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")


def test_check_reports_a_log_that_does_not_replay(tmp_path):
    p = pending_log_image(tmp_path)
    with VhdxBackend.open(str(p)) as b:
        log_off = b.state.hdr.LogOffset
    raw = bytearray(open(p, "rb").read()[log_off:log_off + 8192])
    struct.pack_into("<Q", raw, LOG_ENTRY_HEADER.size + 16, 64 * 1024)  # a descriptor writing a header
    from vdtool.formats.vhdx.crc import with_zeroed_field

    struct.pack_into("<I", raw, 4, with_zeroed_field(raw, 4))
    with open(p, "r+b") as f:
        f.seek(log_off)
        f.write(raw)
    r = cli("check", p)
    assert r.returncode == 2 and "does not replay" in r.stdout, r.stdout + r.stderr
    assert cli("check", "-r", "all", p).returncode == 0
    peers.assert_qemu_check_clean(p, "vhdx")
    assert peers.qemu_raw(p, tmp_path, "vhdx")[:M] == b"\x11" * M  # the state before the log


def test_mixed_chains(tmp_path):
    """qcow2 over VHDX (qemu reads it too), VHDX over VHD; resize and
    compact of a differencing VHDX keep what the chain reads."""
    base = tmp_path / "base.vhdx"
    ops.create(str(base), 8 * M, fmt="vhdx", block_size=M)
    with open_image(str(base), writable=True) as s:
        s.write(M, b"\x11" * (3 * M))
    top = tmp_path / "top.qcow2"
    assert cli("create", "-f", "qcow2", "-b", base, "-F", "vhdx", top).returncode == 0
    peers.qemu_io(top, "write -P 0x22 2M 4k", fmt="qcow2")
    assert read_all(top) == peers.qemu_raw(top, tmp_path, "qcow2")
    vbase = tmp_path / "v.vhd"
    ops.create(str(vbase), 8 * M, fmt="vhd")
    with open_image(str(vbase), writable=True) as s:
        s.write(0, b"\x33" * (2 * M))
    child = tmp_path / "c.vhdx"
    assert cli("create", "-f", "vhdx", "--block-size", "1M", "-b", vbase, child).returncode == 0
    with open_image(str(child), writable=True) as s:
        s.write(M + 512, b"\x44" * 512)
        s.write(4 * M, bytes(M))
    want = read_all(child)
    assert want[:M] == b"\x33" * M and want[M + 512:M + 1024] == b"\x44" * 512
    assert cli("compact", child).returncode == 0
    assert read_all(child) == want
    assert cli("resize", child, "12M").returncode == 0
    assert read_all(child) == want + bytes(4 * M)

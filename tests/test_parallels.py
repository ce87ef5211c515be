"""Parallels backend (bare images): interop with qemu-img/qemu-io, the
in-use flag, ops, check/repair, hostile headers."""

from __future__ import annotations

import json
import struct

import pytest

import peers
from helpers import peek, poke, read_all
from vdrun import cli
from vdtool.core import ops
from vdtool.core.errors import CorruptImageError, VdError
from vdtool.core.stack import open_image
from vdtool.formats.parallels.backend import ParallelsBackend
from vdtool.formats.parallels.layout import BAT_OFFSET, HEADER, INUSE_MAGIC, MAGIC_V1

K, M = 1 << 10, 1 << 20


def write(path, offset, data):
    with open_image(str(path), writable=True) as s:
        s.write(offset, data)


def qemu_made(tmp_path, size, cluster=None, name="q.hds"):
    p = tmp_path / name
    peers.qemu_img("create", "-q", "-f", "parallels", *(["-o", f"cluster_size={cluster}"] if cluster else []),
                   p, size)
    return p


def assert_same_as_qemu(tmp_path, p):
    peers.qemu_to_raw(p, tmp_path / "ref.raw", "parallels")
    assert read_all(p) == (tmp_path / "ref.raw").read_bytes()


# -- qemu-img's images read exactly -------------------------------------------------------------

@pytest.mark.parametrize("size,cluster", [("10M", None), ("3M", "64K"), ("7700K", "32256"), ("1M", "4K")])
def test_reads_qemu_images(tmp_path, size, cluster):
    p = qemu_made(tmp_path, size, cluster)
    total = peers.qemu_info(p)["virtual-size"]
    peers.qemu_io(p, "write -P 0x5a 0 4096", f"write -P 0x33 {total - 70000} 70000",
                  f"write -P 0x71 {total // 2 - 300} 1000", fmt="parallels")
    assert_same_as_qemu(tmp_path, p)
    with ParallelsBackend.open(str(p)) as b:
        assert b.virtual_size == total


def _v1_image(path, size=3 * M, cluster=64 * K, data_off=0):
    """A WithoutFreeSpace image (BAT entries in sectors), as Parallels
    Desktop 2/3 made them: clusters stored out of order."""
    n = -(-size // cluster)
    start = data_off * 512 or -(-(BAT_OFFSET + 4 * n) // 512) * 512
    hdr = HEADER.pack(magic=MAGIC_V1, version=2, heads=16, cylinders=size // 512 // 512, tracks=cluster // 512,
                      bat_entries=n, nb_sectors=size // 512, data_off=data_off)
    bat = [0] * n
    data = bytearray()
    for k, i in enumerate((n - 1, 0, n // 2)):
        bat[i] = (start + k * cluster) // 512
        data += bytes([0x40 + k]) * cluster
    path.write_bytes(hdr + struct.pack(f"<{n}I", *bat) + bytes(start - BAT_OFFSET - 4 * n) + data)
    return path


def test_reads_v1_images(tmp_path):
    p = _v1_image(tmp_path / "v1.hds")
    assert_same_as_qemu(tmp_path, p)
    assert cli("info", "--output", "json", p, expect=0).stdout.count("WithoutFreeSpace") == 1
    write(p, 5 * K, b"\x99" * 70 * K)  # into an allocated and a new cluster, sector-unit entries
    assert_same_as_qemu(tmp_path, p)
    peers.assert_qemu_check_clean(p, "parallels")


# -- what vdtool writes, judged by qemu ------------------------------------------------------------

@pytest.mark.parametrize("size,cluster", [("10M", None), ("1000000", "64K"), ("3M", "32256")])
def test_create_matches_qemu(tmp_path, size, cluster):
    q = qemu_made(tmp_path, size, cluster)
    v = tmp_path / "v.hds"
    cli("create", "-f", "parallels", *(["-o", f"cluster_size={cluster}"] if cluster else []), v, size, expect=0)
    assert v.read_bytes() == q.read_bytes()


def test_writes_pass_qemu(tmp_path):
    p = tmp_path / "v.hds"
    cli("create", "-f", "parallels", "-o", "cluster_size=64K", p, "5M", expect=0)
    want = bytearray(5 * M)
    for off, n, byte in ((0, 512, 1), (100 * K, 200 * K, 2), (5 * M - 3000, 3000, 3), (2 * M + 7, 90 * K, 4)):
        write(p, off, bytes([byte]) * n)
        want[off:off + n] = bytes([byte]) * n
    assert read_all(p) == want
    peers.assert_qemu_check_clean(p, "parallels")
    (tmp_path / "want.raw").write_bytes(want)
    peers.assert_qemu_compare(tmp_path / "want.raw", p, "raw", "parallels")
    # qemu-io writes into vdtool's image, vdtool reads them
    peers.qemu_io(p, "write -P 0x77 3M 100k", fmt="parallels")
    want[3 * M:3 * M + 100 * K] = b"\x77" * 100 * K
    assert read_all(p) == want
    # discard releases clusters and closes the holes: still clean
    ops.discard(str(p), [(64 * K, 192 * K)])
    want[64 * K:256 * K] = bytes(192 * K)
    assert read_all(p) == want
    peers.assert_qemu_check_clean(p, "parallels")
    (tmp_path / "want.raw").write_bytes(want)
    peers.assert_qemu_compare(tmp_path / "want.raw", p, "raw", "parallels")


def test_convert_both_ways(tmp_path):
    src = qemu_made(tmp_path, "6M")
    peers.qemu_io(src, "write -P 0x12 1M 3M", "write -P 0 2M 1M", fmt="parallels")
    out = tmp_path / "out.hds"
    cli("convert", "-O", "parallels", src, out, expect=0)
    peers.assert_qemu_check_clean(out, "parallels")
    peers.assert_qemu_compare(src, out, "parallels", "parallels")
    assert out.stat().st_size < src.stat().st_size  # the zero cluster was not copied


# -- the in-use flag ---------------------------------------------------------------------------------

def test_inuse_flag(tmp_path):
    p = qemu_made(tmp_path, "4M")
    inuse = HEADER.offset_of("inuse")
    with open_image(str(p), writable=True) as s:
        assert peek(p, inuse, "<I") == INUSE_MAGIC  # set while a writer has it open
        s.write(0, b"x" * 512)
    assert peek(p, inuse, "<I") == 0
    poke(p, inuse, "<I", INUSE_MAGIC)  # a writer that never closed it
    assert read_all(p)[:512] == b"x" * 512  # reading is fine
    r = cli("resize", p, "8M", expect=1)
    assert r.stderr.count("\n") == 1 and "not closed correctly" in r.stderr
    assert peers.qemu_check(p, "parallels")["_exit"] == 2  # qemu-img: a corruption
    r = cli("check", "--output", "json", p, expect=3)  # vdtool: a leftover, like a leak
    assert json.loads(r.stdout)["leaks"] == 1
    cli("check", "-r", "leaks", p, expect=0)
    assert peek(p, inuse, "<I") == 0
    peers.assert_qemu_check_clean(p, "parallels")


# -- check and repair ------------------------------------------------------------------------------------

def test_entry_past_eof(tmp_path):
    p = qemu_made(tmp_path, "4M")
    peers.qemu_io(p, "write -P 0x5 0 1M", "write -P 0x6 1M 1M", fmt="parallels")
    poke(p, BAT_OFFSET + 4 * 2, "<I", 40)  # cluster 2 at 40 MiB: past the end
    r = cli("info", p, expect=1)
    assert r.stderr.startswith("vdtool: error:") and r.stderr.count("\n") == 1 and "BAT entry 2" in r.stderr
    assert peers.qemu_check(p, "parallels")["_exit"] == 2
    assert cli("check", p, expect=2).stdout.count("ERROR") == 1
    cli("check", "-r", "all", p, expect=0)
    peers.assert_qemu_check_clean(p, "parallels")
    assert read_all(p) == b"\x05" * M + b"\x06" * M + bytes(2 * M)


def test_duplicate_entries(tmp_path):
    p = qemu_made(tmp_path, "4M", "64K")
    peers.qemu_io(p, "write -P 0x5 0 64k", "write -P 0x6 64k 64k", fmt="parallels")
    first = peek(p, BAT_OFFSET, "<I")
    poke(p, BAT_OFFSET + 4 * 10, "<I", first)  # cluster 10 shares cluster 0's data
    want = read_all(p)
    assert want[10 * 64 * K:11 * 64 * K] == b"\x05" * 64 * K
    with pytest.raises(CorruptImageError, match="check -r all"):
        write(p, 10 * 64 * K, b"y")  # a write would change both
    assert cli("check", p, expect=2).stdout.count("ERROR") == 1
    cli("check", "-r", "all", p, expect=0)
    assert read_all(p) == want
    write(p, 10 * 64 * K, b"y")
    assert read_all(p)[:64 * K] == b"\x05" * 64 * K
    peers.assert_qemu_check_clean(p, "parallels")


def test_leak_at_end(tmp_path):
    p = qemu_made(tmp_path, "4M")
    peers.qemu_io(p, "write -P 0x5 0 1M", fmt="parallels")
    with open(p, "ab") as f:
        f.write(b"junk" * 1000)
    q = peers.qemu_check(p, "parallels")
    r = json.loads(cli("check", "--output", "json", p, expect=3).stdout)
    for key in ("leaks", "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters"):
        assert r.get(key, 0) == q.get(key, 0), key  # qemu-img leaves out what is 0
    cli("check", "-r", "leaks", p, expect=0)
    peers.assert_qemu_check_clean(p, "parallels")


def test_info_and_check_json_match_qemu(tmp_path):
    p = qemu_made(tmp_path, "5M", "64K")
    peers.qemu_io(p, "write -P 0x5 1M 100k", "write -P 0x6 0 10k", fmt="parallels")
    q = peers.qemu_info(p)
    v = json.loads(cli("info", "--output", "json", p, expect=0).stdout)
    for key in ("virtual-size", "format", "actual-size"):
        assert v[key] == q[key], key
    qc = peers.qemu_check(p, "parallels")
    vc = json.loads(cli("check", "--output", "json", p, expect=0).stdout)
    for key in ("check-errors", "image-end-offset", "total-clusters", "allocated-clusters",
                "fragmented-clusters"):
        assert vc.get(key, 0) == qc.get(key, 0), key  # qemu-img leaves out what is 0


# -- whole-image operations ----------------------------------------------------------------------------------

def test_resize_grow_moves_clusters_for_the_bat(tmp_path):
    p = tmp_path / "v.hds"
    cli("create", "-f", "parallels", "-o", "cluster_size=4K", p, "4M", expect=0)
    data = bytes(range(256)) * 16 * 1024
    write(p, 0, data)
    cli("resize", p, "12M", expect=0)  # 3072 entries no longer fit before the data
    assert read_all(p) == data + bytes(8 * M)
    peers.assert_qemu_check_clean(p, "parallels")
    (tmp_path / "want.raw").write_bytes(data + bytes(8 * M))
    peers.assert_qemu_compare(tmp_path / "want.raw", p, "raw", "parallels")
    assert peers.qemu_info(p)["virtual-size"] == 12 * M


def test_resize_shrink_and_compact(tmp_path):
    p = qemu_made(tmp_path, "8M", "64K")
    peers.qemu_io(p, "write -P 0x5 7M 1M", "write -P 0x6 0 100k", "write -P 0 1M 1M", fmt="parallels")
    before = read_all(p)
    cli("resize", "--shrink", p, "3000000", expect=0)
    want = before[:3000320]  # rounded up to whole sectors
    assert read_all(p) == want
    peers.assert_qemu_check_clean(p, "parallels")
    size = p.stat().st_size
    cli("compact", p, expect=0)  # the zero clusters qemu-io wrote go
    assert p.stat().st_size == size - 16 * 64 * K
    assert read_all(p) == want
    peers.assert_qemu_check_clean(p, "parallels")
    cli("resize", p, "8M", expect=0)
    assert read_all(p) == want + bytes(8 * M - len(want))


# -- hostile headers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("version", 3, "version 3"),
    ("tracks", 0, "0 sectors"),
    ("tracks", 0xFFFFFFFF, "too big"),
    ("bat_entries", 0x7FFFFFFF, "too large"),
    ("bat_entries", 1 << 20, "past the end of the file"),
    ("bat_entries", 1, "more than 1 clusters"),
    ("nb_sectors", 1 << 40, "more than"),
    ("data_off", 0, "not a non-zero multiple"),
    ("data_off", 100, "not a non-zero multiple"),
    ("inuse", 0x1234, "in-use field"),
])
def test_hostile_header(tmp_path, field, value, words):
    p = qemu_made(tmp_path, "4M", "64K")
    off, n = HEADER.span(field)
    poke(p, off, {4: "<I", 8: "<Q"}[n], value)
    if field == "version":  # the CLI's one line, once
        r = cli("info", p, expect=1)
        assert r.stderr.startswith("vdtool: error:") and r.stderr.count("\n") == 1, r.stderr
    with pytest.raises(VdError, match=words):
        read_all(p)


def test_bat_entry_off_a_cluster_boundary(tmp_path):
    p = _v1_image(tmp_path / "v1.hds")  # entries in sectors: one can point off a cluster boundary
    poke(p, BAT_OFFSET, "<I", 2)
    with pytest.raises(VdError, match="BAT entry 0 points to offset 1024, not at a cluster boundary"):
        read_all(p)
    cli("check", "-r", "all", p, expect=0)
    peers.assert_qemu_check_clean(p, "parallels")


def test_untrusted(tmp_path):
    p = qemu_made(tmp_path, "4M", "64K")
    cli("info", "--untrusted", p, expect=0)  # a bare image names no other file
    poke(p, HEADER.offset_of("flags"), "<I", 0x10)
    r = cli("info", "--untrusted", p, expect=1)
    assert "flags 0x10" in r.stderr and r.stderr.count("\n") == 1


# -- .hdd bundles ---------------------------------------------------------------------------------------

NULL = "{00000000-0000-0000-0000-000000000000}"
G_BASE, G_TOP = "{11111111-2222-3333-4444-555555555555}", "{66666666-7777-8888-9999-aaaaaaaaaaaa}"


def _descriptor(sectors, storages, shots, top) -> str:
    """A DiskDescriptor.xml as Parallels Desktop writes it: storages are
    (start, end, [(guid, type, file)]), shots (guid, parent)."""
    st = "".join(f"<Storage><Start>{a}</Start><End>{b}</End><Blocksize>128</Blocksize>"
                 + "".join(f"<Image><GUID>{g}</GUID><Type>{t}</Type><File>{f}</File></Image>" for g, t, f in ims)
                 + "</Storage>" for a, b, ims in storages)
    sh = "".join(f"<Shot><GUID>{g}</GUID><ParentGUID>{p}</ParentGUID></Shot>" for g, p in shots)
    return (f"<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\"><Disk_Parameters>"
            f"<Disk_size>{sectors}</Disk_size><Heads>16</Heads></Disk_Parameters><StorageData>{st}</StorageData>"
            f"<Snapshots><TopGUID>{top}</TopGUID>{sh}</Snapshots></Parallels_disk_image>\n")


def _snapshot_bundle(tmp_path):
    """Two storages (4 MiB, then 2 MiB), two snapshots; the second storage's
    base image is a flat one.  Returns (bundle, what it reads as)."""
    b = tmp_path / "vm.hdd"
    b.mkdir()
    base = qemu_made(b, "4M", "64K", name="base.hds")
    top = qemu_made(b, "4M", "64K", name="top.hds")
    top2 = qemu_made(b, "2M", "64K", name="top2.hds")
    peers.qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 3M 100k", fmt="parallels")
    peers.qemu_io(top, "write -P 0x22 512k 88k", fmt="parallels")  # clusters 8 and 9 (the rest zeros)
    peers.qemu_io(top2, "write -P 0x33 64k 4k", fmt="parallels")
    flat = bytes([0x44]) * (2 * M)
    (b / "base2.img").write_bytes(flat)
    (b / "DiskDescriptor.xml").write_text(_descriptor(
        12288, [(0, 8192, [(G_BASE, "Compressed", "base.hds"), (G_TOP, "Compressed", "top.hds")]),
                (8192, 12288, [(G_BASE, "Plain", "base2.img"), (G_TOP, "Compressed", "top2.hds")])],
        [(G_BASE, NULL), (G_TOP, G_BASE)], G_TOP))
    peers.qemu_to_raw(base, tmp_path / "base.raw", "parallels")
    peers.qemu_to_raw(top, tmp_path / "top.raw", "parallels")
    peers.qemu_to_raw(top2, tmp_path / "top2.raw", "parallels")
    want = bytearray((tmp_path / "base.raw").read_bytes())
    want[512 * K:640 * K] = (tmp_path / "top.raw").read_bytes()[512 * K:640 * K]
    second = bytearray(flat)
    second[64 * K:128 * K] = (tmp_path / "top2.raw").read_bytes()[64 * K:128 * K]
    return b, bytes(want + second)


def test_bundle_reads_its_snapshot_chain(tmp_path):
    b, want = _snapshot_bundle(tmp_path)
    assert read_all(b) == want
    cli("convert", "-O", "raw", b, tmp_path / "out.raw", expect=0)
    assert (tmp_path / "out.raw").read_bytes() == want
    d = json.loads(cli("info", "--output", "json", b, expect=0).stdout)
    assert d["virtual-size"] == 6 * M and d["format-specific"]["data"]["snapshot-chain"] == [G_TOP, G_BASE]
    r = cli("discard", b, "0:64k", expect=1)  # writing a bundle with snapshots is not implemented yet
    assert "not implemented yet" in r.stderr and r.stderr.count("\n") == 1
    assert read_all(b) == want


def test_bundle_written_by_vdtool(tmp_path):
    b = tmp_path / "new.hdd"
    cli("create", "-f", "parallels", "--variant", "bundle", "-o", "cluster_size=64K", b, "3M", expect=0)
    (hds,) = [p for p in b.iterdir() if p.suffix == ".hds"]
    with open_image(str(b), writable=True) as s:
        s.write(100 * K, b"\x5a" * 300 * K)
    want = bytes(100 * K) + b"\x5a" * 300 * K + bytes(3 * M - 400 * K)
    assert read_all(b) == want
    peers.assert_qemu_check_clean(hds, "parallels")
    (tmp_path / "want.raw").write_bytes(want)
    peers.assert_qemu_compare(tmp_path / "want.raw", hds, "raw", "parallels")
    cli("check", b, expect=0)
    cli("resize", b, "8M", expect=0)  # the image and the descriptor's sizes
    assert read_all(b) == want + bytes(5 * M)
    cli("resize", "--shrink", b, "200K", expect=0)
    assert read_all(b) == want[:200 * K]
    assert peers.qemu_info(hds)["virtual-size"] == 200 * K
    assert "<Disk_size>400</Disk_size>" in (b / "DiskDescriptor.xml").read_text()
    peers.assert_qemu_check_clean(hds, "parallels")
    cli("resize", b, "3M", expect=0)
    cli("convert", "-O", "parallels", "--variant", "bundle", tmp_path / "want.raw", tmp_path / "c.hdd", expect=0)
    assert read_all(tmp_path / "c.hdd") == want


def test_bundle_untrusted_extents_leaving_the_folder(tmp_path):
    b = tmp_path / "vm.hdd"
    b.mkdir()
    qemu_made(tmp_path, "4M", name="outside.hds")
    (b / "DiskDescriptor.xml").write_text(_descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "../outside.hds")])],
                                                      [(G_BASE, NULL)], G_BASE))
    cli("info", b, expect=0)
    r = cli("info", "--untrusted", b, expect=1)
    assert "outside.hds" in r.stderr and r.stderr.count("\n") == 1
    qemu_made(b, "4M", name="inside.hds")
    (b / "DiskDescriptor.xml").write_text(_descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "inside.hds")])],
                                                      [(G_BASE, NULL)], G_BASE))
    cli("info", "--untrusted", b, expect=0)


@pytest.mark.parametrize("case,words", [
    ("bomb", "DTD or entities"), ("not-xml", "does not parse"), ("loop", "loops"),
    ("missing-image", "no image for snapshot"), ("overlap", "overlap"), ("past-disk", "of a disk of"),
    ("not-a-number", "not a number"), ("no-file", "no such file"), ("type", "not supported"),
    ("short-image", "less than its storage"),
])
def test_bundle_hostile_descriptor(tmp_path, case, words):
    b = tmp_path / "vm.hdd"
    b.mkdir()
    qemu_made(b, "4M", name="a.hds")
    qemu_made(b, "2M", name="small.hds")
    one = [(0, 8192, [(G_BASE, "Compressed", "a.hds")])]
    shots = [(G_BASE, NULL)]
    text = {
        "bomb": '<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><p>&b;</p>',
        "not-xml": "<Parallels_disk_image><Disk_Parameters>",
        "loop": _descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "a.hds"), (G_TOP, "Compressed", "a.hds")])],
                            [(G_BASE, G_TOP), (G_TOP, G_BASE)], G_TOP),
        "missing-image": _descriptor(8192, one, [(G_BASE, NULL), (G_TOP, G_BASE)], G_TOP),
        "overlap": _descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "a.hds")]),
                                      (4096, 8192, [(G_BASE, "Compressed", "small.hds")])], shots, G_BASE),
        "past-disk": _descriptor(4096, one, shots, G_BASE),
        "not-a-number": _descriptor(8192, one, shots, G_BASE).replace("<End>8192", "<End>-1"),
        "no-file": _descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "gone.hds")])], shots, G_BASE),
        "type": _descriptor(8192, [(0, 8192, [(G_BASE, "Sparse", "a.hds")])], shots, G_BASE),
        "short-image": _descriptor(8192, [(0, 8192, [(G_BASE, "Compressed", "small.hds")])], shots, G_BASE),
    }[case]
    (b / "DiskDescriptor.xml").write_text(text)
    with pytest.raises(VdError) as ei:
        read_all(b)
    assert words in str(ei.value) and "\n" not in str(ei.value)

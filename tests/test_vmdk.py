"""VMDK backend judged by peers: qemu-img/qemu-io images read byte-exactly,
vdtool images pass qemu-img check/compare and vmdkinfo, ops on every
variant, streamOptimized header values ESXi checks, overlays, hostile input."""

from __future__ import annotations

import os
import random
import struct

import pytest

import peers
from helpers import read_all
from vdrun import cli
from vdtool.core import ops
from vdtool.core.errors import ChainError, NotSupported, VdError
from vdtool.core.stack import open_image

K, M, G = 1 << 10, 1 << 20, 1 << 30
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized")
WRITABLE = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs")


def pattern_raw(path, size=5 * M, seed=1):
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(12):
        off = rng.randrange(0, size - 200 * K)
        n = rng.randrange(1, 200 * K)
        data[off:off + n] = rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(1, 256)]) * n
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def fill_qemu(path):
    peers.qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 100k 10k", "write -P 0x33 3M 1M",
                  "write -z 3200k 64k", "write -P 0x44 5180k 4k")


# -- reading what qemu-img writes ---------------------------------------------------------

_SPARSE_OPTS = ["", "compat6=on", "zeroed_grain=on", "adapter_type=lsilogic", "adapter_type=buslogic",
                "adapter_type=legacyESX"]


@pytest.mark.parametrize("sub,opts", [(s, o) for s in SUBFORMATS for o in _SPARSE_OPTS
                                      if o in ("", "compat6=on") or s in ("monolithicSparse",
                                                                          "twoGbMaxExtentSparse")])
def test_read_qemu_images(tmp_path, sub, opts):
    src = tmp_path / "src.raw"
    pattern_raw(src)
    img = tmp_path / "q.vmdk"
    o = f"subformat={sub}" + (f",{opts}" if opts else "")
    if sub == "streamOptimized":
        peers.qemu_img("convert", "-O", "vmdk", "-o", o, src, img)
    else:
        peers.qemu_img("create", "-q", "-f", "vmdk", "-o", o, img, "5300K")
        fill_qemu(img)
    want = tmp_path / "want.raw"
    peers.qemu_to_raw(img, want)
    assert read_all(img) == open(want, "rb").read()
    r = ops.check(str(img))
    assert r.corruptions == 0 and r.check_errors == 0, r.messages


def test_read_qemu_zero_grains(tmp_path):
    img = tmp_path / "z.vmdk"
    peers.qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "2M")
    peers.qemu_io(img, "write -P 0x5a 0 2M", "write -z 64k 128k", "write -z 1M 100k")
    want = tmp_path / "w.raw"
    peers.qemu_to_raw(img, want)
    assert read_all(img) == open(want, "rb").read()
    with open_image(str(img)) as s:
        st, n, _ = s.block_status(64 * K, 128 * K)
        assert st.name == "ZERO" and n == 128 * K


def test_split_sparse_over_2g_boundary(tmp_path):
    img = tmp_path / "s.vmdk"
    peers.qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, "3G")
    peers.qemu_io(img, "write -P 0x61 2047M 2M", "write -P 0x62 3071M 1M")
    with open_image(str(img)) as s:
        assert s.read(2047 * M, 2 * M) == b"\x61" * (2 * M)
        assert s.read(3071 * M, M) == b"\x62" * M
        assert s.read(0, M) == bytes(M)


# -- vdtool writes, peers judge ---------------------------------------------------------------

@pytest.mark.parametrize("variant", SUBFORMATS + ("vmfs",))
def test_convert_to_vmdk_judged(tmp_path, variant):
    src = tmp_path / "src.raw"
    pattern_raw(src)
    dst = tmp_path / "out.vmdk"
    ops.convert(str(src), str(dst), variant=variant, verify=True)
    if variant != "vmfs":
        peers.assert_qemu_check_clean(dst)
    peers.assert_qemu_compare(dst, src)
    peers.run("vmdkinfo", dst)
    with open_image(str(dst)) as s:
        assert s.top.variant == variant
    # no absolute paths anywhere in the descriptor
    assert str(tmp_path).encode() not in open(dst, "rb").read(64 * K)


@pytest.mark.parametrize("adapter", ["ide", "lsilogic", "buslogic", "legacyESX"])
def test_create_options(tmp_path, adapter):
    img = tmp_path / "o.vmdk"
    ops.create(str(img), 100 * M, options={"adapter_type": adapter, "hwversion": "11"})
    info = peers.qemu_info(img)
    assert info["virtual-size"] == 100 * M
    text = open(img, "rb").read(20 * K)
    assert f'ddb.adapterType = "{adapter}"'.encode() in text
    assert b'ddb.virtualHWVersion = "11"' in text
    heads = 16 if adapter == "ide" else 255
    assert f'ddb.geometry.heads = "{heads}"'.encode() in text
    peers.assert_qemu_check_clean(img)
    peers.run("vmdkinfo", img)


def test_create_uuid_and_zeroed_grain(tmp_path):
    img = tmp_path / "u.vmdk"
    u = "12345678-1234-1234-1234-123456789abc"
    cli("create", "-q", "--uuid", u, "-o", "zeroed_grain=on", img, "10M", expect=0)
    with open_image(str(img)) as s:
        assert s.top.uuid == u
    hdr = open(img, "rb").read(512)
    version, flags = struct.unpack_from("<II", hdr, 4)
    assert version == 2 and flags & 4


def test_stream_optimized_header_for_esxi(tmp_path):
    src = tmp_path / "src.raw"
    data = pattern_raw(src)
    dst = tmp_path / "s.vmdk"
    cli("convert", "-q", "-c", src, dst, expect=0)  # -c means streamOptimized
    raw = open(dst, "rb").read()
    (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, unclean, nl,
     algo) = struct.unpack_from("<4sIIQQQQIQQQB4sH", raw, 0)
    assert magic == b"KDMV" and version == 3
    assert flags == 0x30001  # newline test, compressed grains, markers
    assert algo == 1 and gd == 0xFFFFFFFFFFFFFFFF and rgd == 0
    assert capacity * 512 == len(data) and grain == 128 and gtes == 512 and doff == 1 and overhead % grain == 0
    assert nl == b"\n \r\n" and unclean == 0
    desc = raw[512:512 + dsize * 512].rstrip(b"\0").decode()
    for key in ('createType="streamOptimized"', "ddb.virtualHWVersion", "ddb.adapterType", "ddb.toolsVersion",
                "ddb.geometry.cylinders", "ddb.geometry.heads", "ddb.geometry.sectors", "ddb.longContentID",
                "parentCID=ffffffff", "CID="):
        assert key in desc
    # footer marker, footer with the real gdOffset, end-of-stream marker
    n, size, mtype = struct.unpack_from("<QII", raw, len(raw) - 1536)
    assert (n, size, mtype) == (1, 0, 3)
    assert raw[-1024:-1020] == b"KDMV"
    fgd = struct.unpack_from("<Q", raw, len(raw) - 1024 + 56)[0]
    assert 0 < fgd * 512 < len(raw)
    assert raw[-512:] == bytes(512)
    # first grain: marker with lba 0 and a zlib stream
    lba, csize = struct.unpack_from("<QI", raw, overhead * 512)
    assert raw[overhead * 512 + 12] == 0x78
    peers.assert_qemu_check_clean(dst)
    peers.assert_qemu_compare(dst, src)
    peers.run("vmdkinfo", dst)
    back = tmp_path / "back.raw"
    peers.qemu_img("convert", "-O", "raw", dst, back)
    assert open(back, "rb").read() == data
    assert read_all(dst) == data
    # writes after creation are refused clearly
    with pytest.raises(NotSupported):
        with open_image(str(dst), writable=True) as s:
            s.write(0, b"x" * 512)


def test_convert_from_vmdk_to_qcow2_and_back(tmp_path):
    src = tmp_path / "src.raw"
    pattern_raw(src)
    a = tmp_path / "a.vmdk"
    ops.convert(str(src), str(a), variant="twoGbMaxExtentSparse")
    q = tmp_path / "q.qcow2"
    ops.convert(str(a), str(q))
    peers.assert_qemu_compare(q, src)
    b = tmp_path / "b.vmdk"
    cli("convert", "-q", q, b, expect=0)
    peers.assert_qemu_compare(b, src)


# -- differencing ---------------------------------------------------------------------------

def test_overlay_chain_with_qemu(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(pattern_raw(src))
    base = tmp_path / "base.vmdk"
    ops.convert(str(src), str(base))
    ov = tmp_path / "ov.vmdk"
    cli("create", "-q", "-b", base, ov, expect=0)
    text = open(ov, "rb").read(20 * K)
    with open_image(str(base)) as s:
        cid = s.top.cid
    assert f"parentCID={cid}".encode() in text and b'parentFileNameHint="base.vmdk"' in text
    peers.assert_qemu_compare(ov, src)
    peers.qemu_io(ov, "write -P 0xab 100k 70k")
    data[100 * K:170 * K] = b"\xab" * (70 * K)
    with open_image(str(ov), writable=True) as s:
        s.write(1000, b"\x11" * 5000)
        s.write_zeroes(256 * K, 128 * K)
        s.discard(3 * M, M)
    data[1000:6000] = b"\x11" * 5000
    data[256 * K:384 * K] = bytes(128 * K)
    data[3 * M:4 * M] = bytes(M)
    assert read_all(ov) == bytes(data)
    want = tmp_path / "want.raw"
    open(want, "wb").write(data)
    peers.assert_qemu_compare(ov, want)
    peers.assert_qemu_check_clean(ov)
    # CID changed by the writes; the parent's untouched
    with open_image(str(ov)) as s:
        assert s.top.cid != s.top.parent_cid
    # convert --parent writes only what differs
    ov2 = tmp_path / "ov2.vmdk"
    ops.convert(str(ov), str(ov2), parent=str(base))
    peers.assert_qemu_compare(ov2, want)
    assert os.path.getsize(ov2) < os.path.getsize(base)


def test_parent_cid_mismatch(tmp_path):
    base = tmp_path / "base.vmdk"
    ops.create(str(base), 4 * M)
    ov = tmp_path / "ov.vmdk"
    ops.create(str(ov), parent=str(base))
    with open_image(str(base), writable=True) as s:
        s.write(0, b"changed")
    with pytest.raises(ChainError) as ei:
        open_image(str(ov))
    assert "cid" in str(ei.value)
    p = cli("info", ov, expect=0)  # info reports, does not fail
    p = cli("convert", "-O", "raw", ov, tmp_path / "x.raw", expect=1)
    assert "Traceback" not in p.stderr and "expects" in p.stderr
    with open_image(str(ov), force=True) as s:
        assert s.read(0, 7) == b"changed"


def test_vmdk_overlay_over_qcow2_base_and_merges(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(pattern_raw(src))
    base = tmp_path / "base.qcow2"
    ops.convert(str(src), str(base))
    ov = tmp_path / "ov.vmdk"
    ops.create(str(ov), parent=str(base))
    with open_image(str(ov), writable=True) as s:
        s.write(70 * K, b"\x77" * 100 * K)
        s.write_zeroes(M, 256 * K)
    data[70 * K:170 * K] = b"\x77" * 100 * K
    data[M:M + 256 * K] = bytes(256 * K)
    assert read_all(ov) == bytes(data)
    ops.merge(str(ov), into="child")
    with open_image(str(ov)) as s:
        assert len(s.layers) == 1
    assert read_all(ov) == bytes(data)
    peers.assert_qemu_check_clean(ov)
    # merge into a VMDK parent
    ov2 = tmp_path / "ov2.vmdk"
    ops.create(str(ov2), parent=str(ov))
    with open_image(str(ov2), writable=True) as s:
        s.write(4 * M, b"\x99" * 64 * K)
    data[4 * M:4 * M + 64 * K] = b"\x99" * 64 * K
    ops.merge(str(ov2), into="parent")
    assert not ov2.exists()
    assert read_all(ov) == bytes(data)
    peers.assert_qemu_check_clean(ov)
    # rebase onto nothing (safe)
    ov3 = tmp_path / "ov3.vmdk"
    ops.create(str(ov3), parent=str(ov))
    ops.rebase(str(ov3), None)
    assert read_all(ov3) == bytes(data)


# -- operations on every writable variant ---------------------------------------------------

@pytest.mark.parametrize("variant", ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat",
                                     "twoGbMaxExtentFlat"])
def test_ops_resize_discard_compact_check(tmp_path, variant):
    src = tmp_path / "src.raw"
    data = bytearray(pattern_raw(src))
    img = tmp_path / "d.vmdk"
    ops.convert(str(src), str(img), variant=variant)
    # grow past a split boundary: grain directory relocated / extents added
    ops.resize(str(img), 2 * G + 3 * M)
    peers.assert_qemu_check_clean(img)
    with open_image(str(img), writable=True) as s:
        assert s.virtual_size == 2 * G + 3 * M
        s.write(2 * G + M, b"\x5e" * 70 * K)
        assert s.read(2 * G + M - 10, 20) == bytes(10) + b"\x5e" * 10
    ops.resize(str(img), 4 * M + 1000, shrink=True)
    data = data[:4 * M + 1024]  # whole sectors, as qemu-img keeps them
    ops.discard(str(img), [(M, 300 * K), (2 * M + 10, 5000)])
    data[M:M + 300 * K] = bytes(300 * K)
    data[2 * M + 10:2 * M + 5010] = bytes(5000)
    before = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.startswith("d"))
    ops.compact(str(img))
    after = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.startswith("d"))
    if "Sparse" in variant:
        assert after < before
    assert read_all(img) == bytes(data)
    want = tmp_path / "want.raw"
    open(want, "wb").write(data)
    peers.assert_qemu_compare(img, want)
    peers.assert_qemu_check_clean(img)
    peers.run("vmdkinfo", img)
    r = ops.check(str(img))
    assert r.exit_code == 0, r.messages
    # grow again: the cut tail reads as zeros
    ops.resize(str(img), 6 * M)
    with open_image(str(img)) as s:
        assert s.read(0, 4 * M + 1024) == bytes(data)
        assert s.read(4 * M + 1024, 2 * M - 1024) == bytes(2 * M - 1024)


def test_compact_overlay_keeps_zeros_over_parent(tmp_path):
    base = tmp_path / "b.vmdk"
    ops.create(str(base), 2 * M)
    with open_image(str(base), writable=True) as s:
        s.write(0, b"\xff" * 2 * M)
    ov = tmp_path / "o.vmdk"
    ops.create(str(ov), parent=str(base))
    with open_image(str(ov), writable=True) as s:
        s.write(0, bytes(128 * K))  # zeros written as data over parent data
        s.write(M, b"\x01" * 64 * K)
        s.write(M, bytes(64 * K))
    ops.compact(str(ov))
    with open_image(str(ov)) as s:
        assert s.read(0, 128 * K) == bytes(128 * K)
        assert s.read(M, 64 * K) == bytes(64 * K)
        assert s.read(128 * K, 64 * K) == b"\xff" * 64 * K
    peers.assert_qemu_check_clean(ov)


def test_compact_stream_rewrites(tmp_path):
    src = tmp_path / "src.raw"
    data = pattern_raw(src)
    img = tmp_path / "s.vmdk"
    ops.convert(str(src), str(img), compress=True)
    ops.compact(str(img))
    assert read_all(img) == data
    peers.assert_qemu_check_clean(img)
    peers.assert_qemu_compare(img, src)


def test_check_repairs_redundant_directory_and_bad_entries(tmp_path):
    img = tmp_path / "c.vmdk"
    ops.create(str(img), 4 * M)
    with open_image(str(img), writable=True) as s:
        s.write(0, b"\x42" * 256 * K)
    raw = bytearray(open(img, "rb").read())
    rgd, gd = struct.unpack_from("<QQ", raw, 48)
    gt = struct.unpack_from("<I", raw, gd * 512)[0]
    rgt = struct.unpack_from("<I", raw, rgd * 512)[0]
    struct.pack_into("<I", raw, rgt * 512, 0)  # redundant table out of step
    struct.pack_into("<I", raw, gt * 512 + 8, 0x7FFFFFF0)  # grain 2 past EOF
    open(img, "wb").write(raw)
    r = ops.check(str(img))
    assert r.corruptions >= 2 and r.exit_code == 2
    cli("check", img, expect=2)
    r = ops.check(str(img), repair="all")
    assert r.corruptions_fixed >= 2
    r = ops.check(str(img))
    assert r.exit_code == 0, r.messages
    peers.assert_qemu_check_clean(img)


def test_info_external_references(tmp_path):
    (tmp_path / "sub").mkdir()
    flat = tmp_path / "data.bin"
    flat.write_bytes(bytes(M))
    d = tmp_path / "sub" / "d.vmdk"
    d.write_text('# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\n'
                 'createType="monolithicFlat"\r\n# comment\r\nRW 2048 FLAT "../data.bin" 0\r\n'
                 'ddb.unknownKey = "kept"\r\n')
    info = ops.info(str(d))
    assert "../data.bin" in info.get("external-references", []) or "../data.bin" in str(info)
    with open_image(str(d), writable=True) as s:
        s.write(0, b"abc")
    text = d.read_text()
    assert 'ddb.unknownKey = "kept"' in text and "# comment" in text
    assert flat.read_bytes()[:3] == b"abc"


# -- hostile headers ------------------------------------------------------------------------

def _sparse_image(tmp_path):
    img = tmp_path / "h.vmdk"
    ops.create(str(img), 4 * M)
    with open_image(str(img), writable=True) as s:
        s.write(0, b"\x42" * 256 * K)
    return img


HOSTILE = {
    "version4": (4, "<I", 4),
    "version0": (4, "<I", 0),
    "grain0": (20, "<Q", 0),
    "grain3000": (20, "<Q", 3000),
    "grain_huge": (20, "<Q", 1 << 40),
    "gtes0": (44, "<I", 0),
    "gtes_huge": (44, "<I", 1 << 30),
    "capacity_2^57": (12, "<Q", 1 << 48),
    "capacity_huge_gd": (12, "<Q", 1 << 46),
    "desc_past_eof": (28, "<Q", 1 << 30),
    "desc_huge": (36, "<Q", 1 << 20),
    "gd_past_eof": (56, "<Q", 1 << 30),
    "rgd_past_eof": (48, "<Q", 1 << 30),
    "gd_zero": (56, "<Q", 0),
    "nl_chars": (73, "<I", 0x0A0D0A0D),
    "compress_algo": (77, "<H", 7),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header(tmp_path, case):
    img = _sparse_image(tmp_path)
    off, fmt, value = HOSTILE[case]
    raw = bytearray(open(img, "rb").read())
    struct.pack_into(fmt, raw, off, value)
    open(img, "wb").write(raw)
    with pytest.raises(VdError):
        with open_image(str(img), "vmdk") as s:
            s.read(0, s.virtual_size)
    p = cli("info", "-f", "vmdk", img, expect=1)
    assert "Traceback" not in p.stderr and p.stderr.startswith("vdtool: error:") and "h.vmdk" in p.stderr


@pytest.mark.parametrize("case", ["gd_entry", "gte_past_eof", "marker_size", "descriptor_line", "missing_extent",
                                  "extent_sectors", "cid", "footer"])
def test_hostile_tables_and_descriptors(tmp_path, case):
    if case in ("marker_size", "footer"):
        src = tmp_path / "src.raw"
        pattern_raw(src)
        img = tmp_path / "h.vmdk"
        ops.convert(str(src), str(img), compress=True)
        raw = bytearray(open(img, "rb").read())
        if case == "marker_size":
            ov = struct.unpack_from("<Q", raw, 64)[0] * 512
            struct.pack_into("<I", raw, ov + 8, 0x7FFFFFFF)
        else:
            raw[-1536 + 12] = 9  # footer marker type
    elif case in ("descriptor_line", "missing_extent", "extent_sectors", "cid"):
        img = tmp_path / "h.vmdk"
        ops.create(str(img), 4 * M, variant="monolithicFlat")
        text = open(img).read()
        text = {"descriptor_line": text.replace("version=1", "version=1\nthis is not a descriptor line"),
                "missing_extent": text.replace("h-flat.vmdk", "nothere.vmdk"),
                "extent_sectors": text.replace("RW 8192 FLAT", "RW 99999999999999999999 FLAT"),
                "cid": text.replace("parentCID=ffffffff", "parentCID=zzzz")}[case]
        raw = bytearray(text.encode())
    else:
        img = _sparse_image(tmp_path)
        raw = bytearray(open(img, "rb").read())
        gd = struct.unpack_from("<Q", raw, 56)[0]
        if case == "gd_entry":
            struct.pack_into("<I", raw, gd * 512, 0x7FFFFFF0)
        else:
            gt = struct.unpack_from("<I", raw, gd * 512)[0]
            struct.pack_into("<I", raw, gt * 512, 0x7FFFFFF0)
    open(img, "wb").write(raw)
    with pytest.raises(VdError):
        with open_image(str(img), "vmdk") as s:
            s.read(0, s.virtual_size)
    p = cli("convert", "-f", "vmdk", "-O", "raw", img, tmp_path / "o.raw", expect=1)
    assert "Traceback" not in p.stderr and p.stderr.startswith("vdtool: error:")


def test_fuzz_flips_never_traceback(tmp_path):
    img = _sparse_image(tmp_path)
    good = open(img, "rb").read()
    rng = random.Random(7)
    for i in range(60):
        raw = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(0, 512) if rng.random() < 0.6 else rng.randrange(0, 40 * K)
            raw[pos] = rng.randrange(256)
        p = tmp_path / f"f{i}.vmdk"
        p.write_bytes(bytes(raw[:rng.choice([len(raw), len(raw), rng.randrange(1, len(raw))])]))
        try:
            with open_image(str(p), "vmdk") as s:
                if s.virtual_size <= 64 * M:
                    s.read(0, s.virtual_size)
            ops.check(str(p), "vmdk")
        except VdError:
            pass


def test_probe(tmp_path):
    from vdtool.core import registry

    img = tmp_path / "p.bin"
    ops.create(str(img), M, fmt="vmdk", variant="monolithicFlat")
    assert registry.probe_format(str(img)) == "vmdk"
    img2 = tmp_path / "p2.bin"
    ops.create(str(img2), M, fmt="vmdk")
    assert registry.probe_format(str(img2)) == "vmdk"


def test_descriptor_file_with_qemu_nul_padding(tmp_path):
    """qemu-io's CID update can leave the descriptor text followed by a NUL,
    a newline and NUL padding (seen with twoGbMaxExtentSparse): qemu-img
    reads it and so must vdtool; text after the NUL is still refused."""
    img = tmp_path / "q.vmdk"
    peers.qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", img, "5300K")
    peers.qemu_io(img, "write -P 0x11 0 64k")
    text = open(img, "rb").read().split(b"\0", 1)[0]
    with open(img, "wb") as f:
        f.write((text + b"\0\n").ljust(512, b"\0"))
    want = tmp_path / "want.raw"
    peers.qemu_to_raw(img, want)
    assert read_all(img) == open(want, "rb").read()
    assert ops.check(str(img)).exit_code == 0
    with open(img, "wb") as f:
        f.write(text + b"\0createType=\"monolithicFlat\"\n")
    with pytest.raises(VdError, match="neither a VMDK sparse extent nor a text descriptor"):
        open_image(str(img)).close()

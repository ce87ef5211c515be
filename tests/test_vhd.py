"""VHD backend: judged by qemu-img/qemu-io and libvhdi's vhdiinfo.

Images qemu-img writes (dynamic, fixed, force_size, odd sizes) must read
through vdtool exactly as qemu-img converts them; images vdtool writes must
compare equal under qemu-img and be accepted by vhdiinfo; ops (convert,
compact, resize, discard, check -r, merge, rebase) and the creator size
rules; differencing chains over any format, with relative locators."""

from __future__ import annotations

import os

import pytest

import peers
from helpers import peek, poke, read_all, write_at
from vdrun import cli
from vdtool.core import ops, registry
from vdtool.core.backend import Status
from vdtool.core.errors import ChainError, CorruptImageError, UsageError, VdError
from vdtool.core.stack import open_image
from vdtool.formats.vhd import layout as V
from vdtool.formats.vhd.backend import VhdBackend

K, M, G = 1 << 10, 1 << 20, 1 << 30


def fill(stack, writes):
    for off, data in writes:
        stack.write(off, data)


# -- reading what qemu writes ------------------------------------------------------------------

@pytest.mark.parametrize("opts,size", [
    ((), "10M"), ((), "1000001"), ((), "129M"), (("-o", "subformat=fixed"), "10M"),
    (("-o", "subformat=fixed"), "5000000"), (("-o", "force_size=on"), "10000000"),
    (("-o", "force_size=on,subformat=fixed"), "3333333"), (("-o", "force_size=on"), "64M"),
])
def test_reads_qemu_images(tmp_path, opts, size):
    p = tmp_path / "q.vhd"
    peers.qemu_img("create", "-q", "-f", "vpc", *opts, p, size)
    vsize = peers.qemu_info(p, "vpc")["virtual-size"]
    cmds = [f"write -P 0x5a 0 {min(vsize, 1 * M)}", f"write -P 0x33 {vsize - 4096} 4096",
            f"write -P 0xc1 {vsize // 2 // 512 * 512} 1536"]
    peers.qemu_io(p, *cmds, fmt="vpc")
    assert registry.probe_format(str(p)) == "vhd"
    info = ops.info(str(p))
    assert info["format"] == "vpc" and info["virtual-size"] == vsize  # qemu-img's driver name
    assert read_all(p) == peers.qemu_raw(p, tmp_path, "vpc")
    # vdtool's own convert of it agrees too
    out = tmp_path / "out.raw"
    ops.convert(str(p), str(out), fmt="raw")
    assert out.read_bytes() == peers.qemu_raw(p, tmp_path, "vpc")


def test_fixed_is_never_raw(tmp_path):
    p = tmp_path / "fixed.img"
    peers.qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "3M")
    peers.qemu_io(p, "write -P 0x42 0 64K", fmt="vpc")
    assert registry.probe_format(str(p)) == "vhd"
    r = cli("info", "--output", "json", p, text=False)
    assert r.returncode == 0 and b'"format": "vpc"' in r.stdout  # qemu-img's name for VHD
    with open_image(str(p)) as s:
        assert s.top.variant == "fixed" and s.virtual_size == peers.qemu_info(p, "vpc")["virtual-size"]


def test_qemu_convert_from_qcow2_reads_back(tmp_path):
    q = tmp_path / "src.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", q, "7M")
    peers.qemu_io(q, "write -P 0x9 100K 3M", "write -P 0x7 6M 100K", fmt="qcow2")
    for sub in ("dynamic", "fixed"):
        p = tmp_path / f"c-{sub}.vhd"
        peers.qemu_img("convert", "-f", "qcow2", "-O", "vpc", "-o", f"subformat={sub}", q, p)
        assert read_all(p) == peers.qemu_raw(p, tmp_path, "vpc")


# -- what vdtool writes, judged by qemu and libvhdi ------------------------------------------------

@pytest.mark.parametrize("variant", ["dynamic", "fixed"])
@pytest.mark.parametrize("size", [10 * M, 1000000 * 512, 5 * M + 512])
def test_written_images_pass_qemu_and_libvhdi(tmp_path, variant, size):
    p = tmp_path / "v.vhd"
    ops.create(str(p), size, variant=variant)
    with open_image(str(p), writable=True) as s:
        assert s.virtual_size == size
        fill(s, [(0, b"\x01" * 70000), (size - 1000, b"\x02" * 1000), (3 * M + 5, b"abc" * 999)])
        s.write_zeroes(100, 300)
        model = s.read(0, size)
    assert peers.qemu_info(p, "vpc")["virtual-size"] == size
    assert peers.qemu_raw(p, tmp_path, "vpc") == model
    raw = tmp_path / "m.raw"
    raw.write_bytes(model)
    peers.assert_qemu_compare(p, raw, "vpc", "raw")
    out = peers.run("vhdiinfo", p).stdout.decode()
    assert f"({size} bytes)" in out and ("Fixed" if variant == "fixed" else "Dynamic") in out
    r = ops.check(str(p))
    assert r.exit_code == 0, r.messages


def test_convert_to_vhd_and_back(tmp_path):
    src = tmp_path / "src.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", src, "9M")
    peers.qemu_io(src, "write -P 0xaa 0 1M", "write -P 0xbb 5M 3000", "write -z 6M 1M", fmt="qcow2")
    for variant in ("dynamic", "fixed"):
        dst = tmp_path / f"d-{variant}.vhd"
        ops.convert(str(src), str(dst), variant=variant, verify=True)
        peers.assert_qemu_compare(src, dst, "qcow2", "vpc")
        back = tmp_path / f"back-{variant}.qcow2"
        ops.convert(str(dst), str(back))
        peers.assert_qemu_compare(src, back, "qcow2", "qcow2")
    # only written blocks are allocated
    with open_image(str(tmp_path / "d-dynamic.vhd")) as s:
        assert sum(1 for e in s.top.state.bat if e != V.UNUSED) == 2


def test_block_sizes(tmp_path):
    for bs in (4 * K, 512 * K, 16 * M):
        p = tmp_path / f"b{bs}.vhd"
        ops.create(str(p), 50 * M, block_size=bs)
        with open_image(str(p), writable=True) as s:
            fill(s, [(bs - 7, b"\x5a" * (2 * bs + 100)), (49 * M, b"\x11" * 5000)])
            model = s.read(0, s.virtual_size)
        assert peers.qemu_raw(p, tmp_path, "vpc") == model
        assert read_all(p) == model
    for bad in (3000, 512, 0, 1 << 29):
        with pytest.raises(UsageError):
            ops.create(str(tmp_path / "bad.vhd"), M, block_size=bad)


def test_azure_option(tmp_path):
    p = tmp_path / "az.vhd"
    r = cli("create", "-f", "vhd", "--variant", "fixed", p, "1000000000", "-o", "azure=on", text=False)
    assert r.returncode == 0, r.stderr
    assert b"1000341504" in r.stdout
    assert os.path.getsize(p) == 1000341504 + 512
    with open_image(str(p)) as s:
        ft = s.top.footer
        assert s.virtual_size == 1000341504 == ft.current_size == ft.original_size
        assert ft.disk_type == V.TYPE_FIXED and ft.data_offset == V.NO_OFFSET and ft.features == 2
        assert ft.file_format_version == 0x10000
    raw = open(p, "rb").read()[-512:]
    assert V.checksum_ok(raw, V.FOOTER)
    res = ops.create(str(tmp_path / "az2.vhd"), 1000000000, variant="fixed", options={"azure": "on"})
    assert res["virtual-size"] == 1000341504 and "MiB" in res["message"]
    with pytest.raises(UsageError):
        ops.create(str(tmp_path / "az3.vhd"), M, options={"azure": "on"})
    # without azure the size is exactly what was asked
    ops.create(str(tmp_path / "ex.vhd"), 1000000000, variant="fixed")
    assert peers.qemu_info(tmp_path / "ex.vhd", "vpc")["virtual-size"] == 1000000000


def test_geometry_by_the_spec():
    assert V.chs_geometry(10 * M) == (301, 4, 17)  # 20480 sectors, rounded down
    assert V.chs_geometry(127 * G) == (16383, 16, 255) or V.chs_geometry(127 * G)[2] == 255
    c, h, s = V.chs_geometry(2040 * G)
    assert (c, h, s) == (65535, 16, 255)
    for size in (1 * M, 100 * M, 4 * G, 40 * G, 300 * G):
        c, h, s = V.chs_geometry(size)
        assert c * h * s * 512 <= size and h <= 16 and s <= 255 and c <= 65535


def _poke_footer(path, **fields):
    """Change footer fields (at the end and in the copy) with checksums recomputed."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        ft = V.FOOTER.unpack(f.read(512)).replace(**fields)
        raw = V.pack_with_checksum(V.FOOTER, ft)
        f.seek(size - 512)
        f.write(raw)
        if ft.disk_type != V.TYPE_FIXED:
            f.seek(0)
            f.write(raw)


@pytest.mark.parametrize("creator,expect_chs", [
    (b"vpc ", True), (b"vs  ", True), (b"qemu", True), (b"win ", False), (b"d2v ", False),
    (b"tap\0", False), (b"CTXS", False), (b"qem2", False), (b"vbox", False),
])
def test_creator_size_rule(tmp_path, creator, expect_chs):
    p = tmp_path / "c.vhd"
    ops.create(str(p), 10 * M + 3 * 512)
    _poke_footer(p, creator_application=creator)
    c, h, s = V.chs_geometry(10 * M + 3 * 512)
    with open_image(str(p)) as st:
        want = c * h * s * 512 if expect_chs else 10 * M + 3 * 512
        assert st.virtual_size == want
        info = st.top.info()
        assert info["current-size"] == 10 * M + 3 * 512 and info["geometry-size"] == c * h * s * 512
    if creator in (b"vpc ", b"qemu", b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"):
        assert peers.qemu_info(p, "vpc")["virtual-size"] == want


def test_max_geometry_means_current_size(tmp_path):
    p = tmp_path / "c.vhd"
    ops.create(str(p), 10 * M)
    _poke_footer(p, creator_application=b"vpc ", cylinders=65535, heads=16, sectors_per_track=255)
    with open_image(str(p)) as st:
        assert st.virtual_size == 10 * M


# -- differencing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_fmt", ["vhd", "raw", "qcow2"])
def test_three_layer_chain_relative_locators(tmp_path, base_fmt):
    d = tmp_path / "imgs"
    d.mkdir()
    base = d / f"base.{ 'img' if base_fmt == 'raw' else base_fmt}"
    ops.create(str(base), 6 * M, fmt=base_fmt)
    with open_image(str(base), writable=True) as s:
        s.write(0, b"\x10" * (3 * M))
    ops.create(str(d / "mid.vhd"), parent=str(base))
    with open_image(str(d / "mid.vhd"), writable=True) as s:
        s.write(M + 100, b"\x20" * 5000)
        s.discard(2 * M, M)  # reads zeros, not the base's data
    ops.create(str(d / "top.vhd"), parent=str(d / "mid.vhd"))
    with open_image(str(d / "top.vhd"), writable=True) as s:
        s.write(5 * M, b"\x30" * 4096)
        s.write(7, b"\x31")
    want = bytearray(b"\x10" * (3 * M) + bytes(3 * M))
    want[M + 100:M + 5100] = b"\x20" * 5000
    want[2 * M:3 * M] = bytes(M)
    want[5 * M:5 * M + 4096] = b"\x30" * 4096
    want[7] = 0x31
    # locators are relative: move the folder and flatten from elsewhere
    moved = tmp_path / "elsewhere"
    os.rename(d, moved)
    other = tmp_path / "cwd"
    other.mkdir()
    r = cli("convert", "-O", "raw", os.path.join("..", "elsewhere", "top.vhd"), "flat.raw", cwd=other)
    assert r.returncode == 0, r.stderr
    assert (other / "flat.raw").read_bytes() == bytes(want)
    out = peers.run("vhdiinfo", moved / "top.vhd").stdout.decode()
    assert "Differential" in out and "mid.vhd" in out
    with open_image(str(moved / "top.vhd")) as s:
        ref = s.top.parent
        assert ref.filename == "mid.vhd" and ref.uuid == s.layers[-2].uuid
        assert any(c.endswith("mid.vhd") and os.path.isabs(c) for c in ref.extra["candidates"])
    # compact keeps the content
    ops.compact(str(moved / "top.vhd"))
    ops.compact(str(moved / "mid.vhd"))
    assert read_all(moved / "top.vhd") == bytes(want)
    # merge into child: top stands alone
    top2 = moved / "top2.vhd"
    ops.convert(str(moved / "mid.vhd"), str(tmp_path / "scratch.raw"), fmt="raw")
    import shutil
    shutil.copy(moved / "top.vhd", top2)
    ops.merge(str(top2), into="child")
    with open_image(str(top2)) as s:
        assert len(s) == 1 and s.top.variant == "dynamic" and s.top.parent is None
        assert s.read(0, 6 * M) == bytes(want)
    # merge into parent
    ops.merge(str(moved / "top.vhd"), into="parent")
    assert read_all(moved / "mid.vhd") == bytes(want)
    assert not (moved / "top.vhd").exists()


def test_parent_uuid_mismatch(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 2 * M)
    ops.create(str(tmp_path / "t.vhd"), parent=str(tmp_path / "b.vhd"))
    os.unlink(tmp_path / "b.vhd")
    ops.create(str(tmp_path / "b.vhd"), 2 * M)
    with pytest.raises(ChainError) as ei:
        open_image(str(tmp_path / "t.vhd"))
    assert "UUID" in str(ei.value)
    with open_image(str(tmp_path / "t.vhd"), force=True) as s:
        assert len(s) == 2
    r = cli("info", tmp_path / "t.vhd", text=False)
    assert r.returncode == 0 and b"MISMATCH" in r.stdout


def test_parent_timestamp_and_name(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 2 * M)
    ops.create(str(tmp_path / "t.vhd"), parent=str(tmp_path / "b.vhd"))
    with open_image(str(tmp_path / "t.vhd")) as s:
        top, base = s.top, s.layers[0]
        assert top.state.parent_ts == base.timestamp
        assert top.state.parent_name == "b.vhd"
        codes = {loc.code for loc in top.state.locators}
        assert codes == {V.PLAT_W2RU, V.PLAT_W2KU}
        assert top.info()["parent-unicode-name"] == "b.vhd"


def test_mac_and_w2ku_only_locators(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 2 * M)
    with open_image(str(tmp_path / "b.vhd"), writable=True) as s:
        s.write(0, b"\x77" * 512)
    ops.create(str(tmp_path / "t.vhd"), parent=str(tmp_path / "b.vhd"))
    # rewrite the locators as MacX (file URL) only
    with open_image(str(tmp_path / "t.vhd"), writable=True) as s:
        top = s.top
        url = ("file://localhost" + str(tmp_path / "b.vhd")).encode()
        loc = top.state.locators[0]
        top.file.pwrite(loc.offset, url.ljust(loc.space, b"\0"))
        loc.code, loc.length = V.PLAT_MACX, len(url)
        top.state.locators = [loc]
        top.state.header_dirty = True
    with open_image(str(tmp_path / "t.vhd")) as s:
        assert s.top.parent.filename == str(tmp_path / "b.vhd")
        assert s.read(0, 512) == b"\x77" * 512


def test_convert_with_parent_and_rebase(tmp_path):
    ops.create(str(tmp_path / "b.qcow2"), 4 * M)
    with open_image(str(tmp_path / "b.qcow2"), writable=True) as s:
        s.write(0, b"\x01" * (2 * M))
    src = tmp_path / "src.raw"
    data = bytearray(b"\x01" * (2 * M) + bytes(2 * M))
    data[M:M + 4096] = b"\x02" * 4096
    data[0:512] = bytes(512)
    src.write_bytes(bytes(data))
    ops.convert(str(src), str(tmp_path / "o.vhd"), parent=str(tmp_path / "b.qcow2"))
    assert read_all(tmp_path / "o.vhd") == bytes(data)
    with open_image(str(tmp_path / "o.vhd")) as s:
        allocated = sum(1 for e in s.top.state.bat if e != V.UNUSED)
        assert allocated == 1
    # safe rebase onto nothing keeps the content
    ops.rebase(str(tmp_path / "o.vhd"), None)
    assert read_all(tmp_path / "o.vhd") == bytes(data)
    with open_image(str(tmp_path / "o.vhd")) as s:
        assert s.top.variant == "dynamic"
    peers.assert_qemu_compare(src, tmp_path / "o.vhd", "raw", "vpc")
    # and back onto a parent
    ops.rebase(str(tmp_path / "o.vhd"), str(tmp_path / "b.qcow2"))
    assert read_all(tmp_path / "o.vhd") == bytes(data)


def test_fixed_cannot_have_parent(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 2 * M)
    with pytest.raises(VdError):
        ops.create(str(tmp_path / "t.vhd"), variant="fixed", parent=str(tmp_path / "b.vhd"))


# -- operations ----------------------------------------------------------------------------------------

def test_resize_dynamic_grows_bat_and_moves_blocks(tmp_path):
    p = tmp_path / "r.vhd"
    ops.create(str(p), 4 * M)  # 2 BAT entries, one BAT sector
    with open_image(str(p), writable=True) as s:
        s.write(0, b"\x01" * M)
        s.write(3 * M, b"\x02" * M)
    before = read_all(p)
    ops.resize(str(p), 600 * M)  # 300 entries: the BAT needs 3 sectors
    after = read_all(p)
    assert after[:4 * M] == before and len(after) == 600 * M and not any(after[4 * M:])
    with open_image(str(p), writable=True) as s:
        assert s.top.state.max_table_entries == 300
        s.write(599 * M, b"\x03" * 100)
    assert peers.qemu_info(p, "vpc")["virtual-size"] == 600 * M
    raw = tmp_path / "r.raw"
    raw.write_bytes(read_all(p))
    peers.assert_qemu_compare(p, raw, "vpc", "raw")
    assert ops.check(str(p)).exit_code == 0
    # shrink
    res = ops.resize(str(p), "3M", shrink=True)
    assert res["lost-allocated-bytes"] > 0
    assert read_all(p) == before[:3 * M]
    ops.resize(str(p), 4 * M)
    assert read_all(p) == before[:3 * M] + bytes(M)
    raw.write_bytes(read_all(p))
    peers.assert_qemu_compare(p, raw, "vpc", "raw")


def test_resize_differencing_grows_bat_past_locators(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 4 * M)
    with open_image(str(tmp_path / "b.vhd"), writable=True) as s:
        s.write(0, b"\x05" * (4 * M))
    t = tmp_path / "t.vhd"
    ops.create(str(t), parent=str(tmp_path / "b.vhd"))
    with open_image(str(t), writable=True) as s:
        s.write(M, b"\x06" * 1000)
    before = read_all(t)
    ops.resize(str(t), 900 * M)
    with open_image(str(t)) as s:
        assert len(s) == 2 and s.read(0, 4 * M) == before
        assert not any(s.read(4 * M, 8 * M))


def _footer(path) -> "V.FOOTER.record":
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return V.FOOTER.unpack(f.read(512))


@pytest.mark.parametrize("variant,maker", [("dynamic", "vdtool"), ("fixed", "vdtool"), ("dynamic", "qemu-img")])
def test_resized_vhd_reads_the_same_everywhere(tmp_path, variant, maker):
    """libvhdi takes the footer's original size (offset 40) as the media
    size, qemu-img and VirtualBox the current size (or the CHS geometry for
    Virtual PC's disks): resize sets all three to the new size."""
    p = tmp_path / "r.vhd"
    if maker == "qemu-img":
        peers.qemu_img("create", "-q", "-f", "vpc", p, "30M")
    else:
        ops.create(str(p), 30 * M, variant=variant)
    for new, shrink in ((70 * M, False), (33 * M + 512, True), (9 * M, True)):
        ops.resize(str(p), new, shrink=shrink)
        ft = _footer(p)
        geometry = ft.cylinders * ft.heads * ft.sectors_per_track * 512
        assert ft.current_size == ft.original_size == new and geometry <= new
        out = peers.run("vhdiinfo", p).stdout.decode()
        assert f"({new} bytes)" in out, out
        assert peers.qemu_info(p, "vpc")["virtual-size"] == new
        with open_image(str(p)) as s:
            assert s.virtual_size == new


def test_resize_fixed(tmp_path):
    p = tmp_path / "f.vhd"
    ops.create(str(p), 3 * M, variant="fixed")
    with open_image(str(p), writable=True) as s:
        s.write(3 * M - 512, b"\x09" * 512)
    ops.resize(str(p), "+1M")
    assert os.path.getsize(p) == 4 * M + 512
    data = read_all(p)
    assert data[3 * M - 512:3 * M] == b"\x09" * 512 and not any(data[3 * M:])
    assert peers.qemu_info(p, "vpc")["virtual-size"] == 4 * M
    ops.resize(str(p), 2 * M, shrink=True)
    assert os.path.getsize(p) == 2 * M + 512 and read_all(p) == bytes(2 * M)
    assert peers.run("vhdiinfo", p).returncode == 0


def test_compact_releases_and_moves(tmp_path):
    p = tmp_path / "c.vhd"
    ops.create(str(p), 20 * M)
    with open_image(str(p), writable=True) as s:
        for i in range(10):
            s.write(i * 2 * M, bytes([i + 1]) * 4096)
        for i in (1, 4, 5, 8):
            s.write(i * 2 * M, bytes(4096))  # allocated zeros
    before = read_all(p)
    size_before = os.path.getsize(p)
    ops.compact(str(p))
    assert read_all(p) == before
    assert os.path.getsize(p) == size_before - 4 * (2 * M + 512)
    raw = tmp_path / "c.raw"
    raw.write_bytes(before)
    peers.assert_qemu_compare(p, raw, "vpc", "raw")
    assert ops.check(str(p)).exit_code == 0


def test_compact_differencing_keeps_zeros_over_parent(tmp_path):
    ops.create(str(tmp_path / "b.vhd"), 8 * M)
    with open_image(str(tmp_path / "b.vhd"), writable=True) as s:
        s.write(0, b"\x44" * (2 * M))
    t = tmp_path / "t.vhd"
    ops.create(str(t), parent=str(tmp_path / "b.vhd"))
    with open_image(str(t), writable=True) as s:
        s.write(0, bytes(4096))  # zeros hiding parent data: must stay
        s.write(4 * M, bytes(4096))  # zeros over zeros: may go
        s.write(6 * M, b"\x01" * 10)
    before = read_all(t)
    ops.compact(str(t))
    assert read_all(t) == before
    with open_image(str(t)) as s:
        assert sum(1 for e in s.top.state.bat if e != V.UNUSED) == 2


def test_discard(tmp_path):
    p = tmp_path / "d.vhd"
    ops.create(str(p), 8 * M)
    with open_image(str(p), writable=True) as s:
        s.write(0, b"\x01" * (8 * M))
    ops.discard(str(p), ["2M:2M", "5M:1000"])
    with open_image(str(p)) as s:
        assert s.top.state.bat[1] == V.UNUSED
        d = s.read(0, 8 * M)
    assert d[:2 * M] == b"\x01" * (2 * M) and not any(d[2 * M:4 * M]) and not any(d[5 * M:5 * M + 1000])
    assert d[5 * M + 1000:] == b"\x01" * (3 * M - 1000)
    ops.compact(str(p))
    assert read_all(p) == d


def test_block_status_merges_runs_on_huge_images(tmp_path):
    p = tmp_path / "h.vhd"
    ops.create(str(p), 2000 * G)
    with open_image(str(p), writable=True) as s:
        s.write(1000 * G, b"\x01" * 512)
        st, n, _ = s.block_status(0, s.virtual_size)
        assert st == Status.UNALLOCATED and n == 1000 * G
        st, n, _ = s.block_status(1000 * G, s.virtual_size - 1000 * G)
        assert st == Status.DATA and n == 512
        st, n, _ = s.block_status(1000 * G + 512, s.virtual_size)
        assert st == Status.UNALLOCATED and n == 1000 * G - 512
    with pytest.raises(UsageError):
        ops.create(str(tmp_path / "big.vhd"), 2041 * G)
    ops.create(str(tmp_path / "bigfixed.vhd"), 3000 * G, variant="fixed")


# -- check and repair ----------------------------------------------------------------------------------

def _dynamic_with_data(path):
    ops.create(str(path), 8 * M)
    with open_image(str(path), writable=True) as s:
        s.write(0, b"\x01" * M)
        s.write(4 * M, b"\x02" * M)
    return read_all(path)


def test_check_repairs_footer_from_copy(tmp_path):
    p = tmp_path / "k.vhd"
    data = _dynamic_with_data(p)
    size = os.path.getsize(p)
    write_at(p, size - 512 + 40, b"\xff" * 8)  # breaks the footer's checksum
    assert read_all(p) == data  # the copy stands in
    r = ops.check(str(p))
    assert r.corruptions >= 1 and r.exit_code == 2
    r = ops.check(str(p), repair="all")
    assert r.corruptions_fixed >= 1
    assert ops.check(str(p)).exit_code == 0
    assert read_all(p) == data
    raw = tmp_path / "k.raw"
    raw.write_bytes(data)
    peers.assert_qemu_compare(p, raw, "vpc", "raw")


def test_check_truncated_footer(tmp_path):
    p = tmp_path / "k.vhd"
    data = _dynamic_with_data(p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 512)
    assert ops.check(str(p)).exit_code == 2
    ops.check(str(p), repair="all")
    assert ops.check(str(p)).exit_code == 0 and read_all(p) == data


def _poke_bat(path, index, value):
    poke(path, peek(path, 512 + 16, ">Q") + 4 * index, ">I", value)


@pytest.mark.parametrize("what", ["past-eof", "over-metadata", "overlap"])
def test_check_bad_bat_entries(tmp_path, what):
    p = tmp_path / "k.vhd"
    _dynamic_with_data(p)
    with open_image(str(p)) as s:
        first = s.top.state.bat[0]
    value = {"past-eof": 0x7FFFFF00, "over-metadata": 1, "overlap": first + 1}[what]
    _poke_bat(p, 3, value)
    r = ops.check(str(p))
    assert r.exit_code == 2 and r.corruptions >= 1
    with pytest.raises(CorruptImageError):
        read_all(p)
    r = ops.check(str(p), repair="all")
    assert r.corruptions_fixed >= 1
    r = ops.check(str(p))
    assert r.exit_code == 0, r.messages
    with open_image(str(p)) as s:
        assert s.read(0, M) == b"\x01" * M


def test_check_leak_of_empty_bitmap(tmp_path):
    p = tmp_path / "k.vhd"
    _dynamic_with_data(p)
    with open_image(str(p)) as s:
        off = s.top.state.bat[2 * M // (2 * M) * 2] * 512  # block 2
    write_at(p, off, bytes(512))
    r = ops.check(str(p))
    assert r.exit_code == 3 and r.leaks == 1
    r = ops.check(str(p), repair="leaks")
    assert r.leaks_fixed == 1 and ops.check(str(p)).exit_code == 0


def test_check_cli_json(tmp_path):
    p = tmp_path / "k.vhd"
    _dynamic_with_data(p)
    r = cli("check", "--output", "json", p, text=False)
    assert r.returncode == 0 and b'"format": "vpc"' in r.stdout  # qemu-img's name for VHD


# -- bad input -----------------------------------------------------------------------------------------

def _dyn(tmp_path, name="h.vhd"):
    p = tmp_path / name
    ops.create(str(p), 8 * M)
    with open_image(str(p), writable=True) as s:
        s.write(0, b"\x01" * 4096)
    return p


def _poke_header(path, **fields):
    with open(path, "r+b") as f:
        f.seek(512)
        raw = bytearray(f.read(1024))
        raw = bytearray(V.DYNAMIC_HEADER.pack(V.DYNAMIC_HEADER.unpack(raw), **fields))
        if "checksum" not in fields:
            V.with_checksum(raw, V.DYNAMIC_HEADER)
        f.seek(512)
        f.write(raw)


def _poke_locator(path, **fields):
    with open(path, "r+b") as f:
        at = 512 + V.DYNAMIC_HEADER.offset_of("parent_locator_entries")
        f.seek(at)
        entry = V.PARENT_LOCATOR.unpack(f.read(V.PARENT_LOCATOR.size))
        f.seek(at)
        f.write(V.PARENT_LOCATOR.pack(entry, **{"platform_data_" + k: v for k, v in fields.items()}))
        f.seek(512)
        raw = bytearray(f.read(1024))
        V.with_checksum(raw, V.DYNAMIC_HEADER)
        f.seek(512)
        f.write(raw)


def _diff(tmp_path):
    ops.create(str(tmp_path / "pb.vhd"), 8 * M)
    p = tmp_path / "h.vhd"
    ops.create(str(p), parent=str(tmp_path / "pb.vhd"))
    return p


HOSTILE = {
    "block-size-zero": lambda t: _poke_header(_dyn(t), block_size=0),
    "block-size-not-pow2": lambda t: _poke_header(_dyn(t), block_size=3000),
    "block-size-huge": lambda t: _poke_header(_dyn(t), block_size=1 << 31),
    "max-entries-too-small": lambda t: _poke_header(_dyn(t), max_table_entries=1),
    "max-entries-huge": lambda t: _poke_header(_dyn(t), max_table_entries=0xFFFFFFFF),
    "max-entries-past-eof": lambda t: _poke_header(_dyn(t), max_table_entries=1020 * 1024),
    "table-offset-past-eof": lambda t: _poke_header(_dyn(t), table_offset=1 << 40),
    "table-offset-over-header": lambda t: _poke_header(_dyn(t), table_offset=600),
    "header-version": lambda t: _poke_header(_dyn(t), header_version=0x00020000),
    "header-cookie": lambda t: _poke_header(_dyn(t), cookie=b"cxspars3"),
    "header-checksum": lambda t: _poke_header(_dyn(t), checksum=12345),
    "data-offset-past-eof": lambda t: _poke_footer(_dyn(t), data_offset=1 << 50),
    "data-offset-zero": lambda t: _poke_footer(_dyn(t), data_offset=0),
    "current-size-over-2040G": lambda t: _poke_footer(_dyn(t), current_size=2041 * G),
    "current-size-over-2^56": lambda t: _poke_footer(_fixed(t), current_size=1 << 57),
    "fixed-size-past-file": lambda t: _poke_footer(_fixed(t), current_size=1 << 40),
    "disk-type-unknown": lambda t: _poke_footer(_dyn(t), disk_type=5),
    "disk-type-zero": lambda t: _poke_footer(_fixed(t), disk_type=0),
    "format-version": lambda t: _poke_footer(_dyn(t), file_format_version=0x00090000),
    "footer-checksums-both": lambda t: _break_both_footers(_dyn(t)),
    "fixed-footer-checksum": lambda t: _break_fixed_footer(_fixed(t)),
    "locator-past-eof": lambda t: _poke_locator(_diff(t), offset=1 << 40),
    "locator-absurd-length": lambda t: _poke_locator(_diff(t), length=0x7FFFFFFF),
    "locator-over-header": lambda t: _poke_locator(_diff(t), offset=600),
}


def _fixed(tmp_path):
    p = tmp_path / "h.vhd"
    ops.create(str(p), 2 * M, variant="fixed")
    return p


def _break_both_footers(p):
    size = os.path.getsize(p)
    for at in (0, size - 512):
        write_at(p, at + 64, b"\x12\x34\x56\x78")


def _break_fixed_footer(p):
    size = os.path.getsize(p)
    write_at(p, size - 512 + 64, b"\x12\x34\x56\x78")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers(tmp_path, case):
    HOSTILE[case](tmp_path)
    p = tmp_path / "h.vhd"
    with pytest.raises(VdError):
        read_all(p, "vhd")
    r = cli("info", p, text=False)
    assert r.returncode == 1, r
    assert r.stderr.startswith(b"vdtool: error: ") and b"Traceback" not in r.stderr
    assert str(p).encode() in r.stderr


def test_bad_checksum_readable_with_force(tmp_path):
    p = _dyn(tmp_path)
    _poke_header(p, checksum=12345)
    with pytest.raises(CorruptImageError) as ei:
        VhdBackend.open(str(p))
    assert "--force" in str(ei.value)
    img = VhdBackend.open(str(p), options={"force": True})
    try:
        assert img.read(0, 4096) == b"\x01" * 4096
        assert img.check().corruptions >= 1
    finally:
        img.close()


def test_random_truncations_and_flips(tmp_path):
    import random

    src = _diff(tmp_path)
    with open_image(str(src), writable=True) as s:
        s.write(0, b"\x01" * 5000)
    good = src.read_bytes()
    rng = random.Random(7)
    for i in range(60):
        data = bytearray(good)
        if i % 3 == 0:
            data = data[:rng.randrange(0, len(data))]
        else:
            for _ in range(rng.randrange(1, 6)):
                region = rng.choice([(0, 512), (512, 1536), (1536, 3584), (len(data) - 512, len(data))])
                data[rng.randrange(*region)] = rng.randrange(256)
        p = tmp_path / f"f{i}.vhd"
        p.write_bytes(bytes(data))
        try:
            with open_image(str(p), "vhd", force=True) as s:
                s.read(0, s.virtual_size)
        except VdError:
            pass
        try:
            ops.check(str(p), fmt="vhd")
        except VdError:
            pass


@pytest.mark.parametrize("fmt,qfmt", [("vhd", "vpc"), ("vhdx", "vhdx")])
def test_convert_leaves_the_zero_part_of_a_half_filled_block_unwritten(tmp_path, fmt, qfmt):
    """Per 2 MiB block, 1 MiB of data and 1 MiB of written zeros: the new
    image holds the data, not the zeros (qemu-img leaves them too); the
    blocks' unwritten halves read as zeros for qemu-img and vdtool."""
    src = tmp_path / "half.raw"
    with open(src, "wb") as f:
        for i in range(16):
            f.write(os.urandom(1 << 20) if i % 2 == 0 else bytes(1 << 20))
    out = tmp_path / f"half.{fmt}"
    cli("convert", "-q", "-O", fmt, str(src), str(out))
    assert os.stat(out).st_blocks * 512 < (8 << 20) + (4 << 20)  # the data and metadata, not 16 MiB
    peers.qemu_img("compare", "-f", qfmt, "-F", "raw", str(out), str(src))
    assert read_all(str(out)) == src.read_bytes()

"""Unit tests of the core: sizes, registry probing, progress, the
capability-vs-override rule, and chain validation."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

import peers
from vdrun import vdtool_env
from vdtool.core import registry
from vdtool.core.backend import Cap, ImageBackend
from vdtool.core.errors import ChainError, NotImplementedFormat, UsageError, VdError
from vdtool.core.progress import Progress
from vdtool.core.sizes import format_size, parse_relative_size, parse_size
from vdtool.core.stack import MAX_CHAIN_DEPTH, open_image

HERE = os.path.dirname(os.path.abspath(__file__))

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# -- sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("64K", 64 * K), ("64k", 64 * K), ("10G", 10 * G), ("1.5T", 3 * T // 2),
    ("4MiB", 4 * M), ("4mib", 4 * M), ("4M", 4 * M), ("1.5K", 1536), ("0.5M", 512 * K),
    (" 2G ", 2 * G), ("1P", 1 << 50), ("1E", 1 << 60), ("7B", 7), ("7b", 7), (".5K", 512), (4096, 4096),
])
def test_parse_size_good(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "abc", "K", "-1", "-1K", "1X", "1.5", "1.0001K", "4iB", "1..5K", "nan", "inf", "1e3", "0x10",
    "1 2", "1KK", "+5", "1Z",
])
def test_parse_size_bad(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize("text,hint", [("10GB", "10G or 10GiB"), ("4MB", "4M or 4MiB"), ("1.5 tb", "1.5T or 1.5TiB")])
def test_decimal_looking_suffixes_are_refused_with_a_hint(text, hint):
    with pytest.raises(UsageError, match="ambiguous") as ei:
        parse_size(text)
    assert hint in str(ei.value)


def test_parse_relative_size():
    assert parse_relative_size("+1M", 1 * M) == 2 * M
    assert parse_relative_size("-512K", 1 * M) == 512 * K
    assert parse_relative_size("-1M", 1 * M) == 0
    assert parse_relative_size("3M", 1 * M) == 3 * M
    assert parse_relative_size(" +1.5K ", 0) == 1536
    with pytest.raises(UsageError):
        parse_relative_size("-2M", 1 * M)
    with pytest.raises(UsageError):
        parse_relative_size("+", 1 * M)
    with pytest.raises(UsageError):
        parse_relative_size("+-1M", 1 * M)


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1024) == "1 KiB"
    assert format_size(3 * M // 2) == "1.5 MiB"
    assert format_size(10 * G) == "10 GiB"


# -- registry probing ------------------------------------------------------------------

def _write(path, data: bytes, size: int | None = None):
    with open(path, "wb") as f:
        f.write(data)
        if size is not None and size > len(data):
            f.truncate(size)
    return str(path)


def test_raw_scores_one():
    raw = registry.get_backend("raw")
    assert raw.probe(b"", b"", 0) == 1
    assert raw.probe(b"QFI\xfb\x00\x00\x00\x03" + bytes(100), b"", 1 << 20) == 1


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096, bytes(range(256)) * 64, b"QFI", b"hello world\n"])
def test_probe_plain_files_are_raw(tmp_path, content):
    p = _write(tmp_path / "disk.qcow2", content)  # the name must not matter
    assert registry.probe_format(p) == "raw"
    assert registry.probe_scores(p) in ({"raw": 1}, {})


def test_probe_qcow2_beats_raw(tmp_path):
    p = tmp_path / "disk.img"  # a raw-sounding name: content decides
    peers.qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    scores = registry.probe_scores(str(p))
    assert scores.get("raw") == 1
    assert scores["qcow2"] > 1
    assert registry.probe_format(str(p)) == "qcow2"
    with open_image(str(p)) as s:
        assert s.top.name == "qcow2"
        assert s.virtual_size == 1 * M


def test_qcow_v1_magic_is_qcow_not_qcow2(tmp_path):
    p = tmp_path / "v1.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow", p, "1M")
    assert open(p, "rb").read(8) == b"QFI\xfb\x00\x00\x00\x01"
    assert registry.probe_format(str(p)) == "qcow"
    with open_image(str(p)) as s:  # the qcow (v1) backend opens it
        assert s.top.name == "qcow" and s.virtual_size == 1 << 20
    # a hand-made v1 header says the same
    h = _write(tmp_path / "hand.qcow2", b"QFI\xfb" + struct.pack(">I", 1) + bytes(64), 4096)
    assert registry.probe_format(h) == "qcow"


def test_unimplemented_formats_recognised(tmp_path):
    # every format of the CLI contract now has a backend (VHDX was the
    # last qemu-img can write); a pending one is still refused by name
    for name, matches in registry._PENDING_MAGIC:  # noqa: SLF001 (empty once all are built)
        assert name in registry.ALL_FORMATS
    assert str(NotImplementedFormat("dmg", "x")) == "x: the dmg format is not implemented yet in vdtool"
    assert issubclass(NotImplementedFormat, VdError)


@pytest.mark.parametrize("qfmt,name,opts", [
    ("qcow2", "qcow2", ()), ("vdi", "vdi", ()), ("vdi", "vdi", ("-o", "static=on")),
    ("vmdk", "vmdk", ()), ("vmdk", "vmdk", ("-o", "subformat=monolithicFlat")),
    ("vmdk", "vmdk", ("-o", "subformat=streamOptimized")), ("vpc", "vhd", ()),
    ("vpc", "vhd", ("-o", "subformat=fixed")), ("parallels", "parallels", ()),
    ("qed", "qed", ()), ("qcow", "qcow", ()),
])
def test_implemented_formats_probed_by_content(tmp_path, qfmt, name, opts):
    p = tmp_path / "disk.img"  # a raw-sounding name: content decides
    peers.qemu_img("create", "-q", "-f", qfmt, *opts, p, "3M")
    assert registry.probe_format(str(p)) == name
    want = peers.qemu_info(p, qfmt)["virtual-size"]
    with open_image(str(p)) as s:
        assert s.top.name == name
        assert s.virtual_size == want
        assert s.read(0, 4096) == bytes(4096)


def _implemented_names():
    return list(registry.BUILTIN)


def test_hand_made_magics(tmp_path):
    cases = {
        "vdi": b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + struct.pack("<I", 0xBEDA107F),
        "vmdk": b"KDMV" + bytes(60),
        "vhdx": b"vhdxfile" + bytes(56),
        "qed": b"QED\x00" + bytes(60),
    }
    for name, head in cases.items():
        p = _write(tmp_path / f"{name}.bin", head, 8192)
        assert registry._magic_scores(open(p, "rb").read(), b"", 8192).get(name) == 100, name
    # a VHD footer at the end only (fixed VHD)
    tail = b"conectix" + bytes(504)
    assert registry._magic_scores(bytes(512), bytes(3584) + tail, 1 << 20).get("vhd") == 100


def test_canonical_names(monkeypatch):
    assert registry.canonical_name("VPC") == "vhd"
    assert registry.canonical_name(" Qcow2 ") == "qcow2"
    with pytest.raises(UsageError):
        registry.canonical_name("floppy")
    assert registry.get_backend("dmg").name == "dmg"
    # a format the CLI contract names before its backend exists
    monkeypatch.setattr(registry, "ALL_FORMATS", registry.ALL_FORMATS + ("floppy",))
    with pytest.raises(NotImplementedFormat):
        registry.get_backend("floppy")


def test_broken_plugin_does_not_break_probing(tmp_path, monkeypatch):
    p = _write(tmp_path / "plain.img", b"just data" * 100)
    monkeypatch.setattr(registry, "_plugins", {"bogus": "vdtool_no_such_module_xyz:Backend"})
    assert registry.probe_format(p) == "raw"
    with pytest.raises(VdError):
        registry.get_backend("bogus")


def test_plugin_declared_by_an_installed_distribution_is_found(tmp_path, monkeypatch):
    dist = tmp_path / "vdtool_fakefmt-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vdtool-fakefmt\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vdtool.formats]\nfakefmt = vdtool_fakefmt:Backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins", None)
    assert registry._plugins_declared()
    assert registry._plugin_specs() == {"fakefmt": "vdtool_fakefmt:Backend"}
    assert "fakefmt" in registry.implemented()


def test_no_plugins_means_no_importlib_metadata():
    """importlib.metadata costs ~18 ms of start-up; it loads only where a
    distribution declares a vdtool.formats entry point."""
    code = ("import sys; from vdtool.core import registry as r; r._plugin_specs(); "
            "print(r._plugins_declared(), 'importlib.metadata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=vdtool_env(),
                         check=True).stdout
    declared, loaded = out.split()
    assert loaded == declared


# -- progress ----------------------------------------------------------------------------

def test_progress_subranges_and_monotonic():
    seen = []
    p = Progress(lambda pct, done, total: seen.append(pct))
    a = p.sub(0, 50)
    b = p.sub(50, 50)
    a.update(0, 100)
    a.update(50, 100)
    a.update(100, 100)
    assert seen == [0.0, 25.0, 50.0]
    b.update(50, 100)
    assert seen[-1] == 75.0
    b.sub(50, 50).update(50, 100)  # 50 + 50*(50+25)/100
    assert seen[-1] == 87.5
    a.update(10, 100)  # going back is clamped
    assert seen[-1] == 87.5
    b.update(100, 100)
    assert seen[-1] < 100  # only finish says 100
    p.finish()
    assert seen[-1] == 100.0
    assert all(x <= y for x, y in zip(seen, seen[1:]))


def test_progress_zero_total_and_overflow():
    seen = []
    p = Progress(lambda pct, done, total: seen.append((pct, done, total)))
    p.update(0, 0)
    p.update(200, 100)
    p.update(-5, 100)
    assert [s[0] for s in seen] == [99.9, 99.9, 99.9]
    Progress(None).update(1, 2)  # no callback: nothing happens


def test_progress_cancel_propagates():
    from vdtool.core.errors import OperationCancelled

    def cb(pct, done, total):
        raise OperationCancelled()

    with pytest.raises(OperationCancelled):
        Progress(cb).sub(10, 10).update(1, 2)


# -- capabilities vs overrides ---------------------------------------------------------------

def _backend_classes():
    return [registry.get_backend(name) for name in _implemented_names()]


def _overrides(cls, method: str) -> bool:
    # a classmethod (create, probe) gives a new bound method at every lookup: compare the functions
    mine, base = getattr(cls, method, None), getattr(ImageBackend, method)
    return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)


@pytest.mark.parametrize("cls", _backend_classes(), ids=lambda c: c.name)
def test_capabilities_match_overrides(cls):
    caps = cls.capabilities
    assert isinstance(caps, Cap)
    assert bool(caps & Cap.WRITE) == _overrides(cls, "write"), "WRITE iff write is overridden"
    assert bool(caps & Cap.DISCARD) == (_overrides(cls, "discard") or _overrides(cls, "write_zeroes")), \
        "DISCARD iff discard or write_zeroes is overridden"
    assert bool(caps & Cap.COMPACT) == _overrides(cls, "compact"), "COMPACT iff compact is overridden"
    assert bool(caps & Cap.RESIZE) == _overrides(cls, "resize"), "RESIZE iff resize is overridden"
    assert bool(caps & Cap.CHECK) == _overrides(cls, "_check"), "CHECK iff _check is overridden"
    assert not _overrides(cls, "check"), "check is the base class's template: formats implement _check"
    assert bool(caps & Cap.DIFF) == _overrides(cls, "set_parent"), "DIFF iff set_parent is overridden"
    assert bool(caps & (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED)) == _overrides(cls, "create")
    # flags that only make sense with another one
    if caps & Cap.SHRINK:
        assert caps & Cap.RESIZE
    if caps & Cap.REPAIR:
        assert caps & Cap.CHECK
    if caps & Cap.ZERO_MARKER:
        assert caps & Cap.DIFF
    # the copy engine compresses with these two hooks
    assert bool(caps & Cap.COMPRESS) == _overrides(cls, "compress_block"), \
        "COMPRESS iff compress_block is overridden"
    assert bool(caps & Cap.COMPRESS) == _overrides(cls, "write_compressed_block"), \
        "COMPRESS iff write_compressed_block is overridden"
    assert _overrides(cls, "block_status") and _overrides(cls, "readinto")  # open is the base's (_load_image)
    assert cls.name and cls.extensions and cls.variants
    assert _overrides(cls, "probe")


# -- chain validation ---------------------------------------------------------------------------

def _qcreate(path, size="1M", backing=None):
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", "qcow2"]
    peers.qemu_img(*args, path, size)


def test_chain_loop_is_chain_error(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    _qcreate(a)
    _qcreate(b, backing="a.qcow2")
    peers.qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    for p in (a, b):
        with pytest.raises(ChainError, match="loop"):
            open_image(str(p))
    # a loop is an error for info too (only a missing parent is reported softly)
    from vdtool.core import ops

    with pytest.raises(ChainError):
        ops.info(str(a), chain=True)


def test_chain_self_loop(tmp_path):
    a = tmp_path / "a.qcow2"
    _qcreate(a)
    peers.qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    with pytest.raises(ChainError):
        open_image(str(a))


def test_chain_depth_limit(tmp_path):
    prev = None
    names = []
    for i in range(MAX_CHAIN_DEPTH + 1):
        p = tmp_path / f"l{i:03d}.qcow2"
        _qcreate(p, backing=prev)
        prev = p.name
        names.append(p)
    # exactly MAX_CHAIN_DEPTH layers open
    with open_image(str(names[MAX_CHAIN_DEPTH - 1])) as s:
        assert len(s) == MAX_CHAIN_DEPTH
    with pytest.raises(ChainError, match="deeper"):
        open_image(str(names[MAX_CHAIN_DEPTH]))


def test_missing_parent(tmp_path):
    from vdtool.core import ops

    c = tmp_path / "c.qcow2"
    _qcreate(c, backing="gone-parent.qcow2")
    with pytest.raises(ChainError) as ei:
        open_image(str(c))
    assert "gone-parent.qcow2" in str(ei.value)
    d = ops.info(str(c))  # reports, never raises
    assert d["parent-found"] is False
    assert d["backing-filename"] == "gone-parent.qcow2"
    assert "gone-parent.qcow2" in d.get("parent-problem", "")
    chain = ops.info(str(c), chain=True)
    assert len(chain) == 1 and chain[0]["parent-found"] is False
    # the parent search folders find a parent that moved
    other = tmp_path / "elsewhere"
    other.mkdir()
    _qcreate(other / "gone-parent.qcow2")
    with open_image(str(c), parent_search=[str(other)]) as s:
        assert len(s) == 2


def test_info_chain_found(tmp_path):
    from vdtool.core import ops

    base = tmp_path / "base.img"
    peers.qemu_img("create", "-q", "-f", "raw", base, "1M")
    top = tmp_path / "top.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", top)
    d = ops.info(str(top), chain=True)
    assert [x["format"] for x in d] == ["qcow2", "raw"]
    assert d[0]["parent-found"] is True
    assert d[0]["backing-filename"] == "base.img"
    assert d[0]["virtual-size"] == 1 * M


# -- smaller contracts found while testing ---------------------------------------------------------------

def test_future_qcow2_version_is_not_raw(tmp_path):
    """A file with the qcow2 magic and an unknown version must not fall back
    to raw (writing to it as raw would destroy a real image): it is probed
    as qcow2 and refused with a VdError."""
    p = tmp_path / "v4.img"
    peers.qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack(">I", 4)
    p.write_bytes(bytes(data))
    assert registry.probe_format(str(p)) == "qcow2"
    with pytest.raises(VdError):
        open_image(str(p))


def test_python_api_options_take_typed_values(tmp_path):
    """ops.create/convert take ``options`` as a dict: typed values from
    Python callers work like the CLI's strings."""
    from vdtool.core import ops

    p = str(tmp_path / "a.qcow2")
    ops.create(p, 1 * M, options={"cluster_size": 4096, "lazy_refcounts": True})
    info = peers.qemu_info(p)
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    q = str(tmp_path / "b.qcow2")
    ops.create(q, 1 * M, options={"cluster_size": "8K", "lazy_refcounts": "on"})
    assert peers.qemu_info(q)["cluster-size"] == 8192
    with pytest.raises(UsageError):
        ops.create(str(tmp_path / "c.qcow2"), 1 * M, options={"cluster_size": [1]})
    with pytest.raises(UsageError):
        ops.create(str(tmp_path / "d.qcow2"), 1 * M, options={"lazy_refcounts": 3.5})
    with pytest.raises(UsageError):
        ops.create(str(tmp_path / "e.qcow2"), 1 * M, options={"no_such_option": "1"})


def test_format_option_parse():
    from vdtool.core.backend import FormatOption

    b = FormatOption("flag", bool, False, "a flag")
    assert b.parse("on", "x") is True and b.parse("no", "x") is False
    assert b.parse(True, "x") is True and b.parse(False, "x") is False
    i = FormatOption("n", int, 16, "a number", ())
    assert i.parse("0x10", "x") == 16 and i.parse(16, "x") == 16
    s = FormatOption("sz", "size", 0, "a size")
    assert s.parse("64K", "x") == 65536 and s.parse(512, "x") == 512
    for opt, bad in ((b, "maybe"), (b, 2), (i, "ten"), (i, 1.5), (i, True), (s, "1Q"), (s, None)):
        with pytest.raises(UsageError):
            opt.parse(bad, "x")


def test_stack_read_ranges(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(b"abcdef")
    with open_image(str(p), "raw", writable=True) as s:
        assert s.read(6, 0) == b""
        assert s.read(0, 6) == b"abcdef"
        for off, n in ((0, -1), (-1, 1), (5, 2), (7, 0)):
            with pytest.raises(VdError):
                s.read(off, n)
        for off, n in ((0, 7), (-1, 1), (6, 1)):
            with pytest.raises(VdError):
                s.write(off, b"x" * n)
        with pytest.raises(VdError):
            s.write_zeroes(2, -1)
        with pytest.raises(VdError):
            s.discard(5, 2)
        s.write(6, b"")
        s.write_zeroes(1, 2)
        assert s.read(0, 6) == b"a\0\0def"
    with open_image(str(p), "raw") as s:
        with pytest.raises(VdError):
            s.write(0, b"x")  # read-only


def test_large_writes_go_in_pieces_and_land_whole(tmp_path, monkeypatch):
    """ImageFile.pwrite hands the kernel at most 1 MiB per call (a write
    covering an aligned 2 MiB range is much slower on Linux with large
    page-cache folios) and still writes every byte where it belongs."""
    import os as _os

    from vdtool.core import fileio

    sizes = []
    real = _os.pwrite

    def spy(fd, data, off):
        sizes.append(len(data))
        return real(fd, data, off)

    data = _os.urandom(5 * (1 << 20) + 123)
    p = tmp_path / "f.img"
    with fileio.ImageFile(str(p), create=True) as f:
        monkeypatch.setattr(fileio.os, "pwrite", spy)
        f.pwrite(4096 * 3 + 7, data)
        monkeypatch.undo()
    assert max(sizes) <= 1 << 20 and sum(sizes) == len(data)
    assert p.read_bytes()[4096 * 3 + 7:] == data

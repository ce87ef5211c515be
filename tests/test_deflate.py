"""vdtool.core.deflate: ISA-L (the isal package) and the zlib fallback
(VDTOOL_DEFLATE=zlib).  Compressed images written through ISA-L are not
byte for byte qemu-img's, so they are judged by the peers: qemu-img check
and compare, qcowinfo and vmdkinfo; raw deflate for qcow2 keeps a 4 KiB
window (QEMU inflates with window bits 12); a hostile compressed cluster is
one error line under both engines; -o compression_level is checked."""

from __future__ import annotations

import os
import random
import zlib

import pytest

import peers
from vdrun import cli
from vdtool.core import deflate

M = 1 << 20
ENGINES = ["isal", "zlib"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    if request.param == "zlib":
        monkeypatch.setenv(deflate.ENV, "zlib")
    else:
        monkeypatch.delenv(deflate.ENV, raising=False)
        _need_module("isal")
    assert deflate.engine() == request.param
    return request.param


def _need_module(*names: str) -> None:
    """Skip without the package (any of ``names``), but fail in CI
    (scripts/test.sh installs it)."""
    for name in names:
        try:
            __import__(name)
            return
        except ImportError:
            continue
    if peers.IN_CI:
        pytest.fail(f"the {names[0]} package is not installed -- these tests may not skip in CI")
    pytest.skip(f"the {names[0]} package is not installed")


def _strict_inflate(data: bytes, wbits: int = -12) -> bytes:
    """Inflate in 512-byte steps: every match must then come from zlib's own
    window of 2^-wbits bytes, not from the output buffer, so a stream with
    a longer distance fails ('invalid distance too far back')."""
    d = zlib.decompressobj(wbits)
    out, rest = bytearray(), data
    while True:
        piece = d.decompress(rest, 512)
        out += piece
        rest = d.unconsumed_tail
        if not piece and not rest:
            return bytes(out)


def _far_repeats(n: int, seed: int = 1) -> bytes:
    """Random 8 KiB and 3 KiB blocks repeated: matches 3 KiB back are in a
    4 KiB window, 8 KiB back are not."""
    rng = random.Random(seed)
    a, b = rng.randbytes(8192), rng.randbytes(3072)
    return ((a * 2 + b * 5) * (n // 31744 + 1))[:n]


def _workload(path, seed: int = 3) -> None:
    """Text-like, far-repeat, random and zero clusters, and a hole."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 8)).hex() for _ in range(300)]
    text = " ".join(rng.choice(words) for _ in range(200000)).encode()[:2 * M]
    data = text + _far_repeats(M) + rng.randbytes(M // 2) + bytes(M // 2)
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(len(data) + M)


def test_raw_deflate_keeps_a_4k_window(engine):
    data = _far_repeats(65536)
    for level in range(1, 10):
        out = deflate.deflate(data, level, -12)
        assert _strict_inflate(out) == data, level
    # the check itself catches a 32 KiB window
    c = zlib.compressobj(6, zlib.DEFLATED, -15, 9)
    with pytest.raises(zlib.error):
        _strict_inflate(c.compress(data) + c.flush())


def test_zlib_streams_and_bounds(engine):
    rng = random.Random(2)
    for data in (rng.randbytes(65536), b"text " * 20000, bytes(65536)):
        for level in (1, 6, 9):
            z = deflate.deflate(data, level)
            assert zlib.decompress(z) == data
            assert len(z) <= deflate.compress_bound(len(data))
            raw = deflate.deflate(data, level, -12)  # no bound: qcow2 stores a cluster that grows as it is
            got = deflate.inflate(raw, len(data), -12)
            assert got == (data, False, True)


def test_inflate_is_capped_and_errors_are_one_type(engine):
    bomb = zlib.compress(bytes(64 * M), 9)
    got = deflate.inflate(bomb, 65536)
    assert len(got.data) == 65536 and got.more and not got.ended
    for bad in (b"\xff" * 64, b"\x78\x9c" + os.urandom(200), zlib.compress(b"x" * 1000)[:-6] + b"\xff" * 8):
        try:
            deflate.inflate(bad, 65536)
        except deflate.DeflateError as e:
            assert str(e)
    with pytest.raises(deflate.DeflateError):
        deflate.inflate(b"\xff" * 64, 65536, -12)


def _info_tool_reads(tool: str, path) -> None:
    out = peers.run(tool, path).stdout
    assert out


def test_qcow2_compressed_valid_for_peers(tmp_path, engine):
    src, dst = tmp_path / "src.raw", tmp_path / "c.qcow2"
    _workload(src)
    cli("convert", "-c", "-O", "qcow2", src, dst, expect=0)
    peers.assert_qemu_check_clean(dst)
    peers.assert_qemu_compare(dst, src, fmt_b="raw")
    _info_tool_reads("qcowinfo", dst)
    cli("compare", src, dst, expect=0)


def test_stream_optimized_vmdk_valid_for_peers(tmp_path, engine):
    src, dst = tmp_path / "src.raw", tmp_path / "s.vmdk"
    _workload(src)
    cli("convert", "-c", "-O", "vmdk", "-o", "compression_level=9", src, dst, expect=0)
    assert peers.qemu_info(dst)["format-specific"]["data"]["create-type"] == "streamOptimized"
    peers.assert_qemu_check_clean(dst)
    peers.assert_qemu_compare(dst, src, fmt_b="raw")
    _info_tool_reads("vmdkinfo", dst)
    cli("compare", src, dst, expect=0)


def test_qcow1_compressed_valid_for_peers(tmp_path, engine):
    src, dst = tmp_path / "src.raw", tmp_path / "c.qcow"
    _workload(src)
    cli("convert", "-c", "-O", "qcow", "-o", "compression_level=1", src, dst, expect=0)
    peers.assert_qemu_compare(dst, src, fmt_b="raw")
    _info_tool_reads("qcowinfo", dst)
    cli("compare", src, dst, expect=0)


def test_levels_change_the_output(tmp_path):
    src = tmp_path / "src.raw"
    _workload(src)
    sizes = {}
    for level in (1, 9):
        dst = tmp_path / f"l{level}.qcow2"
        cli("convert", "-c", "-O", "qcow2", "-o", f"compression_level={level}", src, dst, expect=0)
        peers.assert_qemu_compare(dst, src, fmt_b="raw")
        sizes[level] = os.path.getsize(dst)
    assert sizes[9] < sizes[1]


@pytest.mark.parametrize("fmt,opts", [
    ("qcow2", "compression_level=0"), ("qcow2", "compression_level=10"), ("qcow2", "compression_level=abc"),
    ("qcow2", "compression_type=zstd,compression_level=23"), ("vmdk", "compression_level=0"),
    ("qcow", "compression_level=12"),
])
def test_bad_level_is_one_usage_error(tmp_path, fmt, opts):
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * 65536)
    p = cli("convert", "-c", "-O", fmt, "-o", opts, src, tmp_path / "out", expect=2)
    assert p.stderr.count("\n") == 1 and "compression_level" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_vmdk_level_needs_stream_optimized(tmp_path):
    p = cli("create", "-f", "vmdk", "-o", "compression_level=5", tmp_path / "a.vmdk", "1M", expect=2)
    assert "streamOptimized" in p.stderr


def test_zstd_level(tmp_path):
    _need_module("backports.zstd", "compression.zstd")
    src = tmp_path / "src.raw"
    _workload(src)
    sizes = {}
    for level in (1, 19):
        dst = tmp_path / f"z{level}.qcow2"
        cli("convert", "-c", "-O", "qcow2", "-o", f"compression_type=zstd,compression_level={level}", src, dst,
            expect=0)
        peers.assert_qemu_check_clean(dst)
        peers.assert_qemu_compare(dst, src, fmt_b="raw")
        sizes[level] = dst.read_bytes()
    assert sizes[19] != sizes[1] and len(sizes[19]) <= len(sizes[1])  # (files grow by whole clusters)


def _compressed_payloads(path, fmt: str) -> list:
    """(offset, length) of the first few compressed clusters' or grains'
    deflate bytes (after a zlib header or a grain marker)."""
    if fmt == "vmdk":
        from vdtool.formats.vmdk.layout import GRAIN_MARKER

        blob = path.read_bytes()
        pos, out = 65536, []  # the first grain's marker: after header and descriptor (one 64 KiB grain)
        for _ in range(4):
            m = GRAIN_MARKER.unpack(blob[pos:pos + GRAIN_MARKER.size])
            out.append((pos + GRAIN_MARKER.size + 2, m.size - 2))
            pos += -(-(GRAIN_MARKER.size + m.size) // 512) * 512
        return out
    from vdtool.formats.qcow2.backend import Qcow2Backend
    from vdtool.formats.qcow2.layout import L1E_OFFSET_MASK, compressed_extent

    with Qcow2Backend.open(str(path)) as img:
        st = img.st
        tbl = img.clusters.l2_table(st.l1[0] & L1E_OFFSET_MASK)
        return [compressed_extent(tbl[i], st.cb) for i in range(4)]


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_hostile_compressed_data_is_one_error_line(tmp_path, engine, fmt):
    src, dst = tmp_path / "src.raw", tmp_path / f"c.{fmt}"
    src.write_bytes((b"compress me, %d " * 30000 % tuple(range(30000)))[:M])
    cli("convert", "-c", "-O", fmt, src, dst, expect=0)
    blob = bytearray(dst.read_bytes())
    rng = random.Random(7)
    for n, (off, length) in enumerate(_compressed_payloads(dst, fmt)):
        # garbage, all 0xff (an invalid block type), a stream cut short
        blob[off:off + length] = (rng.randbytes(length), b"\xff" * length, bytes(length), rng.randbytes(length))[n]
    dst.write_bytes(bytes(blob))
    p = cli("convert", "-O", "raw", dst, tmp_path / "out.raw")
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("vdtool: error: "), p.stderr


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "qcow"])
def test_source_of_part_sectors_compresses(tmp_path, fmt):
    """A raw source whose size is not whole sectors: the short last block
    is compressed too (qcow2 refused it)."""
    src, dst = tmp_path / "odd.raw", tmp_path / f"odd.{fmt}"
    src.write_bytes((b"compress me " * 50000)[:600000])
    cli("convert", "-c", "-O", fmt, src, dst, expect=0)
    peers.assert_qemu_compare(dst, src, fmt_b="raw")


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_reads_across_many_compressed_clusters(tmp_path, engine, fmt, monkeypatch):
    """One read inflates its clusters in parallel, a batch at a time:
    unaligned reads that start and end inside compressed clusters give the
    source's bytes."""
    from vdtool.core import workers
    from vdtool.core.stack import open_image

    monkeypatch.setattr(workers, "BATCH_BYTES", 5 << 16)  # several batches per read

    src, dst = tmp_path / "src.raw", tmp_path / f"c.{fmt}"
    _workload(src)
    cli("convert", "-c", "-O", fmt, src, dst, expect=0)
    want = src.read_bytes()
    rng = random.Random(4)
    stack = open_image(str(dst))
    try:
        for off, n in [(0, len(want))] + [(rng.randrange(len(want) - 3 * M), rng.randrange(1, 3 * M))
                                          for _ in range(6)]:
            assert stack.read(off, n) == want[off:off + n], (off, n)
    finally:
        stack.close()

"""qcow2 with compression_type=zstd: images qemu-img writes read byte-exactly,
images vdtool writes are the bytes qemu-img writes and pass its check and
compare; create/convert/amend/compact/check keep the compression type; a
damaged zstd cluster or a missing binding is one error line."""

from __future__ import annotations

import json
import random
import struct
import sys

import pytest

import peers
from helpers import file_bytes, read_all, write_at
from vdrun import cli
from vdtool.core.errors import CorruptImageError, UnsupportedFeature, UsageError
from vdtool.core.stack import open_image
from vdtool.formats.qcow2 import codec
from vdtool.formats.qcow2.backend import Qcow2Backend
from vdtool.formats.qcow2.layout import ADDITIONAL_FIELDS, HEADER, INCOMPAT_COMPRESSION, V3_HEADER_LENGTH

K, M = 1 << 10, 1 << 20


def _source(path, clusters: int = 48, cs: int = 64 * K) -> bytes:
    """Text-like (compressible), random (stored plain) and zero clusters."""
    rng = random.Random(16)
    out = bytearray()
    for i in range(clusters):
        if i % 7 == 0:
            out += rng.randbytes(cs)
        elif i % 3:
            out += bytes(rng.choice(b"abcdefgh \n") for _ in range(3000)).ljust(cs, b"\0")
        else:
            out += bytes(cs)
    path.write_bytes(out)
    return bytes(out)


def _qemu_zstd(tmp_path, src, name="q.qcow2", opts="compression_type=zstd"):
    p = tmp_path / name
    peers.qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, src, p)
    return p


def _header_ctype(path) -> tuple:
    raw = file_bytes(path)[:V3_HEADER_LENGTH + 8]
    hdr = HEADER.unpack(raw)
    return hdr.incompatible_features, ADDITIONAL_FIELDS.unpack(raw, V3_HEADER_LENGTH).compression_type


def test_qemu_zstd_image_reads_byte_exact(tmp_path):
    src = tmp_path / "src.raw"
    data = _source(src)
    q = _qemu_zstd(tmp_path, src)
    assert read_all(q) == data
    cli("compare", q, src, expect=0)
    info = json.loads(cli("info", "--output", "json", q, expect=0).stdout)
    want = peers.qemu_info(q)["format-specific"]["data"]
    assert info["format-specific"]["data"] == want
    assert want["compression-type"] == "zstd"
    chk = json.loads(cli("check", "--output", "json", q, expect=0).stdout)
    assert chk["compressed-clusters"] == peers.qemu_check(q)["compressed-clusters"] > 0


def test_short_last_cluster_and_small_clusters(tmp_path):
    src = tmp_path / "src.raw"
    data = _source(src, clusters=10, cs=4 * K)[:-1536]  # virtual size not cluster aligned
    src.write_bytes(data)
    q = _qemu_zstd(tmp_path, src, opts="compression_type=zstd,cluster_size=4096")
    assert read_all(q) == data


def test_vdtool_convert_writes_qemu_img_bytes(tmp_path):
    src = tmp_path / "src.raw"
    _source(src)
    q = _qemu_zstd(tmp_path, src)
    v = tmp_path / "v.qcow2"
    cli("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, v, expect=0)
    peers.assert_qemu_check_clean(v)
    peers.assert_qemu_compare(v, src)
    assert file_bytes(v) == file_bytes(q)  # same layout, same zstd frames as qemu-img 7.2
    assert _header_ctype(v) == (INCOMPAT_COMPRESSION, 1)


def test_zlib_output_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("VDTOOL_DEFLATE", "zlib")  # byte for byte only under the zlib fallback
    src = tmp_path / "src.raw"
    _source(src, clusters=16)
    q = tmp_path / "q.qcow2"
    peers.qemu_img("convert", "-c", "-O", "qcow2", src, q)
    v = tmp_path / "v.qcow2"
    cli("convert", "-c", "-O", "qcow2", src, v, expect=0)
    assert file_bytes(v) == file_bytes(q)
    assert _header_ctype(v) == (0, 0)


def test_create_matches_qemu_img_header(tmp_path):
    v, q = tmp_path / "v.qcow2", tmp_path / "q.qcow2"
    cli("create", "-f", "qcow2", "-o", "compression_type=zstd", v, "16M", expect=0)
    peers.qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", q, "16M")
    assert file_bytes(v) == file_bytes(q)
    with pytest.raises(UsageError, match="compat 1.1"):
        Qcow2Backend.create(str(tmp_path / "x.qcow2"), M, options={"compression_type": "zstd", "compat": "0.10"})
    err = cli("create", "-f", "qcow2", "-o", "compression_type=lz4", tmp_path / "y.qcow2", "1M", expect=2).stderr
    assert "zlib, zstd" in err and err.count("\n") == 1  # a usage error, as every bad -o value


def test_writes_into_zstd_image_and_guest_compressed_writes(tmp_path):
    p = tmp_path / "w.qcow2"
    img = Qcow2Backend.create(str(p), 4 * M, options={"compression_type": "zstd"})
    block = (b"zstd cluster " * 6000)[:64 * K]
    img.write_compressed(0, block)
    img.write_compressed(128 * K, bytes(range(256)) * 256)
    img.write(70 * K, b"plain data" * 100)
    img.close()
    peers.assert_qemu_check_clean(p)
    want = bytearray(4 * M)
    want[:64 * K] = block
    want[128 * K:192 * K] = bytes(range(256)) * 256
    want[70 * K:70 * K + 1000] = b"plain data" * 100
    assert peers.qemu_raw(p, tmp_path) == want
    # a partial write over a compressed cluster rewrites it plain
    with open_image(str(p), writable=True) as s:
        s.write(100, b"X" * 10)
    want[100:110] = b"X" * 10
    assert peers.qemu_raw(p, tmp_path) == want == read_all(p)


def test_check_compact_amend_keep_zstd(tmp_path):
    src = tmp_path / "src.raw"
    data = _source(src)
    p = _qemu_zstd(tmp_path, src)
    with Qcow2Backend.open(str(p), writable=True) as b:  # a zero cluster stored compressed, for compact to drop
        b.write_compressed(64 * K, bytes(64 * K))
    data = data[:64 * K] + bytes(64 * K) + data[128 * K:]
    before = peers.qemu_check(p)["compressed-clusters"]
    with Qcow2Backend.open(str(p)) as b:
        assert b.check().compressed_clusters == before
    cli("compact", p, expect=0)
    assert peers.qemu_check(p)["compressed-clusters"] == before - 1
    cli("amend", "-o", "refcount_bits=8,lazy_refcounts=on", p, expect=0)
    cli("check", p, expect=0)
    peers.assert_qemu_check_clean(p)
    assert peers.qemu_raw(p, tmp_path) == data == read_all(p)
    assert peers.qemu_info(p)["format-specific"]["data"]["compression-type"] == "zstd"
    err = cli("amend", "-o", "compat=0.10,refcount_bits=16", p, expect=1).stderr
    assert "zstd" in err and err.count("\n") == 1


def _first_compressed(path) -> tuple:
    """(host offset, bytes) of the first compressed L2 entry (64K clusters)."""
    raw = file_bytes(path)
    hdr = HEADER.unpack(raw)
    l2 = struct.unpack_from(">Q", raw, hdr.l1_table_offset)[0] & ((1 << 56) - 512)
    for i in range(8192):
        e = struct.unpack_from(">Q", raw, l2 + 8 * i)[0]
        if e >> 62 & 1:
            shift = 62 - (hdr.cluster_bits - 8)
            off = e & ((1 << shift) - 1)
            return off, ((e >> shift) & ((1 << (hdr.cluster_bits - 8)) - 1)) * 512 + 512 - (off & 511)
    raise AssertionError("no compressed cluster")


def _streamed_frame(zs, data: bytes, window_log: int) -> bytes:
    c = zs.ZstdCompressor(options={zs.CompressionParameter.window_log: window_log})
    return c.compress(data) + c.flush()


def test_damaged_zstd_clusters_are_one_error_line(tmp_path):
    src = tmp_path / "src.raw"
    _source(src, clusters=4)
    good = file_bytes(_qemu_zstd(tmp_path, src))
    p = tmp_path / "bad.qcow2"
    p.write_bytes(good)
    off, n = _first_compressed(p)
    zs = codec.zstd_module()
    damages = {
        "garbage": b"\xAA" * 64,
        # a complete frame of 1050 bytes, then zeros: the cluster stays short
        "short": zs.compress(bytes(1000) + b"x" * 50).ljust(n, b"\0"),
        # two frames of 66000 bytes: more than a cluster
        "long": zs.compress(b"y" * 65000) + zs.compress(b"z" * 1000),
        "huge window": _streamed_frame(zs, b"w" * 64 * K, window_log=27),  # no content size: the window counts
    }
    for name, body in damages.items():
        assert len(body) <= n, name
        p.write_bytes(good)
        write_at(p, off, body)
        with pytest.raises(CorruptImageError, match="zstd") as e:
            read_all(p)
        assert "\n" not in str(e.value), name
    proc = cli("convert", "-O", "raw", p, tmp_path / "out.raw", expect=1)
    assert proc.stderr.startswith("vdtool: error: ") and proc.stderr.count("\n") == 1


def test_several_frames_in_one_cluster_read(tmp_path):
    """The spec lets a cluster's data be several zstd frames in a row."""
    src = tmp_path / "src.raw"
    _source(src, clusters=4)
    p = _qemu_zstd(tmp_path, src)
    off, n = _first_compressed(p)
    zs = codec.zstd_module()
    frames = zs.compress(b"a" * 30000) + zs.compress(b"b" * (64 * K - 30000))
    assert len(frames) <= n
    write_at(p, off, frames)
    got = read_all(p)
    assert got[64 * K:128 * K] == b"a" * 30000 + b"b" * (64 * K - 30000)
    assert peers.qemu_raw(p, tmp_path)[64 * K:128 * K] == got[64 * K:128 * K]


def test_missing_zstd_binding_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "src.raw"
    data = _source(src, clusters=4)
    p = _qemu_zstd(tmp_path, src)
    monkeypatch.setattr(codec, "_zstd", None)
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    monkeypatch.setitem(sys.modules, "backports.zstd", None)
    with pytest.raises(UnsupportedFeature, match="zstd compression needs the backports.zstd package"):
        read_all(p)
    with pytest.raises(UnsupportedFeature, match="backports.zstd"):
        Qcow2Backend.create(str(tmp_path / "n.qcow2"), M, options={"compression_type": "zstd"})
    assert not (tmp_path / "n.qcow2").exists()
    # zlib images and the uncompressed parts of zstd images need no binding
    z = tmp_path / "z.qcow2"
    peers.qemu_img("convert", "-c", "-O", "qcow2", src, z)
    assert read_all(z) == data
    with open_image(str(p)) as s:
        assert s.read(3 * 64 * K, 64 * K) == data[3 * 64 * K:]  # a zero cluster


def test_option_value_checked():
    with pytest.raises(UsageError):
        Qcow2Backend.parse_options({"compression_type": "lzo"})

"""The ops on raw and qcow2 images, judged by real peers (qemu-img/qemu-io):
convert, compact, resize, discard, check/repair, merge, rebase, progress."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from functools import partial

import pytest

import helpers
import peers
from vdtool.core import ops
from vdtool.core.backend import Cap, ImageBackend, Status
from vdtool.core.copy import copy_stack
from vdtool.core.errors import OperationCancelled, UsageError, VdError
from vdtool.core.progress import Progress
from vdtool.core.stack import ImageStack, open_image

HERE = os.path.dirname(os.path.abspath(__file__))

K, M = 1 << 10, 1 << 20


# -- fixtures made by the peers ------------------------------------------------------------

def qcreate(path, size="4M", *, cluster=65536, backing=None, backing_fmt="qcow2", extra=()):
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", *extra]
    if backing is not None:
        args += ["-b", os.path.basename(str(backing)) if os.path.dirname(str(backing)) == os.path.dirname(
            str(path)) else str(backing), "-F", backing_fmt]
    peers.qemu_img(*args, path, *([size] if size is not None else []))
    return str(path)


qio = partial(peers.qemu_io, fmt="qcow2")  # most images here are qcow2


def make_raw(path, size, writes):
    """writes: (offset, bytes)"""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return str(path)


def qmap(path, fmt=None) -> list:
    args = ["map", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(peers.qemu_img(*args, str(path)).stdout)


def own_data_clusters(path, cluster, fmt="qcow2") -> set:
    """Indices of clusters the image itself (depth 0) holds as data."""
    out = set()
    for e in qmap(path, fmt):
        if e["depth"] == 0 and e["data"]:
            out.update(range(e["start"] // cluster, (e["start"] + e["length"] + cluster - 1) // cluster))
    return out


def nonzero_clusters(content: bytes, cluster: int) -> set:
    zero = bytes(cluster)
    return {i // cluster for i in range(0, len(content), cluster)
            if content[i:i + cluster] != zero[:len(content[i:i + cluster])]}


def qcow2_chain(tmp_path, cluster=65536, size="4M"):
    """base.qcow2 <- mid.qcow2 <- top.qcow2 with data, zero clusters and
    partial clusters at every level; returns paths."""
    base = qcreate(tmp_path / "base.qcow2", size, cluster=cluster)
    qio(base, "write -P 0x11 0 1M", "write -P 0x12 2M 512k", "write -P 0x13 3M 64k")
    mid = qcreate(tmp_path / "mid.qcow2", None, cluster=4096, backing=base)
    qio(mid, "write -P 0x21 512k 1M", "write -z 2M 128k", "write -P 0x22 100k 3k")
    top = qcreate(tmp_path / "top.qcow2", None, cluster=512 if cluster != 512 else 4096, backing=mid)
    qio(top, "write -P 0x31 700k 10k", "write -z 0 64k", "write -P 0x32 2100k 1k", "write -P 0 3M 4k",
        "discard 512k 64k")
    return base, mid, top


# these tests never held the working reports to 99.9
Recorder = partial(helpers.Recorder, max_working=100)


def no_staging_left(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.startswith(".vdtool-")]


# -- convert ---------------------------------------------------------------------------------

def test_convert_raw_to_raw_keeps_holes(tmp_path):
    src = make_raw(tmp_path / "src.img", 8 * M, [(4096, b"a" * 5000), (3 * M, bytes(M)), (5 * M + 1, b"z")])
    rec = Recorder()
    dst = str(tmp_path / "dst.img")
    r = ops.convert(src, dst, verify=True, progress=rec.progress())
    assert r.source_digest == r.output_digest and r.virtual_size == 8 * M
    assert open(dst, "rb").read() == open(src, "rb").read()
    # the explicit zero MiB is not allocated in the output
    assert os.stat(dst).st_blocks * 512 <= 64 * K
    rec.assert_good()
    assert no_staging_left(tmp_path)


@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_convert_raw_to_qcow2(tmp_path, cluster):
    rng = random.Random(cluster)
    writes = [(4096, b"\x01" * 4096),  # inside the first 64K cluster, after a 4K hole
              (100 * K + 17, rng.randbytes(70 * K)),
              (1 * M, bytes(256 * K)),  # explicit zeros: allocated in the raw file
              (2 * M - 1, b"\xff\xfe"),
              (3 * M, rng.randbytes(512))]
    src = make_raw(tmp_path / "src.img", 4 * M, writes)
    dst = str(tmp_path / "dst.qcow2")
    r = ops.convert(src, dst, block_size=cluster, verify=True)
    assert r.format == "qcow2" and r.source_digest == r.output_digest
    peers.assert_qemu_check_clean(dst, "qcow2")
    peers.assert_qemu_compare(src, dst, "raw", "qcow2")
    content = open(src, "rb").read()
    assert own_data_clusters(dst, cluster) == nonzero_clusters(content, cluster), "zeros must not be allocated"
    info = peers.qemu_info(dst, "qcow2")
    assert info["virtual-size"] == 4 * M and info["cluster-size"] == cluster


def test_convert_qcow2_to_raw(tmp_path):
    src = qcreate(tmp_path / "src.qcow2", "6M", cluster=4096)
    qio(src, "write -P 0x5a 0 100k", "write -z 1M 1M", "write -P 0 3M 1M", "write -P 0x7f 5M 512")
    dst = str(tmp_path / "dst.raw")
    ops.convert(src, dst, fmt="raw")
    want = peers.qemu_raw(src, tmp_path, "qcow2")
    assert open(dst, "rb").read() == want
    # the explicit zeros (3M..4M) and the zero clusters are holes in the output
    assert os.stat(dst).st_blocks * 512 <= 200 * K
    with open_image(dst, "raw") as s:
        st, n, _ = s.block_status(3 * M, 1 * M)
        assert st != Status.DATA


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("cluster", [4096, 65536])
def test_convert_qcow2_to_qcow2(tmp_path, compress, cluster):
    rng = random.Random(7)
    src = qcreate(tmp_path / "src.qcow2", "5M", cluster=65536)
    qio(src, "write -P 0x5a 0 200k", "write -z 1M 1M", "write -P 0 3M 64k", "write -P 0x7f 4M 300")
    # incompressible data too (compressed output must store it raw or compressed, both fine)
    with open_image(src, "qcow2", writable=True) as s:
        s.write(2 * M + 123, rng.randbytes(150 * K))
    dst = str(tmp_path / "dst.qcow2")
    rec = Recorder()
    r = ops.convert(src, dst, compress=compress, verify=True, block_size=cluster, progress=rec.progress())
    rec.assert_good()
    assert r.source_digest == r.output_digest
    peers.assert_qemu_check_clean(dst, "qcow2")
    peers.assert_qemu_compare(src, dst, "qcow2", "qcow2")
    chk = peers.qemu_check(dst, "qcow2")
    if compress:
        assert chk.get("compressed-clusters", 0) > 0, chk
        assert os.path.getsize(dst) < os.path.getsize(src)
    else:
        assert not chk.get("compressed-clusters")
    content = peers.qemu_raw(src, tmp_path, "qcow2")
    assert own_data_clusters(dst, cluster) == nonzero_clusters(content, cluster)


def test_convert_compressed_from_raw_with_small_holes(tmp_path):
    # a raw source reports 4 KiB holes; the 64 KiB compressed clusters must
    # still be whole, aligned clusters
    rng = random.Random(3)
    src = make_raw(tmp_path / "src.img", 1 * M, [(4096, b"abc" * 1000), (70 * K, rng.randbytes(3000)),
                                                 (200 * K, b"q" * 70 * K)])
    dst = str(tmp_path / "dst.qcow2")
    ops.convert(src, dst, compress=True, verify=True)
    peers.assert_qemu_check_clean(dst, "qcow2")
    peers.assert_qemu_compare(src, dst, "raw", "qcow2")


@pytest.mark.parametrize("parent_kind", ["same_base", "other_base", "raw_base"])
def test_convert_with_parent(tmp_path, parent_kind):
    base, mid, top = qcow2_chain(tmp_path)
    if parent_kind == "same_base":
        parent = base
    elif parent_kind == "other_base":
        parent = qcreate(tmp_path / "other.qcow2", "4M", cluster=4096)
        qio(parent, "write -P 0x11 0 512k", "write -P 0x99 1M 2M", "write -P 0x13 3M 64k")
    else:
        parent = make_raw(tmp_path / "other.img", 3 * M, [(0, b"\x11" * (M // 2)), (2 * M, b"\x44" * 12345)])
    dst = str(tmp_path / "out.qcow2")
    r = ops.convert(top, dst, parent=parent, verify=True)
    assert r.source_digest == r.output_digest
    info = peers.qemu_info(dst)
    assert os.path.basename(info["backing-filename"]) == os.path.basename(parent)
    assert info["backing-filename"] == os.path.basename(parent), "recorded relative to the child"
    peers.assert_qemu_check_clean(dst, "qcow2")
    # qemu-img opens the output with its backing file: it must read as the source
    peers.assert_qemu_compare(top, dst, "qcow2", "qcow2")
    # only what differs from the parent is written
    flat = peers.qemu_raw(top, tmp_path, "qcow2")
    pflat = peers.qemu_raw(parent, tmp_path).ljust(len(flat), b"\0")[:len(flat)]
    same = {i // 65536 for i in range(0, len(flat), 65536) if flat[i:i + 65536] == pflat[i:i + 65536]}
    assert not own_data_clusters(dst, 65536) & same


def test_convert_chain_flattened_like_qemu(tmp_path):
    rawbase = make_raw(tmp_path / "base.img", 4 * M, [(0, b"\x55" * (3 * M)), (3 * M + 5, b"tail")])
    mid = qcreate(tmp_path / "mid.qcow2", None, cluster=512, backing=rawbase, backing_fmt="raw")
    qio(mid, "write -P 0x66 1M 100k", "write -z 0 64k", "write -P 0 2M 4k", "discard 2500k 4k")
    top = qcreate(tmp_path / "top.qcow2", "5M", cluster=65536, backing=mid)  # bigger than its parent
    qio(top, "write -P 0x77 1050k 1k", "write -z 1500k 128k", "write -P 0x78 4600k 8k")
    for fmt, name in (("raw", "flat.img"), ("qcow2", "flat.qcow2")):
        out = str(tmp_path / name)
        ops.convert(top, out, fmt=fmt)
        assert peers.qemu_raw(out, tmp_path, fmt) == peers.qemu_raw(top, tmp_path, "qcow2")
        if fmt == "qcow2":
            peers.assert_qemu_check_clean(out, "qcow2")
            assert "backing-filename" not in peers.qemu_info(out)


@pytest.mark.parametrize("cancel_at", [0, 30, 70, 95])
def test_convert_cancelled_leaves_nothing(tmp_path, cancel_at):
    src = qcreate(tmp_path / "src.qcow2", "32M", cluster=65536)
    qio(src, "write -P 1 0 30M")
    dst = tmp_path / "out" / "dst.qcow2"
    dst.parent.mkdir()
    rec = Recorder(cancel_at=cancel_at)
    with pytest.raises(OperationCancelled):
        ops.convert(src, str(dst), verify=True, progress=rec.progress())
    assert not dst.exists()
    assert os.listdir(dst.parent) == [], os.listdir(dst.parent)
    rec.assert_good(success=False)


def test_convert_writes_beside_destination(tmp_path):
    src = make_raw(tmp_path / "src.img", 16 * M, [(0, b"x" * (16 * M))])
    dst = tmp_path / "dst.img"
    seen = []

    def cb(pct, done, total):
        if pct < 100:
            names = os.listdir(tmp_path)
            stages = [n for n in names if n.startswith(".vdtool-")]
            seen.append((dst.exists(), stages,
                         [os.listdir(tmp_path / s) for s in stages]))

    ops.convert(str(src), str(dst), progress=Progress(cb))
    assert seen
    for exists, stages, contents in seen:
        assert not exists, "the destination name appears only after the copy"
        assert len(stages) == 1 and contents == [["dst.img"]]
    assert dst.exists() and no_staging_left(tmp_path)


def test_convert_injected_failure_leaves_nothing(tmp_path, monkeypatch):
    from vdtool.formats import raw

    src = make_raw(tmp_path / "src.img", 4 * M, [(0, b"x" * (4 * M))])
    dst = tmp_path / "dst.img"
    orig = raw.RawBackend.write

    def failing_write(self, offset, data):
        if offset >= M:
            raise VdError("injected write failure", self.path)
        return orig(self, offset, data)

    monkeypatch.setattr(raw.RawBackend, "write", failing_write)
    import vdtool.core.copy as copy_mod

    monkeypatch.setattr(copy_mod, "CHUNK", 512 * K)
    with pytest.raises(VdError, match="injected"):
        ops.convert(str(src), str(dst))
    assert not dst.exists() and no_staging_left(tmp_path)


def test_convert_refuses_existing_and_force(tmp_path):
    src = make_raw(tmp_path / "src.img", 1 * M, [(0, b"new")])
    dst = make_raw(tmp_path / "dst.img", 2 * M, [(0, b"old")])
    with pytest.raises(VdError, match="already exists"):
        ops.convert(src, dst)
    assert open(dst, "rb").read(3) == b"old" and os.path.getsize(dst) == 2 * M
    ops.convert(src, dst, force=True)
    assert open(dst, "rb").read(3) == b"new" and os.path.getsize(dst) == 1 * M
    with pytest.raises(VdError, match="same file"):
        ops.convert(src, src, force=True)
    with pytest.raises(UsageError):
        ops.convert(src, str(tmp_path / "noext"))
    assert no_staging_left(tmp_path)


# -- the copy engine with a destination that records what it is given ----------------------

class _RecordingDest(ImageBackend):
    name = "recording"
    capabilities = Cap.WRITE | Cap.COMPRESS

    def __init__(self, size, block):
        self._size, self._block = size, block
        self.data = bytearray(size)
        self.compressed = []
        self.path = "<recording>"
        self.writable = True

    @property
    def virtual_size(self):
        return self._size

    @property
    def block_size(self):
        return self._block

    def block_status(self, offset, length):
        return Status.ZERO, length

    def readinto(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def write_zeroes(self, offset, length, *, unmap=True):
        self.data[offset:offset + length] = bytes(length)

    def compress_block(self, raw):
        import zlib

        return zlib.compress(raw)

    def write_compressed_block(self, offset, comp, raw):
        self.compressed.append((offset, len(raw)))
        self.data[offset:offset + len(raw)] = raw


def test_copy_engine_compresses_whole_aligned_blocks(tmp_path):
    size = 1 * M + 4096
    src = make_raw(tmp_path / "src.img", size, [(4096, b"abc" * 1000), (70 * K, b"d" * 3000),
                                              (200 * K, b"q" * 70 * K), (1 * M, b"end")])
    dst = _RecordingDest(size, 65536)
    with open_image(src, "raw") as s:
        copy_stack(s, ImageStack([dst]), compress=True)
        want = s.read(0, size)
    assert bytes(dst.data) == want
    for off, n in dst.compressed:
        assert off % 65536 == 0, f"compressed block at unaligned offset {off}"
        assert n == 65536 or off + n == size


# -- compact ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [4096, 65536])
def test_compact_qcow2_with_allocated_zeros(tmp_path, cluster):
    src = qcreate(tmp_path / "src.qcow2", "8M", cluster=cluster)
    qio(src, "write -P 0x42 0 1M", "write -P 0x43 5M 300k", "write -P 0x44 7M 512")
    full = str(tmp_path / "full.qcow2")
    peers.qemu_img("convert", "-S", "0", "-f", "qcow2", "-O", "qcow2", "-o", f"cluster_size={cluster}", src, full)
    assert peers.qemu_check(full)["allocated-clusters"] * cluster >= 8 * M
    before = os.path.getsize(full)
    rec = Recorder()
    r = ops.compact(full, progress=rec.progress())
    rec.assert_good()
    after = os.path.getsize(full)
    assert after < before / 4, (before, after)
    assert r["after"] < r["before"]
    peers.assert_qemu_check_clean(full, "qcow2")
    peers.assert_qemu_compare(src, full, "qcow2", "qcow2")
    content = peers.qemu_raw(src, tmp_path, "qcow2")
    assert own_data_clusters(full, cluster) == nonzero_clusters(content, cluster)
    assert peers.qemu_info(full)["actual-size"] < before


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_compact_overlay_keeps_zeros_over_parent(tmp_path, base_fmt):
    if base_fmt == "raw":
        base = make_raw(tmp_path / "base.img", 4 * M, [(0, b"\x99" * (4 * M))])
    else:
        base = qcreate(tmp_path / "base.qcow2", "4M")
        qio(base, "write -P 0x99 0 4M")
    top = qcreate(tmp_path / "top.qcow2", None, cluster=4096, backing=base, backing_fmt=base_fmt)
    # explicit zero data over parent data, zero data over zeros, real data
    qio(top, "write -P 0 0 256k", "write -P 0 1M 4k", "write -P 0x5 2M 64k", "write -P 0 3M 2k")
    before_raw = peers.qemu_raw(top, tmp_path, "qcow2")
    assert before_raw[:256 * K] == bytes(256 * K)
    ops.compact(top)
    peers.assert_qemu_check_clean(top, "qcow2")
    after_raw = peers.qemu_raw(top, tmp_path, "qcow2")
    assert after_raw == before_raw, "compact changed what the overlay reads"
    assert after_raw[3 * M:3 * M + 4096] == bytes(2048) + b"\x99" * 2048
    with open_image(top) as s:
        assert s.read(0, 256 * K) == bytes(256 * K)


def test_compact_raw(tmp_path):
    p = make_raw(tmp_path / "d.img", 4 * M, [(0, bytes(4 * M)), (M + 3, b"data")])
    assert os.stat(p).st_blocks * 512 >= 4 * M
    r = ops.compact(p)
    assert r["after"] < r["before"]
    d = open(p, "rb").read()
    assert len(d) == 4 * M and d[M + 3:M + 7] == b"data" and d.count(0) == 4 * M - 4


# -- resize -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [512, 65536])
def test_resize_qcow2_grow_and_shrink(tmp_path, cluster):
    p = qcreate(tmp_path / "d.qcow2", "3M", cluster=cluster)
    qio(p, "write -P 0x31 0 1M", "write -P 0x32 2M 1M")
    want = peers.qemu_raw(p, tmp_path, "qcow2")
    rec = Recorder()
    r = ops.resize(p, "+2M", progress=rec.progress())
    rec.assert_good()
    assert r["old-size"] == 3 * M and r["new-size"] == 5 * M
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_info(p)["virtual-size"] == 5 * M
    assert peers.qemu_raw(p, tmp_path, "qcow2") == want + bytes(2 * M)
    with pytest.raises(UsageError):
        ops.resize(p, 1 * M)
    from vdtool.core.registry import get_backend

    if not get_backend("qcow2").capabilities & Cap.SHRINK:
        pytest.skip("qcow2 backend cannot shrink")
    r = ops.resize(p, "2560K", shrink=True)
    assert r["new-size"] == 2560 * K
    assert r["lost-allocated-bytes"] >= 512 * K
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_info(p)["virtual-size"] == 2560 * K
    assert peers.qemu_raw(p, tmp_path, "qcow2") == want[:2560 * K]
    ops.resize(p, 4 * M)
    assert peers.qemu_raw(p, tmp_path, "qcow2") == want[:2560 * K] + bytes(4 * M - 2560 * K)
    peers.assert_qemu_check_clean(p, "qcow2")


def test_resize_overlay_past_parent_reads_zeros(tmp_path):
    base = qcreate(tmp_path / "base.qcow2", "4M")
    qio(base, "write -P 0x44 0 4M")
    top = qcreate(tmp_path / "top.qcow2", "2M", backing=base)
    assert peers.qemu_raw(top, tmp_path, "qcow2") == b"\x44" * (2 * M)
    ops.resize(top, 6 * M)
    assert peers.qemu_raw(top, tmp_path, "qcow2") == b"\x44" * (2 * M) + bytes(4 * M)
    peers.assert_qemu_check_clean(top, "qcow2")
    with open_image(top) as s:
        assert s.read(2 * M - 1, 2) == b"\x44\x00"
        assert s.read(3 * M, M) == bytes(M)


def test_resize_raw(tmp_path):
    p = make_raw(tmp_path / "d.img", 1 * M, [(M - 3, b"end")])
    ops.resize(p, "+1M")
    assert os.path.getsize(p) == 2 * M
    assert open(p, "rb").read()[M - 3:] == b"end" + bytes(M)
    r = ops.resize(p, "-1M", shrink=True)
    assert r["new-size"] == M and os.path.getsize(p) == M
    with pytest.raises(UsageError):
        ops.resize(p, "-2M", shrink=True)


# -- discard --------------------------------------------------------------------------------------------

def test_discard_ranges_qcow2(tmp_path):
    p = qcreate(tmp_path / "d.qcow2", "4M", cluster=4096)
    qio(p, "write -P 0x61 0 4M")
    rec = Recorder()
    r = ops.discard(p, ["1M:64K", "100:1000", (2 * M + 1, 8191)], progress=rec.progress())
    rec.assert_good()
    assert r["discarded-bytes"] == 64 * K + 1000 + 8191
    want = bytearray(b"\x61" * (4 * M))
    for off, n in ((M, 64 * K), (100, 1000), (2 * M + 1, 8191)):
        want[off:off + n] = bytes(n)
    assert peers.qemu_raw(p, tmp_path, "qcow2") == bytes(want)
    peers.assert_qemu_check_clean(p, "qcow2")
    # whole clusters are released
    assert not own_data_clusters(p, 4096) & set(range(M // 4096, (M + 64 * K) // 4096))
    with pytest.raises(UsageError):
        ops.discard(p, ["4M:1"])
    with pytest.raises(UsageError):
        ops.discard(p, ["nonsense"])


def test_discard_zeroes_qcow2(tmp_path):
    src = qcreate(tmp_path / "src.qcow2", "4M", cluster=4096)
    qio(src, "write -P 0x42 100k 200k", "write -P 0x43 3M 1000")
    p = str(tmp_path / "full.qcow2")
    peers.qemu_img("convert", "-S", "0", "-O", "qcow2", "-o", "cluster_size=4096", src, p)
    ops.discard(p, zeroes=True)
    peers.assert_qemu_check_clean(p, "qcow2")
    peers.assert_qemu_compare(src, p, "qcow2", "qcow2")
    content = peers.qemu_raw(src, tmp_path, "qcow2")
    assert own_data_clusters(p, 4096) == nonzero_clusters(content, 4096)


def test_discard_overlay_reads_zeros_not_parent(tmp_path):
    base = make_raw(tmp_path / "base.img", 2 * M, [(0, b"\x7e" * (2 * M))])
    top = qcreate(tmp_path / "top.qcow2", None, cluster=65536, backing=base, backing_fmt="raw")
    qio(top, "write -P 1 0 128k")
    ops.discard(top, [(0, 256 * K), (M + 5, 70000)])
    flat = peers.qemu_raw(top, tmp_path, "qcow2")
    assert flat[:256 * K] == bytes(256 * K)
    assert flat[M + 5:M + 5 + 70000] == bytes(70000)
    assert flat[M + 4] == 0x7e and flat[M + 5 + 70000] == 0x7e
    peers.assert_qemu_check_clean(top, "qcow2")


def test_discard_raw(tmp_path):
    p = make_raw(tmp_path / "d.img", 2 * M, [(0, b"\x01" * (2 * M))])
    ops.discard(p, ["4K:1M", "5:3"])
    d = open(p, "rb").read()
    assert d[:5] == b"\x01" * 5 and d[5:8] == bytes(3) and d[4096:4096 + M] == bytes(M)
    assert d[4096 + M:] == b"\x01" * (M - 4096)
    assert os.stat(p).st_blocks * 512 <= M + 64 * K
    with pytest.raises(UsageError):
        ops.discard(p)


# -- check / repair -------------------------------------------------------------------------------------

def _qcow2_header(path):
    with open(path, "rb") as f:
        h = f.read(104)
    cluster_bits = struct.unpack(">I", h[20:24])[0]
    reftable = struct.unpack(">Q", h[48:56])[0]
    version = struct.unpack(">I", h[4:8])[0]
    order = struct.unpack(">I", h[96:100])[0] if version >= 3 else 4
    return 1 << cluster_bits, reftable, order


def _refcount_entry(path, cluster_index):
    """(file offset, width) of a cluster's refcount (16-bit refcounts)."""
    cs, reftable, order = _qcow2_header(path)
    assert order == 4
    per_block = cs * 8 // 16
    with open(path, "rb") as f:
        f.seek(reftable + 8 * (cluster_index // per_block))
        block = struct.unpack(">Q", f.read(8))[0]
    assert block, "refcount block not allocated"
    return block + 2 * (cluster_index % per_block), 2


def _set_refcount(path, cluster_index, value):
    off, _ = _refcount_entry(path, cluster_index)
    helpers.poke(path, off, ">H", value)


def test_check_repairs_leaks(tmp_path):
    p = qcreate(tmp_path / "d.qcow2", "4M", cluster=65536)
    qio(p, "write -P 9 0 200k")
    cs, _, _ = _qcow2_header(p)
    assert ops.check(p).leaks == 0 and ops.check(p).corruptions == 0
    # leak 1: the header cluster's refcount bumped from 1 to 2
    _set_refcount(p, 0, 2)
    # leak 2: a cluster appended to the file, counted but used by nothing
    size = os.path.getsize(p)
    nclusters = (size + cs - 1) // cs
    with open(p, "r+b") as f:
        f.truncate((nclusters + 1) * cs)
    _set_refcount(p, nclusters, 1)
    q = peers.qemu_check(p, "qcow2")
    assert q["_exit"] == 3 and q["leaks"] == 2 and not q.get("corruptions"), q
    r = ops.check(p)
    assert r.leaks == 2 and r.corruptions == 0 and r.exit_code == 3, r
    r = ops.check(p, repair="leaks")
    assert r.leaks_fixed == r.leaks == 2 and r.exit_code == 0, r
    peers.assert_qemu_check_clean(p, "qcow2")
    r = ops.check(p)
    assert r.leaks == 0 and r.corruptions == 0 and r.exit_code == 0
    assert peers.qemu_raw(p, tmp_path, "qcow2")[:200 * K] == b"\x09" * (200 * K)


def test_check_repairs_corruption(tmp_path):
    p = qcreate(tmp_path / "d.qcow2", "4M", cluster=65536)
    qio(p, "write -P 9 0 200k")
    want = peers.qemu_raw(p, tmp_path, "qcow2")
    data_host = qmap(p)[0]["offset"]
    _set_refcount(p, data_host // 65536, 0)  # a used data cluster counted as free
    q = peers.qemu_check(p, "qcow2")
    assert q["_exit"] == 2 and q["corruptions"] >= 1, q
    r = ops.check(p)
    assert r.corruptions >= 1 and r.exit_code == 2, r
    r = ops.check(p, repair="leaks")
    assert r.corruptions_fixed == 0 and r.exit_code == 2
    r = ops.check(p, repair="all")
    assert r.corruptions_fixed == r.corruptions >= 1, r
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_raw(p, tmp_path, "qcow2") == want


def test_check_raw_not_supported_and_bad_repair(tmp_path):
    from vdtool.core.errors import NotSupported

    p = make_raw(tmp_path / "d.img", 4096, [])
    with pytest.raises(NotSupported):
        ops.check(p, "raw")
    with pytest.raises(UsageError):
        ops.check(p, repair="everything")


def test_check_reports_missing_parent(tmp_path):
    p = qcreate(tmp_path / "c.qcow2", "1M", extra=("-u",), backing=tmp_path / "nope.qcow2")
    r = ops.check(p)
    assert r.corruptions == 0
    assert any("nope.qcow2" in m for m in r.messages)


# -- merge --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster", [512, 65536])
def test_merge_into_parent(tmp_path, cluster):
    base, mid, top = qcow2_chain(tmp_path, cluster=cluster)
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    base_before = peers.qemu_raw(base, tmp_path, "qcow2")
    rec = Recorder()
    r = ops.merge(top, progress=rec.progress())
    rec.assert_good()
    assert r["target"] == mid and r["deleted"] == [top] and not os.path.exists(top)
    assert peers.qemu_raw(mid, tmp_path, "qcow2") == want
    assert peers.qemu_raw(base, tmp_path, "qcow2") == base_before
    for p in (base, mid):
        peers.assert_qemu_check_clean(p, "qcow2")


def test_merge_into_base_across_two_layers(tmp_path):
    base, mid, top = qcow2_chain(tmp_path)
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    r = ops.merge(top, base=base)
    assert r["target"] == base and sorted(r["deleted"]) == sorted([mid, top])
    assert peers.qemu_raw(base, tmp_path, "qcow2") == want
    peers.assert_qemu_check_clean(base, "qcow2")


def test_merge_into_parent_keep(tmp_path):
    base, mid, top = qcow2_chain(tmp_path)
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    r = ops.merge(top, keep=True)
    assert os.path.exists(top) and r["deleted"] == [] and r["warnings"]
    assert peers.qemu_raw(mid, tmp_path, "qcow2") == want


@pytest.mark.parametrize("base_arg", [None, "base", "mid"])
def test_merge_into_child(tmp_path, base_arg):
    base, mid, top = qcow2_chain(tmp_path)
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    rec = Recorder()
    r = ops.merge(top, into="child", base={"base": base, "mid": mid, None: None}[base_arg],
                  progress=rec.progress())
    rec.assert_good()
    assert r["target"] == top and r["deleted"] == []
    info = peers.qemu_info(top)
    if base_arg == "mid":
        assert info["backing-filename"] == "base.qcow2"
    else:
        assert "backing-filename" not in info
    assert peers.qemu_raw(top, tmp_path, "qcow2") == want
    peers.assert_qemu_check_clean(top, "qcow2")
    assert os.path.exists(base) and os.path.exists(mid)


@pytest.mark.parametrize("into", ["parent", "child"])
def test_merge_raw_base_qcow2_overlays(tmp_path, into):
    base = make_raw(tmp_path / "base.img", 3 * M, [(0, b"\x10" * (2 * M)), (2 * M + 100, b"x" * 5000)])
    mid = qcreate(tmp_path / "mid.qcow2", None, cluster=4096, backing=base, backing_fmt="raw")
    qio(mid, "write -P 0x20 1M 200k", "write -z 0 8k", "write -P 0 1500k 4k")
    top = qcreate(tmp_path / "top.qcow2", "4M", cluster=512, backing=mid)  # larger than the chain below
    qio(top, "write -P 0x30 1100k 3k", "write -z 1M 16k", "write -P 0x31 3500k 2k", "discard 2M 64k")
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    if into == "parent":
        ops.merge(top, base=base)
        assert os.path.getsize(base) == 4 * M, "the raw base grows to the merged size"
        assert open(base, "rb").read() == want
    else:
        ops.merge(top, into="child")
        assert "backing-filename" not in peers.qemu_info(top)
        assert peers.qemu_raw(top, tmp_path, "qcow2") == want
        peers.assert_qemu_check_clean(top, "qcow2")


def test_merge_errors(tmp_path):
    p = qcreate(tmp_path / "alone.qcow2", "1M")
    with pytest.raises(UsageError):
        ops.merge(p)
    base, mid, top = qcow2_chain(tmp_path)
    with pytest.raises(UsageError):
        ops.merge(top, into="sideways")
    with pytest.raises(UsageError):
        ops.merge(top, base=p)


# -- rebase ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("newbase_kind", ["qcow2", "raw", "none", "mid_to_base"])
def test_rebase_safe(tmp_path, newbase_kind):
    base, mid, top = qcow2_chain(tmp_path)
    before = str(tmp_path / "before.raw")
    peers.qemu_to_raw(top, before, "qcow2")
    if newbase_kind == "qcow2":
        newp = qcreate(tmp_path / "new.qcow2", "3M", cluster=4096)
        qio(newp, "write -P 0x11 0 512k", "write -P 0xab 600k 1M", "write -P 0x21 2M 512")
    elif newbase_kind == "raw":
        newp = make_raw(tmp_path / "new.img", 5 * M, [(0, b"\x21" * (5 * M))])
    elif newbase_kind == "mid_to_base":
        newp = base
    else:
        newp = None
    rec = Recorder()
    r = ops.rebase(top, newp, progress=rec.progress())
    rec.assert_good()
    info = peers.qemu_info(top)
    if newp is None:
        assert "backing-filename" not in info
    else:
        assert info["backing-filename"] == os.path.basename(newp)
    peers.assert_qemu_check_clean(top, "qcow2")
    peers.assert_qemu_compare(before, top, "raw", "qcow2")
    assert r["parent"] == newp


def test_rebase_unsafe_only_changes_reference(tmp_path):
    base, mid, top = qcow2_chain(tmp_path)
    newp = qcreate(tmp_path / "new.qcow2", "4M", cluster=4096)
    qio(newp, "write -P 0xcd 0 4M")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copyfile(top, ref)
    peers.qemu_img("rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", ref)
    map_before = [e for e in qmap(top) if e["depth"] == 0]
    ops.rebase(top, newp, unsafe=True)
    assert peers.qemu_info(top)["backing-filename"] == "new.qcow2"
    peers.assert_qemu_check_clean(top, "qcow2")
    peers.assert_qemu_compare(ref, top, "qcow2", "qcow2")
    map_after = [e for e in qmap(top) if e["depth"] == 0]
    strip = lambda m: [(e["start"], e["length"], e["zero"], e["data"]) for e in m]  # noqa: E731
    assert strip(map_after) == strip(map_before)


def test_rebase_unsafe_with_missing_old_parent(tmp_path):
    base, mid, top = qcow2_chain(tmp_path)
    os.unlink(mid)
    with pytest.raises(VdError):
        ops.rebase(top, base)
    ops.rebase(top, base, unsafe=True)
    assert peers.qemu_info(top)["backing-filename"] == "base.qcow2"


def test_rebase_refuses_loop(tmp_path):
    base, mid, top = qcow2_chain(tmp_path)
    with pytest.raises(UsageError):
        ops.rebase(base, top)
    assert "backing-filename" not in peers.qemu_info(base)


# -- create, and progress of every op --------------------------------------------------------------------------

def test_create_overlay_reads_as_parent(tmp_path):
    base = make_raw(tmp_path / "base.img", 2 * M + 512, [(7, b"hello"), (2 * M, b"\x01" * 512)])
    top = str(tmp_path / "top.qcow2")
    rec = Recorder()
    r = ops.create(top, parent=base, progress=rec.progress())
    rec.assert_good()
    assert r["virtual-size"] == 2 * M + 512
    info = peers.qemu_info(top)
    assert info["backing-filename"] == "base.img" and info.get("backing-filename-format") == "raw"
    peers.assert_qemu_compare(base, top, "raw", "qcow2")
    peers.assert_qemu_check_clean(top, "qcow2")
    with pytest.raises(VdError, match="already exists"):
        ops.create(top, 1 * M)
    with pytest.raises(VdError):
        ops.create(str(tmp_path / "x.img"), 1 * M, parent=base)  # raw cannot have a parent
    assert no_staging_left(tmp_path)


def test_progress_raw_ops(tmp_path):
    src = make_raw(tmp_path / "src.img", 8 * M, [(0, b"x" * (8 * M))])
    for fn in (lambda p: ops.convert(src, str(tmp_path / "a.img"), verify=True, progress=p),
               lambda p: ops.compact(src, progress=p),
               lambda p: ops.discard(src, ["0:1M"], zeroes=True, progress=p),
               lambda p: ops.resize(src, "+1M", progress=p),
               lambda p: ops.create(str(tmp_path / "b.img"), 1 * M, variant="full", progress=p)):
        rec = Recorder()
        fn(rec.progress())
        rec.assert_good()


@pytest.mark.parametrize("op", ["convert", "merge_parent", "merge_child", "rebase", "compact", "discard"])
def test_progress_cancel_then_no_100(tmp_path, op):
    base, mid, top = qcow2_chain(tmp_path)
    rec = Recorder(cancel_at=1)
    calls = {
        "convert": lambda p: ops.convert(top, str(tmp_path / "o.qcow2"), progress=p),
        "merge_parent": lambda p: ops.merge(top, progress=p),
        "merge_child": lambda p: ops.merge(top, into="child", progress=p),
        "rebase": lambda p: ops.rebase(top, None, progress=p),
        "compact": lambda p: ops.compact(top, progress=p),
        "discard": lambda p: ops.discard(top, zeroes=True, progress=p),
    }
    try:
        calls[op](rec.progress())
    except OperationCancelled:
        rec.assert_good(success=False)
    else:
        rec.assert_good(success=True)  # finished before the first report
    assert no_staging_left(tmp_path)
    # whatever happened, every image still checks clean
    for p in (base, mid, top):
        if os.path.exists(p):
            peers.assert_qemu_check_clean(p, "qcow2")


# -- holes are skipped everywhere: ops on a huge sparse chain take no time --------------------------

@pytest.mark.parametrize("op", ["convert", "convert_raw", "convert_parent", "rebase_safe", "rebase_none",
                                "merge_parent", "merge_child", "compact", "discard_zeroes", "check", "resize"])
def test_huge_sparse_chain_is_fast(tmp_path, op):
    import time

    base = qcreate(tmp_path / "base.qcow2", "256G")
    qio(base, "write -P 1 100G 64k")
    top = qcreate(tmp_path / "top.qcow2", None, backing=base)
    qio(top, "write -P 2 200G 64k", "write -z 100G 4k")
    other = qcreate(tmp_path / "other.qcow2", "256G")
    qio(other, "write -P 3 50G 64k")
    calls = {
        "convert": lambda: ops.convert(top, str(tmp_path / "o.qcow2")),
        "convert_raw": lambda: ops.convert(top, str(tmp_path / "o.img")),
        "convert_parent": lambda: ops.convert(top, str(tmp_path / "o.qcow2"), parent=other),
        "rebase_safe": lambda: ops.rebase(top, other),
        "rebase_none": lambda: ops.rebase(top, None),
        "merge_parent": lambda: ops.merge(top),
        "merge_child": lambda: ops.merge(top, into="child"),
        "compact": lambda: ops.compact(top),
        "discard_zeroes": lambda: ops.discard(top, zeroes=True),
        "check": lambda: ops.check(top),
        "resize": lambda: ops.resize(top, "+1T"),
    }
    t = time.monotonic()
    calls[op]()
    elapsed = time.monotonic() - t
    assert elapsed < 10, f"{op} on a 256 GiB sparse chain took {elapsed:.1f} s: holes must be skipped"
    if op in ("rebase_safe", "rebase_none", "merge_child"):
        with open_image(top) as s:
            assert s.read(200 << 30, 4) == b"\x02" * 4
            assert s.read(100 << 30, 8192) == bytes(4096) + b"\x01" * 4096
            assert s.read(50 << 30, 4) == bytes(4)


def test_relative_paths_from_another_folder(tmp_path, monkeypatch):
    """Paths given relative to the working folder; parents recorded relative
    to the child's folder, as qemu-img resolves them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_raw(tmp_path / "b" / "base.img", 1 * M, [(0, b"\x42" * 1000)])
    make_raw(tmp_path / "b" / "other.img", 1 * M, [(500, b"\x43" * 1000)])
    monkeypatch.chdir(tmp_path)
    ops.create("a/top.qcow2", parent="b/base.img")
    assert peers.qemu_info("a/top.qcow2")["backing-filename"] == "../b/base.img"
    with open_image("a/top.qcow2", writable=True) as s:
        s.write(100, b"top")
    want = peers.qemu_raw(tmp_path / "a" / "top.qcow2", tmp_path)
    ops.rebase("a/top.qcow2", "b/other.img")
    assert peers.qemu_info("a/top.qcow2")["backing-filename"] == "../b/other.img"
    assert peers.qemu_raw(tmp_path / "a" / "top.qcow2", tmp_path) == want
    ops.convert("a/top.qcow2", "out.qcow2", parent="b/base.img")
    assert peers.qemu_info("out.qcow2")["backing-filename"] == "b/base.img"
    assert peers.qemu_raw(tmp_path / "out.qcow2", tmp_path) == want
    monkeypatch.chdir(tmp_path / "b")
    ops.merge("../a/top.qcow2", into="child")
    assert peers.qemu_raw(tmp_path / "a" / "top.qcow2", tmp_path) == want
    assert "backing-filename" not in peers.qemu_info(tmp_path / "a" / "top.qcow2")


def test_convert_into_missing_folder(tmp_path):
    src = make_raw(tmp_path / "s.img", 4096, [(0, b"x")])
    with pytest.raises(VdError, match="does not exist"):
        ops.convert(src, str(tmp_path / "nope" / "d.img"))


@pytest.mark.parametrize("variant", ["sparse", "full"])
def test_convert_raw_variants(tmp_path, variant):
    src = make_raw(tmp_path / "s.img", 2 * M, [(M, b"y" * 100)])
    dst = str(tmp_path / "d.img")
    ops.convert(src, dst, variant=variant)
    assert open(dst, "rb").read() == open(src, "rb").read()
    used = os.stat(dst).st_blocks * 512
    assert (used >= 2 * M) if variant == "full" else (used <= 64 * K)


@pytest.mark.parametrize("variant", ["metadata", "full"])
def test_convert_qcow2_preallocated(tmp_path, variant):
    src = qcreate(tmp_path / "s.qcow2", "2M")
    qio(src, "write -P 7 512k 100k")
    dst = str(tmp_path / "d.qcow2")
    ops.convert(src, dst, variant=variant, verify=True)
    peers.assert_qemu_check_clean(dst, "qcow2")
    peers.assert_qemu_compare(src, dst, "qcow2", "qcow2")
    assert peers.qemu_info(dst)["format-specific"]["data"].get("compat") == "1.1"


def test_convert_odd_sized_raw_to_qcow2_verifies(tmp_path):
    # qcow2 keeps whole sectors: the output is padded with zeros, and
    # --verify compares the source's bytes
    src = make_raw(tmp_path / "s.img", 1 * M + 77, [(M, b"z" * 77)])
    dst = str(tmp_path / "d.qcow2")
    r = ops.convert(src, dst, verify=True)
    assert r.source_digest == r.output_digest
    assert peers.qemu_info(dst)["virtual-size"] == M + 512
    assert peers.qemu_raw(dst, tmp_path, "qcow2") == open(src, "rb").read() + bytes(512 - 77)


def test_rebase_raw_is_not_supported(tmp_path):
    from vdtool.core.errors import NotSupported

    p = make_raw(tmp_path / "d.img", 4096, [])
    q = make_raw(tmp_path / "e.img", 4096, [])
    with pytest.raises(NotSupported):
        ops.rebase(p, q)
    with pytest.raises(UsageError):
        ops.merge(p)


@pytest.fixture(scope="module")
def cancel_chain(tmp_path_factory):
    """base <- mid <- top with data spread over 24 MiB, plus another parent;
    made once, copied per test."""
    d = tmp_path_factory.mktemp("cancel-chain")
    base = qcreate(d / "base.qcow2", "24M", cluster=4096)
    qio(base, *[f"write -P {i + 1} {i * 3}M 1M" for i in range(8)])
    mid = qcreate(d / "mid.qcow2", None, cluster=65536, backing=base)
    qio(mid, *[f"write -P {0x40 + i} {i * 3 + 1}M 512k" for i in range(8)], "write -z 0 2M")
    top = qcreate(d / "top.qcow2", None, cluster=512, backing=mid)
    qio(top, *[f"write -P 0 {i * 3}M 64k" for i in range(8)], "write -P 0x99 23M 1M")
    other = qcreate(d / "other.qcow2", "24M")
    qio(other, "write -P 0x77 0 24M")
    return d


@pytest.mark.parametrize("cancel_at", [5, 40, 80])
@pytest.mark.parametrize("op", ["merge_parent", "merge_base", "merge_child", "rebase", "rebase_other", "compact",
                                "discard", "convert_parent"])
def test_cancel_keeps_content(tmp_path, cancel_chain, op, cancel_at):
    """A cancelled op leaves every image readable with its old content
    (data is written before the metadata that points to it)."""
    for name in ("base", "mid", "top", "other"):
        shutil.copyfile(cancel_chain / f"{name}.qcow2", tmp_path / f"{name}.qcow2")
    base, mid, top, other = (str(tmp_path / f"{n}.qcow2") for n in ("base", "mid", "top", "other"))
    want = peers.qemu_raw(top, tmp_path, "qcow2")
    rec = Recorder(cancel_at=cancel_at)
    calls = {
        "merge_parent": lambda p: ops.merge(top, progress=p),
        "merge_base": lambda p: ops.merge(top, base=base, progress=p),
        "merge_child": lambda p: ops.merge(top, into="child", progress=p),
        "rebase": lambda p: ops.rebase(top, None, progress=p),
        "rebase_other": lambda p: ops.rebase(top, other, progress=p),
        "compact": lambda p: ops.compact(top, progress=p),
        "discard": lambda p: ops.discard(top, zeroes=True, progress=p),
        "convert_parent": lambda p: ops.convert(top, str(tmp_path / "o.qcow2"), parent=other, progress=p),
    }
    try:
        calls[op](rec.progress())
        cancelled = False
    except OperationCancelled:
        cancelled = True
    rec.assert_good(success=not cancelled)
    assert no_staging_left(tmp_path)
    for p in (base, mid, top, other):
        if os.path.exists(p):
            r = peers.qemu_check(p, "qcow2")
            assert r["_exit"] in (0, 3) and not r.get("corruptions"), f"{p}: {r}"  # leaks are harmless
    if cancelled or op not in ("merge_parent", "merge_base"):
        assert peers.qemu_raw(top, tmp_path, "qcow2") == want
    else:
        assert peers.qemu_raw(mid if op == "merge_parent" else base, tmp_path, "qcow2") == want


# -- the ops on qcow2 images qemu made with other features ---------------------------------------------

def _qemu_variant(tmp_path, kind):
    p = str(tmp_path / f"{kind}.qcow2")
    opts = {"refcount1": "refcount_bits=1", "refcount64": "refcount_bits=64",
            "extl2": "extended_l2=on,cluster_size=65536", "v2": "compat=0.10", "c2m": "cluster_size=2M",
            "lazy_dirty": "lazy_refcounts=on", "snapshot": "cluster_size=4096", "compressed": ""}[kind]
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [p, "6M"]
    writes = ["write -P 0x21 0 700k", "write -P 0x22 1M 4k", "write -z 2M 1M", "write -P 0 3M 128k",
              "write -P 0x23 5M 100k", "discard 300k 64k"]
    if kind == "compressed":
        src = str(tmp_path / "c-src.qcow2")
        peers.qemu_img("create", "-q", "-f", "qcow2", src, "6M")
        peers.qemu_io(src, *writes, fmt="qcow2")
        peers.qemu_img("convert", "-c", "-O", "qcow2", src, p)
        return p, None
    peers.qemu_img(*args)
    if kind == "lazy_dirty":
        peers.qemu_io(p, *writes, "sigraise 9", fmt="qcow2", check=False)  # killed: dirty flag left set
        with open(p, "rb") as f:
            f.seek(72)
            assert struct.unpack(">Q", f.read(8))[0] & 1, "dirty bit expected"
        return p, None
    peers.qemu_io(p, *writes, fmt="qcow2")
    snap = None
    if kind == "snapshot":
        peers.qemu_img("snapshot", "-c", "s1", p)
        snap = peers.qemu_raw(p, tmp_path, "qcow2")
        peers.qemu_io(p, "write -P 0x55 600k 200k", fmt="qcow2")  # diverge from the snapshot
    return p, snap


def _snapshot_content(p, tmp_path):
    out = tmp_path / "snap.raw"
    peers.qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", p, out)
    data = out.read_bytes()
    out.unlink()
    return data


QEMU_VARIANTS = ["refcount1", "refcount64", "extl2", "v2", "c2m", "lazy_dirty", "snapshot", "compressed"]


@pytest.mark.parametrize("kind", QEMU_VARIANTS)
def test_ops_on_qemu_variants(tmp_path, kind):
    p, snap = _qemu_variant(tmp_path, kind)
    if kind == "lazy_dirty":
        # qemu repairs a dirty lazy-refcounts image on a writable open; so does check -r all
        r = ops.check(p, repair="all")
        assert r.exit_code == 0, r
        peers.assert_qemu_check_clean(p, "qcow2")
    want = bytearray(peers.qemu_raw(p, tmp_path, "qcow2"))
    # writes through the stack, unaligned and across clusters
    rng = random.Random(kind)
    with open_image(p, writable=True) as s:
        assert s.read(0, len(want)) == bytes(want)
        for _ in range(12):
            off = rng.randrange(0, len(want) - 1)
            n = rng.randrange(1, min(300 * K, len(want) - off))
            data = rng.randbytes(n) if rng.random() < 0.7 else bytes(n)
            s.write(off, data)
            want[off:off + n] = data
        s.write_zeroes(4 * M + 3, 70000)
        want[4 * M + 3:4 * M + 3 + 70000] = bytes(70000)
        s.discard(1 * M - 5, 9000)
        want[M - 5:M - 5 + 9000] = bytes(9000)
        assert s.read(0, len(want)) == bytes(want)
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_raw(p, tmp_path, "qcow2") == bytes(want)
    ops.compact(p)  # with snapshots: what they share stays in place
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_raw(p, tmp_path, "qcow2") == bytes(want)
    ops.discard(p, zeroes=True)
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_raw(p, tmp_path, "qcow2") == bytes(want)
    ops.resize(p, "+1M")
    peers.assert_qemu_check_clean(p, "qcow2")
    assert peers.qemu_raw(p, tmp_path, "qcow2") == bytes(want) + bytes(M)
    out = str(tmp_path / "out.img")
    ops.convert(p, out, verify=True)
    assert open(out, "rb").read() == bytes(want) + bytes(M)
    r = ops.check(p)
    assert r.exit_code == 0, r
    if snap is not None:
        # (qemu-img convert -l reads a snapshot at the active image's size)
        got = _snapshot_content(p, tmp_path)
        assert got[:len(snap)] == snap, "the internal snapshot changed"
        assert got[len(snap):] == bytes(len(got) - len(snap))


# -- mixed-format chains, judged by qemu-img --------------------------------------------------------------

@pytest.mark.parametrize("pfmt,qfmt", [("vdi", "vdi"), ("vmdk", "vmdk"),
                                       ("vhd", "vpc")])
def test_qcow2_overlay_over_other_format_opens_in_qemu(tmp_path, pfmt, qfmt):
    """The backing-format extension of a qcow2 holds qemu's driver name:
    over a VHD it must say "vpc" (qemu has no "vhd" driver)."""
    base = str(tmp_path / f"base.{pfmt}")
    peers.qemu_img("create", "-q", "-f", qfmt, base, "4M")
    peers.qemu_io(base, "write -P 0x61 0 1M", "write -P 0x62 3M 64k", fmt=qfmt)
    top = str(tmp_path / "top.qcow2")
    ops.create(top, parent=base)
    info = peers.qemu_info(top, "qcow2")
    assert info["backing-filename"] == f"base.{pfmt}"
    assert info["backing-filename-format"] == qfmt
    with open_image(top, writable=True) as s:
        assert s.layers[0].name == pfmt
        s.write(100, b"top data")
    want = bytearray(peers.qemu_raw(base, tmp_path, qfmt))
    want[100:108] = b"top data"
    assert peers.qemu_raw(top, tmp_path, "qcow2") == bytes(want)
    peers.assert_qemu_check_clean(top, "qcow2")
    # and the other way: convert with --parent, and merge into the parent
    out = str(tmp_path / "out.qcow2")
    ops.convert(top, out, parent=base)
    assert peers.qemu_info(out, "qcow2")["backing-filename-format"] == qfmt
    peers.assert_qemu_compare(top, out, "qcow2", "qcow2")
    ops.merge(top)
    assert peers.qemu_raw(base, tmp_path, qfmt) == bytes(want)
    if qfmt != "vpc":
        peers.assert_qemu_check_clean(base, qfmt)


def test_check_reports_progress_monotonic_to_100(tmp_path):
    """check walks every L2 table of a qcow2; it reports as it goes, never
    backwards, below 100 until the end, 100 once at the end."""
    from vdtool.core.progress import Progress

    img = tmp_path / "many-tables.qcow2"
    # 4 KiB clusters with metadata preallocation: hundreds of L2 tables
    peers.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,preallocation=metadata", img, "256M")
    seen = []
    result = ops.check(str(img), progress=Progress(lambda pct, done, total: seen.append(pct)))
    assert result.corruptions == 0 and result.leaks == 0
    assert len(seen) > 3, seen
    assert seen == sorted(seen)
    assert seen[-1] == 100.0 and all(p < 100.0 for p in seen[:-1])


# -- cost follows the data, not the virtual size ------------------------------------------------

@pytest.mark.parametrize("op", ["merge", "rebase", "convert"])
def test_whole_disk_walks_take_empty_runs_whole(tmp_path, op):
    """A 2 TiB chain with a few MiB of data: each op answers in well under
    the 2.8 s that stepping through it 4 MiB at a time used to cost."""
    import time

    base = qcreate(tmp_path / "base.qcow2", "2T")
    qio(base, "write -P 9 100G 2M")
    top = qcreate(tmp_path / "top.qcow2", None, backing=tmp_path / "base.qcow2")
    qio(top, "write -P 7 1500G 1M", "write -z 100G 1M")
    ref = str(tmp_path / "ref.qcow2")
    peers.qemu_img("convert", "-O", "qcow2", top, ref)
    start = time.perf_counter()
    if op == "merge":
        ops.merge(top)
        result = base
    elif op == "rebase":
        other = qcreate(tmp_path / "other.qcow2", "2T")
        qio(other, "write -P 5 1T 1M")
        ops.rebase(top, other, parent_format="qcow2")
        result = top
    else:
        result = str(tmp_path / "out.qcow2")
        ops.convert(top, result)
    assert time.perf_counter() - start < 2.0
    peers.assert_qemu_compare(ref, result)

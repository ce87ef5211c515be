"""The copy engine's own machinery: the reader thread that runs ahead of the
writer, and convert's durability policy (when the new image is fsynced).
Content is judged by qemu-img compare."""

from __future__ import annotations

import os
import random
import threading

import pytest

import peers
from vdtool.core import copy as copy_mod
from vdtool.core.errors import VdError
from vdtool.core.ops._convert import convert

M = 1 << 20


def _workload(path, size=24 * M, seed=7):
    """Random data, written zeros and holes in 256 KiB pieces."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 256 << 10):
            kind = rng.choice(("data", "data", "zero", "hole"))
            if kind == "data":
                f.seek(off)
                f.write(rng.randbytes(256 << 10))
            elif kind == "zero":
                f.seek(off)
                f.write(bytes(256 << 10))
    return str(path)


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk", "vpc", "raw"])
def test_pipelined_convert_matches_source(tmp_path, fmt):
    """Bigger than one chunk, so the reader thread runs ahead of the writer."""
    src = _workload(tmp_path / "src.raw")
    dst = str(tmp_path / f"out.{fmt}")
    convert(src, dst, fmt="vhd" if fmt == "vpc" else fmt)
    peers.qemu_img("compare", "-q", "-f", "raw", "-F", fmt, src, dst)


def test_reader_error_reaches_the_writer_and_the_thread_ends(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw")
    dst = str(tmp_path / "out.qcow2")
    calls = {"n": 0}
    real = copy_mod._extents

    def failing(src_stack, *a):
        for item in real(src_stack, *a):
            calls["n"] += 1
            if calls["n"] == 5:
                raise VdError("injected read failure", src)
            yield item

    monkeypatch.setattr(copy_mod, "_extents", failing)
    before = threading.active_count()
    with pytest.raises(VdError, match="injected read failure"):
        convert(src, dst)
    assert threading.active_count() == before
    assert not os.path.exists(dst)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]


def test_writer_error_stops_the_reader(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw")
    dst = str(tmp_path / "out.qcow2")
    from vdtool.formats.qcow2.backend import Qcow2Backend

    real = Qcow2Backend.write
    seen = {"n": 0}

    def failing(self, offset, data):
        seen["n"] += 1
        if seen["n"] == 3:
            raise VdError("injected write failure", self.path)
        return real(self, offset, data)

    monkeypatch.setattr(Qcow2Backend, "write", failing)
    before = threading.active_count()
    with pytest.raises(VdError, match="injected write failure"):
        convert(src, dst)
    assert threading.active_count() == before
    assert not os.path.exists(dst)


def _fsynced_paths(monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_new_output_is_left_to_writeback_by_default(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw", size=6 * M)
    synced = _fsynced_paths(monkeypatch)
    convert(src, str(tmp_path / "out.qcow2"))
    assert synced == []


def test_sync_flushes_the_image_and_its_folder(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw", size=6 * M)
    synced = _fsynced_paths(monkeypatch)
    convert(src, str(tmp_path / "out.qcow2"), sync=True)
    folder = os.path.realpath(tmp_path)
    # the image while it is still staged (before the rename), then the folder
    assert any(os.path.basename(p) == "out.qcow2" and os.path.dirname(os.path.dirname(p)) == folder
               for p in synced), synced
    assert synced[-1] == folder


def test_replacing_an_existing_file_is_always_synced(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw", size=6 * M)
    dst = tmp_path / "out.qcow2"
    dst.write_bytes(b"old content")
    synced = _fsynced_paths(monkeypatch)
    convert(src, str(dst), force=True)
    assert synced and synced[-1] == os.path.realpath(tmp_path)
    peers.qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", src, str(dst))


def test_no_sync_is_honoured_even_when_replacing(tmp_path, monkeypatch):
    src = _workload(tmp_path / "src.raw", size=6 * M)
    dst = tmp_path / "out.qcow2"
    dst.write_bytes(b"old content")
    synced = _fsynced_paths(monkeypatch)
    convert(src, str(dst), force=True, sync=False)
    assert synced == []


@pytest.mark.parametrize("compress", [False, True])
def test_convert_to_qcow2_is_byte_identical_to_qemu_img(tmp_path, compress, monkeypatch):
    """Many chunks (the reader thread, compression batches in flight): the
    file is the one qemu-img convert writes, byte for byte (compressed:
    under the zlib fallback, whose level 6 is qemu-img's; ISA-L's output
    is checked for validity in test_deflate.py)."""
    monkeypatch.setenv("VDTOOL_DEFLATE", "zlib")
    rng = random.Random(5)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(48):
            kind = rng.choice(["text", "rand", "zero"])
            f.write((b"compress me %d, " % i * 100000)[:256 << 10] if kind == "text"
                    else rng.randbytes(256 << 10) if kind == "rand" else bytes(256 << 10))
    flag = ["-c"] if compress else []
    peers.qemu_img("convert", *flag, "-f", "raw", "-O", "qcow2", str(src), str(tmp_path / "q.qcow2"))
    convert(str(src), str(tmp_path / "v.qcow2"), compress=compress)
    assert (tmp_path / "q.qcow2").read_bytes() == (tmp_path / "v.qcow2").read_bytes()


def _runs_block_by_block(buf, n, block):
    runs, start = [], None
    for i in range(0, n, block):
        k = min(block, n - i)
        zero = buf[i:i + k] == bytes(k)
        if not zero and start is None:
            start = i
        if zero and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, n))
    return runs


def test_data_runs_agree_with_a_block_by_block_scan():
    """The strided-sample zero finder against the obvious loop: random
    blocks of zeros, data, data starting with zero bytes, one stray byte
    anywhere, short last blocks, and stale bytes past n in the buffer."""
    rng = random.Random(11)
    for _ in range(3000):
        block = rng.choice([512, 4096, 65536])
        nb = rng.randint(1, 40)
        n = nb * block - rng.choice([0, 0, 1, block // 2, block - 1])
        buf = bytearray(n + rng.randint(0, 3 * block))
        for b in range(nb):
            kind = rng.random()
            s = b * block
            if kind < 0.4:
                pos = s + rng.randrange(block)
                if pos < len(buf):
                    buf[pos] = rng.randint(1, 255)
            elif kind < 0.6:
                buf[s:s + block] = bytes([0] + [rng.randint(0, 255) for _ in range(7)]) * (block // 8)
        buf[n:] = b"\x07" * (len(buf) - n)
        zeros = memoryview(bytes(len(buf) + block))
        assert copy_mod.data_runs(buf, n, block, zeros) == _runs_block_by_block(buf, n, block)

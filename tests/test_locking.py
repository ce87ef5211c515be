"""QEMU-compatible image locking: vdtool and QEMU see each other's OFD locks
on the lock bytes (100+i held, 200+i not shared)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from vdrun import REPO, run_vdtool, vdtool_env

import peers


_env = vdtool_env
vd = run_vdtool


def locked_bytes(path) -> set:
    """Bytes of ``path`` that some process holds an OFD lock on (/proc/locks)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "OFDLCK" in parts and dev in parts:
                i = parts.index(dev)
                start, end = int(parts[i + 1]), parts[i + 2]
                end = int(end) if end != "EOF" else start
                out.update(range(start, end + 1))
    return out


def _wait_for(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def qemu_io_holding(path, fmt, read_only=False):
    """qemu-io with the image open until the block ends (it holds the image
    while it waits for commands on stdin)."""
    exe = peers.need("qemu-io")
    args = [exe, "-f", fmt] + (["-r"] if read_only else []) + [str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        want = {100} if read_only else {100, 101}
        _wait_for(lambda: want <= locked_bytes(path) or proc.poll() is not None, "qemu-io to lock the image")
        assert proc.poll() is None, proc.stderr.read().decode()
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


HOLDER = """
import sys
from vdtool.core.stack import open_image
s = open_image(sys.argv[1], writable=True)
s.write(0, b"x" * 512)
print("ready", flush=True)
sys.stdin.read()
s.close()
"""


@contextmanager
def vdtool_holding(path):
    """vdtool with the image open for writing, in another process."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.strip() == b"ready", proc.stderr.read().decode()
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture
def qcow2_img(tmp_path):
    p = tmp_path / "vm.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    peers.qemu_io(p, "write -P 0x41 0 64k", fmt="qcow2")
    return p


# -- QEMU holds, vdtool refuses ------------------------------------------------------------------

def test_writing_commands_refuse_an_image_qemu_writes(tmp_path, qcow2_img):
    before = qcow2_img.read_bytes()
    with qemu_io_holding(qcow2_img, "qcow2"):
        assert {100, 101, 103, 201, 203} <= locked_bytes(qcow2_img)
        for args in (["compact", qcow2_img], ["resize", qcow2_img, "2M"], ["discard", qcow2_img, "0:64K"],
                     ["discard", "--zeroes", qcow2_img], ["rebase", "-u", "-b", "", qcow2_img]):
            proc = vd(tmp_path, *args, expect=1)
            assert "vdtool: error:" in proc.stderr and "in use" in proc.stderr, (args, proc.stderr)
    assert qcow2_img.read_bytes() == before
    # once QEMU let go, they work
    vd(tmp_path, "resize", qcow2_img, "2M", expect=0)


def test_merge_refuses_a_chain_qemu_writes(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    peers.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    peers.qemu_io(top, "write -P 0x42 0 64k", fmt="qcow2")
    with qemu_io_holding(top, "qcow2"):  # a VM running on the overlay
        for into in ("parent", "child"):
            proc = vd(tmp_path, "merge", "--into", into, top, expect=1)
            assert "in use" in proc.stderr, proc.stderr
    assert top.exists()
    with qemu_io_holding(base, "qcow2"):  # something writes the base
        proc = vd(tmp_path, "merge", top, expect=1)
        assert "in use" in proc.stderr, proc.stderr
    vd(tmp_path, "merge", top, expect=0)
    assert not top.exists()


def test_read_only_commands_need_force_share(tmp_path, qcow2_img):
    with qemu_io_holding(qcow2_img, "qcow2"):
        proc = vd(tmp_path, "info", qcow2_img, expect=1)
        assert "in use" in proc.stderr and "-U/--force-share" in proc.stderr, proc.stderr
        assert vd(tmp_path, "check", qcow2_img).returncode == 1
        vd(tmp_path, "convert", "-O", "raw", qcow2_img, tmp_path / "a.raw", expect=1)
        assert not (tmp_path / "a.raw").exists()
        # -U reads anyway
        assert "file format: qcow2" in vd(tmp_path, "info", "-U", qcow2_img, expect=0).stdout
        vd(tmp_path, "check", "-U", qcow2_img, expect=0)
        vd(tmp_path, "convert", "-U", "-O", "raw", qcow2_img, tmp_path / "b.raw", expect=0)
    assert (tmp_path / "b.raw").read_bytes()[:65536] == b"\x41" * 65536


def test_qemu_reader_blocks_vdtool_writer_not_reader(tmp_path, qcow2_img):
    with qemu_io_holding(qcow2_img, "qcow2", read_only=True):
        proc = vd(tmp_path, "resize", qcow2_img, "2M", expect=1)
        assert "in use" in proc.stderr, proc.stderr
        vd(tmp_path, "info", qcow2_img, expect=0)
        vd(tmp_path, "convert", "-O", "raw", qcow2_img, tmp_path / "c.raw", expect=0)


def test_raw_image_written_by_qemu(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(1 << 20))
    with qemu_io_holding(p, "raw"):
        for args in (["resize", p, "2M"], ["discard", p, "0:4K"]):
            proc = vd(tmp_path, *args, expect=1)
            assert "in use" in proc.stderr, proc.stderr
    assert os.path.getsize(p) == 1 << 20


def test_vmdk_extent_files_are_locked(tmp_path):
    """A flat extent that QEMU writes (as a raw file) refuses writes through
    the descriptor: every file of an image is locked."""
    vd(tmp_path, "create", "-q", "--variant", "monolithicFlat", "f.vmdk", "1M", expect=0)
    extent = tmp_path / "f-flat.vmdk"
    assert extent.exists()
    with qemu_io_holding(extent, "raw"):
        proc = vd(tmp_path, "discard", "f.vmdk", "0:64K", expect=1)
        assert "in use" in proc.stderr, proc.stderr


# -- vdtool holds, QEMU refuses -----------------------------------------------------------------

def test_qemu_img_refuses_an_image_vdtool_writes(tmp_path, qcow2_img):
    with vdtool_holding(qcow2_img):
        assert {100, 101, 103, 201, 203} <= locked_bytes(qcow2_img)
        proc = peers.qemu_img("info", qcow2_img, check=False)
        assert proc.returncode != 0 and b"lock" in proc.stderr, proc.stderr
        proc = peers.run("qemu-io", "-f", "qcow2", "-c", "write 0 512", qcow2_img, check=False)
        assert b"lock" in proc.stderr, proc.stderr
        # another vdtool refuses too, and -U reads
        proc = vd(tmp_path, "info", qcow2_img, expect=1)
        assert "in use" in proc.stderr
        vd(tmp_path, "info", "-U", qcow2_img, expect=0)
        peers.qemu_img("info", "-U", qcow2_img)
    peers.qemu_img("info", qcow2_img)
    assert not locked_bytes(qcow2_img)


def test_qemu_img_refuses_an_image_vdtool_converts_into(tmp_path, qcow2_img):
    """New images are locked while they are written (ImageFile(create=True))."""
    from vdtool.core.fileio import ImageFile

    p = tmp_path / "new.raw"
    f = ImageFile(str(p), create=True)
    try:
        assert {100, 101, 103, 201, 203} <= locked_bytes(p)
        proc = peers.qemu_img("info", "-f", "qcow2", p, check=False)
        assert proc.returncode != 0
    finally:
        f.close()
    assert not locked_bytes(p)


# -- in-process facts -----------------------------------------------------------------------------

FILE_HOLDER = """
import sys
from vdtool.core.fileio import ImageFile
f = ImageFile(sys.argv[1], writable=sys.argv[2] == "w")
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def file_held(path, mode):
    proc = subprocess.Popen([sys.executable, "-c", FILE_HOLDER, str(path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_image_file_lock_semantics(tmp_path):
    from vdtool.core.errors import ImageInUse
    from vdtool.core.fileio import ImageFile, force_share

    p = tmp_path / "x.img"
    p.write_bytes(bytes(4096))
    with file_held(p, "r"), file_held(p, "r"):  # readers share
        assert locked_bytes(p) == {100, 201, 203}
        ImageFile(str(p)).close()
        with pytest.raises(ImageInUse, match="in use"):
            ImageFile(str(p), writable=True)  # readers do not share write
        # a failed open leaves no lock behind, and create does not truncate a held file
        with pytest.raises(ImageInUse):
            ImageFile(str(p), create=True)
        assert os.path.getsize(p) == 4096
    with file_held(p, "w"):
        with pytest.raises(ImageInUse, match="-U/--force-share"):
            ImageFile(str(p))
        with force_share():
            ImageFile(str(p)).close()  # -U: no test, no lock
            with pytest.raises(ImageInUse):
                ImageFile(str(p), writable=True)  # never for writing
    assert not locked_bytes(p)
    ImageFile(str(p), lock=False).close()


def test_one_process_may_open_a_file_twice(tmp_path):
    """vdtool's own locks never make it refuse itself (rebase onto an image
    whose chain holds the image, to report the loop), and they still keep
    other processes out."""
    from vdtool.core.errors import ImageInUse
    from vdtool.core.fileio import ImageFile

    p = tmp_path / "y.img"
    p.write_bytes(bytes(4096))
    w = ImageFile(str(p), writable=True)
    r = ImageFile(str(p))
    r.close()
    assert {100, 101, 103, 201, 203} <= locked_bytes(p)  # the writer's locks survive the reader's close
    proc = peers.run("qemu-io", "-f", "raw", "-c", "write 0 512", p, check=False)
    assert b"lock" in proc.stderr, proc.stderr
    w.close()
    assert not locked_bytes(p)
    with file_held(p, "r"):
        with pytest.raises(ImageInUse):
            ImageFile(str(p), writable=True)

"""What a new image may replace: only regular files, and only with
--force.  A block or character device, a FIFO or a socket as the
destination is never replaced (the last round's independent suite found
--force turning a device node into a regular file); a symlink is followed
to its target, as qemu-img and cp do, and stays a link."""

from __future__ import annotations

import os
import socket
import stat

import pytest

import peers
from vdrun import cli


def _src(tmp_path):
    p = tmp_path / "src.img"
    with open(p, "wb") as f:
        f.write(b"\x5a" * (1 << 20))
    return p


def _block_node(path):
    try:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 250))  # a loop device number; never opened
    except PermissionError:
        pytest.skip("mknod needs root")


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.mark.parametrize("make,kind", [(_block_node, "a block device"), (_fifo, "a FIFO"),
                                       (_socket, "a socket")])
def test_create_never_replaces_special_files(tmp_path, make, kind):
    _src(tmp_path)
    dst = tmp_path / "dst.img"
    make(dst)
    mode = os.lstat(dst).st_mode
    for force in ([], ["--force"]):
        r = cli("create", *force, "-f", "raw", "dst.img", "1M", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"vdtool: error: dst.img: is {kind}; vdtool replaces nothing but regular files " \
                           f"(create makes new images; 'vdtool convert' writes into {kind})\n"
        assert os.lstat(dst).st_mode == mode
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]


@pytest.mark.parametrize("make,message", [
    (_block_node, "dst.img: is a block device: its content would be overwritten; add --force"),
    (_socket, "dst.img: is a socket; vdtool writes images into files, pipes and devices only")])
def test_convert_writes_into_special_files_but_never_replaces_them(tmp_path, make, message):
    """A device node is written in place (this one has no device behind it,
    so opening it fails) and a socket is refused; neither is ever replaced
    by a file, with or without --force."""
    _src(tmp_path)
    dst = tmp_path / "dst.img"
    make(dst)
    mode = os.lstat(dst).st_mode
    r = cli("convert", "-O", "raw", "src.img", "dst.img", cwd=tmp_path)
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("convert", "--force", "-O", "raw", "src.img", "dst.img", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("vdtool: error: dst.img: ") and r.stderr.count("\n") == 1
    assert os.lstat(dst).st_mode == mode
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    _src(tmp_path)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "disk.qcow2"
    target.write_bytes(b"old")
    link = tmp_path / "disk.qcow2"
    link.symlink_to(target)
    r = cli("convert", "-O", "qcow2", "src.img", "disk.qcow2", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr and target.read_bytes() == b"old"
    cli("convert", "--force", "-O", "qcow2", "src.img", "disk.qcow2", cwd=tmp_path, expect=0)
    assert link.is_symlink() and os.readlink(link) == str(target)
    peers.assert_qemu_compare(tmp_path / "src.img", target, "raw", "qcow2")
    assert not [n for n in os.listdir(tmp_path / "real") if n.startswith(".vdtool-")]


def test_a_dangling_symlink_gets_its_target_made(tmp_path):
    _src(tmp_path)
    target = tmp_path / "made.img"
    (tmp_path / "link.img").symlink_to(target)
    cli("convert", "-O", "raw", "src.img", "link.img", cwd=tmp_path, expect=0)
    assert (tmp_path / "link.img").is_symlink() and target.read_bytes() == (tmp_path / "src.img").read_bytes()


def test_a_directory_is_never_replaced(tmp_path):
    _src(tmp_path)
    (tmp_path / "d.img").mkdir()
    r = cli("convert", "--force", "src.img", "d.img", cwd=tmp_path)
    assert r.returncode == 1 and "is a directory" in r.stderr and (tmp_path / "d.img").is_dir()


def test_dash_is_never_a_file_named_dash(tmp_path):
    """'-' is standard output / input: no file named '-' is ever made."""
    _src(tmp_path)
    r = cli("convert", "-O", "raw", "src.img", "-", cwd=tmp_path, text=False)
    assert r.returncode == 0 and r.stdout == b"\x5a" * (1 << 20)
    assert not (tmp_path / "-").exists()

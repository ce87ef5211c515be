"""--untrusted (and VDTOOL_UNTRUSTED=1), through the command line.

Every hostile image here references a "host file" holding a marker; the
marker must never appear in any output (stdout, stderr, a converted image),
and the refusal must name the rule."""

from __future__ import annotations

import json
import os
import struct

import pytest

from helpers import peek, poke
from vdrun import run_vdtool, vdtool_env

import peers

MARKER = b"HOST-SECRET-0123456789-do-not-leak"


_env = vdtool_env


def vd(cwd, *args, env=None, expect=None):
    # bytes: the tests look for the host file's marker in raw output
    return run_vdtool(cwd, *args, env=env, expect=expect, text=False)


@pytest.fixture
def secret(tmp_path):
    """A host file outside the images' folder, full of the marker."""
    d = tmp_path / "host"
    d.mkdir()
    p = d / "secret.bin"
    p.write_bytes((MARKER * (1 << 20 // len(MARKER) + 1))[:1 << 20])
    return p


@pytest.fixture
def imgdir(tmp_path):
    d = tmp_path / "upload"
    d.mkdir()
    return d


def assert_refused_everywhere(imgdir, image, rule, *fragments, fmt=None):
    """info (text, json), check and convert all refuse with the rule named,
    the marker appears nowhere, and convert leaves no output file."""
    fargs = ["-f", fmt] if fmt else []
    runs = [("info", *fargs, image), ("info", "--output", "json", *fargs, image), ("check", *fargs, image),
            ("convert", *fargs, "-O", "raw", image, "out.raw"), ("info", "--chain", *fargs, image)]
    for args in runs:
        proc = vd(imgdir, *args[:1], "--untrusted", *args[1:], expect=1)
        err = proc.stderr.decode(errors="replace")
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vdtool: error: "), err
        assert "refused by --untrusted" in err and f"rule {rule}" in err, err
        for f in fragments:
            assert f in err, (f, err)
        assert MARKER not in proc.stdout and MARKER not in proc.stderr
    assert not (imgdir / "out.raw").exists()
    # the environment variable does the same
    proc = vd(imgdir, "info", *fargs, image, env=_env(VDTOOL_UNTRUSTED="1"), expect=1)
    assert f"rule {rule}" in proc.stderr.decode()
    assert not [n for n in os.listdir(imgdir) if n.startswith(".vdtool-")]


# -- the four cases of the issue --------------------------------------------------------------

def test_qcow2_backing_file_on_host_file(imgdir, secret):
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", imgdir / "a.qcow2", "1M")
    assert_refused_everywhere(imgdir, "a.qcow2", "external-reference", f"backing file '{secret}'")


def test_qcow2_external_data_file(imgdir, secret):
    content = secret.read_bytes()
    peers.qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret}", imgdir / "d.qcow2", "1M")
    secret.write_bytes(content)  # qemu-img create truncated it: the host file holds the marker again
    assert_refused_everywhere(imgdir, "d.qcow2", "external-reference", f"external data file '{secret}'")


def test_qcow2_backing_and_data_file_both_listed(imgdir, secret, tmp_path):
    other = tmp_path / "host" / "data.bin"
    other.write_bytes(bytes(1 << 20))
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", "-o", f"data_file={other}",
                   imgdir / "both.qcow2", "1M")
    proc = vd(imgdir, "info", "--untrusted", "both.qcow2", expect=1)
    err = proc.stderr.decode()
    assert f"backing file '{secret}'" in err and f"external data file '{other}'" in err, err


def test_vmdk_absolute_flat_extent(imgdir, secret):
    (imgdir / "flat.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n"
        f"RW 2048 FLAT \"{secret}\" 0\n\nddb.virtualHWVersion = \"4\"\n")
    assert_refused_everywhere(imgdir, "flat.vmdk", "external-reference", f"FLAT extent '{secret}'",
                              "absolute path")
    # without --untrusted vdtool would read it: the test image is a real threat
    info = json.loads(vd(imgdir, "info", "--output", "json", "flat.vmdk", expect=0).stdout)
    assert str(secret) in info["external-references"]


def test_vmdk_relative_extent_in_another_file(imgdir):
    """Even a plain monolithicFlat pair is refused: its data lives in another file."""
    vd(imgdir, "create", "-q", "--variant", "monolithicFlat", "p.vmdk", "1M", expect=0)
    proc = vd(imgdir, "info", "--untrusted", "p.vmdk", expect=1)
    assert "rule external-reference" in proc.stderr.decode() and "FLAT extent 'p-flat.vmdk'" in proc.stderr.decode()


def test_vhd_differencing_image(imgdir, secret):
    vd(imgdir, "convert", "-f", "raw", "-O", "vhd", secret, "base.vhd", expect=0)
    vd(imgdir, "create", "-q", "-b", "base.vhd", "diff.vhd", expect=0)
    assert_refused_everywhere(imgdir, "diff.vhd", "external-reference", "parent image", "base.vhd")


def test_raw_disk_carrying_qcow2_header_with_backing_file(imgdir, secret):
    """The classic format-probing attack: a "raw" upload whose first bytes are
    a qcow2 header naming a host file as its backing file."""
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", imgdir / "h.qcow2", "1M")
    data = (imgdir / "h.qcow2").read_bytes()
    (imgdir / "disk.img").write_bytes(data + bytes((1 << 20) - len(data)))
    (imgdir / "h.qcow2").unlink()
    # probed: it is a qcow2 with a backing file
    assert_refused_everywhere(imgdir, "disk.img", "external-reference", f"backing file '{secret}'")
    # named raw: the content probes as qcow2, so the claim is refused too
    assert_refused_everywhere(imgdir, "disk.img", "format-mismatch", "-f raw", "qcow2", fmt="raw")
    # without --untrusted, -f raw reads the bytes as they are (never the backing file) and warns
    proc = vd(imgdir, "convert", "-f", "raw", "-O", "raw", "disk.img", "copy.raw", expect=0)
    assert "looks like qcow2" in proc.stderr.decode()
    assert (imgdir / "copy.raw").read_bytes() == (imgdir / "disk.img").read_bytes()
    # probed without --untrusted: following the absolute reference is said on stderr
    proc = vd(imgdir, "convert", "-O", "raw", "disk.img", "followed.raw", expect=0)
    err = proc.stderr.decode()
    assert "vdtool: warning:" in err and str(secret) in err and "outside the image's folder" in err, err


# -- the other rules ---------------------------------------------------------------------------

def test_vdi_parent_found_by_uuid(imgdir):
    vd(imgdir, "create", "-q", "base.vdi", "1M", expect=0)
    vd(imgdir, "create", "-q", "-b", "base.vdi", "diff.vdi", expect=0)
    proc = vd(imgdir, "info", "--untrusted", "diff.vdi", expect=1)
    err = proc.stderr.decode()
    assert "rule external-reference" in err and "parent image" in err, err


def test_vmdk_sparse_child_refused(imgdir):
    vd(imgdir, "create", "-q", "base.vmdk", "1M", expect=0)
    vd(imgdir, "create", "-q", "-b", "base.vmdk", "child.vmdk", expect=0)
    proc = vd(imgdir, "info", "--untrusted", "child.vmdk", expect=1)
    err = proc.stderr.decode()
    assert "rule external-reference" in err and "base.vmdk" in err, err


def test_ambiguous_probe_refused(imgdir):
    """A file that probes as qcow2 (header) and as vhd (footer): -f is needed,
    and even then the other match is a mismatch."""
    peers.qemu_img("create", "-q", "-f", "qcow2", imgdir / "q.qcow2", "1M")
    peers.qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", imgdir / "v.vhd", "1M")
    both = (imgdir / "q.qcow2").read_bytes()
    both += bytes(-len(both) % 512) + (imgdir / "v.vhd").read_bytes()[-512:]
    (imgdir / "both.img").write_bytes(both)
    proc = vd(imgdir, "info", "--untrusted", "both.img", expect=1)
    err = proc.stderr.decode()
    assert "rule ambiguous-format" in err and "qcow2" in err and "vhd" in err, err
    proc = vd(imgdir, "info", "--untrusted", "-f", "qcow2", "both.img", expect=1)
    assert "rule format-mismatch" in proc.stderr.decode()


@pytest.mark.parametrize("offset,value,what", [(80, 1 << 5, "compatible"), (72, 1 << 20, "incompatible"),
                                                (88, 1 << 7, "autoclear")])
def test_qcow2_unknown_feature_bits(imgdir, offset, value, what):
    peers.qemu_img("create", "-q", "-f", "qcow2", imgdir / "f.qcow2", "1M")
    poke(imgdir / "f.qcow2", offset, ">Q", value)
    proc = vd(imgdir, "info", "--untrusted", "f.qcow2", expect=1)
    err = proc.stderr.decode()
    assert "rule unknown-features" in err and what in err, err


def test_vmdk_unknown_header_flags(imgdir):
    vd(imgdir, "create", "-q", "s.vmdk", "1M", expect=0)
    poke(imgdir / "s.vmdk", 8, "<I", peek(imgdir / "s.vmdk", 8, "<I") | (1 << 9))
    proc = vd(imgdir, "info", "--untrusted", "s.vmdk", expect=1)
    assert "rule unknown-features" in proc.stderr.decode(), proc.stderr


def test_vhd_unknown_footer_features(imgdir):
    vd(imgdir, "create", "-q", "--variant", "fixed", "x.vhd", "1M", expect=0)
    data = bytearray((imgdir / "x.vhd").read_bytes())
    foot = len(data) - 512
    struct.pack_into(">I", data, foot + 8, 0x2 | 0x100)
    struct.pack_into(">I", data, foot + 64, 0)
    struct.pack_into(">I", data, foot + 64, ~sum(data[foot:foot + 512]) & 0xFFFFFFFF)
    (imgdir / "x.vhd").write_bytes(bytes(data))
    proc = vd(imgdir, "info", "--untrusted", "-f", "vhd", "x.vhd", expect=1)
    assert "rule unknown-features" in proc.stderr.decode(), proc.stderr


@pytest.mark.parametrize("name,args", [("p.img", []), ("p.qcow2", []), ("p.vdi", []), ("p.vhd", []),
                                       ("p.vmdk", []), ("s.vmdk", ["--variant", "streamOptimized"]),
                                       ("f.vhd", ["--variant", "fixed"]), ("f.vdi", ["--variant", "fixed"])])
def test_plain_images_pass(imgdir, name, args):
    vd(imgdir, "create", "-q", *args, name, "1M", expect=0)
    vd(imgdir, "info", "--untrusted", name, expect=0)
    vd(imgdir, "check", "--untrusted", name)
    assert vd(imgdir, "check", "--untrusted", name).returncode in (0, 63)
    vd(imgdir, "convert", "--untrusted", "-O", "raw", name, "out.raw", expect=0)
    vd(imgdir, "resize", "--untrusted", "out.raw", "2M", expect=0)


def test_untrusted_create_over_referencing_parent_refused(imgdir, secret):
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", imgdir / "a.qcow2", "1M")
    proc = vd(imgdir, "create", "--untrusted", "-b", "a.qcow2", "top.qcow2", expect=1)
    assert "rule external-reference" in proc.stderr.decode()
    assert not (imgdir / "top.qcow2").exists()


def test_writing_commands_refuse(imgdir, secret):
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", imgdir / "a.qcow2", "1M")
    for args in (["compact"], ["resize", "a.qcow2", "2M"], ["discard", "a.qcow2", "0:64K"], ["merge"],
                 ["rebase", "-u", "-b", "", "a.qcow2"]):
        cmd, rest = args[0], args[1:] or ["a.qcow2"]
        proc = vd(imgdir, cmd, "--untrusted", *rest, expect=1)
        assert "rule external-reference" in proc.stderr.decode(), (cmd, proc.stderr)


# -- without --untrusted ---------------------------------------------------------------------------

def test_info_lists_external_references_without_untrusted(imgdir, secret):
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", imgdir / "a.qcow2", "1M")
    info = json.loads(vd(imgdir, "info", "--output", "json", "-f", "qcow2", "a.qcow2", expect=0).stdout)
    assert info["external-references"] == [str(secret)]
    text = vd(imgdir, "info", "-f", "qcow2", "a.qcow2", expect=0).stdout.decode()
    assert f"external references: {secret}" in text


def test_probed_raw_whose_first_sector_looks_like_another_format_warns(imgdir):
    # a LUKS header is not a format vdtool probes: the file probes as raw
    (imgdir / "luks.img").write_bytes(b"LUKS\xba\xbe\x00\x02" + bytes(1 << 16))
    proc = vd(imgdir, "info", "--output", "json", "luks.img", expect=0)
    assert "vdtool: warning:" in proc.stderr.decode() and "luks" in proc.stderr.decode()
    assert json.loads(proc.stdout)["warnings"]
    # a plain raw disk: no warning
    (imgdir / "plain.img").write_bytes(bytes(1 << 16))
    proc = vd(imgdir, "info", "plain.img", expect=0)
    assert proc.stderr == b""
    # -q silences warnings
    proc = vd(imgdir, "convert", "-q", "-O", "raw", "luks.img", "out.raw", expect=0)
    assert proc.stderr == b""

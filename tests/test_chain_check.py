"""Broken chains fail loudly: check exits 1 ("could not open") when a parent
is gone or is not the image the child recorded, for every differencing
format, as qemu-img check fails on a backing file it cannot open; the JSON
names the problem; --force accepts an identity mismatch."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import peers
from vdrun import cli

FORMATS = ("qcow2", "vdi", "vmdk", "vhd")


def _chain(tmp_path, fmt):
    base = tmp_path / f"base.{fmt}"
    top = tmp_path / f"top.{fmt}"
    assert cli("create", "-f", fmt, base, "4M").returncode == 0
    assert cli("create", "-f", fmt, "-b", base, top).returncode == 0
    return base, top


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_fails_when_the_parent_is_gone(tmp_path, fmt):
    base, top = _chain(tmp_path, fmt)
    assert cli("check", top).returncode == 0
    away = tmp_path / "a" / "b"  # out of reach: VDI parents are found by UUID in nearby folders
    away.mkdir(parents=True)
    os.rename(base, away / "moved.bin")
    r = cli("check", top)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "could not open the image's chain" in r.stdout and "not found" in r.stdout
    assert "rebase -u -b" in r.stdout  # says how to mend it
    r = cli("check", "--output", "json", top)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["check-errors"] == 1 and "not found" in doc["chain-error"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_fails_when_the_parent_is_another_image(tmp_path, fmt):
    """The parent's file replaced by another image of the same format: the
    identity the child recorded (UUID, CID, time stamp) no longer matches,
    except for qcow2, which records none."""
    base, top = _chain(tmp_path, fmt)
    other = tmp_path / f"other.{fmt}"
    assert cli("create", "-f", fmt, other, "4M").returncode == 0
    shutil.copyfile(other, base)
    r = cli("check", top)
    if fmt == "qcow2":
        assert r.returncode == 0, r.stdout
        return
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "could not open the image's chain" in r.stdout
    if fmt != "vdi":  # a VDI parent is found by its UUID: another UUID is no parent at all
        assert cli("check", "--force", top).returncode == 0


@pytest.mark.interop
def test_qemu_img_agrees_on_a_missing_backing_file(tmp_path):
    base, top = _chain(tmp_path, "qcow2")
    os.unlink(base)
    q = peers.qemu_img("check", str(top), check=False)
    assert q.returncode == cli("check", top).returncode == 1


@pytest.mark.parametrize("fmt", ["vhd", "vmdk"])
def test_parent_search_finds_a_moved_and_renamed_parent_by_identity(tmp_path, fmt):
    """--parent-search finds VHD (UUID) and VMDK (CID) parents by the
    identity the child recorded, not only by name, as VDI's by UUID."""
    base, top = _chain(tmp_path, fmt)
    away = tmp_path / "elsewhere"
    away.mkdir()
    decoy = away / f"decoy.{fmt}"
    cli("create", "-f", fmt, decoy, "4M", expect=0)
    os.rename(base, away / f"renamed.{fmt}")
    assert cli("check", top).returncode == 1
    r = cli("check", "--parent-search", away, top)
    assert r.returncode == 0, r.stdout
    info = json.loads(cli("info", "--output", "json", "--parent-search", away, top, expect=0).stdout)
    assert info["parent-found"] is True and info["parent-path"].endswith(f"renamed.{fmt}")


def test_create_unsafe_records_a_parent_that_does_not_exist(tmp_path):
    """create -u, as qemu-img create -u: the parent is recorded as given,
    not opened; qemu-img reads the same backing file and format."""
    cli("create", "-u", "-b", "later.qcow2", "-F", "qcow2", tmp_path / "top.qcow2", "8M", expect=0)
    q = peers.qemu_info(tmp_path / "top.qcow2", "qcow2")
    assert q["backing-filename"] == "later.qcow2" and q["backing-filename-format"] == "qcow2"
    assert cli("check", tmp_path / "top.qcow2").returncode == 1  # until the parent exists
    cli("create", "-f", "qcow2", tmp_path / "later.qcow2", "8M", expect=0)
    assert cli("check", tmp_path / "top.qcow2").returncode == 0
    r = cli("create", "-u", "-b", "p.vdi", "-F", "vdi", tmp_path / "t.vdi", "8M")
    assert r.returncode == 2 and "UUID" in r.stderr and not (tmp_path / "t.vdi").exists()
    r = cli("create", "-u", "-b", "p.qcow2", tmp_path / "t.qcow2", "8M")
    assert r.returncode == 2 and "-F" in r.stderr

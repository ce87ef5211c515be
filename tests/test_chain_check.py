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

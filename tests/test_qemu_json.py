"""Scripts written against qemu-img keep working: for every key qemu-img
reports in `info --output json` (with and without --backing-chain) and
`check --output json`, vdtool reports the same key with the same type and
value; vdtool's own keys only come beside them.  Judged key by key on
images qemu-img and vdtool make, in every format and variant."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import peers
from vdrun import cli

pytestmark = pytest.mark.interop


def _missing_or_different(q, v, path="") -> list:
    """Where ``v`` (vdtool's document) lacks or differs from ``q`` (qemu-img's)."""
    out = []
    if isinstance(q, dict):
        if not isinstance(v, dict):
            return [f"{path}: qemu-img has an object, vdtool {v!r}"]
        for k, qv in q.items():
            if k not in v:
                out.append(f"{path}/{k}: missing (qemu-img: {qv!r})")
            else:
                out += _missing_or_different(qv, v[k], f"{path}/{k}")
    elif isinstance(q, list):
        if not isinstance(v, list) or len(q) != len(v):
            return [f"{path}: qemu-img {q!r}, vdtool {v!r}"]
        for i, (a, b) in enumerate(zip(q, v)):
            out += _missing_or_different(a, b, f"{path}[{i}]")
    elif q != v or type(q) is not type(v):
        out.append(f"{path}: qemu-img {q!r}, vdtool {v!r}")
    return out


def _vd_json(cwd, *args, expect=0):
    r = cli(*args, "--output", "json", cwd=cwd, expect=expect)
    return json.loads(r.stdout)


def _qemu_json(cwd, *args):
    r = subprocess.run([peers.need("qemu-img"), *map(str, args), "--output=json"], cwd=cwd, capture_output=True,
                       text=True, timeout=120, check=True)
    return json.loads(r.stdout)


# (file name, qemu-img create arguments) — made by qemu-img
QEMU_MADE = [
    ("q.qcow2", ["-f", "qcow2"]),
    ("q010.qcow2", ["-f", "qcow2", "-o", "compat=0.10,cluster_size=4096"]),
    ("qx.qcow2", ["-f", "qcow2", "-o", "extended_l2=on,lazy_refcounts=on,refcount_bits=64"]),
    ("q.vdi", ["-f", "vdi"]),
    ("qs.vdi", ["-f", "vdi", "-o", "static=on"]),
    ("q.vmdk", ["-f", "vmdk"]),
    ("q2g.vmdk", ["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"]),
    ("qf.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicFlat"]),
    ("q.vhd", ["-f", "vpc"]),
    ("qf.vhd", ["-f", "vpc", "-o", "subformat=fixed"]),
    ("q.img", ["-f", "raw"]),
    ("q.hds", ["-f", "parallels"]),
]

# (file name, vdtool create arguments) — made by vdtool
VD_MADE = [
    ("v.qcow2", ["-f", "qcow2"]),
    ("v.vdi", ["-f", "vdi"]),
    ("vf.vdi", ["-f", "vdi", "--variant", "fixed"]),
    ("v.vmdk", ["-f", "vmdk"]),
    ("vs.vmdk", ["-f", "vmdk", "--variant", "streamOptimized"]),
    ("v2g.vmdk", ["-f", "vmdk", "--variant", "twoGbMaxExtentFlat"]),
    ("v.vhd", ["-f", "vhd"]),
    ("vf.vhd", ["-f", "vhd", "--variant", "fixed"]),
    ("v.img", ["-f", "raw"]),
    ("v.hds", ["-f", "parallels"]),
]


@pytest.mark.parametrize("name,args", QEMU_MADE + VD_MADE, ids=[n for n, _ in QEMU_MADE + VD_MADE])
def test_info_json_has_every_qemu_img_key(tmp_path, name, args):
    if name.startswith("q"):
        peers.qemu_img("create", "-q", *args, tmp_path / name, "5M")
    else:
        cli("create", "-q", *args, name, "5M", cwd=tmp_path, expect=0)
    qfmt = {"qcow2": "qcow2", "vdi": "vdi", "vmdk": "vmdk", "vhd": "vpc", "img": "raw",
            "hds": "parallels"}[name.rsplit(".", 1)[1]]
    # -f for qemu-img: it probes a fixed VHD (footer at the end only) as raw
    q = _qemu_json(tmp_path, "info", "-f", qfmt, str(tmp_path / name))
    v = _vd_json(tmp_path, "info", str(tmp_path / name))
    assert _missing_or_different(q, v) == []


def test_info_json_snapshots_at_the_top(tmp_path):
    p = tmp_path / "s.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    peers.qemu_img("snapshot", "-c", "one", p)
    peers.qemu_img("snapshot", "-c", "two", p)
    q = _qemu_json(tmp_path, "info", str(p))
    v = _vd_json(tmp_path, "info", str(p))
    assert _missing_or_different(q, v) == []
    assert [s["name"] for s in v["snapshots"]] == ["one", "two"]


@pytest.mark.parametrize("relative", [True, False])
def test_backing_chain_is_a_list_as_qemu_img_gives(tmp_path, relative):
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"  # qemu-img makes VMDK overlays only over VMDK
    top = tmp_path / "top.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    peers.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    peers.qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    name = "top.qcow2" if relative else str(top)
    q = _qemu_json(tmp_path, "info", "--backing-chain", name)
    cwd = tmp_path if relative else None
    v = _vd_json(cwd, "info", "--backing-chain", name)
    assert isinstance(v, list) and len(v) == 3
    assert _missing_or_different(q, v) == []
    assert _vd_json(cwd, "info", "--chain", name) == v  # --chain: the old name


@pytest.mark.parametrize("fmt,qfmt", [("qcow2", "qcow2"), ("vdi", "vdi"), ("vmdk", "vmdk"), ("hds", "parallels")])
def test_check_json_has_every_qemu_img_key(tmp_path, fmt, qfmt):
    p = tmp_path / f"c.{fmt}"
    peers.qemu_img("create", "-q", "-f", qfmt, p, "8M")
    peers.qemu_io(p, "write -P 0x11 0 1M", "write -P 0x22 5M 64k", fmt=qfmt)
    q = json.loads(peers.run("qemu-img", "check", "--output=json", str(p), check=False).stdout)
    v = _vd_json(tmp_path, "check", str(p))
    assert _missing_or_different(q, v) == []


def test_vhd_is_vpc_in_json_and_takes_it_back(tmp_path):
    """The format's name in JSON is qemu-img's driver name (vpc), and vdtool
    takes it back with -f; text output says vhd."""
    p = tmp_path / "d.vhd"
    cli("create", "-q", "-f", "vhd", p, "1M", expect=0)
    v = _vd_json(tmp_path, "info", str(p))
    assert v["format"] == "vpc"
    assert _vd_json(tmp_path, "info", "-f", v["format"], str(p))["virtual-size"] == v["virtual-size"]
    assert "file format: vhd" in cli("info", p, expect=0).stdout
    assert os.path.exists(p)

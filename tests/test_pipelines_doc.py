"""Every recipe in docs/pipelines.md runs, as written, with its URLs on a
local HTTP server, its uploads replaced by ``cat > file`` and /dev/sdX by a
loop device (a plain file where none can be made)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import peers
from httpserver import serve
from vdrun import REPO, vdtool_env

DOC = os.path.join(REPO, "docs", "pipelines.md")
CLOUD_URL = "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img"


def recipes() -> list:
    """(title, shell script) of every block marked <!-- recipe -->; a YAML
    block gives the script of its block scalar (``run: |``, ``- |``)."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    title = ""
    for m in re.finditer(r"^## ([^\n]*)$|<!-- recipe -->\n```(\w+)\n(.*?)\n```", text, re.M | re.S):
        if m.group(1):
            title = m.group(1).strip()
            continue
        lang, body = m.group(2), m.group(3)
        out.append((title, body if lang == "sh" else _block_scalar(body)))
    return out


def _block_scalar(yaml_text: str) -> str:
    lines = yaml_text.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("|"):
            indent = None
            body = []
            for nxt in lines[i + 1:]:
                if not nxt.strip():
                    body.append("")
                    continue
                k = len(nxt) - len(nxt.lstrip())
                if indent is None:
                    indent = k
                if k < indent:
                    break
                body.append(nxt[indent:])
            return "\n".join(body)
    raise AssertionError(f"no script in YAML block:\n{yaml_text}")


def test_the_doc_has_its_recipes():
    titles = [t for t, _ in recipes()]
    assert len(titles) >= 8, titles
    for want in ("VirtualBox", "ESXi", "Azure", "disk", "CI", "Fanning", "Kubernetes"):
        assert any(want in t for t in titles), (want, titles)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The files the recipes start from: a 'cloud image' (qcow2 made by
    qemu-img) on an HTTP server, build/disk.img, images/*.vmdk."""
    peers.need("qemu-img")
    root = tmp_path_factory.mktemp("recipes")
    served = root / "served"
    served.mkdir()
    cloud = served / "cloud.img"
    peers.qemu_img("create", "-q", "-f", "qcow2", str(cloud), "48M")
    peers.qemu_io(cloud, "write -P 0x11 0 2M", "write -P 0x22 20M 1M", "write -P 0x33 47M 1M")
    (root / "build").mkdir()
    peers.qemu_img("convert", "-O", "raw", str(cloud), str(root / "build" / "disk.img"))
    (root / "images").mkdir()
    for name in ("a", "b", "c"):
        peers.qemu_img("convert", "-O", "vmdk", str(cloud), str(root / "images" / f"{name}.vmdk"))
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "vdtool"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m vdtool \"$@\"\n")
    wrapper.chmod(0o755)
    return root


def _disk(work):
    """A loop device over a 64 MiB file, or the file itself."""
    backing = work / "disk.bin"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    if os.geteuid() == 0 and shutil.which("losetup"):
        r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.startswith("/dev/"):
            return r.stdout.strip(), True
    return str(backing), False


@pytest.mark.parametrize("index", range(len(recipes())))
def test_recipe_runs(bench, tmp_path, index):
    title, script = recipes()[index]
    work = tmp_path
    for item in ("build", "images"):
        shutil.copytree(bench / item, work / item)
    disk, is_loop = _disk(work)
    with serve(bench / "served") as srv:
        url = srv.url("cloud.img")
        script = script.replace(CLOUD_URL, url)
        script = re.sub(r"\|\s*aws s3 cp - s3://\S+", "| cat > uploaded.vmdk", script)
        script = script.replace("/dev/sdX", disk).replace("/data/", str(work / "data") + "/")
        (work / "data").mkdir()
        env = vdtool_env(PATH=f"{bench / 'bin'}{os.pathsep}{os.environ['PATH']}", SOURCE_URL=url,
                         TMPDIR=str(work))
        if "noble.vdi" in script and "VirtualBox" not in title:
            # the first recipe makes noble.vdi, later ones use it: each test makes its own
            subprocess.run([sys.executable, "-m", "vdtool", "convert", "-q", url, str(work / "noble.vdi")],
                           env=env, check=True, capture_output=True)
        try:
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                               capture_output=True, text=True, timeout=300)
        finally:
            if is_loop:
                subprocess.run(["losetup", "-d", disk])
    assert r.returncode == 0, f"{title}\n{script}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr
    _judge(title, work, url, bench)


def _judge(title: str, work, url: str, bench) -> None:
    """What each recipe made reads as the cloud image does."""
    cloud = str(bench / "served" / "cloud.img")
    made = {"ESXi": "uploaded.vmdk", "Azure": "noble.vhd", "Through other tools": "noble.qcow2",
            "CI job": "out/disk.qcow2", "Kubernetes": "data/disk.img", "VirtualBox": "noble.vdi",
            "onto a disk": "disk.bin"}
    for key, name in made.items():
        if key in title:
            fmt = {"vhd": "vpc", "img": "raw", "bin": "raw", "vdi": "vdi", "vmdk": "vmdk",
                   "qcow2": "qcow2"}[name.rsplit(".", 1)[1]]
            r = peers.qemu_img("compare", "-f", fmt, "-F", "qcow2", str(work / name), cloud, check=False)
            assert r.returncode == 0, (title, r.stdout, r.stderr)
    if "Fanning" in title:
        for name in ("a", "b", "c"):
            peers.qemu_img("compare", "-F", "qcow2", str(work / "converted" / f"{name}.qcow2"), cloud)

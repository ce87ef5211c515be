"""Machine-readable progress: qemu-img's "(NN.NN/100%)" lines for -p
without a terminal (KubeVirt's importer and Proxmox parse them), JSON lines
with --progress=json or VDTOOL_PROGRESS=json, a line on SIGUSR1, and the
qemu-img form on a terminal without columns."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_on_pty
from vdrun import cli, vdtool_env

M = 1 << 20
QEMU_LINE = re.compile(r"^    \((\d+\.\d\d)/100%\)$")


def _source(tmp_path, mib=8):
    p = tmp_path / "src.img"
    block = os.urandom(M)
    with open(p, "wb") as f:
        for i in range(mib):
            f.write(block[i:] + block[:i])
    return p


def test_dash_p_without_a_terminal_prints_qemu_img_lines(tmp_path):
    _source(tmp_path)
    # -p takes no value; bytes, so that the carriage returns stay as they are
    r = cli("convert", "-p", "-O", "qcow2", "src.img", "out.qcow2", cwd=tmp_path, expect=0, text=False)
    err = r.stderr.decode()
    assert err.startswith("    (0.00/100%)\r") and err.endswith("    (100.00/100%)\r\n"), repr(err[:200])
    values = [float(QEMU_LINE.match(x).group(1)) for x in err.replace("\r\n", "\r").split("\r") if x]
    assert values == sorted(values) and values[-1] == 100.0


@pytest.mark.parametrize("how", ["option", "env"])
def test_json_lines(tmp_path, how):
    _source(tmp_path)
    args = ["convert", "-O", "vdi", "src.img", "out.vdi"]
    env = None
    if how == "option":
        args.insert(1, "--progress=json")
    else:
        env = vdtool_env(VDTOOL_PROGRESS="json")
    r = cli(*args, cwd=tmp_path, env=env, expect=0)
    docs = [json.loads(line) for line in r.stderr.splitlines()]
    assert docs, r.stderr
    for d in docs:
        assert set(d) >= {"op", "done", "total", "percent", "rate", "eta", "elapsed"}
        assert d["op"] == "convert" and isinstance(d["done"], int) and isinstance(d["percent"], float | int)
    assert [d["percent"] for d in docs] == sorted(d["percent"] for d in docs)
    assert docs[-1]["percent"] == 100 and docs[-1].get("final") is True and docs[-1]["eta"] == 0
    assert "Converted" in r.stdout  # the confirmation stays on stdout


def test_quiet_silences_json_progress(tmp_path):
    _source(tmp_path, 2)
    r = cli("convert", "-q", "--progress=json", "src.img", "out.img", cwd=tmp_path, expect=0)
    assert r.stderr == "" and r.stdout == ""


def test_bad_progress_mode_is_a_usage_error(tmp_path):
    _source(tmp_path, 1)
    r = cli("convert", "--progress=fancy", "src.img", "out.img", cwd=tmp_path)
    assert r.returncode == 2 and "fancy" in r.stderr


def test_sigusr1_prints_a_progress_line(tmp_path):
    _source(tmp_path, 160)
    proc = subprocess.Popen([sys.executable, "-m", "vdtool", "convert", "-q", "-c", "-O", "qcow2", "src.img",
                             "out.qcow2"], cwd=tmp_path, env=vdtool_env(), stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not any(n.startswith(".vdtool-") for n in os.listdir(tmp_path)) and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = [x for x in err.splitlines() if x]
    assert len(lines) == 1 and QEMU_LINE.match(lines[0]), repr(err)


def test_a_terminal_without_columns_gets_qemu_img_lines(tmp_path):
    """A bar cannot be drawn in zero columns (some CI runners' ptys): the
    progress falls back to qemu-img's lines instead of vanishing."""
    _source(tmp_path, 4)
    code, text = run_on_pty([sys.executable, "-m", "vdtool", "convert", "src.img", "out.img"], cwd=tmp_path,
                            env=vdtool_env(), winsize=(0, 0), stdout=subprocess.PIPE)
    assert code == 0
    assert "(100.00/100%)" in text and "|" not in text, repr(text)

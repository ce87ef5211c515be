"""A person at a terminal gets colour and tables (rich); a pipe, a file or
NO_COLOR gets the plain text exactly as documented."""

from __future__ import annotations

import sys

from helpers import run_on_pty
from vdrun import cli, vdtool_env


def _on_a_terminal(args, cwd, **env):
    """Run vdtool with stdout and stderr on a pseudo-terminal; what it wrote."""
    return run_on_pty([sys.executable, "-m", "vdtool", *map(str, args)], cwd=cwd,
                      env=vdtool_env(TERM="xterm", COLUMNS="120", **env))


def test_error_is_red_on_a_terminal_and_plain_in_a_pipe(tmp_path):
    code, text = _on_a_terminal(["info", "nope.img"], tmp_path)
    assert code == 1 and "\x1b[" in text and "no such file" in text
    r = cli("info", "nope.img", cwd=tmp_path, expect=1)
    assert r.stderr == "vdtool: error: nope.img: no such file\n"
    code, text = _on_a_terminal(["info", "nope.img"], tmp_path, NO_COLOR="1")
    assert code == 1 and "\x1b[" not in text


def test_backing_chain_table_only_on_a_terminal(tmp_path):
    cli("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path, expect=0)
    cli("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "top.qcow2", cwd=tmp_path, expect=0)
    code, text = _on_a_terminal(["info", "--backing-chain", "top.qcow2"], tmp_path)
    assert code == 0 and "Backing chain" in text and "┃" in text and "image: base.qcow2" in text
    plain = cli("info", "--backing-chain", "top.qcow2", cwd=tmp_path, expect=0).stdout
    assert "Backing chain" not in plain and plain.startswith("image: top.qcow2")


def test_check_summary_coloured_only_on_a_terminal(tmp_path):
    cli("create", "-q", "-f", "qcow2", "d.qcow2", "1M", cwd=tmp_path, expect=0)
    code, text = _on_a_terminal(["check", "d.qcow2"], tmp_path)
    assert code == 0 and "\x1b[" in text and "No errors were found on the image." in text
    assert cli("check", "d.qcow2", cwd=tmp_path, expect=0).stdout.startswith("No errors were found on the image.\n")

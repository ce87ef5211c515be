"""man/ is generated from the click commands (vdtool/manpage.py); it must not
drift from --help.  Regenerate with:  python -m vdtool.manpage man/"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from vdrun import REPO, vdtool_env

MAN = os.path.join(REPO, "man")
from vdtool.cli import COMMANDS  # every command the CLI registers has a page (noqa: E402)


_env = vdtool_env


def test_committed_man_pages_are_up_to_date(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vdtool.manpage", str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    generated = sorted(os.listdir(tmp_path))
    assert generated == sorted(["vdtool.1"] + [f"vdtool-{c}.1" for c in COMMANDS])
    committed = sorted(f for f in os.listdir(MAN) if f.endswith(".1"))
    stale = []
    for name in sorted(set(generated) | set(committed)):
        new = tmp_path / name
        old = os.path.join(MAN, name)
        if not new.exists() or not os.path.exists(old):
            stale.append(name)
        elif new.read_text(encoding="utf-8") != open(old, encoding="utf-8").read():
            stale.append(name)
    assert not stale, f"man pages differ from --help: {stale}; run: python -m vdtool.manpage man/"


def test_pages_carry_every_option():
    from vdtool.cli import main
    from vdtool.manpage import render_all

    import click

    pages = render_all()
    ctx = click.Context(main, info_name="vdtool")
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        text = pages[f"vdtool-{name}.1"]
        assert ".SH EXAMPLES" in text and ".SH OPTIONS" in text
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:  # hidden: internal (--progress-mode)
                for opt in param.opts:
                    assert opt.replace("-", "\\-") in text, (name, opt)
        assert "vdtool\\-" + name in pages["vdtool.1"]


def test_usage_without_folder():
    proc = subprocess.run([sys.executable, "-m", "vdtool.manpage"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("groff") is None, reason="man/groff not installed")
@pytest.mark.parametrize("page", ["vdtool.1"] + [f"vdtool-{c}.1" for c in COMMANDS])
def test_pages_render_without_warnings(page):
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", os.path.join(MAN, page)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_man_pages_install_with_the_package():
    """pyproject.toml installs man/*.1 under PREFIX/share/man/man1, where
    man finds them beside the vdtool script (man vdtool-convert)."""
    tomllib = pytest.importorskip("tomllib")
    import glob

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        conf = tomllib.load(f)
    patterns = conf["tool"]["setuptools"]["data-files"]["share/man/man1"]
    installed = {os.path.basename(p) for pat in patterns for p in glob.glob(os.path.join(REPO, pat))}
    assert installed == {n for n in os.listdir(os.path.join(REPO, "man")) if n.endswith(".1")}
    assert "vdtool-convert.1" in installed

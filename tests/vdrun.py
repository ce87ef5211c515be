"""Running the vdtool command line from tests, the same way everywhere:
the checkout first on PYTHONPATH, no VDTOOL_* settings leaking in from the
caller's environment, and never a traceback in what it prints."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vdtool_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("VDTOOL_UNTRUSTED", None)
    env.pop("VDTOOL_DEBUG", None)
    env.update(extra)
    return env


def cli(*args, cwd=None, env=None, expect=None, text: bool = True) -> subprocess.CompletedProcess:
    """``python -m vdtool ARGS`` (in ``cwd`` when given); asserts no
    traceback and, when ``expect`` is given, the exit status.  ``text=False``
    keeps the output as bytes (for tests that look for leaked binary
    content or compare raw output)."""
    proc = subprocess.run([sys.executable, "-m", "vdtool", *map(str, args)], cwd=cwd, capture_output=True,
                          text=text, env=env or vdtool_env(), timeout=120)
    out, err = proc.stdout, proc.stderr
    if not text:
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
    assert "Traceback" not in out + err, err
    if expect is not None:
        assert proc.returncode == expect, (f"vdtool {' '.join(map(str, args))} exited {proc.returncode}, "
                                           f"expected {expect}\nstdout: {out}\nstderr: {err}")
    return proc


def run_vdtool(cwd, *args, env=None, expect=None, text: bool = True) -> subprocess.CompletedProcess:
    """:func:`cli` with the folder first, for tests that run every command
    in their ``tmp_path``."""
    return cli(*args, cwd=cwd, env=env, expect=expect, text=text)

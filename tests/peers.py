"""Real tools as judges: qemu-img, qemu-io and the libyal readers.

Outside CI a missing tool skips the test; with CI=true it fails, because an
interop test that skips proves nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    msg = f"{tool} is not installed (apt-get install qemu-utils libvhdi-utils libvmdk-utils libqcow-utils)"
    if IN_CI:
        pytest.fail(msg + " -- interop tests may not skip in CI")
    pytest.skip(msg)


def run(tool: str, *args, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    exe = need(tool)
    proc = subprocess.run([exe, *map(str, args)], capture_output=True, input=input, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
    return proc


def qemu_img(*args, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(path, *commands, fmt: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    args = []
    if fmt:
        args += ["-f", fmt]
    for c in commands:
        args += ["-c", c]
    return run("qemu-io", *args, str(path), check=check)


def qemu_info(path, fmt: str | None = None) -> dict:
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(qemu_img(*args, str(path)).stdout)


def qemu_check(path, fmt: str | None = None) -> dict:
    """qemu-img check as JSON; asserts it ran (exit 0 clean, 2/3 corrupt/leaks)."""
    args = ["check", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    proc = qemu_img(*args, str(path), check=False)
    out = proc.stdout.decode()
    result = json.loads(out) if out.strip().startswith("{") else {}
    result["_exit"] = proc.returncode
    result["_stderr"] = proc.stderr.decode(errors="replace")
    return result


def assert_qemu_check_clean(path, fmt: str | None = None) -> None:
    r = qemu_check(path, fmt)
    assert r["_exit"] == 0 and not r.get("corruptions") and not r.get("leaks"), f"qemu-img check on {path}: {r}"


def assert_qemu_compare(a, b, fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False) -> None:
    args = ["compare"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    if strict:
        args.append("-s")
    proc = qemu_img(*args, str(a), str(b), check=False)
    assert proc.returncode == 0, f"qemu-img compare {a} {b}: {proc.stdout.decode()} {proc.stderr.decode()}"


def qemu_to_raw(src, dst, fmt: str | None = None) -> None:
    args = ["convert", "-O", "raw"]
    if fmt:
        args += ["-f", fmt]
    qemu_img(*args, str(src), str(dst))


def qemu_raw(path, folder, fmt: str | None = None) -> bytes:
    """What qemu-img reads from ``path``: converted to raw in a scratch file
    in ``folder`` (removed again).  Name ``fmt`` where qemu's probing could
    guess wrong (a fixed VHD looks raw to it)."""
    fd, out = tempfile.mkstemp(suffix=".qemu.raw", dir=str(folder))
    os.close(fd)
    try:
        qemu_to_raw(path, out, fmt)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def qemu_make(folder, name, fmt, size, *writes, opts=None, backing=None, backing_fmt=None):
    """An image made by qemu-img (``-o opts``, over ``backing``), then
    ``writes`` (qemu-io commands) run on it; its path."""
    p = folder / name
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    qemu_img(*args, str(p), *([size] if size else []))
    if writes:
        qemu_io(p, *writes, fmt=fmt)
    return p

"""SIGTERM (and SIGHUP, SIGINT) at random moments during convert, compact,
merge and resize, in real vdtool processes: what a cancelled CI job,
``docker stop``, ``timeout`` or a closed terminal does.

Each run starts ``python -m vdtool OP ...`` on an image large enough to
take a while, waits until vdtool has its signal handlers in place (read
from /proc/PID/status, no hook in vdtool: a signal before that kills the
interpreter before anything was touched), sleeps a random delay within the
op's measured duration (seeded: the same points every run) and sends the
signal.  Afterwards:

- the exit status is 128 + the signal (143, 129, 130), or 0 when the op
  finished first, with no traceback (or death by the signal itself once
  the op is over: CPython restores the default actions while it exits);
- no ``.vdtool-*`` staging folder is left;
- convert: nothing under the destination's name unless the whole image is
  there (and it reads as the source);
- in-place ops: the image reads as before or as after a clean run (merge:
  what the top of the chain read stays readable, from the top or the base),
  vdtool's check finds no corruption and ``qemu-img check`` exits 0 or 3.

Default run: a handful of (op, format, signal) cases, one kill each; the
long form (``-m slow``) kills every op on every format at 12 points with
SIGTERM and 3 each with SIGHUP and SIGINT."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import chainkit as ck
import peers
from chainkit import M
from helpers import read_all

FORMATS = ("qcow2", "vdi", "vmdk", "vhd")
OPS = ("convert", "compact", "merge", "resize-shrink", "resize-grow")
SIZE = 32 * M
LONG_TERM, LONG_OTHER = 12, 3  # long form: SIGTERM points, and SIGHUP / SIGINT points, per (op, format)


def _default_sighup() -> None:
    # a runner started under nohup passes SIGHUP on ignored, and vdtool
    # rightly keeps an ignored SIGHUP ignored
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _env():
    env = dict(os.environ)
    env.pop("VDTOOL_DEBUG", None)
    return env


def _digest(path) -> str:
    return hashlib.sha256(read_all(path)).hexdigest()


def _busy_data(seed: int) -> list:
    """Writes for SIZE bytes: data that does not repeat, every fourth MiB zeros."""
    rng = random.Random(seed)
    block = rng.randbytes(M)
    return [(i * M, block[i:] + block[:i]) for i in range(SIZE // M) if i % 4 != 3]


# -- the ops ------------------------------------------------------------------------------------

def _build(folder, op, fmt) -> tuple:
    """Make the fixture in ``folder``; returns (args, the file the op changes
    or makes, the chain's base for merge or None)."""
    ext = ck.EXT[fmt]
    if op == "convert":
        src = ck.make_image(folder, "src", "raw", SIZE, writes=_busy_data(1))
        return ["convert", "-O", fmt, os.path.basename(src), f"out.{ext}"], f"out.{ext}", None
    if op == "merge":
        base = ck.make_image(folder, "base", fmt, SIZE, writes=_busy_data(2))
        top = ck.make_image(folder, "top", fmt, None, parent=base,
                            writes=[(i * M + 4096, b"\x5a" * (600 << 10)) for i in range(0, SIZE // M, 2)])
        return ["merge", os.path.basename(top)], os.path.basename(top), os.path.basename(base)
    img = ck.make_image(folder, "a", fmt, SIZE, writes=_busy_data(3))
    name = os.path.basename(img)
    if op == "compact":
        # whole 2 MiB ranges of zeros in the middle and at the end: blocks to give up and to move
        ck.write(img, [(k * M, bytes(2 * M)) for k in range(2, SIZE // M, 6)] + [(SIZE - 2 * M, bytes(2 * M))])
        return ["compact", name], name, None
    if op == "resize-shrink":
        return ["resize", "--shrink", name, f"{SIZE // 2 // M + 1}M"], name, None
    assert op == "resize-grow"
    return ["resize", name, f"{SIZE * 3 // M}M"], name, None


def _ready(pid: int) -> bool:
    """vdtool catches SIGTERM (its handlers are in place)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


class Case:
    """One op on one format: its fixture (``template``), what a clean run
    makes of it and how long that takes once vdtool is ready."""

    def __init__(self, root, op, fmt):
        self.op, self.fmt, self.root = op, fmt, str(root)
        self.template = os.path.join(self.root, "template")
        os.makedirs(self.template)
        self.args, self.target, self.base = _build(self.template, op, fmt)
        if op == "convert":
            self.old = _digest(os.path.join(self.template, "src.img"))
        else:
            self.old = _digest(os.path.join(self.template, self.target))
        work = self._copy("clean")
        rc, err, self.duration = self._run(work, None, 0.0)
        assert rc == 0, err
        self.new = self.old if op in ("convert", "merge", "compact") else _digest(os.path.join(work, self.target))
        shutil.rmtree(work)

    def _copy(self, tag):
        work = os.path.join(self.root, tag)
        shutil.copytree(self.template, work)
        return work

    def _run(self, work, sig, delay) -> tuple:
        proc = subprocess.Popen([sys.executable, "-m", "vdtool", *self.args], cwd=work, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sighup)
        end = time.monotonic() + 30
        while not _ready(proc.pid) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)
        start = time.monotonic()
        if sig is not None:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err, time.monotonic() - start

    def kill_at(self, sig, delay: float) -> str:
        """Send ``sig`` ``delay`` seconds after vdtool is ready; '' when every
        guarantee holds, else what broke."""
        work = self._copy(f"{sig.name}-{delay:.4f}")
        try:
            rc, err, _ = self._run(work, sig, delay)
            code = 128 + sig
            if rc == -sig:
                # CPython puts the default actions back as it shuts down: a signal in
                # the last milliseconds kills it (the shell still sees 128 + signal);
                # the op is over by then, which the judge below holds it to
                if self.op == "convert" and not os.path.exists(os.path.join(work, self.target)):
                    return f"killed by {sig.name} before the convert was done: {err.strip()[-500:]}"
            elif rc not in (0, code) or "Traceback" in err:
                return f"exit {rc} (want 0 or {code}): {err.strip()[-500:]}"
            errors = [ln for ln in err.splitlines() if ln.startswith("vdtool: error:")]
            want = "interrupted" if sig == signal.SIGINT else f"terminated by {sig.name}"
            if rc == code and (not errors or want not in errors[-1]):
                return f"exit {rc} without the '{want}' error line: {err.strip()[-500:]}"
            left = [n for n in os.listdir(work) if n.startswith(".vdtool-")]
            if left:
                return f"staging folder left behind: {left}"
            return self.judge(work, rc)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def judge(self, work, rc) -> str:
        path = os.path.join(work, self.target)
        if self.op == "convert":
            if not os.path.exists(path):
                return "exit 0 but no destination" if rc == 0 else ""
            others = [n for n in os.listdir(work) if n not in ("src.img", self.target)]
            if others:
                return f"files other than the destination appeared: {others}"
            got = _digest(path)
            return "" if got == self.old else f"{self.target} exists but does not read as the source (exit {rc})"
        shown = path
        if self.op == "merge" and not os.path.exists(path):
            shown = os.path.join(work, self.base)
        try:
            got = _digest(shown)
        except Exception as e:  # noqa: BLE001 -- the verdict
            return f"{os.path.basename(shown)} does not open: {e}"
        if got not in (self.old, self.new):
            return f"{os.path.basename(shown)} reads as neither the old nor the new content (exit {rc})"
        for p in {shown, os.path.join(work, self.base)} if self.base else {shown}:
            if os.path.exists(p):
                problem = self._check(p)
                if problem:
                    return problem
        return ""

    def _check(self, path) -> str:
        counts = ck.check_one(path)
        if counts is not None and (counts[0] or counts[2]):
            return f"{os.path.basename(path)}: vdtool check found {counts[0]} corruptions, {counts[2]} errors"
        # qemu-img checks no VPC image, nor a VDI with a parent
        if self.fmt == "vhd" or (self.fmt == "vdi" and self.op == "merge" and path.endswith(self.target)):
            return ""
        r = peers.qemu_check(path, ck.QEMU_NAME[self.fmt])
        if r["_exit"] not in (0, 3):
            return f"{os.path.basename(path)}: qemu-img check exit {r['_exit']}: {r['_stderr'].strip()[:300]}"
        return ""


def _delays(case: Case, sig, k: int) -> list:
    """``k`` seeded delays over the op's duration (a little past its end too:
    a signal as vdtool finishes)."""
    rng = random.Random(f"{case.op}/{case.fmt}/{sig.name}")
    return [rng.uniform(0, case.duration * 1.1) for _ in range(k)]


def _run_case(tmp_path, op, fmt, plan) -> list:
    peers.need("qemu-img")
    case = Case(tmp_path, op, fmt)
    problems = []
    for sig, k in plan:
        for delay in _delays(case, sig, k):
            why = case.kill_at(sig, delay)
            if why:
                problems.append(f"{op} {fmt} {sig.name} after {delay:.3f}s of {case.duration:.3f}s: {why}")
    return problems


QUICK = [("convert", "qcow2", signal.SIGTERM), ("convert", "vdi", signal.SIGTERM),
         ("compact", "vdi", signal.SIGTERM), ("compact", "qcow2", signal.SIGHUP),
         ("merge", "vmdk", signal.SIGTERM), ("merge", "qcow2", signal.SIGINT),
         ("resize-shrink", "vhd", signal.SIGTERM), ("resize-grow", "vdi", signal.SIGTERM)]


@pytest.mark.interop
@pytest.mark.parametrize("op,fmt,sig", QUICK, ids=[f"{o}-{f}-{s.name}" for o, f, s in QUICK])
def test_signal_at_a_random_point(tmp_path, op, fmt, sig):
    problems = _run_case(tmp_path, op, fmt, [(sig, 1)])
    assert not problems, "\n".join(problems)


LONG = [(op, fmt) for op in OPS for fmt in FORMATS]


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.parametrize("op,fmt", LONG, ids=[f"{o}-{f}" for o, f in LONG])
def test_signals_at_many_random_points(tmp_path, op, fmt):
    problems = _run_case(tmp_path, op, fmt, [(signal.SIGTERM, LONG_TERM), (signal.SIGHUP, LONG_OTHER),
                                             (signal.SIGINT, LONG_OTHER)])
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("fmt", ["vmdk"])
def test_sigkill_mid_convert_is_swept_by_the_next_convert(tmp_path, fmt):
    """SIGKILL leaves the staging folder (nothing can clean up); the next
    convert into that folder removes it, says so, and does its own work."""
    case = Case(tmp_path, "convert", fmt)
    work = case._copy("killed")
    proc = subprocess.Popen([sys.executable, "-m", "vdtool", *case.args], cwd=work, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while not any(n.startswith(".vdtool-") for n in os.listdir(work)) and proc.poll() is None:
        assert time.monotonic() < end, "no staging folder appeared"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    left = [n for n in os.listdir(work) if n.startswith(".vdtool-")]
    if not left:
        pytest.skip("the convert finished before the kill")  # not seen so far: the stage lives for the whole copy
    assert not os.path.exists(os.path.join(work, case.target))
    args = list(case.args)
    args[-1] = "again." + ck.EXT[fmt]
    r = subprocess.run([sys.executable, "-m", "vdtool", *args], cwd=work, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"(process {proc.pid} is gone)" in r.stderr
    assert not [n for n in os.listdir(work) if n.startswith(".vdtool-")]
    assert _digest(os.path.join(work, args[-1])) == case.old

"""SIGTERM and SIGHUP (a cancelled CI job, ``docker stop``, a closed
terminal) stop vdtool like Ctrl-C: one error line, exit status 128 + the
signal, no staging folder and nothing under the final name; an image
changed in place is left readable and clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import peers

M = 1 << 20


def _env():
    env = dict(os.environ)
    env.pop("VDTOOL_DEBUG", None)
    # the standard library's zlib: ISA-L compresses the busy source in a
    # fraction of a second, before the signal comes
    env["VDTOOL_DEFLATE"] = "zlib"
    return env


def _busy_source(path, mib: int = 192) -> None:
    """Data that compresses slowly (random, rotated per MiB, so no two
    clusters are alike): a compressed convert of it takes seconds."""
    block = os.urandom(M)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i:] + block[:i])


def _default_sighup() -> None:
    # a runner started under nohup passes SIGHUP on ignored, and vdtool
    # rightly keeps it ignored (test_ignored_sighup_stays_ignored)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "vdtool", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sighup)


def _wait_for_staging(folder, proc, timeout=30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(n.startswith(".vdtool-") for n in os.listdir(folder)):
            time.sleep(0.2)  # well into the copy
            return
        if proc.poll() is not None:
            raise AssertionError(f"vdtool ended before it staged anything: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no staging folder appeared")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_during_convert_leaves_nothing(tmp_path, sig, code):
    _busy_source(tmp_path / "src.img")
    proc = _start(["convert", "-c", "-O", "qcow2", "src.img", "out.qcow2"], tmp_path)
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.startswith("vdtool: error:")]
    assert lines == [f"vdtool: error: terminated by {signal.Signals(sig).name}"], err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src.img"]


def test_second_sigterm_stops_at_once_and_still_cleans_up(tmp_path):
    _busy_source(tmp_path / "src.img")
    proc = _start(["convert", "-c", "-O", "qcow2", "src.img", "out.qcow2"], tmp_path)
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src.img"]


@pytest.mark.interop
def test_sigterm_during_compact_leaves_a_clean_image(tmp_path):
    """compact stops at a safe point: qemu-img check passes and the
    content is what it was."""
    src = tmp_path / "src.img"
    _busy_source(src, 64)
    img = tmp_path / "d.qcow2"
    subprocess.run([sys.executable, "-m", "vdtool", "convert", "-O", "qcow2", str(src), str(img)], check=True,
                   env=_env())
    # zero every other MiB so compact has clusters to release and move
    with open(src, "r+b") as f:
        for i in range(0, 64, 2):
            f.seek(i * M)
            f.write(bytes(M))
    peers.qemu_io(img, *[f"write -z {i * M} {M}" for i in range(0, 64, 2)], fmt="qcow2")
    before = os.stat(img).st_mtime_ns
    proc = _start(["compact", str(img)], tmp_path)
    end = time.monotonic() + 10
    while os.stat(img).st_mtime_ns == before and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)  # until compact writes (a signal before vdtool set its handlers finds nothing done)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 143, -signal.SIGTERM), err
    assert "Traceback" not in err
    peers.assert_qemu_check_clean(img)
    peers.assert_qemu_compare(src, img, fmt_a="raw", fmt_b="qcow2")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]


def test_ignored_sighup_stays_ignored(tmp_path):
    """nohup: a SIGHUP that the parent ignored does not stop vdtool."""
    _busy_source(tmp_path / "src.img", 16)
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                             "from vdtool.cli import main; sys.argv = ['vdtool'] + sys.argv[1:]; main()",
                             "convert", "-c", "-O", "qcow2", "src.img", "out.qcow2"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out.qcow2", "src.img"]


def test_a_staging_folder_left_by_sigkill_is_swept_next_time(tmp_path):
    """SIGKILL gives no chance to clean up: the next vdtool writing into the
    folder removes what a dead vdtool left and says so; a live one's stays."""
    _busy_source(tmp_path / "src.img")
    proc = _start(["convert", "-c", "-O", "qcow2", "src.img", "out.qcow2"], tmp_path)
    _wait_for_staging(tmp_path, proc)
    proc.kill()
    proc.wait()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]
    assert len(left) == 1 and left[0].startswith(f".vdtool-{proc.pid}-")
    live = tmp_path / f".vdtool-{os.getpid()}-keep"  # this test's own process: alive
    live.mkdir()
    r = subprocess.run([sys.executable, "-m", "vdtool", "create", "-f", "raw", "x.img", "1M"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"removed a staging folder left by an interrupted vdtool (process {proc.pid} is gone)" in r.stderr
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")) == [live.name]

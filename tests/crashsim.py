"""Crash and fault injection for vdtool, from the test side only (no hooks in
production code).

``install(at, action, model)`` wraps the one file layer
(``vdtool.core.fileio.ImageFile``: pwrite, truncate, flush, punch_hole,
preallocate) and the directory operations ops use for staging and merge
deletion (``os.replace``, ``os.rename``, ``os.unlink``).  Every call is one
numbered *event*; at event ``at`` (before it happens):

- ``kill``: ``SIGKILL`` to the process itself;
- ``enospc`` / ``eio``: the call fails as the real one would (the file layer
  turns the OSError into a VdError, the os.* calls raise the OSError);
- ``sigint``: a real SIGINT to the process itself (what Ctrl-C sends), then
  the call goes on.

With ``at == 0`` nothing is injected; the number of events is written to
``count_file`` when the process ends (``report``), so a harness first learns
how many events an op makes and then picks kill points over that range.

Crash models (``model``):

- ``kill``: what a killed process leaves: everything written so far stays
  (the page cache survives a SIGKILL).
- ``powerloss``: a power cut right at the kill point, in its harshest
  consistent form: every file write, truncate, hole punch and preallocation
  that no fsync covered yet is reverted before the SIGKILL (pre-images are
  recorded per inode, an fsync through any descriptor of the inode makes its
  writes durable); directory operations (create, rename, unlink) are taken as
  durable at once.  Real hardware may keep any subset of the unflushed
  writes; this model checks the order of writes against fsyncs, which is what
  the formats' write ordering promises.

Two ways to run an op under injection: ``run_forked`` (os.fork of the test
process, then the CLI's ``main`` in the child: milliseconds per run, used by
the quick harness) and ``run_subprocess`` (a fresh ``python -c`` bootstrap,
``BOOTSTRAP``; used where a real process start matters, e.g. SIGINT)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ACTIONS = ("kill", "enospc", "eio", "sigint")
MODELS = ("kill", "powerloss")

_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}


class Injector:
    def __init__(self, at: int = 0, action: str = "kill", model: str = "kill"):
        assert action in ACTIONS and model in MODELS
        self.at = at
        self.action = action
        self.model = model
        self.count = 0
        self.kinds: list = []
        # power-loss journal: inode -> [revert fd, [entries...]]
        self.journal: dict = {}

    # -- events ---------------------------------------------------------------------
    def event(self, kind: str, path=None) -> None:
        self.count += 1
        if self.at and self.count == self.at:
            if self.action == "kill":
                if self.model == "powerloss":
                    self.revert_unflushed()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.action == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
                return
            err = _ERRNO[self.action]
            raise OSError(err, os.strerror(err), path)

    # -- power-loss journal ------------------------------------------------------------
    def _entries(self, fd: int):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino)
        slot = self.journal.get(key)
        if slot is None:
            # a description of our own: valid after rename/unlink/close of
            # the image's, and holding none of its lock bytes
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            slot = self.journal[key] = [rfd, []]
        return slot[1]

    def before_write(self, fd: int, offset: int, length: int) -> None:
        if self.model != "powerloss":
            return
        entries = self._entries(fd)
        if entries is not None:
            size = os.fstat(fd).st_size
            entries.append(("w", offset, os.pread(fd, length, offset), size))

    def before_truncate(self, fd: int, size: int) -> None:
        if self.model != "powerloss":
            return
        entries = self._entries(fd)
        if entries is not None:
            old = os.fstat(fd).st_size
            tail = os.pread(fd, old - size, size) if size < old else b""
            entries.append(("t", size, tail, old))

    def after_flush(self, fd: int) -> None:
        if self.model != "powerloss":
            return
        try:
            st = os.fstat(fd)
        except OSError:
            return
        slot = self.journal.get((st.st_dev, st.st_ino))
        if slot is not None:
            slot[1].clear()

    def revert_unflushed(self) -> None:
        for rfd, entries in self.journal.values():
            for kind, offset, pre, old_size in reversed(entries):
                if kind == "w":
                    if pre:
                        os.pwrite(rfd, pre, offset)
                    os.ftruncate(rfd, old_size)
                else:  # truncate
                    os.ftruncate(rfd, old_size)
                    if pre:
                        os.pwrite(rfd, pre, offset)
            entries.clear()


_injector: Injector | None = None


def install(at: int = 0, action: str = "kill", model: str = "kill") -> Injector:
    """Wrap the file layer and os.replace/rename/unlink (in this process)."""
    global _injector
    from vdtool.core import fileio

    inj = _injector = Injector(at, action, model)
    F = fileio.ImageFile
    orig = {name: getattr(F, name) for name in ("pwrite", "truncate", "flush", "punch_hole", "preallocate")}

    def guarded(self, call):
        try:
            return call()
        except OSError as e:  # injected: the error the real call would give
            raise fileio.os_error(self.path, e) from None

    def pwrite(self, offset, data):
        guarded(self, lambda: inj.event("pwrite", self.path))
        inj.before_write(self.fd, offset, memoryview(data).nbytes)
        return orig["pwrite"](self, offset, data)

    def truncate(self, size):
        guarded(self, lambda: inj.event("truncate", self.path))
        inj.before_truncate(self.fd, size)
        return orig["truncate"](self, size)

    def flush(self):
        guarded(self, lambda: inj.event("flush", self.path))
        orig["flush"](self)
        inj.after_flush(self.fd)

    def punch_hole(self, offset, length):
        guarded(self, lambda: inj.event("punch_hole", self.path))
        if length > 0:
            inj.before_write(self.fd, offset, length)
        return orig["punch_hole"](self, offset, length)

    def preallocate(self, offset, length):
        guarded(self, lambda: inj.event("preallocate", self.path))
        if length > 0:
            inj.before_write(self.fd, offset, 0)  # records the old size only
        return orig["preallocate"](self, offset, length)

    F.pwrite, F.truncate, F.flush, F.punch_hole, F.preallocate = pwrite, truncate, flush, punch_hole, preallocate

    def wrap_os(name):
        real = getattr(os, name)

        def fn(*args, **kwargs):
            inj.event(name, args[0] if args else None)
            return real(*args, **kwargs)

        setattr(os, name, fn)

    for name in ("replace", "rename", "unlink"):
        wrap_os(name)
    return inj


def report(count_file: str | None) -> None:
    if count_file and _injector is not None:
        with open(count_file, "w") as f:
            f.write(str(_injector.count))


def _cli(args) -> int:
    from vdtool.cli import main

    try:
        main.main(args=list(args), prog_name="vdtool", standalone_mode=True)
        return 0
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)


class Result:
    def __init__(self, status: int, killed: bool, count: int, output: str):
        self.status = status  # exit status, or -signal
        self.killed = killed
        self.count = count  # events seen (when the child ended normally)
        self.output = output

    def __repr__(self):
        return f"Result(status={self.status}, killed={self.killed}, count={self.count}, output={self.output!r})"


def run_forked(args, *, at: int = 0, action: str = "kill", model: str = "kill", workdir: str) -> Result:
    """Run ``vdtool ARGS`` in a forked child under injection."""
    out_path = os.path.join(workdir, ".crashsim-out")
    count_path = os.path.join(workdir, ".crashsim-count")
    for p in (out_path, count_path):
        if os.path.exists(p):
            os.unlink(p)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            install(at, action, model)
            code = _cli(args)
            report(count_path)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 -- the child must never return into pytest
            try:
                import traceback

                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:
                pass
            code = 99
        os._exit(code)
    _, wstatus = os.waitpid(pid, 0)
    return _result(wstatus, out_path, count_path)


def _result(wstatus: int, out_path: str, count_path: str) -> Result:
    if os.WIFSIGNALED(wstatus):
        status, killed = -os.WTERMSIG(wstatus), os.WTERMSIG(wstatus) == signal.SIGKILL
    else:
        status, killed = os.WEXITSTATUS(wstatus), False
    count = 0
    if os.path.exists(count_path):
        with open(count_path) as f:
            count = int(f.read() or 0)
        os.unlink(count_path)
    output = ""
    if os.path.exists(out_path):
        with open(out_path, errors="replace") as f:
            output = f.read()
        os.unlink(out_path)
    return Result(status, killed, count, output)


BOOTSTRAP = """\
import os, sys
sys.path[:0] = [os.environ["CRASHSIM_ROOT"], os.environ["CRASHSIM_TESTS"]]
import crashsim
crashsim.install(int(os.environ.get("CRASHSIM_AT", "0")), os.environ.get("CRASHSIM_ACTION", "kill"),
                 os.environ.get("CRASHSIM_MODEL", "kill"))
try:
    code = crashsim._cli(sys.argv[1:])
finally:
    crashsim.report(os.environ.get("CRASHSIM_COUNT"))
sys.exit(code)
"""


def subprocess_cmd(args) -> list:
    return [sys.executable, "-c", BOOTSTRAP, *map(str, args)]


def subprocess_env(*, at: int = 0, action: str = "kill", model: str = "kill", count_file: str | None = None) -> dict:
    env = dict(os.environ)
    env.update(CRASHSIM_ROOT=ROOT, CRASHSIM_TESTS=HERE, CRASHSIM_AT=str(at), CRASHSIM_ACTION=action,
               CRASHSIM_MODEL=model)
    if count_file:
        env["CRASHSIM_COUNT"] = count_file
    return env


def run_subprocess(args, *, at: int = 0, action: str = "kill", model: str = "kill", workdir: str,
                   timeout: float = 120) -> Result:
    """Run ``vdtool ARGS`` in a fresh interpreter under injection."""
    count_path = os.path.join(workdir, ".crashsim-count")
    if os.path.exists(count_path):
        os.unlink(count_path)
    proc = subprocess.run(subprocess_cmd(args), env=subprocess_env(at=at, action=action, model=model,
                                                                   count_file=count_path),
                          capture_output=True, timeout=timeout, cwd=workdir)
    status = proc.returncode
    killed = status == -signal.SIGKILL
    count = 0
    if os.path.exists(count_path):
        with open(count_path) as f:
            count = int(f.read() or 0)
        os.unlink(count_path)
    return Result(status, killed, count, (proc.stdout + proc.stderr).decode(errors="replace"))


def kill_points(n: int, k: int | None) -> list:
    """``k`` points spread over 1..n (all of them when k is None or >= n),
    always including the first and the last."""
    if n <= 0:
        return []
    if k is None or k >= n:
        return list(range(1, n + 1))
    if k <= 1:
        return [n]
    pts = {1 + round(i * (n - 1) / (k - 1)) for i in range(k)}
    return sorted(pts)

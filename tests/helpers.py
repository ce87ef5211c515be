"""Small helpers the tests share.  One home per concern:

- running the vdtool command line: ``vdrun.py`` (``cli``, ``run_vdtool``,
  ``vdtool_env``);
- qemu-img, qemu-io and the libyal tools as judges: ``peers.py``
  (``qemu_io``, ``qemu_raw``, ``qemu_info`` ...);
- images and chains made through vdtool's own API: ``chainkit.py``;
- here: what an image reads through vdtool, bytes written into and read
  from files at an offset, test data and how two buffers differ, and a
  progress recorder for the ops."""

from __future__ import annotations

import random
import struct
import time

from vdtool.core.errors import OperationCancelled
from vdtool.core.progress import Progress
from vdtool.core.stack import open_image


# -- what an image reads through vdtool ------------------------------------------------------

def read_all(path, fmt=None, **options) -> bytes:
    """The whole virtual disk of ``path`` (and its chain) as vdtool reads
    it; ``options`` go to ``open_image`` (``parent_search=`` ...)."""
    with open_image(str(path), fmt, **options) as s:
        return s.read(0, s.virtual_size)


# -- bytes in files, at an offset --------------------------------------------------------------

def file_bytes(path) -> bytes:
    """The file's own bytes (not what the image reads)."""
    with open(path, "rb") as f:
        return f.read()


def write_at(path, offset: int, data) -> None:
    """Overwrite the file's bytes at ``offset`` with ``data``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def poke(path, offset: int, fmt: str, *values) -> None:
    """``struct.pack(fmt, *values)`` written at ``offset`` of the file."""
    write_at(path, offset, struct.pack(fmt, *values))


def peek(path, offset: int, fmt: str):
    """The first value of ``struct.unpack(fmt)`` at ``offset`` of the file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# -- test data and comparing it ----------------------------------------------------------------

def payload(kind: str, seed: int, n: int, data_share: float = 0.5) -> bytes:
    """``n`` bytes of a kind: "fill" (one non-zero byte repeated), "zeros",
    "random", or otherwise "mixed": 512-byte pieces that are random with
    probability ``data_share`` and zero otherwise, so zero detection inside
    a write and in the copy engine gets exercised."""
    rng = random.Random(seed)
    if kind == "fill":
        return bytes([rng.randrange(1, 256)]) * n
    if kind == "zeros":
        return bytes(n)
    if kind == "random":
        return rng.randbytes(n)
    out = bytearray(n)
    for i in range(0, n, 512):
        if rng.random() < data_share:
            k = min(512, n - i)
            out[i:i + k] = rng.randbytes(k)
    return bytes(out)


def first_difference(a, b) -> str:
    """Where ``a`` and ``b`` first differ, for an assertion message."""
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    a, b = bytes(a), bytes(b)
    lo, hi = 0, len(a)
    # binary search for the first differing byte without a Python loop over bytes
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            j = i
            while j < len(a) and j < i + 4096 and a[j] != b[j]:
                j += 1
            return f"first difference at offset {i} (got {a[i]:#04x}, want {b[i]:#04x}; {j - i}+ bytes differ)"
    return "equal"


def assert_same(got, want, what: str) -> None:
    if bytes(got) != bytes(want):
        raise AssertionError(f"{what}: {first_difference(got, want)}")


def timed(fn, *args, **kw):
    """(what ``fn(*args, **kw)`` returns, the seconds it took)."""
    t = time.perf_counter()
    r = fn(*args, **kw)
    return r, time.perf_counter() - t


# -- progress ---------------------------------------------------------------------------------

class Recorder:
    """A progress callback that records the percentages it is given.  It
    cancels the op (OperationCancelled, never at 100) once more than
    ``cancel_after`` reports came, or at the first report at or above
    ``cancel_at`` percent.  ``assert_good`` holds the record to what every
    op promises; ``max_working`` is the most a report before the last may
    say (99.9: Progress keeps 100 for ``finish``)."""

    def __init__(self, cancel_after=None, cancel_at=None, *, max_working: float = 99.9):
        self.values = []
        self.cancel_after = cancel_after
        self.cancel_at = cancel_at
        self.max_working = max_working

    def __call__(self, pct, done, total):
        self.values.append(pct)
        if pct < 100 and (self.cancel_after is not None and len(self.values) > self.cancel_after
                          or self.cancel_at is not None and pct >= self.cancel_at):
            raise OperationCancelled()

    def progress(self):
        return Progress(self)

    def assert_good(self, success=True):
        v = self.values
        assert all(0 <= x <= 100 for x in v), v
        assert all(a <= b for a, b in zip(v, v[1:])), f"progress went backwards: {v}"
        assert all(x <= self.max_working for x in v[:-1]), f"100 before the end: {v}"
        if success:
            assert v and v[-1] == 100 and v.count(100) == 1, v
        else:
            assert 100 not in v, v


def run_on_pty(argv, cwd=None, env=None, winsize=None, stdout=None) -> tuple:
    """Run ``argv`` with stderr (and stdout unless ``stdout`` is given) on a
    pseudo-terminal, optionally of ``winsize`` (rows, cols); returns (exit
    status, what it wrote to the terminal)."""
    import fcntl
    import os
    import pty
    import subprocess
    import termios

    master, slave = pty.openpty()
    if winsize is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", winsize[0], winsize[1], 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout if stdout is not None else slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")

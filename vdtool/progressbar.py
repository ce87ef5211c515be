"""A progress bar for long operations, and clean Ctrl-C.

``operation(label, quiet=..., force=...)`` is a context manager yielding a
``vdtool.core.progress.Progress`` for an op.  Its callback

- draws a bar on stderr (percentage, bytes done of the current phase, rate,
  ETA) when stderr is a terminal; with ``-p`` and no terminal (or a
  terminal without columns) prints qemu-img's ``(NN.NN/100%)`` lines;
  with ``--progress=json`` one JSON object a line; nothing with ``-q``;
- prints one line on SIGUSR1 whatever was chosen;
- stops the op at its next progress report after a first Ctrl-C by raising
  ``OperationCancelled`` (ops stop cleanly from there: no half-written
  output under the final name); a second Ctrl-C interrupts at once.

tqdm is imported only when a bar is actually drawn, and this module only by
commands that run long operations."""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager


def _tqdm_class():
    from tqdm import tqdm

    class _Tqdm(tqdm):
        """tqdm with one more bar_format field, {stats}: bytes of the current
        phase and their rate, computed only when the bar is drawn."""

        phase_done = 0
        phase_total = 0
        phase_start = 0.0

        @property
        def format_dict(self):
            d = super().format_dict
            d["stats"] = self._stats()
            return d

        def _stats(self) -> str:
            from vdtool.core.sizes import format_size

            done, total = self.phase_done, self.phase_total
            if total <= 0:
                return ""
            text = f"{format_size(done)}/{format_size(total)}"
            elapsed = time.monotonic() - self.phase_start
            if elapsed > 0.05 and done:
                text += f", {format_size(int(done / elapsed))}/s"
            return text

    return _Tqdm


class _Bar:
    """tqdm over percent (0..100), tqdm's ETA from the percentage's pace."""

    def __init__(self, label: str, stream):
        self._tqdm = _tqdm_class()(total=100, desc=label, file=stream, leave=True, dynamic_ncols=True,
                                   mininterval=0.2, miniters=0, smoothing=0.1,
                                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {stats} "
                                              "[{elapsed}<{remaining}]")
        self._tqdm.phase_start = time.monotonic()

    def update(self, percent: float, done: int, total: int) -> None:
        t = self._tqdm
        if total != t.phase_total or done < t.phase_done:
            t.phase_total = total
            t.phase_start = time.monotonic()
        t.phase_done = done
        delta = percent - t.n
        if delta > 0:
            t.update(delta)

    def report(self) -> None:
        """SIGUSR1: the bar is there already; draw it now."""
        try:
            self._tqdm.refresh()
        except Exception:
            pass

    def close(self, ok: bool) -> None:
        try:
            if ok and self._tqdm.n < 100:
                self._tqdm.update(100 - self._tqdm.n)
            self._tqdm.close()
        except Exception:  # a bar must never turn success into failure
            pass


class _QemuLines:
    """qemu-img -p's form, ``    (45.34/100%)`` rewritten in place with a
    carriage return, a newline at the end: what KubeVirt's importer and
    Proxmox parse from qemu-img, so their parsers read vdtool's too.  Used
    for -p when stderr is not a terminal, and when a terminal has no
    columns to draw a bar in."""

    def __init__(self, stream, silent: bool = False):
        self._stream = stream
        self._silent = silent  # only SIGUSR1 prints (-q, or no terminal and no -p)
        self._shown = 0.0
        if not silent:
            self._write(self.line(0.0) + "\r")  # qemu-img starts with (0.00/100%)

    def line(self, percent: float) -> str:
        return f"    ({percent:.2f}/100%)"

    def update(self, percent: float, done: int, total: int) -> None:
        if percent - self._shown >= 0.01:  # qemu-img prints at each 0.01 step
            self._shown = percent
            if not self._silent:
                self._write(self.line(percent) + "\r")

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except Exception:  # a report must never turn success into failure
            pass

    def report(self) -> None:
        """One line now (SIGUSR1)."""
        self._write(self.line(self._shown) + "\n")

    def close(self, ok: bool) -> None:
        if ok:
            self._shown = 100.0
        if not self._silent:
            self._write(self.line(self._shown) + "\r\n")  # as qemu-img ends


class _JsonLines:
    """``--progress=json``: one JSON object a line, at most ``per_second``
    a second plus the last: op, done and total (bytes of the current
    phase), percent (of the whole operation), rate (bytes/s in the phase),
    eta and elapsed (seconds)."""

    def __init__(self, op: str, stream, per_second: float = 4.0, silent: bool = False):
        self._op = op
        self._stream = stream
        self._silent = silent
        self._gap = 1.0 / per_second
        self._start = time.monotonic()
        self._phase = (0, time.monotonic())  # (total, started)
        self._state = (0.0, 0, 0)
        self._last = -1.0

    def update(self, percent: float, done: int, total: int) -> None:
        if total != self._phase[0] or done < self._state[1]:
            self._phase = (total, time.monotonic())
        self._state = (percent, done, total)
        now = time.monotonic()
        if now - self._last >= self._gap and not self._silent:
            self._last = now
            self._emit(now)

    def _emit(self, now: float, final: bool = False) -> None:
        import json

        percent, done, total = self._state
        elapsed = now - self._start
        in_phase = now - self._phase[1]
        rate = int(done / in_phase) if in_phase > 0.05 and done else 0
        eta = round(elapsed * (100.0 - percent) / percent, 1) if 0 < percent < 100 else (0.0 if percent >= 100 else None)
        doc = {"op": self._op, "done": done, "total": total, "percent": round(percent, 2), "rate": rate,
               "eta": eta, "elapsed": round(elapsed, 3)}
        if final:
            doc["final"] = True
        try:
            self._stream.write(json.dumps(doc) + "\n")
            self._stream.flush()
        except Exception:
            pass

    def report(self) -> None:
        self._emit(time.monotonic())

    def close(self, ok: bool) -> None:
        if ok:
            percent, done, total = self._state
            self._state = (100.0, max(done, total), total)
        if not self._silent:
            self._emit(time.monotonic(), final=True)


def _terminal_columns(stream) -> int:
    try:
        import os

        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _reporter(label: str, op: str, mode: str | None, stream, quiet: bool):
    """The reporter for ``mode``: "bar" (a tqdm bar; qemu-img's lines where
    the terminal has no columns), "qemu" or "json"; silent (reporting only
    on SIGUSR1) when ``quiet`` or no mode."""
    silent = quiet or mode is None
    if mode == "json":
        return _JsonLines(op, stream, silent=silent)
    if mode == "bar" and not silent and _terminal_columns(stream) > 0:
        return _Bar(label, stream)
    return _QemuLines(stream, silent=silent)


class _ReportOnUsr1:
    """SIGUSR1 prints one progress line on stderr (what ``dd`` does with
    SIGUSR1, and what Incus asked of qemu-img), with or without a bar."""

    def __init__(self, reporter):
        self._reporter = reporter
        self._previous = None

    def __enter__(self):
        sig = getattr(signal, "SIGUSR1", None)
        if sig is not None and threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(sig, lambda signum, frame: self._reporter.report())
            except (ValueError, OSError):
                self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            try:
                signal.signal(signal.SIGUSR1, self._previous)
            except (ValueError, OSError):
                pass
        return False


# Signals that stop an operation at its next safe point (a progress report:
# between writes the op ordered for crash safety).  The second of any of
# them stops at once (the previous handlers: KeyboardInterrupt for SIGINT,
# the CLI's Terminated for SIGTERM/SIGHUP).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _CancelOnSignal:
    """First SIGINT, SIGTERM or SIGHUP: ask the op to stop at its next
    progress report (``requested`` holds the signal number)."""

    def __init__(self):
        self.requested = 0
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self.requested = signum
        self._restore()
        from vdtool.core.progress import output_blocking

        if output_blocking():  # blocked on a pipe's reader: no progress report may ever come
            raise self.cancelled()
        try:
            again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            sys.stderr.write(f"\nvdtool: stopping at the next safe point ({again} again to stop at once)\n")
            sys.stderr.flush()
        except Exception:
            pass

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, OSError):
                pass
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                try:
                    previous = signal.getsignal(signum)
                    if previous == signal.SIG_IGN:
                        continue  # ignored by whoever started vdtool (nohup): stays ignored
                    if previous is None:
                        previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                    signal.signal(signum, self._handler)
                    self._previous[signum] = previous
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def cancelled(self):
        """The error that stops the op for the signal that came."""
        from vdtool.core.errors import OperationCancelled

        if self.requested == signal.SIGINT:
            return OperationCancelled("interrupted")
        err = OperationCancelled(f"terminated by {signal.Signals(self.requested).name}")
        err.exit_code = 128 + self.requested
        return err


def _stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def operation(label: str, *, quiet: bool = False, force: bool = False, mode: str | None = None,
              op: str | None = None):
    """The Progress context of one long operation.  ``mode``: "json" (JSON
    lines), "qemu" (qemu-img's ``(NN.NN/100%)`` lines) or "bar"; None: a bar
    when stderr is a terminal, or with ``force`` (-p) qemu-img's lines when
    it is not.  ``quiet`` (-q) reports nothing, but SIGUSR1 still prints a
    line.  ``op`` names the operation in JSON lines (default: ``label``)."""
    from vdtool.core.progress import Progress

    if mode is None and (force or _stderr_isatty()):
        mode = "bar" if _stderr_isatty() else "qemu"
    reporter = _reporter(label, op or label.lower(), mode, sys.stderr, quiet)
    cancel = _CancelOnSignal()

    def callback(percent: float, done: int, total: int) -> None:
        if cancel.requested and percent < 100:
            raise cancel.cancelled()
        reporter.update(percent, done, total)

    ok = False
    try:
        with cancel, _ReportOnUsr1(reporter):
            yield Progress(callback)
        ok = True
    finally:
        reporter.close(ok)

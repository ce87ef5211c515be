"""A progress bar for long operations, and clean Ctrl-C.

``operation(label, quiet=..., force=...)`` is a context manager yielding a
``vdtool.core.progress.Progress`` for an op.  Its callback

- draws a bar on stderr (percentage, bytes done of the current phase, rate,
  ETA) when stderr is a terminal or ``force`` (``-p``) is given, never when
  ``quiet`` (``-q``);
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

    def close(self, ok: bool) -> None:
        try:
            if ok and self._tqdm.n < 100:
                self._tqdm.update(100 - self._tqdm.n)
            self._tqdm.close()
        except Exception:  # a bar must never turn success into failure
            pass


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
def operation(label: str, *, quiet: bool = False, force: bool = False):
    from vdtool.core.progress import Progress

    show = not quiet and (force or _stderr_isatty())
    bar = _Bar(label, sys.stderr) if show else None
    cancel = _CancelOnSignal()

    def callback(percent: float, done: int, total: int) -> None:
        if cancel.requested and percent < 100:
            raise cancel.cancelled()
        if bar is not None:
            bar.update(percent, done, total)

    ok = False
    try:
        with cancel:
            yield Progress(callback)
        ok = True
    finally:
        if bar is not None:
            bar.close(ok)

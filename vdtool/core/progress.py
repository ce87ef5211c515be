"""Progress reporting for long operations.

Ops take a ``Progress`` and hand each phase a sub-range of it (VirtualBox's
percent-start/percent-span).  The callback gets ``(percent, done, total)`` where
``done``/``total`` are bytes of the current phase; it may raise
``OperationCancelled`` to stop the op.  Percent never goes backwards and stays
below 100 until ``finish()``."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[float, int, int], None]


class Progress:
    def __init__(self, callback: ProgressCallback | None = None, start: float = 0.0, span: float = 100.0,
                 _root: "Progress | None" = None):
        self.callback = callback
        self.start = start
        self.span = span
        self._root = _root or self
        if _root is None:
            self._last = 0.0

    def sub(self, start: float, span: float) -> "Progress":
        """A phase covering ``start``..``start+span`` percent of this range."""
        return Progress(self.callback, self.start + self.span * start / 100.0, self.span * span / 100.0, self._root)

    def update(self, done: int, total: int) -> None:
        if self.callback is None:
            return
        frac = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
        pct = min(self.start + self.span * frac, 99.9)
        root = self._root
        if pct < root._last:
            pct = root._last
        root._last = pct
        self.callback(pct, done, total)

    def finish(self, total: int = 0) -> None:
        if self.callback is None:
            return
        self._root._last = 100.0
        self.callback(100.0, total, total)


NO_PROGRESS = Progress(None)


# A write into a pipe blocks for as long as its reader pleases (a stalled
# upload, a reader that stopped reading): a stop signal that came then
# would wait for a progress report that never comes.  Writes that can block
# like that run inside blocking_output(), and the CLI's signal handler stops
# the op at once while one does (vdtool.progressbar).
_blocking_output = 0


class blocking_output:
    """Context: the write inside may block on its reader."""

    def __enter__(self):
        global _blocking_output
        _blocking_output += 1
        return self

    def __exit__(self, *exc):
        global _blocking_output
        _blocking_output -= 1
        return False


def output_blocking() -> bool:
    return _blocking_output > 0

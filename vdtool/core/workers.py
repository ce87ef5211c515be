"""A shared thread pool for work that lets go of the GIL (inflating the
compressed clusters of one read): ``parallel_map`` runs a function over a
few items on every core and returns the results in order."""

from __future__ import annotations

import os
import threading

# what a caller should hand parallel_map at once, in bytes of results (the
# inflated clusters of one read): memory stays bounded for any read size
BATCH_BYTES = 8 << 20

_pool = None
_lock = threading.Lock()


def _get_pool():
    global _pool
    with _lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor  # only when used: start-up time

            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vdtool-inflate")
        return _pool


def parallel_map(fn, items: list) -> list:
    """[fn(x) for x in items], spread over the pool's threads when there is
    more than one item and more than one core; the first exception that
    ``fn`` raises (in item order) is raised here."""
    cores = os.cpu_count() or 1
    if len(items) < 2 or cores < 2:
        return [fn(x) for x in items]
    # a few slices, not a task per item: a hand-off costs about what
    # inflating a small cluster does
    step = -(-len(items) // (2 * cores))
    pool = _get_pool()
    futures = [pool.submit(_run_slice, fn, items[i:i + step]) for i in range(0, len(items), step)]
    try:
        return [r for f in futures for r in f.result()]
    finally:
        for f in futures:
            f.cancel()


def _run_slice(fn, items: list) -> list:
    return [fn(x) for x in items]

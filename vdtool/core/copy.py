"""The copy engine: moves a disk's content from one stack into another image.

It walks extents from block_status (never byte by byte), reads DATA runs into
one reused buffer, tests each destination block for zeros with a C-level
compare (bytearray.startswith against a zero block: memcmp, no copy), and
writes runs of non-zero blocks with one call.  Compression, where the
destination offers it, runs in a thread pool (zlib releases the GIL) and is
written in order."""

from __future__ import annotations

import os
from typing import Optional

from vdtool.core.backend import Cap, Status
from vdtool.core.digest import ContentDigest
from vdtool.core.progress import NO_PROGRESS, Progress

CHUNK = 4 << 20


def _chunk_size(block: int) -> int:
    return max(CHUNK // block, 1) * block


class CopyStats:
    def __init__(self):
        self.data_bytes = 0
        self.zero_bytes = 0
        self.written_bytes = 0


def copy_stack(src, dst, *, base=None, compress: bool = False, write_zeros: bool = False,
               digest: Optional[ContentDigest] = None, progress: Progress = NO_PROGRESS) -> CopyStats:
    """Copy what ``src`` (an ImageStack) shows into ``dst`` (an ImageStack whose
    top is the new image).  With ``base`` (a stack: the new image's parent)
    only what differs from it is written.  ``write_zeros`` writes zero blocks
    too (preallocated outputs)."""
    size = src.virtual_size
    top = dst.top
    block = max(top.block_size, 512)
    chunk = _chunk_size(block)
    zero_view = memoryview(bytes(chunk))  # zeros to compare with, sliced without copying
    buf = bytearray(chunk)
    base_buf = bytearray(chunk) if base is not None else None
    stats = CopyStats()
    compressor = None
    pool = None
    if compress:
        if not top.capabilities & Cap.COMPRESS:
            from vdtool.core.errors import NotSupported

            raise NotSupported("compression", top.name, top.path)
        compressor = top.compress_block  # declared in ImageBackend
        from concurrent.futures import ThreadPoolExecutor  # only for -c: costs start-up time

        workers = os.cpu_count() or 2
        pool = ThreadPoolExecutor(max_workers=workers)
        # One task per chunk (its data blocks compressed in a loop): a
        # future per 64 KiB block cost more in hand-offs than it saved.
        window = 2 * workers + 1  # chunks in flight: every worker busy, memory bounded
    from collections import deque

    pending: deque = deque()  # (offset, chunk copy, [(i, k)...], future), written in disk order

    def write_oldest():
        off, raw, items, fut = pending.popleft()
        view = memoryview(raw)
        for (i, k), packed in zip(items, fut.result()):
            top.write_compressed_block(off + i, packed, view[i:i + k])

    def flush_pending():
        while pending:
            write_oldest()

    def emit(buf: bytearray, off: int, n: int, has_base: bool) -> None:
        """Write the blocks of buf[:n] (disk offset ``off``) that need writing:
        non-zero ones, or with a base the ones that differ from it."""
        if has_base:
            emit_over_base(buf, off, n)
            return
        view = memoryview(buf)
        runs = ((0, n),) if write_zeros else _data_runs(buf, n, block, zero_view)
        if compressor is None:
            for a, b in runs:
                top.write(off + a, view[a:b])
                stats.written_bytes += b - a
            return
        batch = [(i, min(block, b - i)) for a, b in runs for i in range(a, b, block)]
        if batch:
            stats.written_bytes += sum(k for _, k in batch)
            raw = bytes(view[:n])  # the buffer goes back to the reader
            pending.append((off, raw, batch, pool.submit(_compress_batch, compressor, raw, batch)))
            while len(pending) >= window:
                write_oldest()

    def emit_over_base(buf: bytearray, off: int, n: int) -> None:
        """Block by block: skip what equals the base, record zeros where the
        base has data, write (or compress) the rest."""
        run_start = None
        batch = []  # (i, k) of the blocks to compress
        for i in range(0, n, block):
            k = min(block, n - i)
            if buf.startswith(base_buf[i:i + k], i):
                action = "skip"
            else:
                action = "zero" if buf.startswith(zero_view[:k], i) else "data"
            if action == "data" and compressor is None:
                if run_start is None:
                    run_start = i
                continue
            if run_start is not None:
                top.write(off + run_start, memoryview(buf)[run_start:i])
                stats.written_bytes += i - run_start
                run_start = None
            if action == "zero":
                top.write_zeroes(off + i, k, unmap=True)
            elif action == "data":
                batch.append((i, k))
                stats.written_bytes += k
        if batch:
            raw = bytes(memoryview(buf)[:n])
            pending.append((off, raw, batch, pool.submit(_compress_batch, compressor, raw, batch)))
            while len(pending) >= window:
                write_oldest()
        if run_start is not None:
            top.write(off + run_start, memoryview(buf)[run_start:n])
            stats.written_bytes += n - run_start

    def consume(pos: int, n: int, data) -> None:
        if data is not None:
            if digest is not None:
                digest.update(memoryview(data)[:n])
            if base is not None:
                _read_clipped(base, pos, memoryview(base_buf)[:n])
            emit(data, pos, n, base is not None)
            stats.data_bytes += n
        else:
            if digest is not None:
                digest.update_zeros(n)
            stats.zero_bytes += n
            if base is not None:
                _zero_over_base(base, top, pos, n, base_buf)
            elif write_zeros:
                top.write_zeroes(pos, n, unmap=False)
        progress.update(pos + n, size)

    try:
        if base is None and size > chunk:
            # Reads go ahead in a second thread while this one tests and
            # writes (preadv and pwrite let go of the GIL, so on two cores
            # the copy takes the longer of the two, not their sum).  With a
            # base the writer reads the base too, so that stays serial.
            _pipelined(src, size, block, chunk, buf, consume)
        else:
            for pos, n, is_data in _extents(src, size, block, chunk):
                if is_data:
                    src.readinto(pos, memoryview(buf)[:n])
                consume(pos, n, buf if is_data else None)
        if pool is not None:
            flush_pending()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return stats


def _data_runs(buf: bytearray, n: int, block: int, zeros: memoryview) -> list:
    """[start, end) runs of buf[:n] made of blocks that are not all zeros.

    Without a Python step per block: the first byte of every block, taken
    with one strided slice, rules out most blocks at once (a block whose
    first byte is not zero is data); only the others are compared whole,
    and a zero run, once found, is measured by galloping compares."""
    firsts = buf[0:n:block]
    nblocks = len(firsts)

    def zero_blocks(c: int, t: int) -> bool:  # are blocks c .. c+t-1 all zeros?
        start = c * block
        return buf.startswith(zeros[:min(t * block, n - start)], start)

    runs = []
    i = 0  # start of the current data run
    j = 0  # block index to look from for the next zero block
    while j < nblocks:
        c = firsts.find(0, j)
        if c < 0:
            break
        if not zero_blocks(c, 1):
            j = c + 1
            continue
        most = nblocks - c
        good, t = 1, 2
        while t <= most and zero_blocks(c, t):
            good, t = t, 2 * t
        bad = min(t, most + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            if zero_blocks(c, mid):
                good = mid
            else:
                bad = mid
        if c * block > i:
            runs.append((i, c * block))
        j = c + good
        i = min(j * block, n)
    if i < n:
        runs.append((i, n))
    return runs


def _compress_batch(compressor, raw: bytes, items: list) -> list:
    view = memoryview(raw)
    return [compressor(view[i:i + k]) for i, k in items]


def _extents(src, size: int, block: int, chunk: int):
    """(offset, length, is_data) runs of ``src`` to copy, in order.  Zero and
    unallocated runs are taken whole (an empty 4 TiB disk is a handful of
    calls); data runs are cut at chunk boundaries, so each fits the buffer
    and stays aligned to the destination's blocks."""
    pos = 0
    while pos < size:
        limit = min(chunk - (pos % chunk), size - pos)
        status, n, _ = src.block_status(pos, size - pos)
        if status == Status.DATA:
            n = min(n, limit)
        elif pos + n < size and (pos + n) % block:
            # A zero run that ends inside a destination block (a raw source
            # reports 4 KiB holes, the output may have 64 KiB clusters) must
            # not leave ``pos`` unaligned: emit() judges and compresses whole
            # blocks from ``pos``, and a compressed cluster written at an
            # unaligned offset is wrong.  Skip only whole blocks of zeros;
            # the partial block is read as data.
            aligned = (pos + n) // block * block - pos
            if aligned > 0:
                n = aligned
            else:
                status = Status.DATA
        if status == Status.DATA:
            if n < limit and (pos + n) % block:
                # round the run up to a whole block so a block is judged once
                n = min(limit, (pos + n + block - 1) // block * block - pos)
            yield pos, n, True
        else:
            yield pos, n, False
        pos += n


_BUFFERS = 3  # one being read, one being written, one ready


def _pipelined(src, size: int, block: int, chunk: int, first: bytearray, consume) -> None:
    """Run _extents and the reads in a reader thread, ``consume`` here, with
    a few buffers passed back and forth (memory stays bounded)."""
    import queue
    import threading

    free: queue.Queue = queue.Queue()
    free.put(first)
    for _ in range(_BUFFERS - 1):
        free.put(bytearray(chunk))
    ready: queue.Queue = queue.Queue(maxsize=256)  # zero runs queue up cheaply, but not without end
    stop = threading.Event()
    done = object()

    def reader():
        try:
            for pos, n, is_data in _extents(src, size, block, chunk):
                buf = None
                if is_data:
                    buf = free.get()
                    if stop.is_set():
                        return
                    src.readinto(pos, memoryview(buf)[:n])
                ready.put((pos, n, buf))
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as e:  # handed to the writer, which raises it
            ready.put(e)

    thread = threading.Thread(target=reader, name="vdtool-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            pos, n, buf = item
            consume(pos, n, buf)
            if buf is not None:
                free.put(buf)
    finally:
        stop.set()
        free.put(bytearray(0))  # wakes a reader waiting for a buffer
        while thread.is_alive():  # or one waiting to hand over an item
            try:
                while True:
                    ready.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.01)


def _read_clipped(stack, offset: int, view: memoryview) -> None:
    """Read ``stack`` into ``view``; past its end reads as zeros."""
    size = stack.virtual_size
    n = len(view)
    inside = max(0, min(n, size - offset))
    if inside:
        stack.readinto(offset, view[:inside])
    if inside < n:
        view[inside:] = bytes(n - inside)


def _zero_over_base(base, top, pos: int, n: int, scratch: bytearray) -> None:
    """The source reads zeros here: where the new image's parent does not,
    record zeros in the new image."""
    end = pos + n
    size = base.virtual_size
    while pos < end:
        if pos >= size:
            return
        status, m, _ = base.block_status(pos, min(end, size) - pos)
        if status == Status.DATA:
            view = memoryview(scratch)[:min(m, len(scratch))]
            m = len(view)
            base.readinto(pos, view)
            if not scratch.startswith(bytes(m)):
                top.write_zeroes(pos, m, unmap=True)
        pos += m

"""The copy engine: moves a disk's content from one stack into another image.

It walks extents from block_status (never byte by byte), reads DATA runs into
one reused buffer, tests each destination block for zeros with a C-level
compare (bytearray.startswith against a zero block: memcmp, no copy), and
writes runs of non-zero blocks with one call.  Compression, where the
destination offers it, runs in a thread pool (ISA-L, zlib and zstd release
the GIL: vdtool.core.deflate) and is written in order."""

from __future__ import annotations

import os

from vdtool.core.backend import Cap, Status
from vdtool.core.bytesutil import data_runs  # noqa: F401 -- also named here (the engine's zero test)
from vdtool.core.digest import ContentDigest
from vdtool.core.errors import NotSupported
from vdtool.core.progress import NO_PROGRESS, Progress

# An uncompressed copy moves 1 MiB at a time, so a piece is read, tested for
# zeros and written while it is still in the processor's cache: with 4 MiB
# pieces every one of those passes went to memory, and the same convert took
# 60-90% more system time.  A compressing copy hands bigger pieces to its
# worker threads (fewer hand-offs; the compressor, not the copies, bounds it).
CHUNK = 1 << 20
COMPRESS_CHUNK = 4 << 20


def _chunk_size(block: int, chunk: int = CHUNK) -> int:
    return max(chunk // block, 1) * block


class CopyStats:
    def __init__(self):
        self.data_bytes = 0
        self.zero_bytes = 0
        self.written_bytes = 0


def copy_stack(src, dst, *, base=None, compress: bool = False, write_zeros: bool = False,
               mark_zeros: bool = False, digest: ContentDigest | None = None,
               progress: Progress = NO_PROGRESS) -> CopyStats:
    """Copy what ``src`` (an ImageStack) shows into ``dst`` (an ImageStack whose
    top is the new image).  With ``base`` (a stack: the new image's parent)
    only what differs from it is written.  ``write_zeros`` writes zero blocks
    as data too (preallocated outputs); ``mark_zeros`` hands every range that
    reads as zeros to the destination's ``write_zeroes`` (a target that is
    not known to read as zeros: ``convert -n``, a device)."""
    top = dst.top
    if compress and not top.capabilities & Cap.COMPRESS:
        raise NotSupported("compression", top.name, top.path)
    copier = _Copier(src, top, base, write_zeros, digest, progress, compress)
    copier.mark_zeros = mark_zeros
    writer = _CompressedWriter(top) if compress else None
    copier.compressed = writer
    try:
        copier.run()
        if writer is not None:
            writer.drain()
    finally:
        if writer is not None:
            writer.close()
    return copier.stats


class _CompressedWriter:
    """Compresses blocks in a thread pool and writes them in disk order.

    One task per chunk (its data blocks compressed in a loop): a future per
    64 KiB block cost more in hand-offs than it saved.  At most
    ``2 * workers + 1`` chunks are in flight: every worker busy, memory
    bounded."""

    def __init__(self, top):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor  # only for -c: costs start-up time

        workers = os.cpu_count() or 2
        self.top = top
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.window = 2 * workers + 1
        self.pending: deque = deque()  # (offset, chunk copy, [(i, k)...], future)

    def submit(self, off: int, raw: bytes, batch: list) -> None:
        """Compress blocks ``batch`` [(start, length)...] of ``raw``, a copy of
        the chunk at disk offset ``off``."""
        fut = self.pool.submit(_compress_batch, self.top.compress_block, raw, batch)
        self.pending.append((off, raw, batch, fut))
        while len(self.pending) >= self.window:
            self._write_oldest()

    def _write_oldest(self) -> None:
        off, raw, items, fut = self.pending.popleft()
        view = memoryview(raw)
        for (i, k), packed in zip(items, fut.result()):
            self.top.write_compressed_block(off + i, packed, view[i:i + k])

    def drain(self) -> None:
        while self.pending:
            self._write_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Copier:
    """One copy: walks ``src``'s extents chunk by chunk and hands each to
    ``consume``, which hashes it, tests it and writes what must be written."""

    def __init__(self, src, top, base, write_zeros: bool, digest, progress: Progress, compress: bool = False):
        self.src, self.top, self.base = src, top, base
        self.size = src.virtual_size
        self.block = max(top.block_size, 512)
        chunk = COMPRESS_CHUNK if compress else CHUNK
        grain = getattr(top, "sparse_grain", 0)
        if grain and not compress and grain < self.block:
            # zeros are tested and skipped in grains: the block's unwritten
            # rest reads as zeros (a 2 MiB VHD block half full of data was
            # written whole, zeros and all)
            self.block = grain
        self.chunk = _chunk_size(self.block, chunk)
        self.zero_view = memoryview(bytes(self.chunk))  # zeros to compare with, sliced without copying
        self.buf = bytearray(self.chunk)
        self.base_buf = bytearray(self.chunk) if base is not None else None
        self.write_zeros = write_zeros
        self.digest = digest
        self.progress = progress
        self.stats = CopyStats()
        self.compressed: _CompressedWriter | None = None
        self.mark_zeros = False

    def run(self) -> None:
        if self.base is None and self.size > self.chunk:
            # Reads go ahead in a second thread while this one writes
            # (preadv and pwrite let go of the GIL, so on two cores the copy
            # takes the longer of the two, not their sum).  The reader also
            # finds the zero blocks, while the piece is in its core's cache,
            # which evens out the two threads' work.  With a base the writer
            # reads the base too, so that stays serial.
            test = None if self.write_zeros else self._zero_test
            _pipelined(self.src, self.size, self.block, self.chunk, self.buf, self.consume, test)
            return
        for pos, n, is_data in _extents(self.src, self.size, self.block, self.chunk):
            if is_data:
                self.src.readinto(pos, memoryview(self.buf)[:n])
            self.consume(pos, n, self.buf if is_data else None)

    def _zero_test(self, buf, n: int) -> list:
        return data_runs(buf, n, self.block, self.zero_view)

    def consume(self, pos: int, n: int, data, runs=None) -> None:
        """The ``n`` bytes at ``pos``: ``data`` (a buffer) or None for a run
        that reads as zeros."""
        if data is not None:
            if self.digest is not None:
                self.digest.update(memoryview(data)[:n])
            if self.base is not None:
                _read_clipped(self.base, pos, memoryview(self.base_buf)[:n])
                self._emit_over_base(data, pos, n)
            else:
                self._emit(data, pos, n, runs)
            self.stats.data_bytes += n
        else:
            if self.digest is not None:
                self.digest.update_zeros(n)
            self.stats.zero_bytes += n
            if self.base is not None:
                _zero_over_base(self.base, self.top, pos, n, self.base_buf)
            elif self.write_zeros or self.mark_zeros:
                self.top.write_zeroes(pos, n, unmap=False)
        self.progress.update(pos + n, self.size)

    def _emit(self, buf: bytearray, off: int, n: int, runs=None) -> None:
        """Write the blocks of buf[:n] (disk offset ``off``) that are not
        all zeros (all of them for a preallocated output)."""
        view = memoryview(buf)
        if runs is None:
            runs = ((0, n),) if self.write_zeros else data_runs(buf, n, self.block, self.zero_view)
        if self.compressed is None:
            done = 0
            for a, b in runs:
                if self.mark_zeros and a > done:
                    self.top.write_zeroes(off + done, a - done, unmap=False)
                self.top.write(off + a, view[a:b])
                self.stats.written_bytes += b - a
                done = b
            if self.mark_zeros and done < n:
                self.top.write_zeroes(off + done, n - done, unmap=False)
            return
        block = self.block
        batch = [(i, min(block, b - i)) for a, b in runs for i in range(a, b, block)]
        if batch:
            self.stats.written_bytes += sum(k for _, k in batch)
            self.compressed.submit(off, bytes(view[:n]), batch)  # a copy: the buffer goes back to the reader

    def _emit_over_base(self, buf: bytearray, off: int, n: int) -> None:
        """Block by block: skip what equals the base, record zeros where the
        base has data, write (or compress) the rest."""
        top, block, base_buf = self.top, self.block, self.base_buf
        run_start = None
        batch = []  # (i, k) of the blocks to compress
        for i in range(0, n, block):
            k = min(block, n - i)
            if buf.startswith(base_buf[i:i + k], i):
                action = "skip"
            else:
                action = "zero" if buf.startswith(self.zero_view[:k], i) else "data"
            if action == "data" and self.compressed is None:
                if run_start is None:
                    run_start = i
                continue
            if run_start is not None:
                self._write_run(buf, off, run_start, i)
                run_start = None
            if action == "zero":
                top.write_zeroes(off + i, k, unmap=True)
            elif action == "data":
                batch.append((i, k))
                self.stats.written_bytes += k
        if batch:
            self.compressed.submit(off, bytes(memoryview(buf)[:n]), batch)
        if run_start is not None:
            self._write_run(buf, off, run_start, n)

    def _write_run(self, buf: bytearray, off: int, a: int, b: int) -> None:
        self.top.write(off + a, memoryview(buf)[a:b])
        self.stats.written_bytes += b - a


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


def _pipelined(src, size: int, block: int, chunk: int, first: bytearray, consume, test=None) -> None:
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
                buf = runs = None
                if is_data:
                    buf = free.get()
                    if stop.is_set():
                        return
                    src.readinto(pos, memoryview(buf)[:n])
                    if test is not None:
                        runs = test(buf, n)
                ready.put((pos, n, buf, runs))
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
            pos, n, buf, runs = item
            consume(pos, n, buf, runs)
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

"""Content digests of a virtual disk: ``vdtool checksum`` and ``convert
--verify``.  The same content gives the same digest in any format, variant
and chain; one changed byte, or another length, gives another.

The construction (after Nir Soffer's blkhash, with contiguous groups where
blkhash interleaves streams), H being the chosen algorithm (xxh3-128 or
sha256; ``digest()`` bytes, xxh3-128's in its canonical big-endian form):

1. The disk (L bytes) is cut into blocks of 64 KiB (65536 bytes); the last
   block, when shorter, is padded with zero bytes to 64 KiB.
2. Each block's digest is H(block).  A block of zeros always gives the same
   digest, so blocks the image records as zero or unallocated (through the
   whole chain) are not read at all, and data blocks that read as zeros are
   not hashed.
3. The block digests, in disk order, are taken in groups of 65536 (4 GiB of
   disk; the last group may hold fewer); each group's digest is H(the
   concatenated block digests of the group).  A group of zero blocks
   always gives the same digest, so an empty 2 EiB disk costs seconds.
4. The checksum is H(the concatenated group digests, then L as 8 bytes
   little-endian), in lower-case hex.

Block digests are computed in a thread pool (hashlib's sha256 and xxhash
release the GIL on large inputs) while the main thread reads ahead."""

from __future__ import annotations

import os

from vdtool.core.backend import Status
from vdtool.core.errors import UsageError
from vdtool.core.progress import NO_PROGRESS, Progress

BLOCK = 64 << 10
GROUP_BLOCKS = 1 << 16
CHUNK = 4 << 20  # what one task hashes: 64 blocks
ALGORITHMS = ("xxh3-128", "sha256")
DEFAULT_ALGORITHM = "xxh3-128"
_ZERO_BLOCK = bytes(BLOCK)
_PIECE = 1 << 16  # zero digests fed to a hash at once (at most 2 MiB)


def hash_factory(algorithm: str):
    """The constructor of ``algorithm``'s hash objects (``new(data=b"")``)."""
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128
    raise UsageError(f"unknown checksum algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")


class BlockHasher:
    """Digests of whole blocks; holds no state, so threads may share it."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM):
        self.algorithm = algorithm
        self.new = hash_factory(algorithm)
        self.zero = self.new(_ZERO_BLOCK).digest()

    def digests(self, data) -> bytes:
        """The concatenated digests of the blocks of ``data`` (a buffer; a
        short last block is padded with zeros)."""
        view = memoryview(data).cast("B")
        n = len(view)
        new, zero, zero_block = self.new, self.zero, _ZERO_BLOCK
        out = []
        for i in range(0, n, BLOCK):
            block = view[i:i + BLOCK]
            if len(block) < BLOCK:
                block = bytes(block) + bytes(BLOCK - len(block))
            # a memcmp without a copy, tried only when the first byte is 0
            if block[0] == 0 and zero_block.startswith(block):
                out.append(zero)
            else:
                out.append(new(block).digest())
        return b"".join(out)


class ContentDigest:
    """The digest of a disk fed in order: ``update(data)`` for bytes as they
    are (any length), ``update_zeros(n)`` for a run of n zero bytes (not
    hashed: whole zero blocks take the precomputed digest), ``hexdigest()``
    at the end."""

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM, *, group_blocks: int = GROUP_BLOCKS):
        self.hasher = BlockHasher(algorithm)
        self.algorithm = algorithm
        self._new = self.hasher.new
        self._group_blocks = group_blocks
        self._outer = self._new()
        self._group = None  # the hash of the group being filled
        self._in_group = 0  # block digests in it
        self._zero_group: bytes | None = None
        self._tail = bytearray()  # the start of a block not complete yet
        self._length = 0
        self._final: str | None = None

    # -- bytes ---------------------------------------------------------------
    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self._length += len(view)
        if self._tail:
            take = min(BLOCK - len(self._tail), len(view))
            self._tail += view[:take]
            view = view[take:]
            if len(self._tail) < BLOCK:
                return
            self._feed(self.hasher.digests(self._tail))
            self._tail.clear()
        whole = len(view) // BLOCK * BLOCK
        if whole:
            self._feed(self.hasher.digests(view[:whole]))
        if whole < len(view):
            self._tail += view[whole:]

    def update_zeros(self, n: int) -> None:
        if n <= 0:
            return
        self._length += n
        if self._tail:
            take = min(BLOCK - len(self._tail), n)
            self._tail += bytes(take)
            n -= take
            if len(self._tail) < BLOCK:
                return
            self._feed(self.hasher.digests(self._tail))
            self._tail.clear()
        self._feed_zero_blocks(n // BLOCK)
        rest = n % BLOCK
        if rest:
            self._tail += bytes(rest)

    # -- block digests (for the parallel walker) -------------------------------
    def add_digests(self, digests: bytes, nbytes: int) -> None:
        """Block digests computed elsewhere (``BlockHasher.digests``) for
        ``nbytes`` bytes of disk; only at a block boundary."""
        assert not self._tail, "block digests fed in the middle of a block"
        self._length += nbytes
        self._feed(digests)

    def add_zero_run(self, nbytes: int) -> None:
        """``nbytes`` zero bytes from a block boundary (the last block of the
        disk may be short)."""
        assert not self._tail, "zero run fed in the middle of a block"
        self._length += nbytes
        self._feed_zero_blocks(-(-nbytes // BLOCK))

    def hexdigest(self) -> str:
        if self._final is None:
            if self._tail:
                self._feed(self.hasher.digests(self._tail))
                self._tail.clear()
            if self._group is not None:
                self._outer.update(self._group.digest())
                self._group = None
            self._outer.update(self._length.to_bytes(8, "little"))
            self._final = self._outer.hexdigest()
        return self._final

    # -- groups ---------------------------------------------------------------
    def _feed(self, digests: bytes) -> None:
        size = len(self.hasher.zero)
        view = memoryview(digests)
        while len(view):
            if self._group is None:
                self._group = self._new()
            take = min(self._group_blocks - self._in_group, len(view) // size)
            self._group.update(view[:take * size])
            view = view[take * size:]
            self._in_group += take
            if self._in_group == self._group_blocks:
                self._close_group()

    def _close_group(self) -> None:
        self._outer.update(self._group.digest())
        self._group = None
        self._in_group = 0

    def _feed_zero_blocks(self, k: int) -> None:
        zero = self.hasher.zero
        if self._in_group and k:
            take = min(self._group_blocks - self._in_group, k)
            self._repeat(self._group, zero, take)
            self._in_group += take
            k -= take
            if self._in_group == self._group_blocks:
                self._close_group()
        whole, rest = divmod(k, self._group_blocks)
        if whole:
            if self._zero_group is None:
                g = self._new()
                self._repeat(g, zero, self._group_blocks)
                self._zero_group = g.digest()
            self._repeat(self._outer, self._zero_group, whole)
        if rest:
            self._group = self._new()
            self._repeat(self._group, zero, rest)
            self._in_group = rest

    @staticmethod
    def _repeat(h, digest: bytes, count: int) -> None:
        piece = digest * min(count, _PIECE)
        while count >= _PIECE:
            h.update(piece)
            count -= _PIECE
        if count:
            h.update(piece[:count * len(digest)])


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _runs(stack, size: int):
    """(offset, length, is_data) from a block boundary: a zero run holds
    whole blocks that read as zeros through the whole chain (or reaches the
    disk's end); a data run (at most one CHUNK) is read and hashed."""
    pos = 0
    while pos < size:
        status, n, _ = stack.block_status(pos, size - pos)
        if status != Status.DATA:
            if pos + n >= size:
                yield pos, size - pos, False
                return
            whole = n // BLOCK * BLOCK
            if whole:
                yield pos, whole, False
                pos += whole
                continue
        # data, or zeros ending inside this block: read from here on
        m = min(max(n, 1), CHUNK, size - pos)
        m = min(-(-(pos + m) // BLOCK) * BLOCK, pos + CHUNK, size) - pos
        yield pos, m, True
        pos += m


def digest_stack(stack, progress: Progress = NO_PROGRESS, size=None, *, algorithm: str = DEFAULT_ALGORITHM,
                 workers: int | None = None) -> str:
    """The checksum of what ``stack`` shows (or of its first ``size``
    bytes).  Reads run here, block digests in ``workers`` threads."""
    d = ContentDigest(algorithm)
    size = stack.virtual_size if size is None else min(size, stack.virtual_size)
    workers = default_workers() if workers is None else workers
    if workers <= 1 or size <= CHUNK:
        buf = bytearray(CHUNK)
        for pos, n, is_data in _runs(stack, size):
            if is_data:
                view = memoryview(buf)[:n]
                stack.readinto(pos, view)
                d.add_digests(d.hasher.digests(view), n)
            else:
                d.add_zero_run(n)
            progress.update(pos + n, size)
        return d.hexdigest()
    return _digest_parallel(stack, size, d, workers, progress)


def _digest_parallel(stack, size: int, d: ContentDigest, workers: int, progress: Progress) -> str:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    window = 2 * workers + 1  # chunks in flight: every worker busy, memory bounded
    free = [bytearray(CHUNK) for _ in range(window)]
    pending: deque = deque()  # (pos, n, future or None, buffer or None)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vdtool-hash")

    def settle(block: bool) -> None:
        while pending:
            pos, n, fut, buf = pending[0]
            if fut is not None:
                if not block and not fut.done():
                    return
                d.add_digests(fut.result(), n)
                free.append(buf)
            else:
                d.add_zero_run(n)
            pending.popleft()
            progress.update(pos + n, size)

    try:
        for pos, n, is_data in _runs(stack, size):
            if not is_data:
                pending.append((pos, n, None, None))
                settle(False)
                continue
            while not free:  # every buffer is in flight: wait for the oldest
                head = pending[0][2]
                if head is not None:
                    head.result()
                settle(False)
            buf = free.pop()
            view = memoryview(buf)[:n]
            stack.readinto(pos, view)
            pending.append((pos, n, pool.submit(d.hasher.digests, view), buf))
            settle(False)
        settle(True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return d.hexdigest()

"""Byte helpers every format shares: one zero buffer, integer rounding, and
big/little-endian arrays of table entries.

Formats keep their tables (qcow2 L1/L2, VHD BAT, VDI block map) as
``array.array`` of host-order integers; these turn the on-disk bytes into
such arrays and back with one C-level byteswap, never a Python loop."""

from __future__ import annotations

import sys
from array import array

# One shared, read-only buffer of zeros; slices of it are handed out as
# memoryviews, so writing or comparing zeros never allocates.
ZERO_BUFFER = bytes(2 << 20)

_LITTLE = sys.byteorder == "little"
# array typecodes by item size (``L`` is 8 bytes on LP64, so 4-byte items
# need ``I`` there and ``L`` where ``I`` is 2 bytes)
U8, U16, U64 = "B", "H", "Q"
U32 = "I" if array("I").itemsize == 4 else "L"


def zeros(n: int):
    """``n`` zero bytes: a view of the shared buffer where it is large
    enough, else a new ``bytes``."""
    return memoryview(ZERO_BUFFER)[:n] if n <= len(ZERO_BUFFER) else bytes(n)


def is_zero(buf, start: int = 0, n: int | None = None) -> bool:
    """Whether ``buf[start:start + n]`` is all zero bytes (memcmp in pieces
    of the shared buffer; ``buf`` must have ``startswith``: bytes or
    bytearray)."""
    if n is None:
        n = len(buf) - start
    pos = 0
    while pos < n:
        k = min(len(ZERO_BUFFER), n - pos)
        if not buf.startswith(ZERO_BUFFER[:k], start + pos):
            return False
        pos += k
    return True


def uuid_text(raw: bytes, little: bool = False) -> str:
    """16 bytes of a UUID in its 8-4-4-4-12 form, as ``str(uuid.UUID(bytes=
    raw))`` gives it (``little``: Microsoft's GUID order, the first three
    fields little-endian, as ``uuid.UUID(bytes_le=raw)``).  Here because
    the uuid module brings platform: 3 ms of every ``vdtool info``."""
    raw = bytes(raw)
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, not {len(raw)}")
    if little:
        raw = raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def align_up(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a`` (any positive ``a``)."""
    return -(-n // a) * a


def align_down(n: int, a: int) -> int:
    return n // a * a


def be_array(raw, typecode: str = U64) -> array:
    """Big-endian integers from ``raw`` as a host-order array."""
    a = array(typecode)
    a.frombytes(raw)
    if _LITTLE and a.itemsize > 1:
        a.byteswap()
    return a


def le_array(raw, typecode: str = U32) -> array:
    """Little-endian integers from ``raw`` as a host-order array."""
    a = array(typecode)
    a.frombytes(raw)
    if not _LITTLE and a.itemsize > 1:  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a


def be_bytes(a: array) -> bytes:
    """The array's integers as big-endian bytes (the array is not changed)."""
    if _LITTLE and a.itemsize > 1:
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def le_bytes(a: array) -> bytes:
    """The array's integers as little-endian bytes (the array is not changed)."""
    if not _LITTLE and a.itemsize > 1:  # pragma: no cover - big-endian hosts
        b = array(a.typecode, a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


def data_runs(buf: bytearray, n: int, block: int, zeros: memoryview) -> list:
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

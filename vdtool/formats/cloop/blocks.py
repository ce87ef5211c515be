"""Reading a cloop image: each block a zlib stream that must inflate to
exactly one block (the last one inflated is cached: reads come in pieces)."""

from __future__ import annotations

from vdtool.core.backend import MapExtent, Status
from vdtool.core import deflate
from vdtool.formats.cloop.state import CloopState


def block_status(st: CloopState, offset: int, length: int) -> tuple:
    """Every block is in the file (compressed zeros are data too)."""
    return Status.DATA, min(length, st.size - offset)


def map_extent(st: CloopState, offset: int, length: int) -> MapExtent:
    # compressed: no host offset, as qemu-img map reports compressed data
    return MapExtent(Status.DATA, min(length, st.size - offset), compressed=True)


def inflate(st: CloopState, n: int) -> bytes:
    """Block ``n``'s data."""
    if st.cache[0] == n:
        return st.cache[1]
    start, end = st.offsets[n], st.offsets[n + 1]
    raw = st.file.pread_exact(start, end - start, f"cloop block {n}")
    try:
        out, _, ended = deflate.inflate(raw, st.block)
    except deflate.DeflateError as e:
        raise st.corrupt(f"block {n} at offset {start} ({end - start} bytes) does not inflate: {e}") from None
    if len(out) != st.block:
        raise st.corrupt(f"block {n} at offset {start} ({end - start} bytes) inflates to {len(out)} bytes, not "
                         f"the block size {st.block}")
    if not ended:
        raise st.corrupt(f"block {n} at offset {start} ({end - start} bytes): its zlib stream does not end "
                         f"after the block size {st.block}")
    st.cache = (n, out)
    return out


def readinto(st: CloopState, offset: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    pos = 0
    while pos < len(mv):
        n, within = divmod(offset + pos, st.block)
        k = min(len(mv) - pos, st.block - within)
        mv[pos:pos + k] = inflate(st, n)[within:within + k]
        pos += k

"""cloop's on-disk header, constants and limits, and pure functions over the
header bytes (no I/O): recognising the format, the preamble's version and
validating the header and offset table."""

from __future__ import annotations

import re
from collections.abc import Iterator

from vdtool.core.layout import Layout, Record

# -- structures ------------------------------------------------------------------------------------
HEADROOM = 128  # the shell-script preamble
HEADER = Layout("cloop header", ">", (("preamble", f"{HEADROOM}s"), ("block_size", "I"), ("num_blocks", "I")))
OFFSET_SIZE = 8  # each entry of the offset table: a big-endian u64
TABLE_OFFSET = HEADER.size  # the offset table follows the header (136)

# -- constants -------------------------------------------------------------------------------------
SCRIPT_START = b"#!/bin/sh\n#V"  # every cloop preamble starts so, the version follows
_VERSION = re.compile(rb"#V(\d+\.\d+) Format")
SUPPORTED_VERSION = b"2.0"
SECTOR = 512

# Limits (as QEMU's): a block of at most 64 MiB, an offset table of at most
# 512 MiB; a compressed block may be a little larger than its data (deflate
# of random bytes), never more than twice as large.
MAX_BLOCK = 64 << 20
MAX_TABLE = 512 << 20

FORMAT, UNSUPPORTED, CORRUPT = "format", "unsupported", "corrupt"


def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 when the file starts with a cloop preamble of any version (the
    backend names the versions it refuses), else 0."""
    return 100 if head[:len(SCRIPT_START)] == SCRIPT_START and len(head) >= HEADER.size else 0


def preamble_version(hdr: Record) -> bytes | None:
    """The format version the preamble names (b"2.0"), None when it names none."""
    m = _VERSION.search(hdr.preamble)
    return m.group(1) if m else None


def max_compressed(block_size: int) -> int:
    """The largest compressed block accepted for ``block_size``-byte blocks."""
    return 2 * block_size + 4096


def table_end(hdr: Record) -> int:
    """Where the offset table (num_blocks + 1 entries) ends."""
    return TABLE_OFFSET + OFFSET_SIZE * (hdr.num_blocks + 1)


def header_problems(hdr: Record, file_size: int) -> Iterator[tuple]:
    """(kind, text) for each reason to refuse the header; stops at the
    first one later checks depend on."""
    if hdr.preamble[:len(SCRIPT_START)] != SCRIPT_START:
        yield FORMAT, "not a cloop image (no '#!/bin/sh' / '#V' preamble)"
        return
    version = preamble_version(hdr)
    if version is None:
        yield UNSUPPORTED, ("cloop preamble names no format version ('#V<n>.<m> Format'); vdtool reads the V2.0 "
                            "format with zlib blocks, which create_compressed_fs writes")
        return
    if version != SUPPORTED_VERSION:
        yield UNSUPPORTED, (f"cloop format V{version.decode()} is not supported (vdtool reads the V2.0 format "
                            f"with zlib blocks, which create_compressed_fs writes)")
        return
    bs = hdr.block_size
    if bs == 0 or bs % SECTOR or bs > MAX_BLOCK:
        yield CORRUPT, f"block size {bs} is not a multiple of {SECTOR} from {SECTOR} to {MAX_BLOCK}"
        return
    table = OFFSET_SIZE * (hdr.num_blocks + 1)
    if table > MAX_TABLE:
        yield CORRUPT, f"{hdr.num_blocks} blocks need an offset table of {table} bytes, more than {MAX_TABLE}"
        return
    if table_end(hdr) > file_size:
        yield CORRUPT, (f"offset table of {hdr.num_blocks + 1} entries runs past the end of the file "
                        f"({file_size} bytes)")


def offset_problem(offsets, hdr: Record, file_size: int) -> str | None:
    """What is wrong with the offset table (``offsets``: num_blocks + 1
    values), None when every block lies after the table, inside the file,
    in order and no larger than max_compressed."""
    if not len(offsets):
        return None
    if offsets[0] < table_end(hdr):
        return f"block 0 starts at offset {offsets[0]}, inside the header or offset table"
    if offsets[-1] > file_size:
        return f"the last block ends at offset {offsets[-1]}, past the end of the file ({file_size} bytes)"
    limit = max_compressed(hdr.block_size)
    prev = offsets[0]
    for i in range(1, len(offsets)):
        cur = offsets[i]
        if cur < prev:
            return f"offsets are not in order at entry {i} ({cur} after {prev})"
        if cur - prev > limit:
            return f"block {i - 1} is {cur - prev} bytes compressed, more than the limit of {limit}"
        prev = cur
    return None

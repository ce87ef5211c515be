"""Deflate and inflate for every format: raw deflate with a chosen window
(qcow2 and QCOW v1 clusters: 4 KiB), zlib streams (RFC 1950: VMDK grains,
DMG and cloop blocks), and inflate capped at the size the caller expects.

The work is done by ISA-L through the ``isal`` package where it is installed
(several times zlib's speed, and it lets go of the GIL, so the copy engine's
threads run in parallel), else by the standard library's zlib.  The
environment variable VDTOOL_DEFLATE=zlib forces zlib (tests run both; under
zlib level 6 the output is byte for byte what qemu-img writes).

Levels are on zlib's scale, 1 (fastest) to 9 (smallest).  ISA-L has four
levels, 0 to 3; zlib's are mapped onto them as ``ISAL_LEVEL`` says, so the
default 6 becomes ISA-L level 2, which compresses text-like data at least
as well as zlib 6 at several times its speed."""

from __future__ import annotations

import os
import zlib
from collections import namedtuple

from vdtool.core.errors import UsageError

MIN_LEVEL, MAX_LEVEL = 1, 9
DEFAULT_LEVEL = 6
# zlib level -> ISA-L level: 1 (zlib's fastest) to ISA-L's fastest, which
# compresses much less; the middle to 1 and 2; 8-9 to ISA-L's smallest.
ISAL_LEVEL = {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 3, 9: 3}
ZLIB_WBITS = 15  # an RFC 1950 stream; raw deflate is a negative wbits, as in zlib
ENV = "VDTOOL_DEFLATE"

_engine: dict = {}  # the value of ENV -> (module, its error class, name)


class DeflateError(ValueError):
    """Compressed data that does not inflate."""


# data: at most the ``limit`` asked for; more: the stream holds more than
# ``limit`` bytes; ended: the stream's end was reached
Inflated = namedtuple("Inflated", "data more ended")


def _backend() -> tuple:
    """(module, error class, name) of the engine in use: isal's isal_zlib,
    imported on first use, or zlib when it is missing or ENV says zlib."""
    want = os.environ.get(ENV, "")
    got = _engine.get(want)
    if got is None:
        got = (zlib, zlib.error, "zlib")
        if want != "zlib":
            try:
                from isal import isal_zlib
            except ImportError:
                pass
            else:
                got = (isal_zlib, isal_zlib.error, "isal")
        _engine[want] = got
    return got


def engine() -> str:
    """'isal' or 'zlib': the library that does the work."""
    return _backend()[2]


def check_level(value, what: str = "compression_level") -> int:
    """A deflate level 1-9 from an option's value; UsageError otherwise."""
    return level_in_range(value, MIN_LEVEL, MAX_LEVEL, what, "deflate levels are {lo} to {hi} (zlib's scale)")


def level_in_range(value, lo: int, hi: int, what: str, rule: str) -> int:
    """An option's value as an integer from ``lo`` to ``hi``; a UsageError
    that names the option and ``rule`` (formatted with lo and hi) otherwise."""
    try:
        level = int(value)
    except (TypeError, ValueError):
        level = None
    if level is None or isinstance(value, bool) or not lo <= level <= hi:
        raise UsageError(f"{what}: invalid value {value!r}; {rule.format(lo=lo, hi=hi)}")
    return level


def deflate(data, level: int | None = None, wbits: int = ZLIB_WBITS) -> bytes:
    """``data`` compressed; ``wbits`` as zlib's: -12 raw deflate with a
    4 KiB window, 15 a zlib stream."""
    mod, _, name = _backend()
    level = DEFAULT_LEVEL if level is None else level
    c = mod.compressobj(ISAL_LEVEL[level] if name == "isal" else level, mod.DEFLATED, wbits, 9)
    out = c.compress(data) + c.flush()
    if name == "isal" and wbits == ZLIB_WBITS and len(out) > compress_bound(len(data)):
        # ISA-L's worst case is a little over zlib's (incompressible data);
        # stored blocks keep every output within what measure promises
        c = zlib.compressobj(0, zlib.DEFLATED, wbits, 9)
        out = c.compress(data) + c.flush()
    return out


def compress_bound(n: int) -> int:
    """The most deflate() returns for ``n`` bytes as a zlib stream (zlib's
    compressBound, for its default window; a smaller window may go over)."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def inflate(data, limit: int, wbits: int = ZLIB_WBITS) -> Inflated:
    """What ``data`` inflates to, at most ``limit`` bytes (never more is
    made, whatever the stream says); DeflateError when it is not valid."""
    mod, error, _ = _backend()
    d = mod.decompressobj(wbits)
    try:
        # one byte over the limit shows a stream that holds more
        out = d.decompress(data, limit + 1)
    except (error, zlib.error, ValueError, OverflowError) as e:
        raise DeflateError(str(e) or type(e).__name__) from None
    more = len(out) > limit
    return Inflated(out[:limit] if more else out, more, d.eof)

"""Compressed cluster payloads: zlib (compression_type 0) and zstd (1), as
qemu-img 7.2 writes and reads them.

- zlib: raw deflate, 4 KiB window, memLevel 9, level 6.
- zstd: the cluster compressed into one zstd frame with the library's
  default parameters (level 3, content size recorded, no checksum): what
  one ZSTD_compressStream2(..., ZSTD_e_end) call makes, which is what
  ``compress()`` makes too.  A reader must accept several frames in a row
  (the spec allows it) and ignore what follows the cluster's data up to
  the sector the L2 entry rounds to.

Both compressors get cluster_size - 1 bytes of room, as QEMU's do: output
that does not fit is stored as a plain cluster.  The functions are pure and
run in the copy engine's worker threads (both libraries drop the GIL)."""

from __future__ import annotations

import zlib
from typing import Optional

from vdtool.core.errors import UnsupportedFeature
from vdtool.formats.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

# A cluster is at most 2 MiB: a frame asking for a bigger window than this
# is not one qemu-img wrote, and refusing it caps the decoder's allocation.
ZSTD_WINDOW_LOG_MAX = 22

_zstd = None


def zstd_module(path: Optional[str] = None):
    """The zstd binding: the standard library's (Python 3.14+) or the
    backports.zstd package, imported on first use."""
    global _zstd
    if _zstd is None:
        import importlib

        for name in ("compression.zstd", "backports.zstd"):
            try:
                _zstd = importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            raise UnsupportedFeature("zstd compression needs the backports.zstd package "
                                     "(pip install backports.zstd)", path)
    return _zstd


def compress_cluster(data, cluster_size: int, ctype: int = COMPRESSION_ZLIB,
                     path: Optional[str] = None) -> Optional[bytes]:
    """One guest cluster (a short last one is padded with zeros) compressed
    as QEMU stores it; None when that would not save space (``path``: the
    image, named when the zstd binding is missing)."""
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    if ctype == COMPRESSION_ZSTD:
        out = zstd_module(path).compress(data)
    else:
        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    return out if len(out) < cluster_size else None


class DecompressError(ValueError):
    """A compressed cluster's bytes do not decode to one cluster."""


def decompress_cluster(raw: bytes, cluster_size: int, ctype: int, path: Optional[str] = None) -> bytes:
    """The ``cluster_size`` bytes that ``raw`` (the sectors an L2 entry
    covers) decodes to; DecompressError when it does not (``path``: the
    image, named when the zstd binding is missing)."""
    if ctype == COMPRESSION_ZSTD:
        return _zstd_decompress(zstd_module(path), raw, cluster_size)
    try:
        out = zlib.decompressobj(-12).decompress(raw, cluster_size)
    except zlib.error as ex:
        raise DecompressError(f"does not inflate: {ex}") from None
    if len(out) != cluster_size:
        raise DecompressError(f"inflates to {len(out)} bytes, not {cluster_size}")
    return out


def _zstd_decompress(zs, raw: bytes, cluster_size: int) -> bytes:
    """Frames one after another until the cluster is full; the bytes after
    the frame that fills it are the sector's padding."""
    opts = {zs.DecompressionParameter.window_log_max: ZSTD_WINDOW_LOG_MAX}
    out = bytearray()
    rest = raw
    while len(out) < cluster_size:
        if not rest:
            raise DecompressError(f"zstd data ends after {len(out)} of {cluster_size} bytes")
        d = zs.ZstdDecompressor(options=opts)
        try:
            # one byte more than fits: a frame that overflows the cluster shows
            piece = d.decompress(rest, cluster_size - len(out) + 1)
        except zs.ZstdError as ex:
            raise DecompressError(f"is not valid zstd data: {ex}") from None
        out += piece
        if len(out) > cluster_size:
            raise DecompressError(f"zstd data decodes to more than {cluster_size} bytes")
        if not d.eof:  # the input ended inside a frame
            raise DecompressError(f"zstd frame is cut short after {len(out)} of {cluster_size} bytes")
        rest = d.unused_data
    return bytes(out)

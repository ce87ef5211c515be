"""Compressed cluster payloads: zlib (compression_type 0) and zstd (1), as
qemu-img 7.2 writes and reads them.

- zlib: raw deflate, 4 KiB window (QEMU inflates with window bits 12),
  through vdtool.core.deflate (ISA-L where installed); level 6 by default.
- zstd: the cluster compressed into one zstd frame with the library's
  default parameters (level 3, content size recorded, no checksum): what
  one ZSTD_compressStream2(..., ZSTD_e_end) call makes, which is what
  ``compress()`` makes too.  A reader must accept several frames in a row
  (the spec allows it) and ignore what follows the cluster's data up to
  the sector the L2 entry rounds to.

Both compressors get cluster_size - 1 bytes of room, as QEMU's do: output
that does not fit is stored as a plain cluster.  The functions are pure and
run in the copy engine's worker threads (the libraries drop the GIL).
``compression_level`` is a vdtool extra (qemu-img 7.2 has none): deflate
1-9 on zlib's scale, zstd its own range; not stored in the image."""

from __future__ import annotations

from vdtool.core import deflate
from vdtool.core.errors import UnsupportedFeature
from vdtool.formats.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

# A cluster is at most 2 MiB: a frame asking for a bigger window than this
# is not one qemu-img wrote, and refusing it caps the decoder's allocation.
ZSTD_WINDOW_LOG_MAX = 22
ZLIB_WBITS = -12  # raw deflate, 4 KiB window
ZSTD_DEFAULT_LEVEL = 3

_zstd = None


def zstd_module(path: str | None = None):
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


def check_level(value, ctype: int, path: str | None = None) -> int | None:
    """The ``compression_level`` option checked for the compression type
    (None: the codec's default); UsageError when out of range."""
    if value is None:
        return None
    if ctype != COMPRESSION_ZSTD:
        return deflate.check_level(value, "qcow2 option compression_level")
    lo, hi = zstd_module(path).CompressionParameter.compression_level.bounds()
    return deflate.level_in_range(value, lo, hi, "qcow2 option compression_level", "zstd levels are {lo} to {hi}")


def compress_cluster(data, cluster_size: int, ctype: int = COMPRESSION_ZLIB,
                     path: str | None = None, level: int | None = None) -> bytes | None:
    """One guest cluster (a short last one is padded with zeros) compressed
    as QEMU stores it; None when that would not save space (``path``: the
    image, named when the zstd binding is missing; ``level``: None for the
    codec's default)."""
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    if ctype == COMPRESSION_ZSTD:
        out = zstd_module(path).compress(data, ZSTD_DEFAULT_LEVEL if level is None else level)
    else:
        out = deflate.deflate(data, level, ZLIB_WBITS)
    return out if len(out) < cluster_size else None


class DecompressError(ValueError):
    """A compressed cluster's bytes do not decode to one cluster."""


def decompress_cluster(raw: bytes, cluster_size: int, ctype: int, path: str | None = None) -> bytes:
    """The ``cluster_size`` bytes that ``raw`` (the sectors an L2 entry
    covers) decodes to; DecompressError when it does not (``path``: the
    image, named when the zstd binding is missing)."""
    if ctype == COMPRESSION_ZSTD:
        return _zstd_decompress(zstd_module(path), raw, cluster_size)
    try:
        out = deflate.inflate(raw, cluster_size, ZLIB_WBITS).data
    except deflate.DeflateError as ex:
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

"""One DMG chunk's decoded bytes, from what is stored: raw, zlib (UDZO),
bzip2 (UDBZ), ADC (UDCO) and, where a binding is installed, LZFSE (ULFO).
Every decoder is bounded by the size the chunk table promises: a chunk that
decodes to more or less is corrupt."""

from __future__ import annotations

import bz2

from vdtool.core.deflate import DeflateError, inflate
from vdtool.core.errors import CorruptImageError, UnsupportedFeature
from vdtool.formats.dmg import adc
from vdtool.formats.dmg.layout import ADC, BZIP2, LZFSE, RAW, ZLIB, type_name


def _zlib(data: bytes, size: int) -> bytes:
    got = inflate(data, size)
    return got.data + b"\0" if got.more else got.data  # one byte over: decode() says "more than"


def _bzip2(data: bytes, size: int) -> bytes:
    d = bz2.BZ2Decompressor()
    return d.decompress(data, size + 1)


def _lzfse(data: bytes, size: int) -> bytes:
    try:
        import liblzfse  # the pyliblzfse binding, when installed
    except ImportError:
        raise UnsupportedFeature(f"chunk type {type_name(LZFSE)} (ULFO, LZFSE-compressed) needs the pyliblzfse "
                                 f"package, which is not installed") from None
    out = liblzfse.decompress(data)
    return out[:size + 1]


_DECODERS = {ZLIB: _zlib, BZIP2: _bzip2, ADC: lambda data, size: adc.decompress(data, size + 1), LZFSE: _lzfse}


def decode(kind: int, data: bytes, size: int, where: str, path: str) -> bytes:
    """``size`` bytes from the stored ``data`` of a chunk of type ``kind``;
    ``where`` names the chunk for errors."""
    if kind == RAW:
        return bytes(data).ljust(size, b"\0")
    fn = _DECODERS.get(kind)
    if fn is None:
        raise UnsupportedFeature(f"{where}: chunk type {type_name(kind)} is not supported", path)
    try:
        out = fn(data, size)
    except UnsupportedFeature as e:
        raise UnsupportedFeature(f"{where}: {e}", path) from None
    except (DeflateError, OSError, EOFError, ValueError, MemoryError) as e:
        raise CorruptImageError(f"{where}: {type_name(kind)} data does not decode ({e})", path) from None
    if len(out) != size:
        got = f"more than {size}" if len(out) > size else str(len(out))
        raise CorruptImageError(f"{where}: {type_name(kind)} data decodes to {got} bytes, not the {size} its "
                                f"table says", path)
    return bytes(out)

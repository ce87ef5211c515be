"""Apple Data Compression (the UDCO chunks of old DMGs), decoding only.

A stream of codes, each starting with one byte: with the top bit set, a
literal run of (byte & 0x7f) + 1 bytes follows; else with bit 6 set, a
three-byte code copies (byte & 0x3f) + 4 bytes from 16-bit distance + 1
back; else a two-byte code copies ((byte >> 2) & 0xf) + 3 bytes from
10-bit distance + 1 back.  Copies may overlap what they produce."""

from __future__ import annotations


class AdcError(ValueError):
    pass


def decompress(src, out_size: int) -> bytearray:
    """Decode ``src`` into exactly ``out_size`` bytes at most (a stream that
    would produce more is an error, as is a copy from before the start)."""
    src = bytes(src)
    out = bytearray()
    i, n = 0, len(src)
    while i < n and len(out) < out_size:
        b = src[i]
        if b & 0x80:
            k = (b & 0x7F) + 1
            if i + 1 + k > n:
                raise AdcError(f"literal run of {k} bytes at {i} passes the end of the input")
            out += src[i + 1:i + 1 + k]
            i += 1 + k
            continue
        if b & 0x40:
            if i + 3 > n:
                raise AdcError(f"three-byte code at {i} passes the end of the input")
            length, dist = (b & 0x3F) + 4, ((src[i + 1] << 8) | src[i + 2]) + 1
            i += 3
        else:
            if i + 2 > n:
                raise AdcError(f"two-byte code at {i} passes the end of the input")
            length, dist = ((b >> 2) & 0xF) + 3, (((b & 0x3) << 8) | src[i + 1]) + 1
            i += 2
        if dist > len(out):
            raise AdcError(f"a copy from {dist} bytes back at output offset {len(out)} reaches before the start")
        start = len(out) - dist
        if dist >= length:
            out += out[start:start + length]
        else:  # overlapping: the pattern of ``dist`` bytes repeats
            pattern = out[start:]
            out += (pattern * (length // dist + 1))[:length]
    if len(out) > out_size:
        raise AdcError(f"the stream decodes to more than {out_size} bytes")
    return out

"""CRC-32C (Castagnoli), the checksum of every VHDX header, region table
and log entry.

``google_crc32c`` (hardware CRC instructions: 0.15 ms per MiB here, against
161 ms for the table) is used when it imports and is not its
pure-Python fallback; otherwise a byte-table implementation of our own,
fast enough for VHDX's checksummed structures (4 KiB headers, 64 KiB
tables, log entries of at most a few MiB)."""

from __future__ import annotations

_POLY = 0x82F63B78  # the Castagnoli polynomial, reflected
_TABLE: list = []
_fast = None


def _table() -> list:
    if not _TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ _POLY if c & 1 else c >> 1
            _TABLE.append(c)
    return _TABLE


def crc32c_python(data, crc: int = 0) -> int:
    """CRC-32C in pure Python (table driven, one byte a step)."""
    table = _table()
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _load_fast():
    global _fast
    if _fast is None:
        _fast = False
        try:
            import google_crc32c

            if google_crc32c.implementation == "c":  # its own fallback is slower than ours
                _fast = google_crc32c.extend
        except Exception:  # missing or broken wheel: the table does it
            _fast = False
    return _fast


def crc32c(data, crc: int = 0) -> int:
    fast = _load_fast()
    if fast:
        return fast(crc, bytes(data))
    return crc32c_python(data, crc)


def with_zeroed_field(buf, offset: int, length: int = 4) -> int:
    """CRC-32C of ``buf`` with its checksum field (``length`` bytes at
    ``offset``) taken as zeros, as VHDX computes every checksum."""
    mv = memoryview(buf)
    crc = crc32c(mv[:offset])
    crc = crc32c(bytes(length), crc)
    return crc32c(mv[offset + length:], crc)

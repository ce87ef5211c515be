"""VHDX for the fuzzer (tests/test_fuzz.py): where a valid image's
metadata is, checksums recomputed after a poke, and hostile values in each
field (headers, region table, metadata table and items, BAT, log)."""

from __future__ import annotations

import struct

from vdtool.formats.vhdx.crc import with_zeroed_field
from vdtool.formats.vhdx.layout import (FILE_PARAMETERS, HEADER, HEADER_BYTES, HEADER_OFFSETS, LOG_ENTRY_HEADER,
                                        METADATA_TABLE_ENTRY, METADATA_TABLE_HEADER, REGION_TABLE_BYTES,
                                        REGION_TABLE_ENTRY, REGION_TABLE_HEADER, REGION_TABLE_OFFSETS,
                                        VIRTUAL_DISK_SIZE, region_entries)

U64 = (1 << 64) - 1
H32 = [0, 1, 0x80000000, 0xFFFFFFFF]
H64 = [0, 1, 1 << 40, U64]
M = 1 << 20


def _regions(data: bytes) -> dict:
    entries, _ = region_entries(data[REGION_TABLE_OFFSETS[0]:REGION_TABLE_OFFSETS[0] + REGION_TABLE_BYTES])
    return {i: e for i, e in enumerate(entries)}


def _meta(data: bytes):
    """(metadata region offset, its table entries) or (None, [])."""
    for e in _regions(data).values():
        if e.Length == M and e.FileOffset + 65536 <= len(data):
            t = data[e.FileOffset:e.FileOffset + 65536]
            if t[:8] == b"metadata":
                n = min(METADATA_TABLE_HEADER.unpack(t).EntryCount, 64)
                return e.FileOffset, [METADATA_TABLE_ENTRY.unpack(t, 32 * (i + 1)) for i in range(n)]
    return None, []


def spans(data: bytes) -> list:
    out = [(HEADER_OFFSETS[0], HEADER_OFFSETS[0] + 128), (HEADER_OFFSETS[1], HEADER_OFFSETS[1] + 128),
           (REGION_TABLE_OFFSETS[0], REGION_TABLE_OFFSETS[0] + 96), (M, M + 8192)]
    for e in _regions(data).values():
        out.append((e.FileOffset, e.FileOffset + 4096))
    off, items = _meta(data)
    for e in items:
        out.append((off + e.Offset, off + e.Offset + max(8, min(e.Length, 512))))
    return out


def fix_checksums(buf: bytearray) -> None:
    for off in HEADER_OFFSETS:
        if buf[off:off + 4] == b"head" and off + HEADER_BYTES <= len(buf):
            struct.pack_into("<I", buf, off + 4, with_zeroed_field(buf[off:off + HEADER_BYTES], 4))
    for off in REGION_TABLE_OFFSETS:
        if buf[off:off + 4] == b"regi" and off + REGION_TABLE_BYTES <= len(buf):
            struct.pack_into("<I", buf, off + 4, with_zeroed_field(buf[off:off + REGION_TABLE_BYTES], 4))


def field_cases(data: bytes, poke) -> None:
    """Calls ``poke(label, offset, struct format, value)`` for each case
    (it recomputes the checksums)."""
    for h in HEADER_OFFSETS[1:]:  # the current header of a new image
        for name, vals in (("SequenceNumber", [0, U64, U64 - 1]), ("LogGuid", [b"\x01" * 16]),
                           ("LogVersion", [1, 0xFFFF]), ("Version", [0, 2]), ("LogLength", H32 + [M + 4096]),
                           ("LogOffset", H64 + [M + 1])):
            code = "<16s" if name == "LogGuid" else "<" + {2: "H", 4: "I", 8: "Q"}[HEADER.sizes[name]]
            for v in vals:
                poke(f"header{h >> 16}.{name}={v!r}", h + HEADER.offset_of(name), code, v)
    rt = REGION_TABLE_OFFSETS[0]
    for v in H32 + [2048, 3]:
        poke(f"region.EntryCount={v:#x}", rt + REGION_TABLE_HEADER.offset_of("EntryCount"), "<I", v)
    for i in range(2):
        base = rt + REGION_TABLE_HEADER.size + i * REGION_TABLE_ENTRY.size
        for v in H64 + [M, 3 * M, len(data)]:
            poke(f"region[{i}].FileOffset={v:#x}", base + REGION_TABLE_ENTRY.offset_of("FileOffset"), "<Q", v)
        for v in H32 + [M]:
            poke(f"region[{i}].Length={v:#x}", base + REGION_TABLE_ENTRY.offset_of("Length"), "<I", v)
        poke(f"region[{i}].Guid=junk required", base, "<16sQII", (b"\x07" * 16, 3 * M, M, 1))
    off, items = _meta(data)
    if off is None:
        return
    for v in [0, 6, 2048, 0xFFFF]:
        poke(f"metadata.EntryCount={v}", off + METADATA_TABLE_HEADER.offset_of("EntryCount"), "<H", v)
    for i, e in enumerate(items):
        base = off + 32 * (i + 1)
        for v in [0, 0xFFFFFFFF, M - 4]:
            poke(f"item[{i}].Offset={v:#x}", base + METADATA_TABLE_ENTRY.offset_of("Offset"), "<I", v)
        for v in [0, 0xFFFFFFFF, 2 * M]:
            poke(f"item[{i}].Length={v:#x}", base + METADATA_TABLE_ENTRY.offset_of("Length"), "<I", v)
        for v in (0, 4096, 1 << 20 | 1, 0xFFFFFFFF):
            poke(f"item[{i}] value={v:#x}", off + e.Offset, "<I", v)
        if e.Length == VIRTUAL_DISK_SIZE.size:
            for v in [0, U64, (64 << 40) + 512, 511]:
                poke(f"item[{i}] size={v:#x}", off + e.Offset, "<Q", v)
        if e.Length == FILE_PARAMETERS.size:
            for v in (2, 3, 0xFFFFFFFF):
                poke(f"item[{i}] flags={v:#x}", off + e.Offset + FILE_PARAMETERS.offset_of("Flags"), "<I", v)
    for e in _regions(data).values():
        if e.FileOffset + 16 <= len(data) and data[e.FileOffset:e.FileOffset + 8] != b"metadata":
            for v in (6 | (1 << 20), 6 | (len(data) >> 20 << 20), 6 | (U64 >> 20 << 20), 7, 4):
                poke(f"BAT[0]={v:#x}", e.FileOffset, "<Q", v)
                poke(f"BAT[1]={v:#x}", e.FileOffset + 8, "<Q", v)
    # a log entry header where the log is (its checksum does not match: no valid log)
    for v in (0, M, U64):
        poke(f"log.Tail={v:#x}", M + LOG_ENTRY_HEADER.offset_of("Tail"), "<I", v & 0xFFFFFFFF)

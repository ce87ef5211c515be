"""Building DMG (UDIF) images from the specification, for tests: no tool
here makes them.  A disk is given as partitions, each a list of chunks
(kind, plain bytes); the builder stores each chunk as its kind says (raw,
zero, ignore, zlib, bzip2, ADC) and writes the data fork, the property
list (or a binary resource fork) and the koly trailer."""

from __future__ import annotations

import base64
import bz2
import struct
import zlib

from vdtool.formats.dmg.layout import (ADC, BZIP2, CHUNK, COMMENT, IGNORE, KOLY, MISH, RAW, RSRC_HEADER, TERMINATOR,
                                       ZERO, ZLIB)

KINDS = {"raw": RAW, "zero": ZERO, "ignore": IGNORE, "zlib": ZLIB, "bzip2": BZIP2, "adc": ADC}


def adc_compress(data: bytes) -> bytes:
    """A small ADC encoder using all three codes: runs of one byte (copies
    from 1 back), repeats 256 bytes back (three-byte code), and literals."""
    out = bytearray()
    lit = bytearray()
    i, n = 0, len(data)

    def flush():
        for k in range(0, len(lit), 128):
            part = lit[k:k + 128]
            out.append(0x80 | (len(part) - 1))
            out.extend(part)
        lit.clear()

    while i < n:
        run = 0
        while i > 0 and i + run < n and run < 18 and data[i + run] == data[i - 1]:
            run += 1
        if run >= 3:  # two-byte code: distance 1, 3..18 bytes
            flush()
            out += bytes([((run - 3) << 2) & 0x3C, 0])
            i += run
            continue
        far = 0
        while i >= 256 and i + far < n and far < 67 and data[i + far] == data[i - 256 + far]:
            far += 1
        if far >= 4:  # three-byte code: distance 256, 4..67 bytes
            flush()
            out += bytes([0x40 | (far - 4), 0, 255])
            i += far
            continue
        lit.append(data[i])
        i += 1
    flush()
    return bytes(out)


def _store(kind: str, data: bytes) -> bytes:
    if kind == "raw":
        return data
    if kind in ("zero", "ignore"):
        return b""
    if kind == "zlib":
        return zlib.compress(data)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "adc":
        return adc_compress(data)
    raise ValueError(kind)


def _mish(first: int, chunks: list, fork_pos: int, extra=()) -> tuple:
    """(mish bytes, stored chunk data) for one partition starting at sector ``first``."""
    entries, stored = [], bytearray()
    sector = 0
    for kind, data in chunks:
        assert len(data) % 512 == 0
        body = _store(kind, data)
        entries.append(CHUNK.pack(EntryType=KINDS[kind], SectorNumber=sector, SectorCount=len(data) // 512,
                                  CompressedOffset=fork_pos + len(stored), CompressedLength=len(body)))
        stored += body
        sector += len(data) // 512
    entries += list(extra)
    entries.append(CHUNK.pack(EntryType=TERMINATOR, SectorNumber=sector))
    hdr = MISH.pack(Signature=b"mish", Version=1, SectorNumber=first, SectorCount=sector,
                    NumberOfBlockChunks=len(entries))
    return hdr + b"".join(entries), bytes(stored), sector


def plist_xml(parts: list) -> bytes:
    """The property list for ``parts`` [(name, mish bytes)], as hdiutil lays it out."""
    items = []
    for i, (name, mish) in enumerate(parts):
        b64 = base64.b64encode(mish).decode()
        items.append(f"\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n"
                     f"\t\t\t\t<key>CFName</key>\n\t\t\t\t<string>{name}</string>\n"
                     f"\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t\t{b64}\n\t\t\t\t</data>\n"
                     f"\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i - 1}</string>\n"
                     f"\t\t\t\t<key>Name</key>\n\t\t\t\t<string>{name}</string>\n\t\t\t</dict>\n")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
            '<plist version="1.0">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n'
            + "".join(items) + "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").encode()


def rsrc_fork(parts: list) -> bytes:
    """A classic resource fork holding the mish blocks (no resource map)."""
    data = b"".join(struct.pack(">I", len(m)) + m for _, m in parts)
    return RSRC_HEADER.pack(DataOffset=256, MapOffset=256 + len(data), DataLength=len(data), MapLength=0) \
        + bytes(256 - RSRC_HEADER.size) + data


def build(path, partitions: list, *, rsrc: bool = False, comments: bool = False) -> bytes:
    """Write a DMG of ``partitions`` [(name, [(kind, bytes), ...])] to
    ``path``; returns the disk it holds (what a reader must show)."""
    fork = bytearray()
    parts, disk = [], bytearray()
    first = 0
    for name, chunks in partitions:
        extra = [CHUNK.pack(EntryType=COMMENT)] if comments else []
        mish, stored, sectors = _mish(first, chunks, len(fork), extra)
        fork += stored
        parts.append((name, mish))
        for kind, data in chunks:
            disk += bytes(len(data)) if kind in ("zero", "ignore") else data
        first += sectors
    meta = rsrc_fork(parts) if rsrc else plist_xml(parts)
    koly = KOLY.pack(Signature=b"koly", Version=4, HeaderSize=KOLY.size, Flags=1, DataForkOffset=0,
                     DataForkLength=len(fork), SegmentNumber=1, SegmentCount=1,
                     RsrcForkOffset=len(fork) if rsrc else 0, RsrcForkLength=len(meta) if rsrc else 0,
                     XMLOffset=0 if rsrc else len(fork), XMLLength=0 if rsrc else len(meta),
                     ImageVariant=1, SectorCount=first)
    with open(path, "wb") as f:
        f.write(bytes(fork) + meta + koly)
    return bytes(disk)

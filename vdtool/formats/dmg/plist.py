"""The partitions of a DMG: each ``blkx`` resource's name and ``mish``
block, read from the XML property list or from the classic (binary)
resource fork.

The property list is untrusted XML: its size is capped before it is read,
entity declarations (the "billion laughs" and external entities) and
internal DTD subsets are refused, and plistlib (expat underneath) never
fetches an external DTD.  Apple's plists declare their public DTD by name
only, which is allowed."""

from __future__ import annotations

import re
from collections import namedtuple

from vdtool.core.errors import CorruptImageError
from vdtool.formats.dmg.layout import MAX_PARTITIONS, MISH_MAGIC, RSRC_HEADER

_DOCTYPE_SUBSET = re.compile(rb"<!DOCTYPE[^>\[]*\[")


Partition = namedtuple("Partition", ("name", "id", "mish"))  # str, str, bytes


def _text(v) -> str:
    return v if isinstance(v, str) else ""


def parse_xml(raw: bytes, path: str) -> list:
    """[Partition] from the property list ``raw`` (already size-capped)."""
    import plistlib

    if b"<!ENTITY" in raw or _DOCTYPE_SUBSET.search(raw):
        raise CorruptImageError("the DMG property list declares entities or a DTD subset; refused", path)
    try:
        doc = plistlib.loads(raw, fmt=plistlib.FMT_XML)
    except Exception as e:  # plistlib raises InvalidFileException, ExpatError, ValueError...
        raise CorruptImageError(f"the DMG property list does not parse ({type(e).__name__}: {e})", path) from None
    fork = doc.get("resource-fork", doc) if isinstance(doc, dict) else None
    blkx = fork.get("blkx") if isinstance(fork, dict) else None
    if not isinstance(blkx, list):
        raise CorruptImageError("the DMG property list has no blkx array (resource-fork/blkx)", path)
    if len(blkx) > MAX_PARTITIONS:
        raise CorruptImageError(f"the DMG property list names {len(blkx)} partitions (at most {MAX_PARTITIONS})",
                                path)
    out = []
    for i, entry in enumerate(blkx):
        if not isinstance(entry, dict) or not isinstance(entry.get("Data"), bytes):
            raise CorruptImageError(f"blkx entry {i} of the DMG property list has no Data", path)
        name = _text(entry.get("CFName")) or _text(entry.get("Name")) or f"partition {i}"
        out.append(Partition(name, _text(entry.get("ID")) or str(i), entry["Data"]))
    return out


def parse_rsrc(raw: bytes, path: str) -> list:
    """[Partition] from a binary resource fork ``raw`` (already size-capped):
    the resources of its data section that are mish blocks, in order (the
    names are in the resource map, which is not read)."""
    if len(raw) < RSRC_HEADER.size:
        raise CorruptImageError(f"the DMG resource fork is only {len(raw)} bytes", path)
    hdr = RSRC_HEADER.unpack(raw)
    start, end = hdr.DataOffset, hdr.DataOffset + hdr.DataLength
    if not hdr.DataLength or end > len(raw):
        raise CorruptImageError(f"the DMG resource fork's data ({hdr.DataLength} bytes at {hdr.DataOffset}) "
                                f"runs past the fork ({len(raw)} bytes)", path)
    out = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise CorruptImageError(f"a resource at offset {pos} of the DMG resource fork is cut short", path)
        n = int.from_bytes(raw[pos:pos + 4], "big")
        pos += 4
        if n == 0 or n > end - pos:
            raise CorruptImageError(f"a resource of {n} bytes at offset {pos - 4} of the DMG resource fork runs "
                                    f"past its data ({end})", path)
        if raw[pos:pos + 4] == MISH_MAGIC:
            if len(out) >= MAX_PARTITIONS:
                raise CorruptImageError(f"the DMG resource fork holds more than {MAX_PARTITIONS} partitions", path)
            out.append(Partition(f"partition {len(out)}", str(len(out)), raw[pos:pos + n]))
        pos += n
    return out

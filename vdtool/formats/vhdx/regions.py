"""The region tables: which one is used, and what is wrong with its entries
(offsets and lengths not in whole MiB, overlaps with each other, the header
section or the log, duplicates, unknown required regions, the BAT or
metadata region missing)."""

from __future__ import annotations

from vdtool.core.errors import CorruptImageError, UnsupportedFeature
from vdtool.formats.vhdx.layout import (BAT_GUID, HEADER_SECTION, KNOWN_REGIONS, METADATA_GUID, METADATA_TABLE_BYTES,
                                        REGION_REQUIRED, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS, MiB, guid_text,
                                        region_entries)
from vdtool.formats.vhdx.state import VhdxState


def read_regions(st: VhdxState) -> list:
    """Set the BAT and metadata regions of ``st`` from the first region
    table that is valid and whose entries make sense; returns what is wrong
    with the other one, for check (which copies the good one over it)."""
    tables = []
    for off in REGION_TABLE_OFFSETS:
        entries, problem = region_entries(st.read(off, REGION_TABLE_BYTES))
        found = entry_problems(st, entries) if problem is None else [("corrupt", problem)]
        tables.append((entries, found))
    use = 0 if not tables[0][1] else 1 if not tables[1][1] else -1
    if use < 0:
        kind, text = tables[0][1][0]
        if kind == "unsupported":
            raise UnsupportedFeature(text, st.path)
        other = tables[1][1][0][1]
        raise CorruptImageError(f"neither region table is usable (1: {text}; 2: {other})", st.path)
    entries = tables[use][0]
    found = {e.Guid: e for e in entries}
    st.regions = entries
    st.bat_offset, st.bat_length = found[BAT_GUID].FileOffset, found[BAT_GUID].Length
    st.meta_offset, st.meta_length = found[METADATA_GUID].FileOffset, found[METADATA_GUID].Length
    other = tables[1 - use]
    if other[1]:
        return [f"region table {2 - use}: {other[1][0][1]}"]
    if [e.values() for e in other[0]] != [e.values() for e in entries]:
        return ["the two region tables differ"]
    return []


def entry_problems(st: VhdxState, entries: list) -> list:
    """(kind, text) for each thing wrong with a region table's entries."""
    out = []
    seen: dict = {}
    spans = []
    hdr = st.hdr
    if hdr.LogLength:
        spans.append((hdr.LogOffset, hdr.LogOffset + hdr.LogLength, "log"))
    for e in entries:
        name = KNOWN_REGIONS.get(e.Guid, guid_text(e.Guid))
        if e.Guid in seen:
            out.append(("corrupt", f"region {name} appears twice in the region table"))
            continue
        seen[e.Guid] = e
        if e.Guid not in KNOWN_REGIONS:
            if e.Required & REGION_REQUIRED:
                out.append(("unsupported", f"unknown required region {name}"))
        if e.FileOffset % MiB or e.Length % MiB or not e.Length:
            out.append(("corrupt", f"region {name} at offset {e.FileOffset}, length {e.Length}: not whole MiB"))
            continue
        if e.FileOffset < HEADER_SECTION or e.FileOffset + e.Length > st.fsize:
            out.append(("corrupt", f"region {name} at offset {e.FileOffset}, length {e.Length} lies outside the "
                                   f"file (file size {st.fsize})"))
            continue
        for lo, hi, other in spans:
            if e.FileOffset < hi and lo < e.FileOffset + e.Length:
                out.append(("corrupt", f"region {name} at offset {e.FileOffset} overlaps the {other}"))
        spans.append((e.FileOffset, e.FileOffset + e.Length, f"{name} region"))
    for g in (BAT_GUID, METADATA_GUID):
        if g not in seen:
            out.append(("corrupt", f"the region table has no {KNOWN_REGIONS[g]} region"))
    meta = seen.get(METADATA_GUID)
    if meta is not None and meta.Length < METADATA_TABLE_BYTES:
        out.append(("corrupt", f"metadata region of {meta.Length} bytes is smaller than its table"))
    return out

"""The parent locator of a differencing VHDX: decoding and encoding its
key/value pairs (UTF-16LE), and the names a parent is looked for by:
``relative_path``, then ``absolute_win32_path`` and ``volume_path`` (the
last two are Windows names: a drive letter or a volume GUID path, tried by
their last component next to the child and in --parent-search folders).
``parent_linkage`` is the parent's DataWriteGuid, which the opened parent
must have (the stack checks it as ``expect["data_write_guid"]``;
``parent_linkage2`` is shown by ``info`` but not checked)."""

from __future__ import annotations

import ntpath
import os

from vdtool.core.backend import ParentRef
from vdtool.core.errors import CorruptImageError
from vdtool.formats.vhdx.layout import PARENT_LOCATOR_ENTRY, PARENT_LOCATOR_HEADER, VHDX_LOCATOR_TYPE, guid_text

MAX_KEYS = 256


def decode_locator(raw: bytes, length: int, path: str) -> tuple:
    """(locator type GUID, {key: value}) from a parent locator item."""
    if len(raw) < PARENT_LOCATOR_HEADER.size:
        raise CorruptImageError(f"parent locator of {len(raw)} bytes is too short", path)
    hdr = PARENT_LOCATOR_HEADER.unpack(raw)
    count = hdr.KeyValueCount
    if count > MAX_KEYS or PARENT_LOCATOR_HEADER.size + count * PARENT_LOCATOR_ENTRY.size > len(raw):
        raise CorruptImageError(f"parent locator with {count} entries does not fit its {len(raw)} bytes", path)
    out = {}
    for i in range(count):
        e = PARENT_LOCATOR_ENTRY.unpack(raw, PARENT_LOCATOR_HEADER.size + i * PARENT_LOCATOR_ENTRY.size)
        for off, n in ((e.KeyOffset, e.KeyLength), (e.ValueOffset, e.ValueLength)):
            if not n or n % 2 or off + n > len(raw):
                raise CorruptImageError(f"parent locator entry {i} (offset {off}, length {n}) lies outside the "
                                        f"locator ({len(raw)} bytes)", path)
        key = raw[e.KeyOffset:e.KeyOffset + e.KeyLength].decode("utf-16-le", "replace")
        out[key] = raw[e.ValueOffset:e.ValueOffset + e.ValueLength].decode("utf-16-le", "replace")
    return hdr.LocatorType, out


def encode_locator(pairs: dict) -> bytes:
    """A parent locator item (VHDX locator type) for ``pairs``."""
    keys = [(k.encode("utf-16-le"), v.encode("utf-16-le")) for k, v in pairs.items() if v]
    pos = PARENT_LOCATOR_HEADER.size + len(keys) * PARENT_LOCATOR_ENTRY.size
    head = [PARENT_LOCATOR_HEADER.pack(LocatorType=VHDX_LOCATOR_TYPE, KeyValueCount=len(keys))]
    body = []
    for k, v in keys:
        head.append(PARENT_LOCATOR_ENTRY.pack(KeyOffset=pos, ValueOffset=pos + len(k), KeyLength=len(k),
                                              ValueLength=len(v)))
        body += [k, v]
        pos += len(k) + len(v)
    return b"".join(head + body)


def linkage_text(data_write_guid: bytes) -> str:
    """parent_linkage as Hyper-V writes it: the GUID in braces."""
    return "{" + guid_text(data_write_guid) + "}"


def _plain_guid(text: str | None) -> str | None:
    return text.strip().strip("{}").lower() if text else None


def parent_names(locator: dict) -> list:
    """Names to look for the parent by, best first (local path forms)."""
    names = []
    rel = locator.get("relative_path")
    if rel:
        names.append(rel.replace("\\", "/") if "\\" in rel and not rel.startswith("\\\\") else rel)
    for key in ("absolute_win32_path", "volume_path"):
        val = locator.get(key)
        if val:
            if val.startswith("/"):
                names.append(val)
            else:
                names.append(ntpath.basename(val))
    out = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def parent_ref(locator: dict) -> ParentRef:
    names = parent_names(locator)
    linkage = _plain_guid(locator.get("parent_linkage"))
    return ParentRef(filename=names[0] if names else None, format=None, uuid=None,
                     extra={"candidates": names[1:], "expect": {"data_write_guid": linkage}})


def locator_for(parent_name: str, parent_abs: str, linkage: bytes) -> dict:
    """The key/value pairs vdtool records for a parent."""
    rel = parent_name if not ntpath.isabs(parent_name) and not parent_name.startswith("/") else ""
    out = {"parent_linkage": linkage_text(linkage)}
    if rel:
        out["relative_path"] = rel.replace("/", "\\")
    out["absolute_win32_path"] = os.path.abspath(parent_abs)
    return out

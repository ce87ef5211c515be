"""Finding a parent image named only by UUID (VDI differencing images).

Where VirtualBox would know from its media registry, vdtool looks in a few
folders: the child's own, the one above it, and the ``--parent-search``
folders, plus the VirtualBox registries found there (``*.vbox`` machine files
and ``VirtualBox.xml``), whose ``<HardDisk uuid="{...}" location="...">``
entries map UUIDs to files (locations relative to the registry file).

Work is bounded: folders are listed, never walked recursively; only the
first bytes of each candidate are read (a VDI header carries its UUID at a
fixed place); other formats that record UUIDs are opened only when their
extension says they could be one."""

from __future__ import annotations

import os
from collections.abc import Callable

MAX_ENTRIES_PER_DIR = 4096
MAX_REGISTRY_BYTES = 16 << 20
_seen_registries: list = []  # registry files met in this process, newest last
_UUID_EXTS = {".vmdk", ".vhd", ".vhdx", ".hdd", ".hds"}


def _norm(u) -> str | None:
    try:
        import uuid  # here, not at the top: the stack imports this module at every start

        return str(uuid.UUID(str(u).strip().strip("{}"))).lower()
    except (ValueError, TypeError):
        return None


def vdi_uuid(path: str) -> str | None:
    """The image UUID of a VDI file from its header alone (None if not a VDI)."""
    from vdtool.core import registry

    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    return registry.layout_module("vdi").image_uuid(head)


def _image_uuid(path: str, opener: Callable) -> str | None:
    u = vdi_uuid(path)
    if u is not None:
        return u
    if os.path.splitext(path)[1].lower() not in _UUID_EXTS:
        return None
    try:
        img = opener(path)
    except Exception:  # any unreadable candidate is simply not the parent
        return None
    try:
        return _norm(img.uuid) if img.uuid else None
    finally:
        try:
            img.close()
        except Exception:
            pass


def _registry_entries(reg_path: str) -> list:
    """(uuid, absolute location) of every HardDisk in a VirtualBox registry file."""
    try:
        if os.path.getsize(reg_path) > MAX_REGISTRY_BYTES:
            return []
        with open(reg_path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        return []  # VirtualBox never writes these; entity expansion is a known way to blow up a parser
    try:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(data)
    except Exception:
        return []
    folder = os.path.dirname(os.path.abspath(reg_path))
    out = []
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1] if isinstance(el.tag, str) else ""
        if tag != "HardDisk":
            continue
        u = _norm(el.get("uuid", ""))
        loc = el.get("location")
        if u and loc:
            loc = loc.replace("\\", os.sep) if os.sep == "/" and "\\" in loc and "/" not in loc else loc
            out.append((u, loc if os.path.isabs(loc) else os.path.join(folder, loc)))
    return out


def _list(folder: str) -> list:
    try:
        with os.scandir(folder) as it:
            out = []
            for entry in it:
                if len(out) >= MAX_ENTRIES_PER_DIR:
                    break
                try:
                    if entry.is_file():
                        out.append(entry.path)
                except OSError:
                    continue
            return sorted(out)
    except OSError:
        return []


def search_folders(child_path: str, search_dirs=()) -> list:
    child_dir = os.path.dirname(os.path.abspath(child_path))
    folders = []
    for d in [child_dir, os.path.dirname(child_dir), *search_dirs]:
        d = os.path.abspath(d)
        if d not in folders and os.path.isdir(d):
            folders.append(d)
    return folders


def find_by_uuid(child_path: str, ref, search_dirs=(), *, opener: Callable) -> str | None:
    """The file holding the image whose UUID ``ref.uuid`` names, or None.
    ``opener(path)`` opens a candidate image (one, no parents) to read its
    UUID where the header alone does not tell; the stack passes its
    ``open_backend``."""
    want = _norm(ref.uuid)
    if want is None:
        return None
    me = os.path.abspath(child_path)
    folders = search_folders(child_path, search_dirs)
    listings = {d: _list(d) for d in folders}

    def ok(path: str, trust: bool) -> bool:
        if os.path.abspath(path) == me or not os.path.isfile(path):
            return False
        got = _image_uuid(path, opener)
        return got == want or (trust and got is None)

    # VirtualBox names differencing images after their UUID: try that first
    for d in folders:
        for name in (f"{{{want}}}.vdi", f"{want}.vdi"):
            p = os.path.join(d, name)
            if os.path.exists(p) and ok(p, False):
                return p
    # registries: trusted for formats whose UUID vdtool cannot read cheaply.
    # One seen while resolving a child also serves its parents (a chain
    # spread over folders is described by the top's machine file).
    for d in folders:
        for p in listings[d]:
            base = os.path.basename(p)
            if (base.endswith(".vbox") or base == "VirtualBox.xml") and p not in _seen_registries:
                _seen_registries.append(p)
                del _seen_registries[:-64]
    for reg in list(_seen_registries):
        for u, loc in _registry_entries(reg):
            if u == want and ok(loc, True):
                return os.path.normpath(loc)
    for d in folders:
        for p in listings[d]:
            if ok(p, False):
                return p
    return None


def find_by_identity(child_path: str, ref, search_dirs, *, opener: Callable) -> str | None:
    """A parent named by a file name that is not where the name says, found
    in the ``search_dirs`` (``--parent-search``) by the identity the child
    recorded: the UUID (VHD), else every attribute of
    ``ref.extra["expect"]`` (VMDK's CID).  Only image files of the formats
    that record such an identity are opened, at most MAX_ENTRIES_PER_DIR a
    folder; None when nothing matches."""
    want_uuid = _norm(ref.uuid) if ref.uuid else None
    expect = {k: str(v).lower() for k, v in ref.extra.get("expect", {}).items() if v is not None}
    if want_uuid is None and not expect:
        return None
    me = os.path.abspath(child_path)
    for folder in dict.fromkeys(os.path.abspath(d) for d in search_dirs if os.path.isdir(d)):
        for path in _list(folder):
            if os.path.abspath(path) == me or os.path.splitext(path)[1].lower() not in _UUID_EXTS:
                continue
            try:
                img = opener(path)
            except Exception:  # an unreadable candidate is simply not the parent
                continue
            try:
                if want_uuid is not None:
                    hit = _norm(img.uuid) == want_uuid if img.uuid else False
                else:
                    hit = all(str(getattr(img, k, None)).lower() == v for k, v in expect.items())
            finally:
                try:
                    img.close()
                except Exception:
                    pass
            if hit:
                return path
    return None

"""VMDK text descriptor: parse, edit in place, render.

The descriptor is kept as its list of lines so that comments, blank lines,
unknown keys and their order survive a rewrite; only the values vdtool
changes (CID, parentCID, extent sizes, ...) are replaced.  Field and type
names as VMware's "Virtual Disk Format 5.0" spells them.

Also the descriptor's values vdtool computes: the content ID (CID) and
its renewal on a session's first write, the disk geometry, and the names of
the extent files of a new or grown image."""

from __future__ import annotations

import os
import random
import re

from vdtool.core.errors import CorruptImageError
from vdtool.formats.vmdk.layout import MAX_DESCRIPTOR_BYTES, SECTOR

MAX_EXTENTS = 4096
MAX_LINE = 4096

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")

_KEY_RE = re.compile(r"^([A-Za-z0-9_.\-]+)\s*=\s*(.*)$")
_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"((?:[^"])*)"(?:\s+(\d+))?)?\s*$')


class ExtentLine:
    """One extent line: access mode, size in sectors, type, file name (None
    for ZERO) and, for FLAT/VMFS, the start sector inside the file.  (Not a
    dataclass: making one costs a millisecond of every start-up.)"""

    __slots__ = ("access", "sectors", "type", "filename", "offset")

    def __init__(self, access: str, sectors: int, type: str, filename: str | None, offset: int):
        self.access = access
        self.sectors = sectors
        self.type = type
        self.filename = filename
        self.offset = offset  # FLAT/VMFS: start sector inside the file

    def _values(self) -> tuple:
        return self.access, self.sectors, self.type, self.filename, self.offset

    def __eq__(self, other) -> bool:
        return isinstance(other, ExtentLine) and other._values() == self._values()

    def __repr__(self) -> str:
        return "ExtentLine(access={!r}, sectors={!r}, type={!r}, filename={!r}, offset={!r})".format(*self._values())

    def render(self) -> str:
        s = f"{self.access} {self.sectors} {self.type}"
        if self.filename is not None:
            s += f' "{self.filename}"'
            if self.type == "FLAT":
                s += f" {self.offset}"
        return s


class Descriptor:
    """Lines as (kind, payload): kind "text" (kept verbatim), "key"
    ([key, value, quoted]) or "extent" (index into ``extents``)."""

    def __init__(self):
        self.lines: list = []
        self.extents: list = []

    # -- parsing -------------------------------------------------------------
    @classmethod
    def parse(cls, raw: bytes, path: str) -> "Descriptor":
        if len(raw) > MAX_DESCRIPTOR_BYTES:
            raise CorruptImageError(f"descriptor of {len(raw)} bytes is larger than {MAX_DESCRIPTOR_BYTES}", path)
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        d = cls()
        for no, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            s = line.strip()
            if len(line) > MAX_LINE:
                raise CorruptImageError(f"descriptor line {no} is {len(line)} characters long", path)
            if not s or s.startswith("#"):
                d.lines.append(("text", line))
                continue
            m = _EXTENT_RE.match(s)
            if m:
                if len(d.extents) >= MAX_EXTENTS:
                    raise CorruptImageError(f"descriptor names more than {MAX_EXTENTS} extents", path)
                etype = m.group(3).upper()
                if etype not in EXTENT_TYPES:
                    raise CorruptImageError(f"descriptor line {no}: unknown extent type {m.group(3)!r}", path)
                sectors = int(m.group(2))
                offset = int(m.group(5)) if m.group(5) else 0
                if sectors > (1 << 55) or offset > (1 << 55):
                    raise CorruptImageError(f"descriptor line {no}: extent size {sectors} or offset {offset} "
                                            f"sectors is out of range", path)
                if m.group(4) is None and etype != "ZERO":
                    raise CorruptImageError(f"descriptor line {no}: {etype} extent without a file name", path)
                d.extents.append(ExtentLine(m.group(1), sectors, etype, m.group(4), offset))
                d.lines.append(("extent", len(d.extents) - 1))
                continue
            m = _KEY_RE.match(s)
            if m:
                value = m.group(2).strip()
                quoted = len(value) >= 2 and value[0] == '"' and value[-1] == '"'
                if quoted:
                    value = value[1:-1]
                elif value.startswith('"'):
                    raise CorruptImageError(f"descriptor line {no}: unterminated quote in {s[:80]!r}", path)
                d.lines.append(("key", [m.group(1), value, quoted]))
                continue
            raise CorruptImageError(f"descriptor line {no} is malformed: {s[:80]!r}", path)
        if not any(k == "key" and p[0] == "createType" for k, p in d.lines):
            raise CorruptImageError("descriptor has no createType", path)
        return d

    # -- access --------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        for kind, p in self.lines:
            if kind == "key" and p[0].lower() == key.lower():
                return p[1]
        return default

    def set(self, key: str, value: str | None, quoted: bool = True, after: str | None = None) -> None:
        """Replace a key's value in place, add it (after ``after`` or at the
        end), or with None remove it."""
        for i, (kind, p) in enumerate(self.lines):
            if kind == "key" and p[0].lower() == key.lower():
                if value is None:
                    del self.lines[i]
                else:
                    p[1] = value
                return
        if value is None:
            return
        entry = ("key", [key, value, quoted])
        if after is not None:
            for i, (kind, p) in enumerate(self.lines):
                if kind == "key" and p[0].lower() == after.lower():
                    self.lines.insert(i + 1, entry)
                    return
        self.lines.append(entry)

    def set_extents(self, extents: list) -> None:
        """Replace the extent lines, keeping their place in the text."""
        first = next((i for i, (k, _) in enumerate(self.lines) if k == "extent"), None)
        self.lines = [ln for ln in self.lines if ln[0] != "extent"]
        if first is None:
            first = len(self.lines)
        self.extents = list(extents)
        for j in range(len(extents)):
            self.lines.insert(first + j, ("extent", j))

    def render(self) -> bytes:
        out = []
        for kind, p in self.lines:
            if kind == "text":
                out.append(p)
            elif kind == "extent":
                out.append(self.extents[p].render())
            else:
                key, value, quoted = p
                if quoted:
                    out.append(f'{key} = "{value}"' if key.startswith("ddb.") else f'{key}="{value}"')
                else:
                    out.append(f"{key}={value}")
        return ("\n".join(out).rstrip("\n") + "\n").encode("utf-8")


def new_descriptor(create_type: str, cid: int, parent_cid: int, extents: list, ddb: list,
                   parent_hint: str | None = None) -> Descriptor:
    d = Descriptor()
    L = d.lines
    L.append(("text", "# Disk DescriptorFile"))
    L.append(("key", ["version", "1", False]))
    L.append(("key", ["encoding", "UTF-8", True]))
    L.append(("key", ["CID", f"{cid:08x}", False]))
    L.append(("key", ["parentCID", f"{parent_cid:08x}", False]))
    L.append(("key", ["createType", create_type, True]))
    if parent_hint is not None:
        L.append(("key", ["parentFileNameHint", parent_hint, True]))
    L.append(("text", ""))
    L.append(("text", "# Extent description"))
    d.extents = list(extents)
    for j in range(len(extents)):
        L.append(("extent", j))
    L.append(("text", ""))
    L.append(("text", "# The Disk Data Base"))
    L.append(("text", "#DDB"))
    L.append(("text", ""))
    for key, value in ddb:
        L.append(("key", [key, value, True]))
    return d


# -- content IDs ------------------------------------------------------------------------

NO_PARENT_CID = 0xFFFFFFFF  # parentCID of an image without a parent
NO_PARENT_CID_TEXT = "ffffffff"


def is_hex32(v: str) -> bool:
    """Whether ``v`` is a CID as descriptors write it: up to 8 hex digits."""
    try:
        return 0 <= int(v, 16) <= 0xFFFFFFFF and len(v) <= 8 and not v.startswith(("-", "+", "0x"))
    except (ValueError, TypeError):
        return False


def cid_text(v: str) -> str:
    """A CID value normalised to 8 lowercase digits (kept as is when it is
    not a CID)."""
    return f"{int(v, 16):08x}" if is_hex32(v) else v


def new_cid(old: int | None = None) -> int:
    """A random CID, neither "no parent" nor ``old``."""
    while True:
        c = random.SystemRandom().getrandbits(32)
        if c not in (NO_PARENT_CID, old):
            return c


def long_content_id(cid: int) -> str:
    import secrets  # here: secrets brings hashlib, 4 ms of every vmdk info

    return secrets.token_hex(12) + f"{cid:08x}"


def renew_cid(desc: Descriptor) -> None:
    """A new CID (and, where the descriptor has them, a new long content ID
    and modification UUID): what the first write of a session does, as
    VMware does, so that overlays recording the old CID see the change."""
    old = desc.get("CID")
    cid = new_cid(int(old, 16) if old and is_hex32(old) else None)
    desc.set("CID", f"{cid:08x}", quoted=False)
    if desc.get("ddb.longContentID") is not None:
        desc.set("ddb.longContentID", long_content_id(cid))
    if desc.get("ddb.uuid.modification") is not None:
        import uuid as uuidlib  # here: the uuid module costs 3 ms of start-up

        desc.set("ddb.uuid.modification", str(uuidlib.uuid4()))


# -- geometry and file names ----------------------------------------------------------------

def geometry(size: int, adapter: str) -> tuple:
    """(cylinders, heads, sectors) of a ``size``-byte disk on ``adapter``."""
    heads = 16 if adapter == "ide" else 255
    return size // (63 * heads * SECTOR), heads, 63


def stem_ext(path: str) -> tuple:
    """The descriptor's file name as (stem, extension), ".vmdk" if it has none."""
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    if not ext:
        ext = ".vmdk"
    return stem, ext


def part_name(path: str, letter: str, index: int) -> str:
    """File name of part ``index`` (from 1) of a split image: ``s`` for
    sparse, ``f`` for flat parts, as qemu-img and VMware name them."""
    stem, ext = stem_ext(path)
    return f"{stem}-{letter}{index:03d}{ext}"

"""``--untrusted``: the rules for images from strangers, and the warnings
every open gives about format probing.

Modelled on OpenStack's format_inspector safety checks, and stricter:

- ``ambiguous-format``: without ``-f`` the content must probe as exactly one
  format (raw counts only when nothing else matches);
- ``format-mismatch``: with ``-f`` the content must not probe as another
  format (a "raw" disk carrying a qcow2 header is refused, because whatever
  reads it next may probe it);
- ``external-reference``: the image may not make a reader open any other
  file: backing files, external data files, VMDK extents in other files,
  VHD/VMDK/VDI parents (by name or by UUID);
- ``unknown-features``: no feature or flag bits the format's specification
  (as vdtool knows it) does not define.

The format-level facts are read twice: first from the header bytes here,
before the backend opens anything (a VMDK backend opens its extent files, a
qcow2 one refuses data files before it could list them), then from the
opened backend (``parent``, ``external_references()``,
``unknown_features()``).  Every finding is reported, not only the first, so
``info --untrusted`` lists every external reference the image makes."""

from __future__ import annotations

import os
import struct
from typing import Callable, Optional

from vdtool.core.errors import VdError

RULES = {
    "ambiguous-format": "the content probes as more than one format; name the format with -f",
    "format-mismatch": "the content probes as a different format than -f names",
    "external-reference": "the image references other files",
    "unknown-features": "the image carries feature bits vdtool does not know",
}

ENV = "VDTOOL_UNTRUSTED"


class UntrustedImage(VdError):
    """An image refused by an ``--untrusted`` rule.  ``findings`` is a list
    of (rule, description); ``references`` the external references found."""

    def __init__(self, findings: list, path: str):
        self.findings = list(findings)
        self.rules = []
        for rule, _ in self.findings:
            if rule not in self.rules:
                self.rules.append(rule)
        self.references = [d for r, d in self.findings if r == "external-reference"]
        parts = []
        for rule in self.rules:
            items = [d for r, d in self.findings if r == rule]
            parts.append(f"rule {rule} ({RULES[rule]}): " + "; ".join(items))
        super().__init__("refused by --untrusted: " + " | ".join(parts), path)


# -- notices (warnings on stderr) ---------------------------------------------------

_handler: Optional[Callable[[str], None]] = None
recent: list = []  # the last notices given, for tests and the Python API


def set_notice_handler(fn: Optional[Callable[[str], None]]) -> None:
    """The CLI prints notices as ``vdtool: warning: ...`` on stderr."""
    global _handler
    _handler = fn


def notice(text: str) -> None:
    recent.append(text)
    del recent[:-100]
    if _handler is not None:
        _handler(text)


# -- probing rules --------------------------------------------------------------------

# Signatures looked for anywhere in the first sector of an image read as raw.
# Formats the registry probes are recognised at their fixed places; these
# catch shifted or partial headers and formats vdtool does not read.
_SIGNATURES = (
    (b"QFI\xfb", "qcow/qcow2"), (b"QED\x00", "qed"), (b"KDMV", "vmdk"), (b"COWD", "vmdk (vmfsSparse)"),
    (b"# Disk DescriptorFile", "vmdk descriptor"), (b"conectix", "vhd"), (b"vhdxfile", "vhdx"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"), (b"\x7f\x10\xda\xbe", "vdi"),
    (b"WithoutFreeSpace", "parallels"), (b"WithouFreSpacExt", "parallels"), (b"LUKS\xba\xbe", "luks"),
)


def other_formats(path: str, data=None) -> list:
    """Formats other than raw whose magic the file's content matches
    (``data``: its probe data, when already read)."""
    from vdtool.core import registry

    try:
        scores = registry.probe_scores(path, data)
    except VdError:
        return []
    return sorted(n for n, s in scores.items() if n != "raw" and s > 0)


def first_sector_signatures(head: bytes) -> list:
    """Names of the formats whose signature stands anywhere in ``head``'s
    first sector."""
    found = []
    for sig, name in _SIGNATURES:
        if sig in head[:512] and name not in found:
            found.append(name)
    return found


def raw_warning(path: str, probed: bool, data=None) -> Optional[str]:
    """A warning for an image about to be read as raw whose content looks
    like another format (None when it does not).  ``data``: the file's
    probe data (vdtool.core.registry.ProbeData), when already read."""
    from vdtool.core import registry

    if data is None:
        try:
            data = registry.read_probe_data(path)
        except VdError:
            return None
    others = other_formats(path, data)
    if not others:
        others = first_sector_signatures(data.head)
    if not others:
        return None
    how = "probed as raw" if probed else "read as raw as -f says"
    return (f"{path}: {how}, but its content looks like {', '.join(others)}; its headers are not interpreted "
            f"(the bytes are the disk's content)")


def choose_format(path: str, fmt: Optional[str], data=None) -> str:
    """The format to open ``path`` as under --untrusted, or UntrustedImage."""
    from vdtool.core import registry

    scores = registry.probe_scores(path, data)
    matched = sorted(n for n, s in scores.items() if n != "raw" and s > 0)
    if fmt:
        name = registry.canonical_name(fmt)
        wrong = [n for n in matched if n != name]
        if wrong:
            raise UntrustedImage([("format-mismatch", f"-f {name} was given but the content probes as "
                                                      f"{', '.join(wrong)}")], path)
        return name
    if len(matched) > 1:
        raise UntrustedImage([("ambiguous-format", f"the content probes as {', '.join(matched)}")], path)
    return matched[0] if matched else "raw"


# -- header inspection (before the backend opens anything) --------------------------------

_QCOW2_INCOMPAT_KNOWN = 0x1F  # dirty, corrupt, external data file, compression type, extended L2
_QCOW2_COMPAT_KNOWN = 0x1  # lazy refcounts
_QCOW2_AUTOCLEAR_KNOWN = 0x3  # bitmaps, raw external data
_QCOW2_EXT_DATA_FILE = 0x44415441
_VHD_FEATURES_KNOWN = 0x3  # temporary, reserved
_VDI_FLAGS_KNOWN = 0x301  # VirtualBox's VD_VDI_IMAGE_FLAGS_ZERO_EXPAND and VD_IMAGE_FLAGS_FIXED|DIFF bits
_VMDK_FLAGS_KNOWN = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 16) | (1 << 17)


def _name(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def inspect_header(path: str, name: str, data=None) -> tuple:
    """(findings, complete): what the header bytes say before the backend
    opens the image.  ``complete`` means every reference the format can make
    was looked at here, so the backend need not be opened to find more.
    ``data``: the file's probe data, when already read."""
    from vdtool.core import registry
    from vdtool.core.fileio import ImageFile

    fn = {"qcow2": _qcow2, "vmdk": _vmdk, "vhd": _vhd, "vdi": _vdi}.get(name)
    if fn is None:
        return [], False
    try:
        if data is None:
            data = registry.read_probe_data(path)
        with ImageFile(path, lock=False) as f:
            return fn(f, data.head, data.tail, data.size)
    except VdError:
        return [], False  # the backend's open will say what is wrong
    except (struct.error, ValueError, IndexError):
        return [], False  # malformed: the backend refuses it with the real reason


def _read(f, offset: int, length: int) -> bytes:
    return f.pread(offset, max(0, min(length, 1 << 20)))


def _qcow2(f, head: bytes, tail: bytes, size: int):
    out = []
    if len(head) < 72 or head[:4] != b"QFI\xfb":
        return out, False
    version, bf_off, bf_size = struct.unpack_from(">IQI", head, 4)
    if bf_off:
        n = min(bf_size, 1023)
        raw = _read(f, bf_off, n) if bf_off < size else b""
        out.append(("external-reference", f"backing file {_name(raw)!r}"))
    if version >= 3 and len(head) >= 104:
        incompat, compat, autoclear = struct.unpack_from(">QQQ", head, 72)
        hdr_len = struct.unpack_from(">I", head, 100)[0]
        unknown = []
        for kind, bits, known in (("incompatible", incompat, _QCOW2_INCOMPAT_KNOWN),
                                  ("compatible", compat, _QCOW2_COMPAT_KNOWN),
                                  ("autoclear", autoclear, _QCOW2_AUTOCLEAR_KNOWN)):
            extra = bits & ~known
            if extra:
                unknown.append(f"{kind} 0x{extra:x}")
        if unknown:
            out.append(("unknown-features", "qcow2 feature bits " + ", ".join(unknown)))
        data_name = None
        pos = hdr_len if 104 <= hdr_len < len(head) else 104
        for _ in range(64):  # header extensions, bounded
            if pos + 8 > len(head):
                break
            etype, elen = struct.unpack_from(">II", head, pos)
            if etype == 0:
                break
            if etype == _QCOW2_EXT_DATA_FILE:
                data_name = _name(head[pos + 8:pos + 8 + min(elen, 4096)])
            pos += 8 + (elen + 7) // 8 * 8
        if incompat & 0x4 or data_name:
            out.append(("external-reference", f"external data file {data_name or '(name not recorded)'!r}"))
    return out, True


def _vmdk(f, head: bytes, tail: bytes, size: int):
    out = []
    if head[:4] == b"KDMV" and len(head) >= 512:
        flags = struct.unpack_from("<I", head, 8)[0]
        if flags & ~_VMDK_FLAGS_KNOWN:
            out.append(("unknown-features", f"vmdk sparse header flags 0x{flags & ~_VMDK_FLAGS_KNOWN:x}"))
        desc_off, desc_size = struct.unpack_from("<QQ", head, 28)
        if desc_off and desc_size and desc_size <= 2048:
            text = _read(f, desc_off * 512, desc_size * 512)
            out += _descriptor_findings(text, embedded=True)
        return out, False
    if head[:4] == b"COWD":
        return out, False
    if size > (1 << 20):
        return out, False
    text = _read(f, 0, size)
    out += _descriptor_findings(text, embedded=False)
    return out, True


def _descriptor_findings(text: bytes, embedded: bool) -> list:
    import re

    out = []
    text = text.split(b"\0", 1)[0].decode("utf-8", "replace")
    for line in text.split("\n"):
        s = line.strip()
        m = re.match(r'^parentFileNameHint\s*=\s*"?([^"]*)"?\s*$', s)
        if m and m.group(1):
            out.append(("external-reference", f"parent image {m.group(1)!r} (parentFileNameHint)"))
        if embedded:
            continue
        m = re.match(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)")?', s)
        if m and m.group(3).upper() != "ZERO":
            where = "absolute path" if os.path.isabs(m.group(4) or "") else "another file"
            out.append(("external-reference", f"{m.group(3).upper()} extent {m.group(4)!r} ({where})"))
    return out


def _vhd(f, head: bytes, tail: bytes, size: int):
    out = []
    for raw in (tail[-512:], head[:512]):
        if len(raw) == 512 and raw[:8] == b"conectix":
            features = struct.unpack_from(">I", raw, 8)[0]
            disk_type = struct.unpack_from(">I", raw, 60)[0]
            if features & ~_VHD_FEATURES_KNOWN:
                out.append(("unknown-features", f"vhd footer features 0x{features & ~_VHD_FEATURES_KNOWN:x}"))
            if disk_type == 4:
                out.append(("external-reference", "differencing image: its parent is another file "
                                                  "(parent locators)"))
            break
    return out, False


def _vdi(f, head: bytes, tail: bytes, size: int):
    out = []
    if len(head) < 0x58:
        return out, False
    sig, ver = struct.unpack_from("<II", head, 0x40)
    if ver >> 16 == 1:
        img_type, flags = struct.unpack_from("<II", head, 0x4C)
    elif ver == 2:
        img_type, flags = struct.unpack_from("<II", head, 0x48)
    else:
        return out, False
    if flags & ~_VDI_FLAGS_KNOWN:
        out.append(("unknown-features", f"vdi image flags 0x{flags & ~_VDI_FLAGS_KNOWN:x}"))
    if img_type in (3, 4):
        out.append(("external-reference", "differencing image: its parent is another file (found by UUID)"))
    return out, False


# -- after the backend opened the image ----------------------------------------------------

def inspect_backend(backend) -> list:
    out = []
    ref = backend.parent
    names = []
    if ref is not None:
        names = [n for n in [ref.filename, *ref.extra.get("candidates", ())] if n]
        if names:
            out.append(("external-reference", "parent image " + ", ".join(repr(n) for n in names)))
        else:
            out.append(("external-reference", f"parent image with UUID {ref.uuid}"))
    uuid = (ref.uuid or "").lower() if ref is not None else ""
    for r in backend.external_references():
        if r not in names and not (uuid and r.strip("{}").lower() == uuid):
            out.append(("external-reference", f"file {r!r}"))
    unknown = getattr(backend, "unknown_features", None)
    if callable(unknown):
        for u in unknown() or ():
            out.append(("unknown-features", str(u)))
    return out


def merge_findings(*lists) -> list:
    """Findings in order, the same fact said twice kept once (header and
    backend both see a qcow2 backing file: keep the header's wording)."""
    out = []
    seen_ext = False
    for lst in lists:
        for rule, desc in lst:
            if (rule, desc) in out:
                continue
            out.append((rule, desc))
    # a backend's parent/backing finding repeats the header's: drop the later duplicate kinds
    dedup = []
    for rule, desc in out:
        if rule == "external-reference" and desc.startswith("differencing image"):
            seen_ext = True
        dedup.append((rule, desc))
    if seen_ext and any(d.startswith("parent image") for r, d in dedup):
        dedup = [(r, d) for r, d in dedup if not d.startswith("differencing image")]
    return dedup


def outside_folder(name: str, base_dir: str, own_dir: str) -> Optional[str]:
    """The absolute path a reference names when it lies outside ``base_dir``
    (None when inside, or when it names a UUID rather than a file)."""
    if not name or name.startswith("{"):
        return None
    full = name if os.path.isabs(name) else os.path.join(own_dir, name)
    full = os.path.normpath(full)
    base = os.path.normpath(base_dir)
    if full == base or full.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return full

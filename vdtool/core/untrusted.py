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


# -- notices (warnings on stderr): kept in notices.py, named here too -----------------

from vdtool.core.notices import notice, recent, set_notice_handler  # noqa: E402,F401


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


def raw_warning(path: str, probed: bool, data=None) -> str | None:
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


def choose_format(path: str, fmt: str | None, data=None) -> str:
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

def inspect_header(path: str, name: str, data=None) -> tuple:
    """(findings, complete): what the header bytes say before the backend
    opens the image (each format's layout module reads its own header:
    ``inspect_untrusted``).  ``complete`` means every reference the format
    can make was looked at here, so the backend need not be opened to find
    more.  ``data``: the file's probe data, when already read."""
    from vdtool.core import registry
    from vdtool.core.fileio import open_file

    if name not in registry.LAYOUTS:
        return [], False
    layout = registry.layout_module(name)
    try:
        if data is None:
            data = registry.read_probe_data(path)
        with open_file(path, lock=False) as f:
            def read(offset: int, length: int) -> bytes:
                # names and descriptors only: bounded however large the header says they are
                return f.pread(offset, max(0, min(length, 1 << 20)))

            return layout.inspect_untrusted(data.head, data.tail, data.size, read)
    except VdError:
        return [], False  # the backend's open will say what is wrong
    except (struct.error, ValueError, IndexError):
        return [], False  # malformed: the backend refuses it with the real reason


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


def outside_folder(name: str, base_dir: str, own_dir: str) -> str | None:
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

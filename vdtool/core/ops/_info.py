"""info: what an image is, in qemu-img's JSON key names where they apply."""

from __future__ import annotations

import os

from vdtool.core.fileio import is_url
from vdtool.core.registry import canonical_name, qemu_driver_name
from vdtool.core.stack import check_parent_identity, open_image


def image_info(layer, parent_path: str | None = None, parent_found: bool | None = None,
               shown_name: str | None = None) -> dict:
    """One image's facts under qemu-img's keys (same names, types and values
    where qemu-img reports the same fact), vdtool's own keys beside them.
    ``shown_name``: the file name as qemu-img shows it (as given on the
    command line, or as the child's full-backing-filename)."""
    name = shown_name or layer.path
    d: dict = {
        "filename": name,
        # qemu-img's driver name (vpc for VHD), which vdtool's -f takes too
        "format": qemu_driver_name(layer.name),
        "virtual-size": layer.virtual_size,
    }
    if not is_url(layer.path):
        d["actual-size"] = layer.actual_size()  # a server does not say (qemu-img leaves it out too)
    if layer.block_size and layer.name != "raw":
        d["cluster-size"] = layer.block_size
    specific = dict(layer.info() or {})
    dirty = specific.pop("dirty-flag", None)
    snapshots = specific.pop("snapshots", None)
    if snapshots:
        d["snapshots"] = snapshots  # qemu-img lists them at the top level
    variant = layer.variant
    if variant:
        d["variant"] = variant
    if layer.uuid:
        d["uuid"] = layer.uuid
    ref = layer.parent
    if ref is not None:
        _parent_keys(d, layer, ref, name, parent_path, parent_found)
    refs = layer.external_references()
    if refs:
        d["external-references"] = refs
    d["dirty-flag"] = bool(dirty)  # qemu-img always reports it
    if specific:
        d["format-specific"] = {"type": layer.name, "data": specific}
    return d


def _parent_keys(d: dict, layer, ref, name: str, parent_path: str | None, parent_found: bool | None) -> None:
    if ref.filename:
        d["backing-filename"] = ref.filename
        d["full-backing-filename"] = full_backing_name(name, ref.filename)
    if ref.format:
        d["backing-filename-format"] = ref.format
    if ref.uuid:
        d["parent-uuid"] = ref.uuid
        if not ref.filename and parent_path:
            # named by UUID only (VDI): say where it was found
            d["full-backing-filename"] = parent_path
    if ref.filename and parent_path and os.path.abspath(parent_path) != os.path.abspath(d["full-backing-filename"]):
        d["parent-path"] = parent_path  # found elsewhere (--parent-search, a VHD locator...)
    if parent_found is not None:
        d["parent-found"] = parent_found


def full_backing_name(child_name: str, backing: str) -> str:
    """The parent's name as qemu-img shows it: an absolute name as is, a
    relative one joined to the folder of the child's name as given."""
    if is_url(child_name) or is_url(backing):
        from urllib.parse import urljoin  # what urlnames opens; a local name shown as qemu-img joins it

        return urljoin(child_name, backing) if is_url(child_name) and not os.path.isabs(backing) else backing
    if os.path.isabs(backing):
        return backing
    folder = os.path.dirname(child_name)
    return os.path.join(folder, backing) if folder else backing


def info(path: str, fmt: str | None = None, *, chain: bool = False, parent_search=(),
         force: bool = False, untrusted: bool = False, force_share: bool = False):
    """One image's facts (a dict), or with ``chain`` a list of them from
    ``path`` down to the base image, as ``qemu-img info --backing-chain``."""
    stack = open_image(path, fmt, parent_search=parent_search, force=force, allow_mismatch=True,
                       allow_missing_parent=True,
                       chain=True, untrusted=untrusted, force_share=force_share)
    try:
        layers = list(reversed(stack.layers))  # top first
        out = []
        shown = path
        for i, layer in enumerate(layers):
            below = layers[i + 1] if i + 1 < len(layers) else None
            found = None
            if layer.parent is not None:
                found = below is not None
            d = image_info(layer, below.path if below is not None else None, found, shown)
            mismatch = check_parent_identity(layer, below, layer.parent) if below is not None else None
            if mismatch:
                d["parent-mismatch"] = mismatch
                if layer.parent.uuid and below.uuid and layer.parent.uuid.lower() != below.uuid.lower():
                    d["parent-uuid-mismatch"] = below.uuid
            if found is False and stack.missing_reason:
                d["parent-problem"] = stack.missing_reason
            if i == 0 and stack.warnings:
                d["warnings"] = list(stack.warnings)
            out.append(d)
            if not chain:
                break
            shown = d.get("full-backing-filename") or (below.path if below is not None else None)
        return out if chain else out[0]
    finally:
        stack.close()


def human_lines(d: dict) -> list:
    """Text rendering of one image's info."""
    from vdtool.core.sizes import format_size

    lines = [f"image: {d['filename']}", f"file format: {canonical_name(d['format'])}"]
    if "variant" in d:
        lines.append(f"variant: {d['variant']}")
    lines.append(f"virtual size: {format_size(d['virtual-size'])} ({d['virtual-size']} bytes)")
    lines.append(f"disk size: {format_size(d['actual-size']) if 'actual-size' in d else 'unavailable'}")
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if "uuid" in d:
        lines.append(f"uuid: {d['uuid']}")
    if "backing-filename" in d:
        lines.append(f"backing file: {d['backing-filename']}"
                     + (f" (actual path: {d['full-backing-filename']})"
                        if d.get("full-backing-filename") != d["backing-filename"] else ""))
    if "backing-filename-format" in d:
        lines.append(f"backing file format: {d['backing-filename-format']}")
    if "parent-uuid" in d:
        lines.append(f"parent uuid: {d['parent-uuid']}")
        if "backing-filename" not in d and d.get("full-backing-filename"):
            lines.append(f"parent found at: {d['full-backing-filename']}")
    if d.get("parent-found") is False:
        lines.append(f"parent: NOT FOUND ({d.get('parent-problem', 'missing')})")
    if "parent-path" in d:
        lines.append(f"parent found at: {d['parent-path']}")
    if "parent-mismatch" in d:
        lines.append(f"parent: MISMATCH ({d['parent-mismatch']})")
    if d.get("dirty-flag"):
        lines.append("dirty flag: yes")
    if d.get("snapshots"):
        from vdtool.core.ops._snapshot import snapshot_table

        lines += snapshot_table(d["snapshots"])  # qemu-img info shows qemu-img snapshot -l's table
    spec = d.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for key, value in spec["data"].items():
            lines += _nested_lines(key, value, 4)
    if d.get("external-references"):
        lines.append("external references: " + ", ".join(d["external-references"]))
    return lines


def _nested_lines(key, value, indent: int) -> list:
    """qemu-img's layout for nested format-specific data: lists as [i]:
    entries, dicts as indented key: value lines."""
    pad = " " * indent
    if isinstance(value, dict):
        out = [f"{pad}{key}:"]
        for k, v in value.items():
            out += _nested_lines(k, v, indent + 4)
        return out
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (dict, list, tuple)) for v in value):
        out = [f"{pad}{key}:"]
        for i, v in enumerate(value):
            out += _nested_lines(f"[{i}]", v, indent + 4)
        return out
    if isinstance(value, (list, tuple)):
        return [f"{pad}{key}: {', '.join(str(_fmt_value(v)) for v in value)}"]
    return [f"{pad}{key}: {_fmt_value(value)}"]


def _fmt_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return v

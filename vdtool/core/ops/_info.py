"""info: what an image is, in qemu-img's JSON key names where they apply."""

from __future__ import annotations

from typing import Optional

from vdtool.core.stack import open_image, resolve_parent_path


def image_info(layer, parent_path: Optional[str] = None, parent_found: Optional[bool] = None) -> dict:
    d: dict = {
        "filename": layer.path,
        "format": layer.name,
        "virtual-size": layer.virtual_size,
        "actual-size": layer.actual_size(),
    }
    if layer.block_size and layer.name != "raw":
        d["cluster-size"] = layer.block_size
    specific = dict(layer.info() or {})
    dirty = specific.pop("dirty-flag", None)
    variant = layer.variant
    if variant:
        d["variant"] = variant
    if layer.uuid:
        d["uuid"] = layer.uuid
    ref = layer.parent
    if ref is not None:
        if ref.filename:
            d["backing-filename"] = ref.filename
            d["full-backing-filename"] = parent_path or resolve_parent_path(layer.path, ref) or ref.filename
        if ref.format:
            d["backing-filename-format"] = ref.format
        if ref.uuid:
            d["parent-uuid"] = ref.uuid
            if not ref.filename and parent_path:
                # named by UUID only (VDI): say where it was found
                d["full-backing-filename"] = parent_path
        if parent_found is not None:
            d["parent-found"] = parent_found
    refs = layer.external_references()
    if refs:
        d["external-references"] = refs
    if dirty is not None:
        d["dirty-flag"] = bool(dirty)
    if specific:
        d["format-specific"] = {"type": layer.name, "data": specific}
    return d


def info(path: str, fmt: Optional[str] = None, *, chain: bool = False, parent_search=(),
         force: bool = False, untrusted: bool = False, force_share: bool = False) -> dict:
    """One image's facts, or with ``chain`` ``{"chain": [top, ..., base]}``."""
    stack = open_image(path, fmt, parent_search=parent_search, force=force, allow_mismatch=True,
                       allow_missing_parent=True,
                       chain=True, untrusted=untrusted, force_share=force_share)
    try:
        layers = list(reversed(stack.layers))  # top first
        out = []
        for i, layer in enumerate(layers):
            below = layers[i + 1] if i + 1 < len(layers) else None
            found = None
            if layer.parent is not None:
                found = below is not None
            d = image_info(layer, below.path if below is not None else None, found)
            if below is not None and layer.parent and layer.parent.uuid and below.uuid \
                    and layer.parent.uuid != below.uuid:
                d["parent-uuid-mismatch"] = below.uuid
            if found is False and stack.missing_reason:
                d["parent-problem"] = stack.missing_reason
            if i == 0 and stack.warnings:
                d["warnings"] = list(stack.warnings)
            out.append(d)
            if not chain:
                break
        if chain:
            return {"chain": out}
        return out[0]
    finally:
        stack.close()


def human_lines(d: dict) -> list:
    """Text rendering of one image's info."""
    from vdtool.core.sizes import format_size

    lines = [f"image: {d['filename']}", f"file format: {d['format']}"]
    if "variant" in d:
        lines.append(f"variant: {d['variant']}")
    lines.append(f"virtual size: {format_size(d['virtual-size'])} ({d['virtual-size']} bytes)")
    lines.append(f"disk size: {format_size(d['actual-size'])}")
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
    if "parent-uuid-mismatch" in d:
        lines.append(f"parent: UUID MISMATCH (found {d['parent-uuid-mismatch']})")
    if d.get("dirty-flag"):
        lines.append("dirty flag: yes")
    spec = d.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for key, value in spec["data"].items():
            if key == "snapshots":
                continue
            lines += _nested_lines(key, value, 4)
        snaps = spec["data"].get("snapshots")
        if snaps:
            lines.append("Snapshot list:")
            lines.append(f"{'ID':<8}{'TAG':<20}{'VM SIZE':>10}  {'DATE':<20}")
            import time

            for s in snaps:
                date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("date-sec", 0)))
                lines.append(f"{str(s.get('id', '')):<8}{str(s.get('name', '')):<20}"
                             f"{format_size(s.get('vm-state-size', 0)):>10}  {date}")
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

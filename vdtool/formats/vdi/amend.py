"""vdi amend: the image UUID and the parent UUID a differencing image
records (VBoxManage internalcommands sethduuid / sethdparentuuid).

Only the header changes (one write, then a flush); the modification UUID
stays, as VBoxManage leaves it.  Children that recorded the old image UUID
no longer find this image as their parent."""

from __future__ import annotations

from vdtool.core.errors import NotSupported, UsageError
from vdtool.formats.vdi.layout import NULL_UUID, parse_uuid, uuid_str
from vdtool.formats.vdi.metadata import begin_write, sync


def _uuid(key: str, value, path: str) -> bytes:
    try:
        raw = parse_uuid(str(value))
    except UsageError:
        raw = NULL_UUID
    if raw == NULL_UUID:
        raise UsageError(f"vdi amend option {key}: {value!r} is not a UUID (expected the form "
                         f"01234567-89ab-cdef-0123-456789abcdef, not the nil UUID)", path)
    return raw


def amend(state, opts: dict) -> list:
    hdr = state.hdr
    new = {}
    if "uuid" in opts:
        new["uuidCreate"] = ("uuid", _uuid("uuid", opts["uuid"], state.path))
    if "parent_uuid" in opts:
        if not state.is_diff:
            raise NotSupported("parent_uuid", "vdi", state.path, "the image is not a differencing image")
        new["uuidLinkage"] = ("parent_uuid", _uuid("parent_uuid", opts["parent_uuid"], state.path))
    changes = []
    for field, (key, raw) in new.items():
        old = getattr(hdr, field)
        if raw != old:
            changes.append((key, uuid_str(old), uuid_str(raw)))
    if not changes:
        return []
    begin_write(state, content=False)
    for field, (_, raw) in new.items():
        setattr(hdr, field, raw)
    state.hdr_dirty = True
    sync(state)
    return changes

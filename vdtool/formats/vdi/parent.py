"""A differencing VDI's parent: named by UUID (uuidLinkage) with the
parent's modification UUID at link time (uuidParentModify), and, where the
parent has no UUID of its own (qcow2, raw), by the name vdtool keeps beside
the header (layout's hint)."""

from __future__ import annotations

from vdtool.core.backend import ParentRef, ParentSpec
from vdtool.core.errors import NotSupported, UsageError
from vdtool.formats.vdi.layout import (HINT, HINT_OFFSET, MAX_HINT_NAME, NULL_UUID, VDI_IMAGE_TYPE_DIFF,
                                       VDI_IMAGE_TYPE_NORMAL, VDI_IMAGE_TYPE_UNDO, VDI_IMAGE_VERSION_OLD,
                                       encode_hint, hint_room, parse_uuid, random_uuid, uuid_str)
from vdtool.formats.vdi.metadata import sync
from vdtool.formats.vdi.state import VdiState


def parent_ref(state: VdiState) -> ParentRef | None:
    if not state.is_diff:
        return None
    hdr = state.hdr
    extra: dict = {}
    pmod = None
    if hdr.uuidParentModify != NULL_UUID:
        pmod = uuid_str(hdr.uuidParentModify)
        extra["expect"] = {"modification_uuid": pmod}
    if state.hint is not None:
        return ParentRef(filename=state.hint, uuid=None if state.hint_synthetic else uuid_str(hdr.uuidLinkage),
                         modification_uuid=pmod, extra=extra)
    return ParentRef(filename=None, uuid=uuid_str(hdr.uuidLinkage), modification_uuid=pmod, extra=extra)


def external_references(state: VdiState) -> list:
    if not state.is_diff:
        return []
    if state.hint is not None:
        return [state.hint]
    return ["{" + uuid_str(state.hdr.uuidLinkage) + "}"]


def _uuid_or_none(text: str | None) -> bytes | None:
    """A parent's UUID as VDI stores it; None when it has none (or not one
    that parses)."""
    if not text:
        return None
    try:
        return parse_uuid(text)
    except UsageError:
        return None


def write_parent(state: VdiState, parent: ParentSpec | None) -> None:
    """Record ``parent`` (None: the image stands alone from now on) and
    write the header."""
    hdr = state.hdr
    hint = None
    synthetic = False
    if parent is None:
        if hdr.u32Type in (VDI_IMAGE_TYPE_DIFF, VDI_IMAGE_TYPE_UNDO):
            hdr.u32Type = VDI_IMAGE_TYPE_NORMAL
        hdr.uuidLinkage = NULL_UUID
        hdr.uuidParentModify = NULL_UUID
    else:
        if state.version == VDI_IMAGE_VERSION_OLD:
            raise NotSupported("recording a parent", "vdi", state.path, "VDI 0.2 headers have no room for it")
        puuid = _uuid_or_none(parent.uuid)
        if puuid is None or puuid == NULL_UUID:
            # the parent has no UUID of its own (qcow2, raw): keep its name beside the header
            hint, synthetic = parent.recorded_name, True
            puuid = random_uuid()
        hdr.u32Type = VDI_IMAGE_TYPE_DIFF
        hdr.uuidLinkage = puuid
        hdr.uuidParentModify = _uuid_or_none(parent.modification_uuid) or NULL_UUID
    store_hint(state, hint, synthetic)
    state.hdr_dirty = True
    sync(state)


def store_hint(state: VdiState, name: str | None, synthetic: bool) -> None:
    """Write (or, with None, wipe) the parent-name hint."""
    if not state.v1:
        return
    room = hint_room(state.hdr.offBlocks)
    old = len(state.hint.encode("utf-8")) if state.hint is not None else 0
    if name is None:
        if state.hint is not None and room >= 0:
            state.file.pwrite(HINT_OFFSET, bytes(HINT.size + old))
        state.hint = None
        state.hint_synthetic = False
        return
    raw = name.encode("utf-8")
    if len(raw) > MAX_HINT_NAME or len(raw) > room:
        raise NotSupported("recording this parent", "vdi", state.path,
                           f"it has no UUID and its {len(raw)}-byte name does not fit before the block map")
    blob = encode_hint(raw, synthetic)
    state.file.pwrite(HINT_OFFSET, blob + bytes(max(0, HINT.size + old - len(blob))))
    state.hint = name
    state.hint_synthetic = synthetic

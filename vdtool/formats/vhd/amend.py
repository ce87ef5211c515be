"""vhd amend: a new unique ID (VBoxManage internalcommands sethduuid).

The footer is rewritten with its checksum: for a fixed disk the footer at
the end, for a dynamic or differencing one the footer at the end and its
copy at offset 0 (write_footer's order), then flushed.  Children that
recorded the old unique ID no longer match this image."""

from __future__ import annotations

import uuid as uuidlib

from vdtool.core.errors import UsageError
from vdtool.formats.vhd import metadata
from vdtool.formats.vhd.layout import uuid_text


def parse_uuid(value, path: str) -> bytes:
    """A UUID as the 16 bytes a VHD stores; anything else (or the nil UUID)
    is a usage error."""
    try:
        raw = uuidlib.UUID(str(value).strip().strip("{}")).bytes
    except ValueError:
        raw = bytes(16)
    if raw == bytes(16):
        raise UsageError(f"vhd amend option uuid: {value!r} is not a UUID (expected the form "
                         f"01234567-89ab-cdef-0123-456789abcdef, not the nil UUID)", path)
    return raw


def amend(st, opts: dict) -> list:
    changes = []
    if "uuid" in opts:
        raw = parse_uuid(opts["uuid"], st.path)
        old = uuid_text(st.footer.unique_id)
        if raw != st.footer.unique_id:
            metadata.flush(st)  # what a write left pending first
            st.footer = st.footer.replace(unique_id=raw)
            metadata.write_footer(st)
            st.file.flush()
            changes.append(("uuid", old, uuid_text(raw)))
    return changes

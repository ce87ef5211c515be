"""The two VHDX headers: reading them and choosing the current one, and
the header update MS-VHDX orders (the non-current header gets the changes
and the next sequence number, then a flush makes it the current one)."""

from __future__ import annotations

from vdtool.core.errors import CorruptImageError, FormatError
from vdtool.formats.vhdx.layout import (CHECKSUM_OFFSET, FILE_IDENTIFIER, FILE_SIGNATURE, HEADER, HEADER_BYTES,
                                        HEADER_OFFSETS, current_header, random_guid)
from vdtool.formats.vhdx.crc import with_zeroed_field
from vdtool.formats.vhdx.state import VhdxState


def read_identifier(st: VhdxState) -> str:
    """The creator string of the file identifier (the signature checked)."""
    raw = st.file.pread(0, FILE_IDENTIFIER.size)
    if len(raw) < FILE_IDENTIFIER.size or raw[:8] != FILE_SIGNATURE:
        raise FormatError(f"no VHDX file identifier (signature {raw[:8]!r}, file size {st.fsize})", st.path)
    creator = FILE_IDENTIFIER.unpack(raw).Creator
    return creator.decode("utf-16-le", "replace").split("\0", 1)[0]


def read_headers(st: VhdxState) -> list:
    """Read both headers into ``st`` and choose the current one; returns the
    problems of the header that is not valid (for check).  Neither valid:
    CorruptImageError with both reasons."""
    raws = tuple(st.file.pread(off, HEADER_BYTES) for off in HEADER_OFFSETS)
    cur, problems = current_header(raws, st.fsize)
    if cur < 0:
        why = "; ".join(f"header {i + 1}: {', '.join(p)}" for i, p in enumerate(problems))
        raise CorruptImageError(f"neither VHDX header is valid ({why})", st.path)
    st.headers = [HEADER.unpack(r) if not problems[i] else None for i, r in enumerate(raws)]
    st.cur = cur
    return [(i, p) for i, p in enumerate(problems) if p]


def encode_header(hdr) -> bytes:
    """The 4 KiB header block with its checksum."""
    buf = bytearray(HEADER_BYTES)
    HEADER.pack_into(buf, 0, hdr.replace(Checksum=0))
    HEADER.pack_into(buf, 0, hdr.replace(Checksum=with_zeroed_field(buf, CHECKSUM_OFFSET)))
    return bytes(buf)


def update_header(st: VhdxState, **changes) -> None:
    """Write the current header with ``changes`` and the next sequence
    number over the non-current one, and flush: the new header becomes the
    current one only once it is on disk whole."""
    if st.hdr.SequenceNumber >= (1 << 64) - 1:
        raise CorruptImageError(f"header sequence number {st.hdr.SequenceNumber} is at its maximum; the "
                                f"headers cannot be updated", st.path)
    new = st.hdr.replace(SequenceNumber=st.hdr.SequenceNumber + 1, **changes)
    other = 1 - st.cur
    st.file.pwrite(HEADER_OFFSETS[other], encode_header(new))
    st.file.flush()
    st.headers[other] = new
    st.cur = other


def begin_modification(st: VhdxState, visible: bool) -> None:
    """Before the session's first change to the file: a new FileWriteGuid
    (MS-VHDX), and a new DataWriteGuid before the first change readers can
    see, unless the identity change is deferred (children record the
    DataWriteGuid as their parent_linkage)."""
    changes = {}
    if not st.session:
        changes["FileWriteGuid"] = random_guid()
    if visible and not st.data_renewed:
        changes["DataWriteGuid"] = random_guid()
        st.data_renewed = True
    if changes:
        update_header(st, **changes)
        st.session = True

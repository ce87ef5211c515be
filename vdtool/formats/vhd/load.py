"""Open: read and validate the footer, the dynamic disk header, the BAT and
the parent locators into a ``VhdState``.

A bad footer at the end with a good copy at offset 0 opens with the copy;
wrong checksums are accepted with ``force`` (and recorded as problems for
check and info); broken BAT entries do not stop the open (``space``)."""

from __future__ import annotations

from vdtool.core.bytesutil import U32, be_array
from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vhd.layout import (COOKIE, DYN_COOKIE, DYNAMIC_HEADER, FOOTER, FOOTER_SIZE, HEADER_SIZE,
                                       TYPE_DIFF, TYPE_FIXED, UNSUPPORTED, checksum_ok, disk_size,
                                       expected_checksum, footer_problems, has_footer_copy, header_problems,
                                       locator_entries, locator_problem, locator_space)
from vdtool.formats.vhd.locators import Locator, decode_path, decode_utf16
from vdtool.formats.vhd.space import find_bad_entries
from vdtool.formats.vhd.state import VhdState


def raise_first(problems: list, path: str) -> None:
    """Raise the first (kind, message) of a layout validation, if any."""
    if problems:
        kind, msg = problems[0]
        raise (UnsupportedFeature if kind == UNSUPPORTED else CorruptImageError)(msg, path)


def load(file: ImageFile, force: bool) -> VhdState:
    """The image's metadata, validated (VdError for what cannot be opened)."""
    st = VhdState(file, force=force)
    fsize = file.size()
    if fsize < FOOTER_SIZE:
        raise FormatError(f"file is only {fsize} bytes, too small for a VHD footer (512 bytes)", st.path)
    raw, head_raw = _choose_footer(st, fsize)
    ft = st.footer = FOOTER.unpack(raw)
    raise_first(footer_problems(ft, fsize), st.path)
    st.disk_type = ft.disk_type
    st.size = disk_size(ft)
    if st.disk_type == TYPE_FIXED:
        if ft.current_size > st.data_end:
            raise CorruptImageError(f"fixed disk of current size {ft.current_size} but the file holds only "
                                    f"{st.data_end} bytes before its footer", st.path)
        return st
    if head_raw != raw:  # the footer at the end is used; its copy is not the same
        why = "is not a VHD footer" if not has_footer_copy(head_raw) else (
            "has a wrong checksum" if not checksum_ok(head_raw, FOOTER) else "differs from the footer")
        st.problems.append(("footer-copy", f"the footer copy at offset 0 {why}"))
    hdr = _load_header(st, fsize)
    _load_bat(st)
    if st.disk_type == TYPE_DIFF:
        _load_locators(st, hdr, fsize)
    find_bad_entries(st, fsize)
    return st


def _choose_footer(st: VhdState, fsize: int) -> tuple:
    """(footer bytes, first sector); sets ``st.data_end``.  The footer at
    the end counts unless it is broken and the copy at offset 0 is good."""
    f = st.file
    end_raw = f.pread_exact(fsize - FOOTER_SIZE, FOOTER_SIZE, "VHD footer")
    end_at = fsize - FOOTER_SIZE
    if end_raw[:8] != COOKIE:
        # Virtual PC before 2004 wrote a 511-byte footer
        alt = f.pread(fsize - 511, 511)
        if alt[:8] == COOKIE:
            end_raw, end_at = alt + b"\0", fsize - 511
    head_raw = f.pread(0, FOOTER_SIZE)
    end_found = end_raw[:8] == COOKIE
    end_ok = end_found and checksum_ok(end_raw, FOOTER)
    head_is_copy = has_footer_copy(head_raw)
    head_ok = head_is_copy and checksum_ok(head_raw, FOOTER)
    if end_found and (end_ok or not head_ok or FOOTER.unpack(end_raw).disk_type == TYPE_FIXED):
        if not end_ok:
            if not st.force:
                raise CorruptImageError(
                    f"footer checksum is {FOOTER.unpack(end_raw).checksum:#010x}, expected "
                    f"{expected_checksum(end_raw, FOOTER):#010x} (--force reads it anyway)", st.path)
            st.problems.append(("footer-checksum", "footer checksum is wrong"))
        st.data_end = end_at
        return end_raw, head_raw
    if head_is_copy:
        if not head_ok and not st.force:
            raise CorruptImageError("no valid footer: the footer at the end is missing and the copy at offset 0 "
                                    "has a wrong checksum (--force reads it anyway)", st.path)
        st.data_end = fsize
        what = "has a wrong checksum" if end_found else "is missing (file truncated or not closed)"
        st.problems.append(("footer-missing", f"the footer at the end of the file {what}; "
                                              f"the copy at offset 0 was used"))
        return head_raw, head_raw
    raise FormatError(f"no VHD footer: cookie at the end is {end_raw[:8]!r}, expected {COOKIE!r}", st.path)


def _load_header(st: VhdState, fsize: int) -> Record:
    """The dynamic disk header: cookie, checksum, then its fields."""
    at = st.header_offset = st.footer.data_offset
    raw = st.file.pread_exact(at, HEADER_SIZE, "dynamic disk header")
    hdr = DYNAMIC_HEADER.unpack(raw)
    if hdr.cookie != DYN_COOKIE:
        raise CorruptImageError(f"dynamic disk header cookie at offset {at} is {hdr.cookie!r}, expected "
                                f"{DYN_COOKIE!r}", st.path)
    if not checksum_ok(raw, DYNAMIC_HEADER):
        if not st.force:
            raise CorruptImageError(f"dynamic disk header checksum is {hdr.checksum:#010x}, expected "
                                    f"{expected_checksum(raw, DYNAMIC_HEADER):#010x} (--force reads it anyway)",
                                    st.path)
        st.problems.append(("header-checksum", "dynamic disk header checksum is wrong"))
    raise_first(header_problems(hdr, st.size, at, fsize), st.path)
    st.set_block(hdr.block_size)
    st.table_offset = hdr.table_offset
    st.max_table_entries = hdr.max_table_entries
    st.parent_uid = hdr.parent_unique_id
    st.parent_ts = hdr.parent_time_stamp
    st.parent_name = decode_utf16(hdr.parent_unicode_name, "utf-16-be")
    st.locators = []
    return hdr


def _load_bat(st: VhdState) -> None:
    n = st.max_table_entries
    st.bat = be_array(st.file.pread_exact(st.table_offset, n * 4, "BAT"), U32)


def _load_locators(st: VhdState, hdr: Record, fsize: int) -> None:
    for slot, e in locator_entries(hdr):
        why = locator_problem(slot, e, st.header_offset, fsize)
        if why is not None:
            raise CorruptImageError(why, st.path)
        data = st.file.pread_exact(e.platform_data_offset, e.platform_data_length, f"parent locator {slot}")
        st.locators.append(Locator(code=e.platform_code, space=locator_space(e), length=e.platform_data_length,
                                   offset=e.platform_data_offset, path=decode_path(e.platform_code, data)))

"""Opening a VDI image: the pre-header and header read and validated, the
parent-name hint of a differencing image, the block map read and scanned."""

from __future__ import annotations

import struct

from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vdi.blockmap import BlockMap
from vdtool.formats.vdi.layout import (CORRUPT, FORMAT, HEAD_READ, MIN_FILE_SIZE, UNSUPPORTED, VDI_IMAGE_TYPE_DIFF,
                                       Hint, decode_header, decode_hint, header_problems, is_v1,
                                       preheader_problems)
from vdtool.formats.vdi.state import VdiState

_ERRORS = {FORMAT: FormatError, UNSUPPORTED: UnsupportedFeature, CORRUPT: CorruptImageError}


def _refuse(problems: list, path: str) -> None:
    """Raise the first problem as the error of its kind."""
    if problems:
        raise _ERRORS[problems[0].kind](problems[0].text, path)


def load(file: ImageFile, lenient: bool) -> VdiState:
    """The image's state, or the error that refuses it.  ``lenient`` (check,
    repair): map entries past the file are left for the check to report."""
    try:
        fsize = file.size()
        head = file.pread_exact(0, min(fsize, HEAD_READ), "VDI header") if fsize >= MIN_FILE_SIZE else b""
        _refuse(preheader_problems(head, fsize), file.path)
        version, hdr = decode_header(head)
        _refuse(header_problems(version, hdr, fsize), file.path)
        hint = _read_hint(head, version, hdr, file.path)
        state = VdiState(file, version, hdr, _read_map(file, hdr.offBlocks, hdr.cBlocks), fsize)
        if hint is not None:
            state.hint, state.hint_synthetic = hint.name, hint.synthetic
        if lenient:
            state.problems = None  # check scans anyway: not twice (see VdiState.map_problems)
        else:
            state.scan_map(lenient)
        return state
    except (struct.error, ValueError, OverflowError, IndexError, UnicodeError) as e:
        raise CorruptImageError(f"malformed VDI header ({e})", file.path) from None


def _read_hint(head: bytes, version: int, hdr: Record, path: str) -> Hint | None:
    """The parent's name that vdtool keeps beside a differencing 1.1 header."""
    if hdr.u32Type != VDI_IMAGE_TYPE_DIFF or not is_v1(version):
        return None
    hint, problem = decode_hint(head, hdr.offBlocks)
    _refuse([problem] if problem else [], path)
    return hint


def _read_map(file: ImageFile, offset: int, entries: int) -> BlockMap:
    size = 4 * entries
    raw = bytearray(size)  # read in place: a 64 TiB image has a 256 MiB map, copies cost
    if file.readinto(offset, raw) != size:
        raw = bytearray(file.pread_exact(offset, size, "block map"))  # raises: map cut short
    return BlockMap.from_disk(raw)

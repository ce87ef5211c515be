"""Opening a cloop image: the header and the offset table read and validated."""

from __future__ import annotations

from vdtool.core.bytesutil import be_array
from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.formats.cloop.layout import (CORRUPT, FORMAT, HEADER, OFFSET_SIZE, TABLE_OFFSET, UNSUPPORTED,
                                         header_problems, offset_problem)
from vdtool.formats.cloop.state import CloopState

_ERRORS = {FORMAT: FormatError, UNSUPPORTED: UnsupportedFeature, CORRUPT: CorruptImageError}


def load(file: ImageFile) -> CloopState:
    """The image's state, or the error that refuses it."""
    fsize = file.size()
    if fsize < HEADER.size:
        raise FormatError(f"file is only {fsize} bytes, too small for a cloop header", file.path)
    hdr = HEADER.unpack(file.pread_exact(0, HEADER.size, "cloop header"))
    for kind, text in header_problems(hdr, fsize):
        raise _ERRORS[kind](text, file.path)
    raw = file.pread_exact(TABLE_OFFSET, OFFSET_SIZE * (hdr.num_blocks + 1), "cloop offset table")
    offsets = be_array(raw)
    problem = offset_problem(offsets, hdr, fsize)
    if problem:
        raise CorruptImageError(problem, file.path)
    return CloopState(file, hdr, offsets)

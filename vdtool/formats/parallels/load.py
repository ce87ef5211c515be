"""Opening a Parallels image: the header read and validated, the BAT read
(its size capped by the file's) and scanned."""

from __future__ import annotations

import struct

from vdtool.core.bytesutil import le_array
from vdtool.core.errors import CorruptImageError, FormatError, ReadOnlyError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.formats.parallels.layout import (BAT_OFFSET, CORRUPT, FORMAT, HEADER, UNSUPPORTED, bat_end,
                                             header_problems)
from vdtool.formats.parallels.state import ParallelsState

_ERRORS = {FORMAT: FormatError, UNSUPPORTED: UnsupportedFeature, CORRUPT: CorruptImageError}

_WHY = {"outside": "points to offset {o}, outside the data area or past the end of the file",
        "misaligned": "points to offset {o}, not at a cluster boundary of the data area",
        "dup": "points to the cluster that entry {o} uses"}


def describe(kind: str, i: int, other: int) -> str:
    return f"BAT entry {i} " + _WHY[kind].format(o=other)


def load(file: ImageFile, lenient: bool) -> ParallelsState:
    """The image's state, or the error that refuses it.  ``lenient`` (check,
    repair): entries outside the file and an unclean image are left for the
    check to report."""
    try:
        fsize = file.size()
        if fsize < HEADER.size:
            raise FormatError(f"file is only {fsize} bytes, too small for a Parallels header", file.path)
        hdr = HEADER.unpack(file.pread_exact(0, HEADER.size, "Parallels header"))
        problems = header_problems(hdr, fsize)
        if problems:
            kind, text = problems[0]
            raise _ERRORS[kind](text, file.path)
        n = hdr.bat_entries
        raw = file.pread_exact(BAT_OFFSET, bat_end(n) - BAT_OFFSET, "BAT")
        state = ParallelsState(file, hdr, le_array(raw), fsize)
    except (struct.error, ValueError, OverflowError) as e:
        raise CorruptImageError(f"malformed Parallels header ({e})", file.path) from None
    state.scan()
    if not lenient:
        outside = [p for p in state.problems if p[0] != "dup"]
        if outside:
            raise state.corrupt(describe(*outside[0]) + f" (file size {fsize}); 'vdtool check -r all' repairs it")
        if state.unclean and file.writable:
            raise ReadOnlyError("image was not closed correctly (in-use flag set); it opens read-only until "
                                "'vdtool check -r leaks' clears the flag", file.path)
    return state

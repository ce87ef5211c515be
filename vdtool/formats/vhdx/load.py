"""Opening a VHDX: file identifier, headers, the log (replayed when the
image is opened for writing, read through otherwise), region table,
metadata and BAT, each checked before it is used."""

from __future__ import annotations

from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.formats.vhdx import bat, log
from vdtool.formats.vhdx.headers import read_headers, read_identifier
from vdtool.formats.vhdx.layout import NULL_GUID
from vdtool.formats.vhdx.metadata import read_metadata
from vdtool.formats.vhdx.regions import read_regions
from vdtool.formats.vhdx.state import VhdxState


def load(f: ImageFile, lenient: bool = False) -> VhdxState:
    """The open image's state.  ``lenient`` (check): a log that does not
    replay is reported instead of refusing the image."""
    st = VhdxState(f)
    st.fsize = f.size()
    read_identifier(st)
    for i, problems in read_headers(st):
        st.problems.append(("corrupt", f"header {i + 1} is not valid: {', '.join(problems)}"))
    if st.hdr.LogGuid != NULL_GUID:
        try:
            entries = log.active_sequence(st)
        except CorruptImageError as e:
            if not lenient:
                raise
            st.problems.append(("corrupt", f"the log does not replay: {e}"))
            entries = []
        if entries:
            st.log_seq = entries[-1].hdr.SequenceNumber + 1
            if f.writable:
                log.replay(st, entries)
            else:
                st.overlay = log.overlay(st, entries)
    for text in read_regions(st):
        st.problems.append(("corrupt", text))
    read_metadata(st)
    bat.load_bat(st)
    problems, st.bad = bat.scan(st)
    st.problems += problems
    return st

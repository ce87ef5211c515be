"""Opening a Bochs redolog image: the header read and validated, the catalog
read and every allocated extent checked to lie inside the file."""

from __future__ import annotations

from array import array

from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.formats.bochs.layout import (CATALOG_FREE, CORRUPT, FORMAT, HEAD_READ, HEADER, UNSUPPORTED, decode,
                                         header_problems)
from vdtool.formats.bochs.state import BochsState

_ERRORS = {FORMAT: FormatError, UNSUPPORTED: UnsupportedFeature, CORRUPT: CorruptImageError}


def load(file: ImageFile) -> BochsState:
    """The image's state, or the error that refuses it."""
    fsize = file.size()
    if fsize < HEADER.size:
        raise FormatError(f"file is only {fsize} bytes, too small for a Bochs header", file.path)
    hdr = decode(file.pread_exact(0, min(fsize, HEAD_READ), "Bochs header"))
    for kind, text in header_problems(hdr, fsize):
        raise _ERRORS[kind](text, file.path)
    raw = file.pread_exact(hdr.header, 4 * hdr.catalog, "Bochs catalog")
    catalog = array("I", raw)
    if array("I", [1]).tobytes() != b"\x01\0\0\0":
        catalog.byteswap()
    st = BochsState(file, hdr, catalog, fsize)
    _check_extents(st)
    return st


def _check_extents(st: BochsState) -> None:
    """Every extent the catalog names must lie whole inside the file (a
    hostile index would otherwise send reads far past its end)."""
    used = [e for e in st.catalog if e != CATALOG_FREE]
    if not used:
        return
    top = max(used)
    end = st.extent_start(top) + st.span
    if end > st.fsize:
        idx = st.catalog.index(top)
        raise st.corrupt(f"catalog entry {idx} names extent {top}, which ends at offset {end}, past the end "
                         f"of the file ({st.fsize} bytes)")

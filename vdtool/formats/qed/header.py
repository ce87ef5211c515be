"""Opening a QED image (header, backing name, L1 table, each checked before
use), writing the header back, the need-check flag and the backing file
name."""

from __future__ import annotations

from vdtool.core.bytesutil import U64, le_array
from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.core.tablemap import TableMap
from vdtool.formats.qed.layout import (CORRUPT, HEADER, QED_AUTOCLEAR_FEATURE_MASK, QED_F_BACKING_FILE,
                                       QED_F_BACKING_FORMAT_NO_PROBE, QED_F_NEED_CHECK, QED_MAGIC,
                                       header_problems, table_entries)
from vdtool.formats.qed.state import QedState


def load(f: ImageFile) -> QedState:
    size = f.size()
    raw = f.pread(0, HEADER.size)
    if len(raw) < HEADER.size:
        raise CorruptImageError(f"file is {size} bytes, shorter than a QED header ({HEADER.size})", f.path)
    hdr = HEADER.unpack(raw)
    if hdr.magic != QED_MAGIC:
        raise FormatError("not a QED image (bad magic)", f.path)
    for kind, text in header_problems(hdr, size):
        raise (CorruptImageError if kind == CORRUPT else UnsupportedFeature)(text, f.path)
    name = None
    if hdr.features & QED_F_BACKING_FILE:
        b = f.pread_exact(hdr.backing_filename_offset, hdr.backing_filename_size, "backing file name")
        name = b.decode("utf-8", "surrogateescape")
    cs = hdr.cluster_size
    nl1 = table_entries(hdr)
    l1 = le_array(f.pread_exact(hdr.l1_table_offset, nl1 * 8, "L1 table"), U64)
    data_start = hdr.l1_table_offset + hdr.table_size * cs
    end = max(size, data_start)
    end += -end % cs  # QEMU allocates from the end of the file rounded up to a cluster
    tables = TableMap(f, l1=l1, l1_offset=hdr.l1_table_offset, l2_entries=nl1, table_align=cs,
                      min_offset=data_start, little=True, end=end)
    st = QedState(f, hdr, tables, name)
    if f.writable:
        tables.on_change = lambda: set_need_check(st)
        if hdr.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK:
            # as QEMU: a writer that does not know an autoclear bit clears it
            hdr.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK
            write_header(st)
    return st


def write_header(st: QedState) -> None:
    st.file.pwrite(0, HEADER.pack(st.hdr))


def set_need_check(st: QedState) -> None:
    """Before the first table change of a session: the flag goes to disk
    (flushed) first, so a crash while tables change is found on the next
    open."""
    if st.hdr.features & QED_F_NEED_CHECK:
        return
    st.hdr.features |= QED_F_NEED_CHECK
    st.need_check_ours = True
    write_header(st)
    st.file.flush()


def clear_need_check(st: QedState) -> None:
    """After the tables are written and flushed."""
    if not st.hdr.features & QED_F_NEED_CHECK:
        return
    st.file.flush()  # the tables reach the disk before the header says they are consistent
    st.hdr.features &= ~QED_F_NEED_CHECK
    st.need_check_ours = False
    write_header(st)
    st.file.flush()


def set_backing(st: QedState, name: str | None, raw_format: bool) -> None:
    """Record the backing file ``name`` (None: none) in the header clusters.
    The new name goes where the old one is not, is flushed, and only then
    the header names it: a crash leaves the old or the new reference."""
    hdr = st.hdr
    if name is None:
        hdr.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)
        hdr.backing_filename_offset = hdr.backing_filename_size = 0
        write_header(st)
        st.file.flush()
        st.backing_name = None
        return
    data = name.encode("utf-8", "surrogateescape")
    header_end = hdr.header_size * st.cs
    old = (hdr.backing_filename_offset, hdr.backing_filename_offset + hdr.backing_filename_size) \
        if hdr.features & QED_F_BACKING_FILE else (0, 0)
    pos = None
    for cand in (HEADER.size, old[1] + (-old[1] % 8), header_end - len(data)):
        if cand >= HEADER.size and cand + len(data) <= header_end and (cand + len(data) <= old[0] or cand >= old[1]):
            pos = cand
            break
    if pos is None:
        raise UnsupportedFeature(f"backing file name of {len(data)} bytes does not fit in the QED header "
                                 f"({header_end} bytes)", st.path)
    st.file.pwrite(pos, data)
    st.file.flush()
    hdr.features |= QED_F_BACKING_FILE
    if raw_format:
        hdr.features |= QED_F_BACKING_FORMAT_NO_PROBE
    else:
        hdr.features &= ~QED_F_BACKING_FORMAT_NO_PROBE
    hdr.backing_filename_offset, hdr.backing_filename_size = pos, len(data)
    write_header(st)
    st.file.flush()
    st.backing_name = name

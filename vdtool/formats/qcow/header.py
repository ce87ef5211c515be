"""Opening a QCOW image (header, tapdisk's extended header, backing name, L1
table, each checked before use) and recording the backing file."""

from __future__ import annotations

from vdtool.core.bytesutil import U64, align_up, be_array, le_array
from vdtool.core.errors import CorruptImageError, FormatError, UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.core.tablemap import TableMap
from vdtool.formats.qcow.layout import (CORRUPT, EXTHDR_L1_BIG_ENDIAN, HEADER, QCOW_MAGIC, XEN_HEADER,
                                        XEN_HEADER_OFFSET, XEN_MAGIC, header_problems, l1_checksum, l1_entries)
from vdtool.formats.qcow.state import QcowState


def load(f: ImageFile) -> QcowState:
    size = f.size()
    raw = f.pread(0, HEADER.size + XEN_HEADER.size)
    if len(raw) < HEADER.size:
        raise CorruptImageError(f"file is {size} bytes, shorter than a QCOW header ({HEADER.size})", f.path)
    hdr = HEADER.unpack(raw)
    if hdr.magic != QCOW_MAGIC:
        raise FormatError("not a QCOW image (bad magic)", f.path)
    for kind, text in header_problems(hdr, size):
        raise (CorruptImageError if kind == CORRUPT else UnsupportedFeature)(text, f.path)
    name = None
    if hdr.backing_file_offset:
        b = f.pread_exact(hdr.backing_file_offset, hdr.backing_file_size, "backing file name")
        name = b.decode("utf-8", "surrogateescape")
    xen = None
    if len(raw) >= XEN_HEADER_OFFSET + XEN_HEADER.size and hdr.l1_table_offset % 4096 == 0:
        rec = XEN_HEADER.unpack(raw, XEN_HEADER_OFFSET)
        if rec.xmagic == XEN_MAGIC:
            xen = rec
    n = l1_entries(hdr)
    l1_raw = f.pread_exact(hdr.l1_table_offset, n * 8, "L1 table")
    l1_little = xen is not None and not xen.flags & EXTHDR_L1_BIG_ENDIAN
    l1 = le_array(l1_raw, U64) if l1_little else be_array(l1_raw, U64)
    cs = 1 << hdr.cluster_bits
    min_offset = hdr.l1_table_offset + n * 8
    end = align_up(max(size, min_offset), 512)
    tables = TableMap(f, l1=l1, l1_offset=hdr.l1_table_offset, l2_entries=1 << hdr.l2_bits, table_align=cs,
                      min_offset=min(min_offset, hdr.l1_table_offset + align_up(n * 8, 512)),
                      little=False, end=end)
    tables.l1_little = l1_little
    tables.min_offset = HEADER.size
    st = QcowState(f, hdr, xen, tables, name)
    if f.writable and xen is not None:
        tables.on_change = lambda: _tapdisk_writable(st)
    return st


def _tapdisk_writable(st: QcowState) -> None:
    """Before vdtool changes a tapdisk image's tables: the L1 table goes
    big-endian (flag set, as tapdisk converts it itself), and
    ``min_cluster_alloc`` drops to 1 -- tapdisk's fast path assumes every
    L2 table is followed by its clusters, which vdtool does not allocate."""
    xen, tabs = st.xen, st.tables
    if tabs.l1_little:
        tabs.l1_little = False
        tabs.dirty_l1.update(range(len(tabs.l1)))
        tabs.flush()
        xen.flags |= EXTHDR_L1_BIG_ENDIAN
    xen.min_cluster_alloc = 1
    write_xen(st)
    st.tables.on_change = None


def write_xen(st: QcowState) -> None:
    if st.xen is None:
        return
    from vdtool.core.bytesutil import be_bytes

    st.xen.cksum = l1_checksum(be_bytes(st.tables.l1))
    st.file.pwrite(XEN_HEADER_OFFSET, XEN_HEADER.pack(st.xen))


def set_backing(st: QcowState, name: str | None) -> None:
    """Record the backing file ``name`` (None: none).  The name goes to the
    end of the file (no table names that space), is flushed, and only then
    the 48-byte header names it."""
    hdr = st.hdr
    if name is None:
        hdr.backing_file_offset = hdr.backing_file_size = 0
    else:
        data = name.encode("utf-8", "surrogateescape")
        if len(data) > 1023:
            raise UnsupportedFeature(f"backing file name of {len(data)} bytes is longer than QCOW's 1023", st.path)
        pos = st.tables.allocate(len(data), 8)
        st.file.pwrite(pos, data)
        st.file.flush()
        hdr.backing_file_offset, hdr.backing_file_size = pos, len(data)
    st.file.pwrite(0, HEADER.pack(hdr))
    st.file.flush()
    st.backing_name = name

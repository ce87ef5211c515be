"""Compacting a QCOW image by rewriting it: a new file beside it gets the
same header and backing name and, in disk order, every cluster but those
that read as zeros in an image without a parent (compressed clusters are
copied as they are); it is flushed and then renamed over the image, so a
crash leaves the old image or the new one."""

from __future__ import annotations

import os

from vdtool.core.bytesutil import is_zero
from vdtool.core.fileio import ImageFile
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.tablemap import TableMap
from vdtool.formats.qcow.clusters import allocate, checked, readinto
from vdtool.formats.qcow.create import write_image
from vdtool.formats.qcow.header import load
from vdtool.formats.qcow.layout import QCOW_OFLAG_COMPRESSED
from vdtool.formats.qcow.state import QcowState


def rewrite(st: QcowState, progress: Progress = NO_PROGRESS) -> str:
    """Write the compacted copy; returns its path (closed, flushed)."""
    st.tables.flush()
    tmp = os.path.join(os.path.dirname(os.path.abspath(st.path)), f".{os.path.basename(st.path)}.compact")
    name = (st.backing_name or "").encode("utf-8", "surrogateescape")
    hdr = st.hdr.replace(backing_file_offset=48 if name else 0, backing_file_size=len(name),
                         l1_table_offset=(48 + len(name) + 7) // 8 * 8)
    f = ImageFile(tmp, create=True)
    try:
        write_image(f, hdr, name)
        new = load(f)
        _copy_clusters(st, new, progress)
        new.tables.flush()
        f.flush()
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    f.close()
    return tmp


def _copy_clusters(st: QcowState, new: QcowState, progress: Progress) -> None:
    tabs: TableMap = st.tables
    cs = st.cs
    buf = bytearray(cs)
    n = len(tabs.l1)
    for i in range(n):
        t = tabs.l2(i)
        if t is None:
            continue
        base = i * tabs.l2_entries
        for j, e in enumerate(t):
            if not e:
                continue
            ci = base + j
            checked(st, ci, e)
            if e & QCOW_OFLAG_COMPRESSED:
                off, size = st.compressed(e)
                packed = st.file.pread(off, size)
                pos = new.tables.allocate(size, 1)
                new.file.pwrite(pos, packed)
                new.tables.set_entry(ci, new.compressed_entry(pos, size))
                continue
            readinto(st, ci * cs, buf)
            if is_zero(buf) and not st.backing_name:
                continue
            allocate(new, ci, buf)
        progress.update(i + 1, n)

"""Metadata write-back: the sector bitmap cache and the writing of bitmaps,
BAT, dynamic disk header and footer.

Everything is cached write-back; ``flush`` orders the writes: data, fsync,
bitmaps, BAT, header, footer (the copy at offset 0 and the one at the end),
fsync.  A crash leaves unreferenced space at worst, or a footer missing at
the end of the file, which the copy at offset 0 stands in for."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, be_bytes
from vdtool.formats.vhd.layout import (BAT_PER_SECTOR, FOOTER, FOOTER_SIZE, SECTOR, TYPE_FIXED, UNUSED,
                                       dynamic_header, pack_with_checksum)
from vdtool.formats.vhd.state import VhdState

BITMAP_CACHE = 8192  # sector bitmaps kept in memory (halved when full)


# -- sector bitmaps -----------------------------------------------------------------------

def bitmap(st: VhdState, idx: int) -> bytearray:
    """Block ``idx``'s sector bitmap (cached; the block is allocated)."""
    bm = st.bitmaps.get(idx)
    if bm is not None:
        st.bitmaps.move_to_end(idx)
        return bm
    off = st.bat[idx] * SECTOR
    bm = bytearray(st.file.pread_exact(off, st.bitmap_size, f"sector bitmap of block {idx}"))
    st.bitmaps[idx] = bm
    if len(st.bitmaps) > BITMAP_CACHE:
        if st.bm_dirty:
            write_bitmaps(st)
        while len(st.bitmaps) > BITMAP_CACHE // 2:
            st.bitmaps.popitem(last=False)
    return bm


def bits(st: VhdState, idx: int) -> int:
    """The block's bitmap as an int whose most significant of ``spb`` bits is sector 0."""
    bm = bitmap(st, idx)
    return int.from_bytes(bm, "big") >> (len(bm) * 8 - st.spb)


def set_bits(st: VhdState, idx: int, first: int, end: int) -> None:
    """Mark sectors ``first``..``end`` of block ``idx`` as in use."""
    bm = bitmap(st, idx)
    nbits = len(bm) * 8
    v = int.from_bytes(bm, "big")
    nv = v | (((1 << (end - first)) - 1) << (nbits - end))
    if nv != v:
        bm[:] = nv.to_bytes(len(bm), "big")
        st.bm_dirty.add(idx)


def run(spb: int, bits_: int, sector: int, limit: int) -> tuple:
    """(is_set, count) of the run of equal bits from ``sector`` up to
    ``limit`` in ``bits_`` (as ``bits`` returns them)."""
    w = limit - sector
    x = (bits_ >> (spb - limit)) & ((1 << w) - 1)
    is_set = bool(x >> (w - 1))
    if is_set:
        x = ~x & ((1 << w) - 1)
    return is_set, w - x.bit_length()


# -- writing ----------------------------------------------------------------------------------

def write_bitmaps(st: VhdState) -> None:
    bat = st.bat
    for idx in sorted(st.bm_dirty, key=lambda i: bat[i]):
        if bat[idx] != UNUSED:
            st.file.pwrite(bat[idx] * SECTOR, st.bitmaps[idx])
    st.bm_dirty.clear()


def write_bat(st: VhdState, sectors=None) -> None:
    """The whole BAT, or only the given BAT sectors; the last sector is
    padded with unused entries."""
    if sectors is None:
        raw = be_bytes(st.bat)
        pad = align_up(len(raw), SECTOR) - len(raw)
        st.file.pwrite(st.table_offset, raw + b"\xff" * pad)
    else:
        per, n = BAT_PER_SECTOR, st.max_table_entries
        for s in sorted(sectors):
            raw = be_bytes(st.bat[s * per:min((s + 1) * per, n)])
            st.file.pwrite(st.table_offset + s * SECTOR, raw + b"\xff" * (SECTOR - len(raw)))
    st.bat_dirty.clear()


def write_footer(st: VhdState) -> None:
    """The footer: after the data of a fixed disk; for a dynamic one at
    ``next_free`` (the file cut behind it) and as the copy at offset 0."""
    raw = pack_with_checksum(FOOTER, st.footer)
    if st.disk_type == TYPE_FIXED:
        st.file.pwrite(st.data_end, raw)
        return
    st.file.pwrite(st.next_free, raw)
    if st.file.size() > st.next_free + FOOTER_SIZE:
        st.file.truncate(st.next_free + FOOTER_SIZE)
    st.data_end = st.next_free
    st.file.pwrite(0, raw)
    st.problems = [p for p in st.problems if p[0] not in ("footer-missing", "footer-copy", "footer-checksum")]
    st.footer_dirty = False


def write_header(st: VhdState) -> None:
    raw = dynamic_header(st.table_offset, st.max_table_entries, st.block, parent_unique_id=st.parent_uid,
                         parent_time_stamp=st.parent_ts, parent_unicode_name=st.parent_name,
                         parent_locator_entries=b"".join(loc.entry() for loc in st.locators))
    st.file.pwrite(st.header_offset, raw)
    st.problems = [p for p in st.problems if p[0] != "header-checksum"]
    st.header_dirty = False


def flush(st: VhdState) -> None:
    """Write what is dirty, in the order that keeps a crash harmless (the
    image must be writable)."""
    if st.disk_type == TYPE_FIXED:
        st.file.flush()
        return
    if not (st.data_dirty or st.bm_dirty or st.bat_dirty or st.footer_dirty or st.header_dirty):
        return
    st.file.flush()  # data before the metadata that points at it
    write_bitmaps(st)
    if st.bat_dirty:
        write_bat(st, st.bat_dirty)
    if st.header_dirty:
        write_header(st)
    if st.footer_dirty or st.data_end != st.next_free:
        write_footer(st)
    st.file.flush()
    st.data_dirty = False

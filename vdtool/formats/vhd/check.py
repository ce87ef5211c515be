"""Check and repair (``VhdBackend._check``).

Corruptions: the problems open found (footer checksum, footer missing at
the end, header checksum) and unusable BAT entries; repaired by -r all
(footers and header rewritten, broken entries dropped).  Leaks: allocated
blocks whose bitmap has no sector in use, and a stale footer copy at offset
0 (the footer copy is written after the footer at the end, so a crash
between the two leaves it behind: harmless); repaired by -r leaks."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.progress import Progress
from vdtool.formats.vhd.layout import FOOTER_SIZE, SECTOR, TYPE_FIXED, UNUSED, geometry_sectors
from vdtool.formats.vhd.metadata import flush, write_bat, write_footer, write_header
from vdtool.formats.vhd.space import allocated_blocks, release, trim_tail
from vdtool.formats.vhd.state import VhdState


def check(st: VhdState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    fix_all = repair == "all"
    stale = _report_problems(st, res, fix_all)
    if st.disk_type == TYPE_FIXED:
        res.image_end_offset = st.data_end + FOOTER_SIZE
        if fix_all and st.problems:
            write_footer(st)
            st.file.flush()
            res.corruptions_fixed += len(st.problems)
            st.problems = []
        return
    if geometry_sectors(st.footer) == 0 and st.footer.current_size:
        res.say("note: the disk geometry is 0/0/0")
    for why in st.bad.values():
        res.corrupt(why, repairing=fix_all)
    leaks = _empty_blocks(st, progress)
    if leaks:
        res.leak(f"{len(leaks)} allocated blocks have no sector in use (first: block {leaks[0]})", len(leaks))
    res.total_clusters = st.max_table_entries
    res.allocated_clusters = st.allocated_count() - len(st.bad)
    if repair:
        _repair(st, res, fix_all, leaks, stale)
    res.image_end_offset = st.next_free + FOOTER_SIZE


def _report_problems(st: VhdState, res: CheckResult, fix_all: bool) -> int:
    """Count what open found; returns how many are a stale footer copy."""
    stale = 0
    for kind, msg in st.problems:
        if kind == "footer-copy" and st.disk_type != TYPE_FIXED:
            stale += 1
            res.leak(msg + " (stale copy; the footer at the end is used)")
        else:
            res.corrupt(msg, repairing=fix_all)
    return stale


def _empty_blocks(st: VhdState, progress: Progress) -> list:
    """Usable allocated blocks whose sector bitmap is all clear (leaked)."""
    blocks = [i for i in allocated_blocks(st) if i not in st.bad]
    out = []
    # one read per block and nothing more: a 4 GiB image has 2048 blocks,
    # and the cache's bookkeeping per bitmap cost more than the read
    cached, size, bat, pread = st.bitmaps, st.bitmap_size, st.bat, st.file.pread_exact
    zero = bytes(size)
    for k, i in enumerate(blocks):
        bm = cached.get(i)  # a changed bitmap not yet written
        if bm is None:
            bm = pread(bat[i] * SECTOR, size, f"sector bitmap of block {i}")
        if bm == zero:
            out.append(i)
        if not k % 64:
            progress.update(k + 1, len(blocks))
    progress.update(len(blocks), len(blocks))
    return out


def _repair(st: VhdState, res: CheckResult, fix_all: bool, leaks: list, stale: int) -> None:
    if fix_all and st.bad:
        for i in list(st.bad):
            st.bat[i] = UNUSED
            st.bitmaps.pop(i, None)
            st.bm_dirty.discard(i)
            res.corruptions_fixed += 1
        st.bad = {}
        write_bat(st)
        st.file.flush()
    for i in leaks:
        release(st, i)
        res.leaks_fixed += 1
    if stale:
        res.leaks_fixed += stale
        st.footer_dirty = True
    if fix_all and len(st.problems) > stale:
        if any(k == "header-checksum" for k, _ in st.problems):
            write_header(st)
        res.corruptions_fixed += len(st.problems) - stale
        st.footer_dirty = True
    if fix_all or leaks or stale:
        trim_tail(st)
        flush(st)
        write_footer(st)
        st.file.flush()
        st.problems = []

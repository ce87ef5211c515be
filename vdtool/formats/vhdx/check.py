"""check and check -r: a header or region table that is not valid, BAT
entries past the end of the file, over the header section, the log or a
region, overlapping blocks, states an entry may not have, a log that is
pending or does not replay, and space past the last block (a leak)."""

from __future__ import annotations

from vdtool.core.backend import CheckResult
from vdtool.core.bytesutil import align_up
from vdtool.core.progress import Progress
from vdtool.formats.vhdx import bat
from vdtool.formats.vhdx.bat import used_end
from vdtool.formats.vhdx.headers import begin_modification, update_header
from vdtool.formats.vhdx.layout import (NULL_GUID, REGION_TABLE_BYTES, REGION_TABLE_OFFSETS,
                                        region_entries, PAYLOAD_BLOCK_NOT_PRESENT,
                                        PAYLOAD_BLOCK_ZERO, SB_BLOCK_NOT_PRESENT, MiB, bat_entry,
                                        bat_state)
from vdtool.formats.vhdx.state import VhdxState


def check(st: VhdxState, res: CheckResult, repair: str | None, progress: Progress) -> None:
    fix_all = repair == "all"
    # A pending log is what a crash between a log entry and its writes in
    # place leaves: readers replay it (vdtool reads through it), so it is a
    # harmless leftover, a leak that any writable open (check -r) replays.
    if st.log_replayed:
        res.leak("a pending log (replayed now)")
        res.leaks_fixed += 1
    elif st.hdr.LogGuid != NULL_GUID and st.overlay:
        res.leak("a pending log holds changes not yet written in place (vdtool reads through it; "
                 "'check -r leaks' replays it, qemu-img needs that before it opens the image)")
    for kind, text in st.problems:
        _report(res, text, fix_all and not text.startswith("BAT entry"))
    if fix_all:
        _repair_headers(st)
        _repair_region_tables(st)
    overlaps = bat.check_blocks_overlap(st)
    for a, b in overlaps:
        res.corrupt(f"BAT entries {a} and {b} point to overlapping blocks", repairing=fix_all)
    if fix_all:
        _repair_entries(st, {b for _, b in overlaps} | st.bad, res)
    res.total_clusters = st.blocks
    res.allocated_clusters = sum(1 for b in range(st.blocks) if bat_state(st.entry(b)) in bat.PRESENT)
    end = used_end(st)
    fsize = st.file.size()
    if fsize > align_up(end, MiB):
        res.leak(f"{fsize - end} bytes past the last block (file size {fsize}, last block ends at {end})")
        if repair:
            st.file.truncate(end)
            st.fsize = end
            res.leaks_fixed += 1
    res.image_end_offset = min(fsize, max(end, st.fsize)) if not repair else st.file.size()
    progress.update(1, 1)


def _report(res: CheckResult, text: str, fixing: bool) -> None:
    res.corrupt(text, repairing=fixing)
    if fixing:
        res.corruptions_fixed += 1


def _repair_headers(st: VhdxState) -> None:
    """A header that is not valid gets the current one (a header update
    writes the non-current header), and a log that does not replay is
    dropped: the metadata in place is the state before it."""
    if st.headers[1 - st.cur] is None or st.hdr.LogGuid != NULL_GUID:
        begin_modification(st, visible=False)
        update_header(st, LogGuid=NULL_GUID)
        st.overlay = {}
    if st.headers[1 - st.cur] is None:
        update_header(st)


def _repair_region_tables(st: VhdxState) -> None:
    """Both region tables the same: the one in use copied over the other
    (the one in use stays whole meanwhile)."""
    raws = [st.read(off, REGION_TABLE_BYTES) for off in REGION_TABLE_OFFSETS]
    mine = [e.values() for e in st.regions]
    used = [i for i, r in enumerate(raws) if [e.values() for e in region_entries(r)[0]] == mine]
    if used and raws[0] != raws[1]:
        good = used[0]
        st.file.pwrite(REGION_TABLE_OFFSETS[1 - good], raws[good])
        st.file.flush()


def _repair_entries(st: VhdxState, bad: set, res: CheckResult) -> None:
    """Damaged entries are dropped: a payload block reads as zeros (ZERO,
    so no parent shows through), a sector bitmap as not present."""
    ratio = st.ratio
    for i in sorted(bad):
        if i % (ratio + 1) == ratio:
            st.set_entry(i, bat_entry(SB_BLOCK_NOT_PRESENT, 0))
        else:
            st.set_entry(i, bat_entry(PAYLOAD_BLOCK_ZERO if st.has_parent else PAYLOAD_BLOCK_NOT_PRESENT, 0))
        res.corruptions_fixed += 1
    st.bad = set()
    st.problems = []

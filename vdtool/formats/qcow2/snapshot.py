"""Internal snapshots: the snapshot table, read at open and listed by info.

Creating, applying and deleting them is ``snapedit``.  What a snapshot shares with
the active image is seen through the refcounts: the write path copies an L2
table or data cluster whose entry lacks OFLAG_COPIED before changing it
(cluster.ClusterMap.l2_for_write, write.Writer), and check walks each
snapshot's L1 table (``l1_table``)."""

from __future__ import annotations

from vdtool.core.bytesutil import be_array
from vdtool.formats.qcow2.layout import (MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE, SNAPSHOT_ENTRY, decode_name,
                                         pad8, snapshot_extra, snapshot_l1_problem, snapshot_problem)


def read_table(st, file_size: int) -> tuple:
    """(snapshots, table bytes) of the table the state's header points at;
    each snapshot a dict (id, name, l1_table_offset, l1_size, vm_state_size,
    date_sec, date_nsec, vm_clock_nsec, disk_size, icount; ``entry`` the
    fixed part as read and ``extra`` the extra data bytes, kept so that a
    rewritten table keeps what it does not know)."""
    start = st.snapshots_offset
    limit = min(file_size, start + MAX_SNAPSHOT_TABLE)
    pos = start
    out = []
    for i in range(st.nb_snapshots):
        problem = snapshot_problem(i, pos, 0, limit, file_size)
        if problem:
            raise st.corrupt(problem)
        ent = SNAPSHOT_ENTRY.unpack(st.file.pread(pos, SNAPSHOT_ENTRY.size))
        if ent.extra_data_size > MAX_SNAPSHOT_EXTRA:
            raise st.corrupt(f"snapshot {i}: extra_data_size {ent.extra_data_size} is above {MAX_SNAPSHOT_EXTRA}")
        body = SNAPSHOT_ENTRY.size + ent.extra_data_size + ent.id_str_size + ent.name_size
        problem = snapshot_problem(i, pos, body, limit, file_size)
        if problem:
            raise st.corrupt(problem)
        out.append(_entry(st, ent, st.file.pread(pos + SNAPSHOT_ENTRY.size, body - SNAPSHOT_ENTRY.size),
                          file_size))
        pos = start + pad8(pos + body - start)
    return out, pos - start


def _entry(st, ent, raw: bytes, file_size: int) -> dict:
    """One snapshot from its fixed part and the bytes after it."""
    xs = ent.extra_data_size
    vm_large, disk_size, icount = snapshot_extra(raw[:xs])
    sid = decode_name(raw[xs:xs + ent.id_str_size])
    sname = decode_name(raw[xs + ent.id_str_size:])
    problem = snapshot_l1_problem(sid, ent, st.cs, file_size)
    if problem:
        raise st.corrupt(problem)
    return {"id": sid, "name": sname, "l1_table_offset": ent.l1_table_offset, "l1_size": ent.l1_size,
            "vm_state_size": vm_large if vm_large is not None else ent.vm_state_size,
            "date_sec": ent.date_sec, "date_nsec": ent.date_nsec, "vm_clock_nsec": ent.vm_clock_nsec,
            "disk_size": disk_size, "icount": icount, "entry": ent, "extra": bytes(raw[:xs])}


def l1_table(st, sn: dict):
    """A snapshot's L1 table (host order)."""
    n = sn["l1_size"]
    return be_array(st.file.pread_exact(sn["l1_table_offset"], n * 8, "snapshot L1 table"))


def info_list(snapshots: list) -> list:
    """The snapshots as info reports them (qemu-img's field names)."""
    out = []
    for s in snapshots:
        e = {"id": s["id"], "name": s["name"], "vm-state-size": s["vm_state_size"],
             "date-sec": s["date_sec"], "date-nsec": s["date_nsec"],
             "vm-clock-sec": s["vm_clock_nsec"] // 1_000_000_000,
             "vm-clock-nsec": s["vm_clock_nsec"] % 1_000_000_000}
        if s["icount"] is not None and s["icount"] != (1 << 64) - 1:
            e["icount"] = s["icount"]
        out.append(e)
    return out

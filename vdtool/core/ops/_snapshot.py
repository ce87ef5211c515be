"""snapshot: list, create, apply and delete internal snapshots (qcow2), as
``qemu-img snapshot -l/-c/-a/-d`` does.  The image is opened alone (its
backing file is not needed, as qemu-img opens it without)."""

from __future__ import annotations

from vdtool.core.errors import UsageError
from vdtool.core.stack import open_backend

ACTIONS = ("list", "create", "apply", "delete")


def snapshot(path: str, action: str = "list", name: str | None = None, fmt: str | None = None, *,
             force_share: bool = False, force: bool = False, untrusted: bool = False) -> dict:
    """``action`` list (``name`` unused), create, apply or delete.  Returns
    ``{"filename", "format", "snapshots"}`` for list (``snapshots`` None when
    the format has no internal snapshots) and ``{"filename", "format",
    "action", "snapshot"}`` otherwise; each snapshot with qemu-img info's
    keys (id, name, vm-state-size, date-sec, date-nsec, vm-clock-sec,
    vm-clock-nsec, icount)."""
    if action not in ACTIONS:
        raise UsageError(f"snapshot action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if action != "list" and name is None:
        raise UsageError(f"snapshot {action} needs a snapshot name")
    if action != "list" and force_share:
        raise UsageError("-U/--force-share can only be used with read-only access (-l)")
    img = open_backend(path, fmt, writable=action != "list", untrusted=untrusted, force_share=force_share,
                       options={"force": True} if force else None)
    try:
        if action == "list":
            return {"filename": path, "format": img.name, "snapshots": img.snapshot_list()}
        sn = img.snapshot_change(action, name)
        img.flush()
        return {"filename": path, "format": img.name, "action": action, "snapshot": sn}
    finally:
        img.close()


def snapshot_table(snaps: list) -> list:
    """The lines qemu-img snapshot -l prints (none for no snapshots)."""
    if not snaps:
        return []
    import time

    from vdtool.core.sizes import qemu_size

    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("date-sec", 0)))
        secs = s.get("vm-clock-sec", 0)
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s.get('vm-clock-nsec', 0) // 1_000_000 % 1000:03d}")
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {qemu_size(s.get('vm-state-size', 0)):>8}{date:>20}"
                     f"{clock:>13}{icount:>11}")
    return lines

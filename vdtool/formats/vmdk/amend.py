"""vmdk amend: the descriptor's ``ddb.adapterType`` and
``ddb.virtualHWVersion``.

A new adapter type brings the geometry create gives it (16 heads for
ide, 255 for the SCSI adapters, 63 sectors), since VMware's importers
reject an ide disk with SCSI geometry and the other way round.  The CID
stays: the disk's content does not change, so children still match.  The
descriptor is written as the package writes it (in place: its own file,
or the embedded area), then flushed."""

from __future__ import annotations

from vdtool.core.errors import NotSupported, VdError
from vdtool.formats.vmdk.descriptor import geometry


def amend(disk, opts: dict, path: str) -> list:
    desc = disk.desc
    new = {}
    if "adapter_type" in opts:
        adapter = str(opts["adapter_type"])  # one of the declared choices (parse_amend_options)
        new["ddb.adapterType"] = ("adapter_type", adapter)
    if "hwversion" in opts:
        hw = str(opts["hwversion"]).strip()
        if not hw.isdigit() or not 1 <= int(hw) <= 99:
            raise VdError(f"vmdk amend option hwversion: invalid value {hw!r} (a number from 1 to 99)", path)
        new["ddb.virtualHWVersion"] = ("hwversion", str(int(hw)))
    changes = []
    for key, (name, value) in new.items():
        old = desc.get(key)
        if old != value:
            changes.append((name, old, value))
    if not changes:
        return []
    if disk.desc_home is None or disk.stream is not None:
        raise NotSupported("option amendment", "vmdk", path, "the image has no descriptor that can be rewritten")
    for key, (_, value) in new.items():
        desc.set(key, value)
    if "ddb.adapterType" in new:
        cyl, heads, secs = geometry(disk.virtual_size, new["ddb.adapterType"][1])
        desc.set("ddb.geometry.cylinders", str(cyl))
        desc.set("ddb.geometry.heads", str(heads))
        desc.set("ddb.geometry.sectors", str(secs))
    disk.flush()
    disk.write_descriptor()
    disk.file.flush()
    return changes

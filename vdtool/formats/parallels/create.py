"""Creating a Parallels image as QEMU does: a ``WithouFreSpacExt`` header,
a zeroed BAT and the data area from the first cluster boundary after it
(no clusters allocated)."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up, le_array
from vdtool.core.errors import UsageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.parallels.layout import (BAT_OFFSET, DEFAULT_CLUSTER, HEADER, MAGIC_V2, MAX_BAT, MAX_TRACKS,
                                             SECTOR, VARIANTS, VERSION, geometry)
from vdtool.formats.parallels.state import ParallelsState


def new_header(size: int, variant: str | None, block_size: int | None, options: dict) -> Record:
    """The header of a new image (bad arguments are UsageErrors before any
    file is touched)."""
    if variant not in (None, "dynamic"):
        raise UsageError(f"parallels has no variant {variant!r}; choose from {', '.join(VARIANTS)}")
    cs = block_size or options.get("cluster_size") or DEFAULT_CLUSTER
    cs = int(cs)
    if cs <= 0 or cs % SECTOR or cs // SECTOR > MAX_TRACKS:
        raise UsageError(f"Parallels cluster size {cs} must be a multiple of {SECTOR} from {SECTOR} to "
                         f"{MAX_TRACKS * SECTOR}")
    if size < 0:
        raise UsageError(f"disk size {size} is negative")
    size = align_up(size, SECTOR)
    g = geometry(size, cs)
    if g["bat_entries"] > MAX_BAT or g["data_off"] > 0xFFFFFFFF:
        raise UsageError(f"{size} bytes need {g['bat_entries']} clusters of {cs} bytes: too many for a Parallels "
                         f"BAT; use a larger cluster size")
    return HEADER.new(magic=MAGIC_V2, version=VERSION, **g)


def write_image(f: ImageFile, hdr: Record) -> ParallelsState:
    """Write a new image with header ``hdr`` into the empty file ``f``."""
    start = hdr.data_off * SECTOR
    f.truncate(start)
    f.pwrite(0, HEADER.pack(hdr))
    f.pwrite(BAT_OFFSET, bytes(4 * hdr.bat_entries))
    state = ParallelsState(f, hdr, le_array(bytes(4 * hdr.bat_entries)), f.size())
    state.scan()
    return state

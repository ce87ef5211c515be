"""Writing a Parallels image's metadata back, in the order that keeps a
crash safe: data first, then the BAT entries and the header that point at
it.  Also the changes every writer makes: the in-use flag, allocating a
cluster at the end, and closing the holes released clusters leave."""

from __future__ import annotations

from vdtool.core.bytesutil import le_array
from vdtool.core.errors import ReadOnlyError
from vdtool.formats.parallels.layout import BAT_OFFSET, HEADER, INUSE_MAGIC, MAX_ENTRY
from vdtool.formats.parallels.load import describe
from vdtool.formats.parallels.state import ParallelsState

_WHOLE_BAT = 4096  # more dirty entries than this: the whole BAT is written in one go


def set_entry(state: ParallelsState, i: int, value: int) -> None:
    state.bat[i] = value
    state.dirty.add(i)


def _bat_bytes(state: ParallelsState, lo: int, hi: int) -> bytes:
    part = state.bat[lo:hi]
    return le_array(part.tobytes(), part.typecode).tobytes()  # host order to little-endian (a no-op on x86)


def _runs(indices: list):
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        yield indices[i], indices[j] + 1
        i = j + 1


def sync(state: ParallelsState) -> None:
    """Data first, then the BAT entries and header that point at it."""
    if not state.dirty and not state.hdr_dirty:
        return
    f = state.file
    f.flush()
    dirty = sorted(state.dirty)
    if len(dirty) > _WHOLE_BAT:
        f.pwrite(BAT_OFFSET, _bat_bytes(state, 0, len(state.bat)))
    else:
        for lo, hi in _runs(dirty):
            f.pwrite(BAT_OFFSET + 4 * lo, _bat_bytes(state, lo, hi))
    if state.hdr_dirty:
        f.pwrite(0, HEADER.pack(state.hdr))
    f.flush()
    state.dirty.clear()
    state.hdr_dirty = False


def mark_open(state: ParallelsState) -> None:
    """A writer opened the image: the in-use flag goes on disk (as QEMU and
    Parallels set it), and a format extension is dropped (vdtool does not
    keep its dirty bitmaps up to date, so they would lie)."""
    state.hdr.inuse = INUSE_MAGIC
    state.hdr.ext_off = 0
    state.hdr_dirty = True
    sync(state)


def mark_closed(state: ParallelsState) -> None:
    """The writer is done: everything synced, then the in-use flag cleared
    (QEMU writes 0) unless the image was found unclean and not repaired."""
    sync(state)
    if not state.unclean:
        state.hdr.inuse = 0
        state.hdr_dirty = True
        sync(state)


def begin_write(state: ParallelsState) -> None:
    """Before any change: the image must be writable and its BAT consistent."""
    if not state.file.writable:
        raise ReadOnlyError("image is opened read-only", state.path)
    problems = state.map_problems()
    if problems:
        raise state.corrupt(f"the BAT has {len(problems)} inconsistent entries (first: "
                            f"{describe(*problems[0])}); 'vdtool check -r all' repairs it")


def alloc(state: ParallelsState, i: int, cluster) -> None:
    """Store a whole cluster for BAT entry ``i`` at the end of the data
    area; the entry reaches the disk at the next sync, after the data."""
    pos = state.data_end
    entry = state.entry_for(pos)
    if entry > MAX_ENTRY:
        raise state.corrupt(f"the image is full: a cluster at offset {pos} cannot be recorded in a 32-bit BAT entry")
    state.file.pwrite(pos, cluster)
    state.data_end = pos + state.cluster
    set_entry(state, i, entry)


def close_holes(state: ParallelsState) -> int:
    """Move the last clusters into the slots no entry uses, so the clusters
    lie packed from the data start, and cut the file after them.  Crash
    order: copies, flush, entries, flush, then the truncate (a crash leaves
    leaked clusters at worst).  Returns how many slots were filled."""
    start, cs = state.data_start, state.cluster
    owner = {state.host(i): i for i, e in enumerate(state.bat) if e}
    slots = len(owner)
    end = start + slots * cs
    holes = [p for p in range(start, end, cs) if p not in owner]
    movers = sorted((p for p in owner if p >= end), reverse=True)
    buf = bytearray(cs)
    for dst, src in zip(holes, movers):
        state.file.readinto(src, buf)
        state.file.pwrite(dst, buf)
    if holes:
        state.file.flush()
        for dst, src in zip(holes, movers):
            set_entry(state, owner[src], state.entry_for(dst))
    sync(state)
    state.data_end = end
    if state.file.size() > end:
        state.file.truncate(end)
    state.fsize = state.file.size()
    return len(holes)

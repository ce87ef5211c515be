"""map: where every guest byte of an image (and its chain) lives, as
``qemu-img map`` reports it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from vdtool.core.backend import Status
from vdtool.core.errors import UsageError, VdError
from vdtool.core.stack import ImageStack, open_image


@dataclass
class MapEntry:
    """One run of qemu-img map's output.  ``depth``: the layer that decides,
    counted from the top (0); ``offset``: the host offset in ``filename``
    (None where qemu-img gives none)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool = False
    offset: int | None = None
    filename: str | None = None

    def to_json(self) -> dict:
        d = {"start": self.start, "length": self.length, "depth": self.depth, "present": self.present,
             "zero": self.zero, "data": self.data, "compressed": self.compressed}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def mergeable(self, nxt: "MapEntry") -> bool:
        """qemu-img's rule: same flags and depth, and the same file with
        host offsets one after another, or both without an offset."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present, self.compressed) != \
                (nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.compressed):
            return False
        if (self.offset is None) != (nxt.offset is None):
            return False
        if self.offset is None:
            return True
        return self.filename == nxt.filename and self.offset + self.length == nxt.offset


def display_names(stack: ImageStack, path: str) -> list:
    """Each layer's file name as qemu-img prints it (base first): the top as
    given, a parent recorded by a relative name joined to its child's
    folder as the child was named (QEMU's path_combine), else the path
    vdtool opened."""
    layers = stack.layers
    names = [""] * len(layers)
    names[-1] = path
    for i in range(len(layers) - 1, 0, -1):
        ref = layers[i].parent
        rec = ref.filename if ref is not None else None
        parent_path = layers[i - 1].path
        name = parent_path
        if rec and not os.path.isabs(rec):
            joined = os.path.join(os.path.dirname(names[i]), rec)
            try:
                if os.path.samefile(joined, parent_path):
                    name = joined
            except OSError:
                pass
        elif rec:
            name = rec
        names[i - 1] = name
    return names


def _display_file(file: str | None, layer, name: str) -> str:
    """The file a host offset is in, named as the layer is named (a VMDK
    extent file beside its descriptor keeps the descriptor's folder)."""
    if file is None or file == layer.path:
        return name
    if os.path.dirname(os.path.abspath(file)) == os.path.dirname(os.path.abspath(layer.path)):
        return os.path.join(os.path.dirname(name), os.path.basename(file))
    return file


def status_at(stack: ImageStack, offset: int, length: int, names: list | None = None) -> MapEntry:
    """qemu-img's get_block_status: walk down from the top while the range
    is unallocated; a layer with no parent, or whose parent ends before
    ``offset``, reads as zeros that are not present.  ``names``: the
    layers' names for ``filename`` (default: their paths)."""
    layers = stack.layers
    if names is None:
        names = [layer.path for layer in layers]
    top = len(layers) - 1
    level = top
    n = length
    while True:
        layer = layers[level]
        ext = layer.map_extent(offset, min(n, layer.virtual_size - offset))
        if ext.length <= 0:
            raise VdError(f"internal error: map_extent returned length {ext.length} at offset {offset}",
                          layer.path)
        n = min(n, ext.length)
        depth = top - level
        if ext.status != Status.UNALLOCATED:
            data = ext.status == Status.DATA
            zero = ext.status == Status.ZERO or (data and ext.zero)
            off = ext.offset
            return MapEntry(offset, n, depth, True, zero, data, bool(ext.compressed), off,
                            _display_file(ext.file, layer, names[level]) if off is not None else None)
        if level == 0 or offset >= layers[level - 1].virtual_size:
            off = ext.offset
            return MapEntry(offset, n, depth, False, True, False, False, off,
                            _display_file(ext.file, layer, names[level]) if off is not None else None)
        level -= 1


def map_entries(stack: ImageStack, start: int = 0, max_length: int | None = None,
                path: str | None = None) -> Iterator[MapEntry]:
    """The merged entries of qemu-img map for ``[start, start+max_length)``
    of the stack's disk (clipped to its size)."""
    size = stack.virtual_size
    if start < 0:
        raise UsageError(f"start offset {start} is negative")
    if max_length is not None and max_length < 0:
        raise UsageError(f"maximum length {max_length} is negative")
    end = size if max_length is None else min(start + max_length, size)
    names = display_names(stack, path or stack.path)
    curr = MapEntry(start, 0, 0, False, False, False)
    while curr.start + curr.length < end:
        pos = curr.start + curr.length
        nxt = status_at(stack, pos, end - pos, names)
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
        curr = nxt
    if curr.length > 0 or start >= end:
        yield curr


def map(path: str, fmt: str | None = None, *, start: int = 0, max_length: int | None = None,
        parent_search=(), force: bool = False, untrusted: bool = False, force_share: bool = False) -> list:
    """qemu-img map as a list of MapEntry (``.to_json()`` gives qemu-img's
    keys plus ``compressed``)."""
    with open_image(path, fmt, parent_search=parent_search, force=force, untrusted=untrusted,
                    force_share=force_share) as stack:
        return list(map_entries(stack, start, max_length, path))


def map_human_lines(entries, path: str) -> Iterator[str]:
    """qemu-img map's table: data ranges only, hexadecimal; data without
    a host offset (compressed clusters) is an error, as in qemu-img."""
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"
    for e in entries:
        if e.data and e.offset is None:
            raise VdError("File contains external, encrypted or compressed clusters.", path)
        if e.data and not e.zero:
            yield f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}"


def _hex(n: int) -> str:
    """C's %#x: no 0x before a zero."""
    return f"{n:#x}" if n else "0"

"""Laying out an image ahead, for a destination written front to back (a
pipe, standard output, a device), without a temporary copy of its data.

Formats whose tables come before their data (qcow2, VDI, VHD, VMDK
monolithicSparse) cannot be written to a pipe as they are made: a table
is only final once every block has been placed.  So convert makes the image
twice:

1. **Plan.**  The normal convert runs into a shadow file in TMPDIR
   (``ShadowFile``): the backend, the copy engine and their zero tests are
   the very ones a file DST gets, so the layout is the same byte for byte.
   Tables and headers are kept in the shadow (a few MiB for most images);
   a write of the source's data is not stored, only noted: where it went in
   the image and where it came from on the source disk.  The data is
   recognised by its buffer: it is a slice of the buffer the copy engine
   handed to the backend's ``write`` (``Recording``).  Anything else the
   backend writes (a copy, a padded block) is stored like a table.
2. **Emit.**  The shadow is sent from its first byte to its last, each noted
   range read again from the source.

The source is read twice (like QEMU's qcow2-to-stdout.py, which scans for
zeros first); memory stays bounded and TMPDIR holds only the tables.  A
source that cannot be read twice (standard input, a URL) is not planned:
convert writes the whole image into a temporary file instead."""

from __future__ import annotations

import bisect

from vdtool.core.errors import VdError
from vdtool.core.fileio import ImageFile


def buffer_address(view) -> int | None:
    """Where a writable buffer's first byte is in memory (None for a
    read-only or empty buffer)."""
    import ctypes  # here: only convert to a stream needs it

    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


class DataMap:
    """The noted data ranges of the shadow: (host offset, length, disk
    offset), sorted by host offset and never overlapping; a later write
    over a range (stored or noted) takes its place."""

    def __init__(self):
        self.hosts: list = []
        self.ranges: list = []  # (host, length, voff)
        self.current: tuple | None = None  # (address, length, voff) of the buffer being written
        self.noted_bytes = 0

    def source_offset(self, view) -> int | None:
        """The disk offset ``view`` holds if it is a slice of the buffer
        being written, else None."""
        cur = self.current
        if cur is None or not len(view):
            return None
        addr = buffer_address(view)
        if addr is None or not (cur[0] <= addr and addr + len(view) <= cur[0] + cur[1]):
            return None
        return cur[2] + (addr - cur[0])

    def forget(self, host: int, n: int) -> None:
        """[host, host+n) no longer holds noted data."""
        if not self.ranges or host >= self.ranges[-1][0] + self.ranges[-1][1]:
            return  # the usual case: past every noted range
        end = host + n
        i = max(0, bisect.bisect_right(self.hosts, host) - 1)
        keep_before, keep_after = [], []
        j = i
        while j < len(self.ranges) and self.ranges[j][0] < end:
            h, k, v = self.ranges[j]
            if h + k > host:
                if h < host:
                    keep_before.append((h, host - h, v))
                if h + k > end:
                    keep_after.append((end, h + k - end, v + (end - h)))
            else:
                keep_before.append((h, k, v))
            j += 1
        self.ranges[i:j] = keep_before + keep_after
        self.hosts[i:j] = [r[0] for r in keep_before + keep_after]

    def note(self, host: int, n: int, voff: int) -> None:
        self.forget(host, n)
        self.noted_bytes += n
        if self.ranges:
            h, k, v = self.ranges[-1]
            if h + k == host and v + k == voff:  # continues the last range
                self.ranges[-1] = (h, k + n, v)
                return
            if host < h:
                i = bisect.bisect_left(self.hosts, host)
                self.ranges.insert(i, (host, n, voff))
                self.hosts.insert(i, host)
                return
        self.ranges.append((host, n, voff))
        self.hosts.append(host)


class NotPlannable(Exception):
    """The backend read back data that was only noted: plan differently."""


class ShadowFile(ImageFile):
    """An image file that stores what the backend writes except the
    source's data, which ``data_map`` notes instead (a subclass per plan
    sets it).  Zeros and preallocation stay holes."""

    data_map: DataMap

    def pwrite(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        voff = self.data_map.source_offset(mv)
        if voff is None:
            self.data_map.forget(offset, len(mv))
            super().pwrite(offset, mv)
            return
        self.data_map.note(offset, len(mv), voff)
        self._hole(offset, len(mv))

    def _hole(self, offset: int, n: int) -> None:
        """[offset, offset+n) reads as zeros in the shadow, which is at
        least that long."""
        size = self.size()
        if offset < size:
            self.punch_hole(offset, min(n, size - offset)) or super().write_zeroes(offset, min(n, size - offset))
        if offset + n > size:
            self.truncate(offset + n)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.data_map.forget(offset, length)
        self._hole(offset, length)

    def preallocate(self, offset: int, length: int) -> None:
        if offset + length > self.size():
            self.truncate(offset + length)

    def pread(self, offset: int, length: int) -> bytes:
        self._readable(offset, length)
        return super().pread(offset, length)

    def readinto(self, offset: int, buf) -> int:
        self._readable(offset, len(memoryview(buf).cast("B")))
        return super().readinto(offset, buf)

    def _readable(self, offset: int, length: int) -> None:
        ranges = self.data_map.ranges
        if not ranges or offset >= ranges[-1][0] + ranges[-1][1]:
            return
        i = max(0, bisect.bisect_right(self.data_map.hosts, offset) - 1)
        while i < len(ranges) and ranges[i][0] < offset + length:
            h, k, _ = ranges[i]
            if h + k > offset:
                raise NotPlannable(f"the backend read back data at {h}")
            i += 1


def shadow_class(data_map: DataMap) -> type:
    return type("PlannedShadowFile", (ShadowFile,), {"data_map": data_map})


class Recording:
    """The new image as the copy engine sees it, telling the data map which
    buffer each ``write`` carries (everything else goes to the backend)."""

    def __init__(self, top, data_map: DataMap):
        self._top, self._map = top, data_map

    def __getattr__(self, name):
        return getattr(self._top, name)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        addr = buffer_address(mv)
        self._map.current = (addr, len(mv), offset) if addr is not None else None
        try:
            self._top.write(offset, data)
        finally:
            self._map.current = None


def emit(shadow_fd: int, total: int, data_map: DataMap, source, target, deliver_range, progress) -> None:
    """Send the planned image into ``target``: stored bytes and holes from
    the shadow (``deliver_range(fd, start, end)``), noted ranges read again
    from ``source`` (a stack)."""
    buf = bytearray(1 << 20)
    pos = 0
    for host, n, voff in data_map.ranges:
        if host > pos:
            deliver_range(shadow_fd, pos, min(host, total))
        send_source(source, voff, n, target, host, buf, progress, total)
        pos = host + n
    if pos < total:
        deliver_range(shadow_fd, pos, total)
    if pos > total:
        raise VdError(f"internal error: planned data ends at {pos}, past the image's end {total}", target.name)


def send_source(source, offset: int, length: int, target, at: int, buf: bytearray, progress, total: int) -> int:
    """The disk bytes [offset, offset + length) of ``source`` into ``target``
    from ``at``: what a raw layer stores goes by sendfile (into a pipe: page
    references, no copy), zeros as zeros, the rest is read into ``buf`` and
    written.  Returns how many were data (not zeros)."""
    piece = 64 * len(buf)  # progress is reported between pieces
    if hasattr(source, "file_runs"):
        runs = source.file_runs(offset, length)
    else:
        runs = ((True, None, None, length),)
    pos = data = 0
    for is_data, fd, host, n in runs:
        start, end = pos, pos + n
        if not is_data:
            target.zero(at + pos, n)
            pos = end
        while pos < end:
            m = min(piece, end - pos)
            sent = target.send_file(fd, host + pos - start, at + pos, m) if fd is not None else 0
            if sent:
                m = sent  # all of it, or up to where the file ends (the rest is read next)
            else:
                m = min(len(buf), m)
                view = memoryview(buf)[:m]
                source.readinto(offset + pos, view)
                target.write_at(at + pos, view)
            data += m
            pos += m
            progress.update(at + pos, total)
    return data


class AppendFile:
    """A new image file that is the target itself, for a writer that only
    appends (VMDK streamOptimized: grains, then each grain table, the
    directory and the footer after them).  A write behind what was sent,
    or a read, is refused: that writer does neither."""

    target = None  # set by append_class
    writable = True

    def __init__(self, path: str, *, writable: bool = True, create: bool = False, lock: bool = True):
        self.path = path

    def pwrite(self, offset: int, data) -> None:
        if offset < self.target.written:
            raise VdError(f"internal error: a write at {offset} after {self.target.written} bytes were sent",
                          self.target.name)
        self.target.write_at(offset, data)

    def truncate(self, size: int) -> None:
        if size < self.target.written:
            raise VdError(f"internal error: a cut to {size} bytes after {self.target.written} were sent",
                          self.target.name)
        if size > self.target.written:
            self.target.zero(self.target.written, size - self.target.written)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.pwrite(offset, bytes(0))
        self.target.zero(offset, length)

    def size(self) -> int:
        return self.target.written

    def pread(self, offset: int, length: int) -> bytes:
        raise VdError("internal error: a streaming writer read back what it sent", self.target.name)

    pread_exact = readinto = pread

    def set_perms(self, held: int, shared: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def append_class(target) -> type:
    return type("TargetAppendFile", (AppendFile,), {"target": target})

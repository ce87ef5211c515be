"""The read side of ImageFile for images that are not local files (standard
input read into a spool, an http(s) URL): what backends need to read one."""

from __future__ import annotations

from vdtool.core.errors import CorruptImageError

_PERM_ALL = 0x0F  # fileio.PERM_ALL: every lock permission shared


class SourceFile:
    """ImageFile's read side for something that is not a local file: a
    subclass provides ``path``, ``pread(offset, length)`` (short only at the
    end) and ``size()``; everything here builds on those two."""

    writable = False
    perms = (0, _PERM_ALL)

    def pread_exact(self, offset: int, length: int, what: str = "data") -> bytes:
        data = self.pread(offset, length)
        if len(data) != length:
            raise CorruptImageError(
                f"{what} at offset {offset} (length {length}) runs past the end of the image "
                f"(size {self.size()})", self.path)
        return data

    def readinto(self, offset: int, buf) -> int:
        mv = memoryview(buf).cast("B")
        data = self.pread(offset, len(mv))
        mv[:len(data)] = data
        if len(data) < len(mv):
            mv[len(data):] = bytes(len(mv) - len(data))
        return len(data)

    def set_perms(self, held: int, shared: int) -> None:
        pass  # nothing to lock: nobody else can write what vdtool reads here

    def allocated_size(self) -> int:
        return self.size()

    def next_data(self, offset: int) -> int:
        return offset  # no holes known: all data

    def next_hole(self, offset: int) -> int:
        return max(offset, self.size())

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

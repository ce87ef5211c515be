"""``VhdxState``: what every module of the package shares about one open
VHDX image, and the facts derived from it."""

from __future__ import annotations

from array import array

from vdtool.core.errors import CorruptImageError
from vdtool.core.fileio import ImageFile
from vdtool.core.layout import Record
from vdtool.formats.vhdx.layout import HAS_PARENT, LEAVE_BLOCK_ALLOCATED, LOG_SECTOR, bat_index, chunk_ratio


class VhdxState:
    """One open VHDX image.

    ``file``, ``path``     the ImageFile and its name
    ``fsize``              the file size as last known (grows as blocks are allocated)
    ``headers``            the two header records (None where a header is not valid)
    ``cur``                index of the current header; ``hdr`` is it
    ``regions``            the region table entries in use
    ``bat_offset``, ``bat_length``, ``meta_offset``, ``meta_length``: the two known regions
    ``meta_entries``       the metadata table entries (METADATA_TABLE_ENTRY records)
    ``block_size``, ``param_flags``, ``size``, ``logical_sector``, ``physical_sector``,
    ``page83``             the metadata items' values
    ``locator``            the parent locator's key/value pairs (HasParent images), else {}
    ``locator_type``       the parent locator's type GUID (None without one)
    ``bat``                the BAT, one u64 a entry
    ``dirty_pages``        indices of 4 KiB BAT pages changed since the last flush
    ``pending``            other metadata sectors to write through the log: file offset -> 4 KiB
    ``overlay``            a pending log read without replaying (read-only open): file
                           offset of a 4 KiB sector -> its bytes as the log has them
    ``session``            FileWriteGuid was renewed in this session (first modification done)
    ``data_renewed``       DataWriteGuid was renewed in this session, or must not be (``defer_identity``)
    ``log_seq``            the next log entry's sequence number
    ``problems``           what the open let through for check to report: (kind, text)
    ``log_replayed``       the open replayed a pending log
    ``bad``                BAT entries not to follow (bat.scan): reading or writing them is refused
    ``dirty_bitmaps``      sector bitmap chunk -> its changed 4 KiB pages"""

    __slots__ = ("file", "path", "fsize", "headers", "cur", "regions", "bat_offset", "bat_length", "meta_offset",
                 "meta_length", "meta_entries", "block_size", "param_flags", "size", "logical_sector",
                 "physical_sector", "page83", "locator", "locator_type", "bat", "dirty_pages", "pending", "overlay",
                 "session", "data_renewed", "log_seq", "problems", "log_replayed", "bad", "dirty_bitmaps")

    def __init__(self, file: ImageFile):
        self.file = file
        self.path: str = file.path
        self.fsize = 0
        self.headers: list = [None, None]
        self.cur = 0
        self.regions: list = []
        self.bat_offset = self.bat_length = self.meta_offset = self.meta_length = 0
        self.meta_entries: list = []
        self.block_size = 0
        self.param_flags = 0
        self.size = 0
        self.logical_sector = 512
        self.physical_sector = 4096
        self.page83 = bytes(16)
        self.locator: dict = {}
        self.locator_type: bytes | None = None
        self.bat = array("Q")
        self.dirty_pages: set = set()
        self.pending: dict = {}
        self.overlay: dict = {}
        self.session = False
        self.data_renewed = False
        self.log_seq = 1
        self.problems: list = []
        self.log_replayed = False
        self.bad: set = set()
        self.dirty_bitmaps: dict = {}

    def corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(msg, self.path)

    # -- derived facts --------------------------------------------------------------------------
    @property
    def hdr(self) -> Record:
        return self.headers[self.cur]

    @property
    def has_parent(self) -> bool:
        return bool(self.param_flags & HAS_PARENT)

    @property
    def fixed(self) -> bool:
        return bool(self.param_flags & LEAVE_BLOCK_ALLOCATED)

    @property
    def ratio(self) -> int:
        return chunk_ratio(self.block_size, self.logical_sector)

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    def entry(self, block: int) -> int:
        return self.bat[bat_index(block, self.ratio)]

    def set_entry(self, index: int, value: int) -> None:
        """Change BAT entry ``index`` (written through the log at the next flush)."""
        self.bat[index] = value
        self.dirty_pages.add(index * 8 // LOG_SECTOR)

    # -- reading metadata (through a pending log's overlay) ------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """File bytes at ``offset`` as a replayed log would leave them
        (short at the end of the file, as pread)."""
        data = self.file.pread(offset, length)
        if not self.overlay:
            return data
        buf = bytearray(data)
        end = offset + length
        first = offset - offset % LOG_SECTOR
        for sec in range(first, end, LOG_SECTOR):
            patch = self.overlay.get(sec)
            if patch is None:
                continue
            lo, hi = max(sec, offset), min(sec + LOG_SECTOR, end)
            if len(buf) < hi - offset:
                buf.extend(bytes(hi - offset - len(buf)))
            buf[lo - offset:hi - offset] = patch[lo - sec:hi - sec]
        return bytes(buf)

    def readinto(self, offset: int, buf) -> None:
        """Fill ``buf`` from the file (zeros past its end), through the overlay."""
        if not self.overlay:
            self.file.readinto(offset, buf)
            return
        mv = memoryview(buf).cast("B")
        data = self.read(offset, len(mv))
        mv[:len(data)] = data
        mv[len(data):] = bytes(len(mv) - len(data))

"""The contract every format backend implements (one image, no parents).

Like VirtualBox's VDIMAGEBACKEND, a backend sees only its own file.  The
stack (vdtool.core.stack) owns fall-through to parents; where a backend needs
parent data (copy-on-write of a partial block, compact of an overlay) it calls
``self.parent_read(offset, length)``, which the stack sets; standalone it
reads zeros."""

from __future__ import annotations

import enum
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Optional

from vdtool.core.errors import NotSupported, ReadOnlyError, UnsupportedFeature, UsageError, VdError
from vdtool.core.progress import NO_PROGRESS, Progress


class Status(enum.IntEnum):
    UNALLOCATED = 0  # not in this image: the parent's data shows through
    ZERO = 1  # reads as zeros, whatever the parent holds
    DATA = 2  # this image holds the data


class MapExtent(NamedTuple):
    """Where a run of guest bytes lives (``map_extent``): qemu-img map's facts
    for one image.  ``status`` as block_status; ``offset``: the run's host
    offset in ``file`` (None where there is none: compressed, zero or
    unallocated data, or a backend that cannot tell); ``zero``: DATA known
    to read as zeros (a hole in the file under allocated or flat data);
    ``file``: the file ``offset`` is in (None: the image's own file)."""

    status: "Status"
    length: int
    offset: Optional[int] = None
    compressed: bool = False
    zero: bool = False
    file: Optional[str] = None


class Cap(enum.Flag):
    NONE = 0
    CREATE_DYNAMIC = enum.auto()
    CREATE_FIXED = enum.auto()
    DIFF = enum.auto()  # can be an overlay (records a parent)
    WRITE = enum.auto()
    DISCARD = enum.auto()
    COMPACT = enum.auto()
    RESIZE = enum.auto()
    SHRINK = enum.auto()
    CHECK = enum.auto()
    REPAIR = enum.auto()
    UUID = enum.auto()
    COMPRESS = enum.auto()
    ZERO_MARKER = enum.auto()  # can record ZERO over parent data


@dataclass
class ParentRef:
    """How an image names its parent, as read from the file."""

    filename: Optional[str] = None  # as recorded (may be relative)
    format: Optional[str] = None
    uuid: Optional[str] = None
    modification_uuid: Optional[str] = None
    extra: dict = field(default_factory=dict)


@dataclass
class ParentSpec:
    """What a backend needs to record a parent when creating an overlay."""

    path: str  # the parent's real path
    recorded_name: str  # name to store (relative to the child's folder if possible)
    format: str
    size: int
    uuid: Optional[str] = None
    modification_uuid: Optional[str] = None
    mtime: Optional[float] = None
    # The parent's opened top image, for format facts a child records
    # (VMDK's CID, VHD's timestamp); read it, never write or close it.
    image: Optional["ImageBackend"] = None


@dataclass
class FormatOption:
    """A ``-o KEY=VALUE`` option a backend accepts (VirtualBox's config keys)."""

    name: str
    type: type  # int, str, bool, or "size"
    default: Any
    help: str
    choices: tuple = ()

    def parse(self, value: str, fmt: str) -> Any:
        from vdtool.core.sizes import parse_size

        # Python callers (ops.create(options={...})) pass typed values, the
        # CLI passes strings: a bool or int used to hit value.lower() /
        # int(value, 0) and escape as AttributeError/TypeError.
        if isinstance(value, bool) and self.type is bool:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and self.type in (int, "size"):
            return value
        if not isinstance(value, str):
            raise UsageError(f"{fmt} option {self.name}: invalid value {value!r} ({self.help})")
        try:
            if self.type is bool:
                v = value.lower()
                if v in ("on", "true", "yes", "1"):
                    return True
                if v in ("off", "false", "no", "0"):
                    return False
                raise ValueError
            if self.type == "size":
                return parse_size(value)
            if self.type is int:
                return int(value, 0)
            out = str(value)
        except (ValueError, UsageError):
            raise UsageError(f"{fmt} option {self.name}: invalid value {value!r} ({self.help})") from None
        if self.choices and out not in self.choices:
            raise UsageError(f"{fmt} option {self.name}: invalid value {value!r}; choose from {', '.join(self.choices)}")
        return out


@dataclass
class CheckResult:
    """QEMU's BdrvCheckResult, plus messages for the report."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: Optional[int] = None
    total_clusters: Optional[int] = None
    allocated_clusters: Optional[int] = None
    fragmented_clusters: Optional[int] = None
    compressed_clusters: Optional[int] = None
    messages: list = field(default_factory=list)
    # Why the image's chain cannot be opened (a parent missing, or not the
    # image the child recorded): a check error, as qemu-img's "Could not
    # open backing file" is; reported in JSON as "chain-error".
    chain_error: Optional[str] = None
    format_name: Optional[str] = None  # the format the image was checked as (vdtool's name)

    # Every format reports in the same words: "ERROR: ..." for corruption
    # and check errors, "Repairing: ..." for corruption being repaired,
    # "Leaked: ..." for leaks, notes as given; at most MAX_MESSAGES lines
    # (the counts go on).
    MAX_MESSAGES = 200

    def say(self, text: str) -> None:
        """Add one report line (notes and warnings: no count changes)."""
        if len(self.messages) < self.MAX_MESSAGES:
            self.messages.append(text)
        elif len(self.messages) == self.MAX_MESSAGES:
            self.messages.append("(further messages left out)")

    def corrupt(self, text: str, count: int = 1, repairing: bool = False) -> None:
        """``count`` corruptions, described by ``text``."""
        self.corruptions += count
        self.say(("Repairing: " if repairing else "ERROR: ") + text)

    def leak(self, text: str, count: int = 1) -> None:
        """``count`` leaked clusters or blocks, described by ``text``."""
        self.leaks += count
        self.say("Leaked: " + text)

    def error(self, text: str) -> None:
        """The check itself could not look at something (qemu-img's
        check-errors: exit status 1)."""
        self.check_errors += 1
        self.say("ERROR: " + text)

    def to_json(self, filename: str, fmt: str) -> dict:
        d: dict = {"filename": filename, "format": fmt, "check-errors": self.check_errors}
        for key, val in (
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("image-end-offset", self.image_end_offset),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if val is not None and (val or key in ("corruptions", "leaks") or key.endswith("clusters")
                                    or key == "image-end-offset"):
                d[key] = val
        if self.chain_error:
            d["chain-error"] = self.chain_error
        return d

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions > self.corruptions_fixed:
            return 2
        if self.leaks > self.leaks_fixed:
            return 3
        return 0


class MeasureSource:
    """What ``ImageBackend.measure`` asks of an image being measured (the
    op gives a stack-backed one, vdtool.core.measure.StackSource)."""

    def data_blocks(self, block: int) -> int:
        """How many ``block``-byte blocks convert would write: those holding
        any non-zero byte."""
        raise NotImplementedError

    def bitmaps_size(self, cluster_size: int) -> Optional[int]:
        """Bytes qcow2 needs for the image's persistent bitmaps at
        ``cluster_size``; None when the image cannot have any."""
        return None


def zeros_reader(offset: int, length: int) -> bytes:
    return bytes(length)


class ImageBackend:
    """Base class.  Subclasses override what their capabilities promise;
    a test holds each class's flags against what it overrides."""

    name: ClassVar[str] = ""
    extensions: ClassVar[tuple] = ()
    capabilities: ClassVar[Cap] = Cap.NONE
    variants: ClassVar[tuple] = ()  # first is the default
    multi_file_variants: ClassVar[tuple] = ()  # variants made of several files (not for pipes or devices)
    append_only_variants: ClassVar[tuple] = ()  # variants written front to back only (straight into a pipe)
    # An overlay records facts read from its parent (VDI/VHD UUIDs, VMDK's
    # CID), so the parent must exist to create one; qcow2 records a name
    # and a format only, and takes ``create -u`` (the parent need not exist).
    parent_identity: ClassVar[bool] = True
    options: ClassVar[tuple] = ()  # FormatOption, for -o
    # Where a block is big and a write into a new one leaves the rest as a
    # hole that reads as zeros (VHD, VHDX), a copy need not write the zero
    # parts of a block: it tests and skips zeros in pieces of this size.
    # 0: the block (a format that fills a new block whole, or compresses it).
    sparse_grain: ClassVar[int] = 0
    amend_options: ClassVar[tuple] = ()  # FormatOption, for amend -o (what can change in place)

    def __init__(self, file):
        self.file = file  # vdtool.core.fileio.ImageFile
        self.path: str = file.path
        self.writable: bool = file.writable
        # Set by the stack: reads what the layers below show (zeros if none).
        self.parent_read: Callable[[int, int], bytes] = zeros_reader

    # -- class-level ---------------------------------------------------------
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        """0..100: how sure the format is that the file is its own, from its
        first 64 KiB (``head``) and last 4 KiB (``tail``)."""
        return 0

    @classmethod
    def open(cls, path: str, *, writable: bool = False, options: Optional[dict] = None) -> "ImageBackend":
        """Open the file and read its metadata (``_load_image``); whatever
        fails on the way, the file is closed again.  A format without
        Cap.WRITE (bochs, cloop...) refuses a writable open here, so no op
        can change it, nor do nothing and report success."""
        from vdtool.core.fileio import open_file

        if writable and not cls.capabilities & Cap.WRITE:
            raise NotSupported("writing", cls.name, path,
                               f"vdtool reads {cls.name} images but never changes them; convert the image to a "
                               f"writable format first")
        f = open_file(path, writable=writable)
        img = None
        try:
            img = cls(f)
            img._load_image(options or {})
            return img
        except BaseException:
            if img is not None:
                img._abandon()
            else:
                f.close()
            raise

    @classmethod
    def stream_source(cls, head: bytes, read, name: str):
        """A source stack that reads the image front to back from a stream
        whose first bytes are ``head`` (``read(n)`` gives the next ones),
        when this format and this image can be read that way; None to have
        the stream read into a temporary file instead."""
        return None

    def _load_image(self, options: dict) -> None:
        """Read and check the format's metadata (formats override); ``options``
        are open options such as ``repair``, ``check`` or ``force``."""

    def _abandon(self) -> None:
        """Close what a failed open left open (formats with several files
        override)."""
        self.file.close()

    def _corrupt(self, msg: str):
        from vdtool.core.errors import CorruptImageError

        return CorruptImageError(msg, self.path)

    @classmethod
    def create(cls, path: str, size: int, *, variant: Optional[str] = None, block_size: Optional[int] = None,
               parent: Optional[ParentSpec] = None, options: Optional[dict] = None,
               progress: Progress = NO_PROGRESS) -> "ImageBackend":
        """Create a new image at ``path`` (the caller made sure it may) and
        return it opened for writing."""
        raise NotSupported("create", cls.name)

    @classmethod
    def measure(cls, size: int, source: Optional["MeasureSource"], *, variant: Optional[str] = None,
                block_size: Optional[int] = None, options: Optional[dict] = None) -> dict:
        """How big a new image of ``size`` bytes would be (qemu-img measure):
        ``{"required": N, "fully-allocated": N}`` in bytes of files, plus
        qemu's ``"bitmaps"`` where the format stores persistent bitmaps.
        ``required`` is the size of what ``create`` (``source`` None) or
        ``convert`` from ``source`` writes with this variant, block size and
        ``options`` (the ``-o`` strings, checked as create checks them);
        ``fully-allocated`` is the size with every block allocated."""
        raise NotSupported("measure", cls.name)

    def persistent_bitmaps(self) -> Optional[list]:
        """The image's persistent dirty bitmaps as ``(name, granularity)``
        pairs (qemu-img measure's ``bitmaps``), ``[]`` for none, or None
        where the format (or this version of it) cannot store any."""
        return None

    @classmethod
    def parse_options(cls, pairs: dict) -> dict:
        """Turn ``-o`` strings into typed values; unknown keys are usage errors."""
        known = {o.name: o for o in cls.options}
        out = {o.name: o.default for o in cls.options}
        for key, value in pairs.items():
            if key not in known:
                valid = ", ".join(sorted(known)) or "none"
                raise UsageError(f"unknown {cls.name} option {key!r} (valid options: {valid})")
            out[key] = known[key].parse(value, cls.name)
        return out

    # -- facts ---------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        """Allocation granularity (cluster, grain, block) in bytes."""
        return 1 << 16

    @property
    def parent(self) -> Optional[ParentRef]:
        return None

    @property
    def variant(self) -> Optional[str]:
        return None

    @property
    def uuid(self) -> Optional[str]:
        return None

    def info(self) -> dict:
        """Format-specific facts for ``info`` (qemu-img's format-specific data)."""
        return {}

    def external_references(self) -> list:
        """Other files this image makes readers open (backing, data files...)."""
        ref = self.parent
        return [ref.filename] if ref and ref.filename else []

    # -- data ----------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> tuple:
        """(Status, n) for the run starting at ``offset``; 0 < n <= length."""
        raise NotImplementedError

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """block_status with where the data lives (qemu-img map): a MapExtent
        for the run at ``offset``, 0 < length <= ``length``.  The default
        knows no host offsets; formats that can tell override it."""
        status, n = self.block_status(offset, length)
        return MapExtent(status, n)

    def check_range(self, offset: int, length: int) -> None:
        """A write or zeroing of ``length`` bytes at ``offset`` must lie on the disk."""
        size = self.virtual_size
        if offset < 0 or length < 0 or offset + length > size:
            raise VdError(f"range {offset}+{length} is outside the disk (virtual size {size})", self.path)

    def readinto(self, offset: int, buf) -> None:
        """Fill ``buf`` with the data at ``offset``; the range lies inside what
        block_status reported as DATA or ZERO (UNALLOCATED reads as zeros)."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data) -> None:
        raise ReadOnlyError(f"writing is not supported for {self.name} images", self.path)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make the range read as zeros (ZERO markers or released blocks where
        the format can; never UNALLOCATED over a parent)."""
        pos, end = offset, offset + length
        chunk = 1 << 20
        while pos < end:
            n = min(chunk, end - pos)
            self.write(pos, bytes(n))
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Release what can be released; afterwards the range reads as zeros."""
        self.write_zeroes(offset, length, unmap=True)

    # -- compression (Cap.COMPRESS) -------------------------------------------
    # The copy engine (vdtool.core.copy) compresses whole blocks in a thread
    # pool with compress_block and writes them, in order, with
    # write_compressed_block.  These two hooks were only implied by copy.py;
    # they are declared here so every format implements the same names.
    def compress_block(self, data) -> Optional[bytes]:
        """Compress one whole block (``block_size`` bytes at a block-aligned
        offset, or the short last block); None when it does not get smaller.
        Runs in worker threads: no I/O, no shared state."""
        raise NotSupported("compression", self.name, self.path)

    def write_compressed_block(self, offset: int, compressed: Optional[bytes], data) -> None:
        """Store one block given compressed (from compress_block) and plain
        (``data``, stored as is when ``compressed`` is None)."""
        raise NotSupported("compression", self.name, self.path)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    # -- whole-image operations ---------------------------------------------
    def resize(self, new_size: int) -> None:
        raise NotSupported("resize", self.name, self.path)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        raise NotSupported("compact", self.name, self.path)

    # -- internal snapshots (qemu-img snapshot) -------------------------------
    def snapshot_list(self) -> Optional[list]:
        """The internal snapshots as qemu-img info lists them (id, name,
        vm-state-size, date-sec, date-nsec, vm-clock-sec, vm-clock-nsec,
        icount); None when the format has no internal snapshots."""
        return None

    def snapshot_change(self, action: str, name: str) -> dict:
        """``action`` 'create', 'apply' or 'delete' the snapshot ``name``
        (apply looks up an id first, then a name; delete a name, as qemu-img
        does); returns the snapshot as snapshot_list shows it."""
        raise UnsupportedFeature(f"{self.name} images have no internal snapshots", self.path)

    # -- check (a template method: formats implement _check) ------------------
    def check(self, repair: Optional[str] = None, progress: Progress = NO_PROGRESS) -> CheckResult:
        """Check the image's metadata; ``repair`` is None, 'leaks' or 'all'.

        The same for every format: the repair mode and the image's
        capabilities and writability are validated here, the format's
        ``_check`` fills in a CheckResult, and what it raises on the way
        (a VdError, or a parse error from a damaged table) becomes a check
        error instead of ending the check."""
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"check repair mode must be None, 'leaks' or 'all', not {repair!r}")
        if not self.capabilities & Cap.CHECK:
            raise NotSupported("check", self.name, self.path)
        if repair and not self.capabilities & Cap.REPAIR:
            raise NotSupported("repair", self.name, self.path)
        if repair and not self.writable:
            raise ReadOnlyError("image is opened read-only; it must be opened for writing to repair it", self.path)
        res = CheckResult()
        try:
            self._check(res, repair, progress)
        except VdError as e:
            res.error(str(e))
        except (struct.error, ValueError, OverflowError, IndexError, KeyError, zlib.error, MemoryError) as e:
            res.error(f"internal check failure: {type(e).__name__}: {e}")
        return res

    def _check(self, res: CheckResult, repair: Optional[str], progress: Progress) -> None:
        """The format's check (Cap.CHECK): count what is wrong into ``res``
        with its ``corrupt``/``leak``/``error``/``say`` helpers, and repair
        it when ``repair`` asks ('leaks' or 'all'; the image is then open
        for writing).  Where the walk is proportional to the image, report
        ``progress`` as it goes; the op reports 100 at the end."""
        raise NotSupported("check", self.name, self.path)

    def defer_identity_change(self) -> None:
        """The writes that follow keep what the image's children check
        (VDI's modification UUID, VMDK's CID) until ``change_identity``:
        ops that write data the image's readers already see (merge into
        parent, compact, merge into child, safe rebase) use it, so that a
        crash in the middle does not make the children refuse their parent.
        Formats whose children check nothing that writes change need
        nothing."""

    def change_identity(self) -> None:
        """Give the image a new modification identity now (written at the
        next flush); for merge into parent, after the merged images are gone."""

    def set_parent(self, parent: Optional[ParentSpec]) -> None:
        """Rewrite the parent reference (rebase, merge into child)."""
        raise NotSupported("changing the parent", self.name, self.path)

    # -- amend (qemu-img amend) ------------------------------------------------
    @classmethod
    def parse_amend_options(cls, pairs: dict, path: Optional[str] = None) -> dict:
        """The ``amend -o`` strings as typed values (only the keys given).
        As qemu-img amend, a bad key or value is an error with exit status
        1; a creation-only option says so."""
        known = {o.name: o for o in cls.amend_options}
        if not known:
            raise NotSupported("option amendment", cls.name, path)
        out = {}
        for key, value in pairs.items():
            if key not in known:
                why = (" (this option is only supported for image creation)"
                       if any(o.name == key for o in cls.options) else "")
                raise VdError(f"invalid {cls.name} amend option {key!r}{why}; valid options: "
                              f"{', '.join(sorted(known))}", path)
            try:
                out[key] = known[key].parse(value, cls.name)
            except UsageError as e:
                raise VdError(str(e), path) from None
        return out

    def amend(self, options: dict, progress: Progress = NO_PROGRESS) -> list:
        """Change in place what ``options`` (from parse_amend_options) ask,
        crash-safe, and return what changed as (key, old, new) tuples.
        Formats that can declare ``amend_options`` and override this."""
        raise NotSupported("option amendment", self.name, self.path)

    def actual_size(self) -> int:
        return self.file.allocated_size()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def relative_parent_name(child_path: str, parent_path: str) -> str:
    """The parent's name as recorded in a child: relative to the child's
    folder where that is possible, else absolute; a URL as it is."""
    if parent_path[:8].lower().startswith(("http://", "https://")):
        return parent_path
    child_dir = os.path.dirname(os.path.abspath(child_path))
    parent_abs = os.path.abspath(parent_path)
    try:
        return os.path.relpath(parent_abs, child_dir)
    except ValueError:
        return parent_abs

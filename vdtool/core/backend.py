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
from collections import namedtuple
from collections.abc import Callable

from vdtool.core.errors import NotSupported, ReadOnlyError, UnsupportedFeature, UsageError, VdError
from vdtool.core.progress import NO_PROGRESS, Progress

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, ClassVar


class Status(enum.IntEnum):
    UNALLOCATED = 0  # not in this image: the parent's data shows through
    ZERO = 1  # reads as zeros, whatever the parent holds
    DATA = 2  # this image holds the data


class MapExtent(namedtuple("MapExtent", ("status", "length", "offset", "compressed", "zero", "file"),
                           defaults=(None, False, False, None))):
    """Where a run of guest bytes lives (``map_extent``): qemu-img map's facts
    for one image.  ``status`` as block_status; ``offset``: the run's host
    offset in ``file`` (None where there is none: compressed, zero or
    unallocated data, or a backend that cannot tell); ``zero``: DATA known
    to read as zeros (a hole in the file under allocated or flat data);
    ``file``: the file ``offset`` is in (None: the image's own file)."""

    __slots__ = ()  # status: Status, length: int, offset: int | None, compressed, zero: bool, file: str | None


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


class _Fields:
    """repr and == over ``_fields``, as @dataclass gave them (a dataclass
    costs about a millisecond of start-up to build, and the dataclasses
    module brings inspect: several milliseconds of every ``vdtool info``)."""

    _fields: tuple = ()
    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._fields)})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self._fields)


class ParentRef(_Fields):
    """How an image names its parent, as read from the file.

    ``filename`` as recorded (may be relative), ``format``, ``uuid``,
    ``modification_uuid``, ``extra`` (a dict)."""

    _fields = ("filename", "format", "uuid", "modification_uuid", "extra")

    def __init__(self, filename: str | None = None, format: str | None = None, uuid: str | None = None,
                 modification_uuid: str | None = None, extra: dict | None = None):
        self.filename = filename
        self.format = format
        self.uuid = uuid
        self.modification_uuid = modification_uuid
        self.extra = {} if extra is None else extra


class ParentSpec(_Fields):
    """What a backend needs to record a parent when creating an overlay.

    ``path`` the parent's real path, ``recorded_name`` the name to store
    (relative to the child's folder if possible), ``format``, ``size``,
    ``uuid``, ``modification_uuid``, ``mtime``; ``image``: the parent's
    opened top image, for format facts a child records (VMDK's CID, VHD's
    timestamp): read it, never write or close it."""

    _fields = ("path", "recorded_name", "format", "size", "uuid", "modification_uuid", "mtime", "image")

    def __init__(self, path: str, recorded_name: str, format: str, size: int, uuid: str | None = None,
                 modification_uuid: str | None = None, mtime: float | None = None,
                 image: ImageBackend | None = None):
        self.path = path
        self.recorded_name = recorded_name
        self.format = format
        self.size = size
        self.uuid = uuid
        self.modification_uuid = modification_uuid
        self.mtime = mtime
        self.image = image


class FormatOption(_Fields):
    """A ``-o KEY=VALUE`` option a backend accepts (VirtualBox's config
    keys); ``type``: int, str, bool, or "size"."""

    _fields = ("name", "type", "default", "help", "choices")

    def __init__(self, name: str, type: Any, default: Any, help: str, choices: tuple = ()):
        self.name = name
        self.type = type
        self.default = default
        self.help = help
        self.choices = choices

    def parse(self, value: str, fmt: str) -> Any:
        from vdtool.core.sizes import parse_size

        # Python callers (ops.create(options={...})) pass typed values, the
        # CLI passes strings: a bool or int used to hit value.lower() /
        # int(value, 0) and escape as AttributeError/TypeError.
        if isinstance(value, bool) and self.type is bool:
            return value
        if value is None and self.default is None:
            return None  # an option whose default is "not given", parsed twice (ops, then the backend)
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


class CheckResult(_Fields):
    """QEMU's BdrvCheckResult, plus messages for the report.

    ``chain_error``: why the image's chain cannot be opened (a parent
    missing, or not the image the child recorded): a check error, as
    qemu-img's "Could not open backing file" is; reported in JSON as
    "chain-error".  ``format_name``: the format the image was checked as
    (vdtool's name)."""

    _fields = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed", "image_end_offset",
               "total_clusters", "allocated_clusters", "fragmented_clusters", "compressed_clusters", "messages",
               "chain_error", "format_name")

    def __init__(self, corruptions: int = 0, leaks: int = 0, check_errors: int = 0, corruptions_fixed: int = 0,
                 leaks_fixed: int = 0, image_end_offset: int | None = None,
                 total_clusters: int | None = None, allocated_clusters: int | None = None,
                 fragmented_clusters: int | None = None, compressed_clusters: int | None = None,
                 messages: list | None = None, chain_error: str | None = None,
                 format_name: str | None = None):
        self.corruptions = corruptions
        self.leaks = leaks
        self.check_errors = check_errors
        self.corruptions_fixed = corruptions_fixed
        self.leaks_fixed = leaks_fixed
        self.image_end_offset = image_end_offset
        self.total_clusters = total_clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters
        self.compressed_clusters = compressed_clusters
        self.messages = [] if messages is None else messages
        self.chain_error = chain_error
        self.format_name = format_name

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

    def bitmaps_size(self, cluster_size: int) -> int | None:
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
    # Whether map_extent's host offsets may be handed to the kernel to copy
    # (sendfile into a pipe) without readinto's checks: only where the disk
    # is the file (raw).  An image format's reads check each data cluster
    # against its metadata first (a hostile table may point into the
    # header), so its data is read, not sent.
    kernel_copy: ClassVar[bool] = False
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
    def open(cls, path: str, *, writable: bool = False, options: dict | None = None) -> "ImageBackend":
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
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "ImageBackend":
        """Create a new image at ``path`` (the caller made sure it may) and
        return it opened for writing."""
        raise NotSupported("create", cls.name)

    @classmethod
    def measure(cls, size: int, source: MeasureSource | None, *, variant: str | None = None,
                block_size: int | None = None, options: dict | None = None) -> dict:
        """How big a new image of ``size`` bytes would be (qemu-img measure):
        ``{"required": N, "fully-allocated": N}`` in bytes of files, plus
        qemu's ``"bitmaps"`` where the format stores persistent bitmaps.
        ``required`` is the size of what ``create`` (``source`` None) or
        ``convert`` from ``source`` writes with this variant, block size and
        ``options`` (the ``-o`` strings, checked as create checks them);
        ``fully-allocated`` is the size with every block allocated."""
        raise NotSupported("measure", cls.name)

    def persistent_bitmaps(self) -> list | None:
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
    def parent(self) -> ParentRef | None:
        return None

    @property
    def variant(self) -> str | None:
        return None

    @property
    def uuid(self) -> str | None:
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
    def compress_block(self, data) -> bytes | None:
        """Compress one whole block (``block_size`` bytes at a block-aligned
        offset, or the short last block); None when it does not get smaller.
        Runs in worker threads: no I/O, no shared state."""
        raise NotSupported("compression", self.name, self.path)

    def write_compressed_block(self, offset: int, compressed: bytes | None, data) -> None:
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
    def snapshot_list(self) -> list | None:
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
    def check(self, repair: str | None = None, progress: Progress = NO_PROGRESS) -> CheckResult:
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

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
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

    def set_parent(self, parent: ParentSpec | None) -> None:
        """Rewrite the parent reference (rebase, merge into child)."""
        raise NotSupported("changing the parent", self.name, self.path)

    # -- amend (qemu-img amend) ------------------------------------------------
    @classmethod
    def parse_amend_options(cls, pairs: dict, path: str | None = None) -> dict:
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

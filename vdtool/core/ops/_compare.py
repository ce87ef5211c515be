"""compare: whether two images (each with its chain) show the same disk,
as ``qemu-img compare`` decides it, with its messages.

Both chains' block status is walked together: ranges that read as zeros
on both sides are equal without reading; zeros against data reads only the
data side and looks for a non-zero byte; only data against data reads
both.  Differences are reported at the start of the first 512-byte sector
that differs, as qemu-img reports them."""

from __future__ import annotations

from dataclasses import dataclass, field

from vdtool.core.errors import VdError
from vdtool.core.ops._map import status_at
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import ImageStack, open_image

SECTOR = 512
CHUNK = 4 << 20  # bytes read per side at a time


@dataclass
class CompareResult:
    identical: bool
    first_difference: int | None  # None when identical (or the sizes differ in strict mode)
    size_a: int
    size_b: int
    strict: bool = False
    # "content", "block-status" (strict), "size" (strict), or None
    reason: str | None = None
    messages: list = field(default_factory=list)  # qemu-img's lines, in order

    @property
    def exit_code(self) -> int:
        return 0 if self.identical else 1

    def to_json(self, a: str, b: str) -> dict:
        return {"identical": self.identical, "first-difference": self.first_difference, "size-a": self.size_a,
                "size-b": self.size_b, "strict": self.strict, "reason": self.reason, "image-a": a, "image-b": b}


def _qemu_run_unit(layer, data: bool) -> int:
    """The longest run QEMU's driver for ``layer``'s format answers one
    block-status query with.  It matters for one bit of strict mode: QEMU
    flags the run that reaches the end of the disk (BDRV_BLOCK_EOF), so
    with a driver that answers a grain or an L2 table at a time, only the
    last such piece carries the flag, and strict mode says "block status
    mismatch" where one image's piece reaches the end and the other's does
    not (an empty 1 GiB qcow2 against an empty 1 GiB VMDK differ at 512
    MiB)."""
    bs = max(int(layer.block_size or 512), 512)
    name = layer.name
    if name == "qcow2":
        return bs * (bs // 8)  # one L2 table
    if name == "vmdk":
        return bs if "Flat" not in str(layer.variant) else _NO_LIMIT
    if name == "vdi":
        return bs
    if name == "vhd":
        return bs if data and layer.variant != "fixed" else _NO_LIMIT
    return _NO_LIMIT


_NO_LIMIT = 1 << 80


class _Side:
    """One image's walk: the current run of block status (qemu's bits:
    allocated, zero, data, offset valid, end of file) and where it ends."""

    def __init__(self, stack: ImageStack):
        self.stack = stack
        self.size = stack.virtual_size
        self.last = len(stack.layers) - 1
        self.start = self.end = 0
        self.bits = None

    def _last_piece(self, depth: int, data: bool) -> int:
        """Where QEMU's last answer before the end of the disk starts: the
        one that carries the end-of-file flag (every layer it asked answers
        up to the end)."""
        layers = self.stack.layers
        start = 0
        for level in range(self.last, max(self.last - depth - 1, -1), -1):
            unit = _qemu_run_unit(layers[level], data)
            if unit < _NO_LIMIT:
                start = max(start, (self.size - 1) // unit * unit)
        return start

    def at(self, offset: int, limit: int) -> tuple:
        """(bits, n) for the run at ``offset`` (at most to ``limit``)."""
        if not (self.start <= offset < self.end):
            e = status_at(self.stack, offset, limit - offset)
            if e.present:
                allocated, offset_valid = True, e.offset is not None
            elif e.depth < self.last:
                # the layer's parent ends before offset: QEMU synthesises
                # allocated zeros there
                allocated, offset_valid = True, False
            else:
                allocated, offset_valid = False, e.offset is not None
            self.start, self.end = offset, offset + e.length
            eof = self.end == self.size
            if eof:
                last = self._last_piece(e.depth, e.data)
                if offset < last:
                    self.end, eof = last, False
            self.bits = (allocated, e.zero, e.data, offset_valid, eof)
        return self.bits, min(self.end, limit) - offset


def _first_diff(b1, b2, n: int) -> int | None:
    """Index of the first differing byte of the first ``n`` bytes, or None."""
    if b1[:n] == b2[:n]:
        return None
    x = int.from_bytes(b1[:n], "little") ^ int.from_bytes(b2[:n], "little")
    return ((x & -x).bit_length() - 1) // 8


def _first_nonzero(buf, n: int) -> int | None:
    view = bytes(buf[:n])
    rest = len(view.lstrip(b"\0"))
    return None if rest == 0 else n - rest


def _sector_of(offset: int, index: int) -> int:
    """The reported offset: the start of the sector holding byte ``index``
    of the chunk at ``offset`` (qemu-img compares 512-byte sectors)."""
    return offset + index // SECTOR * SECTOR


def compare_stacks(a: ImageStack, b: ImageStack, *, strict: bool = False,
                   progress: Progress = NO_PROGRESS) -> CompareResult:
    size_a, size_b = a.virtual_size, b.virtual_size
    res = CompareResult(True, None, size_a, size_b, strict)
    total = max(size_a, size_b)

    def differ(offset: int | None, reason: str, message: str) -> CompareResult:
        res.identical, res.first_difference, res.reason = False, offset, reason
        res.messages.append(message)
        return res

    if strict and size_a != size_b:
        return differ(None, "size", "Strict mode: Image size mismatch!")
    common = min(size_a, size_b)
    sa, sb = _Side(a), _Side(b)
    buf1 = bytearray(CHUNK)
    buf2 = bytearray(CHUNK)
    mv1, mv2 = memoryview(buf1), memoryview(buf2)
    pos = 0
    while pos < common:
        bits1, n1 = sa.at(pos, size_a)
        bits2, n2 = sb.at(pos, size_b)
        n = min(n1, n2, common - pos)
        if strict and bits1 != bits2:
            return differ(pos, "block-status", f"Strict mode: Offset {pos} block status mismatch!")
        if bits1[1] and bits2[1]:
            pass  # zeros on both sides
        elif bits1[0] == bits2[0]:
            n = min(n, CHUNK)
            if bits1[0]:
                a.readinto(pos, mv1[:n])
                b.readinto(pos, mv2[:n])
                i = _first_diff(buf1, buf2, n)
                if i is not None:
                    at = _sector_of(pos, i)
                    return differ(at, "content", f"Content mismatch at offset {at}!")
        else:
            n = min(n, CHUNK)
            (a if bits1[0] else b).readinto(pos, mv1[:n])
            i = _first_nonzero(buf1, n)
            if i is not None:
                at = _sector_of(pos, i)
                return differ(at, "content", f"Content mismatch at offset {at}!")
        pos += n
        progress.update(pos, total)
    if size_a != size_b:
        res.messages.append("Warning: Image size mismatch!")
        over, side, size = (a, sa, size_a) if size_a > size_b else (b, sb, size_b)
        while pos < size:
            bits, n = side.at(pos, size)
            if bits[0] and not bits[1]:
                n = min(n, CHUNK)
                over.readinto(pos, mv1[:n])
                i = _first_nonzero(buf1, n)
                if i is not None:
                    at = _sector_of(pos, i)
                    return differ(at, "content", f"Content mismatch at offset {at}!")
            pos += n
            progress.update(pos, total)
    res.messages.append("Images are identical.")
    progress.finish(total)
    return res


def compare(path_a: str, path_b: str, fmt_a: str | None = None, fmt_b: str | None = None, *,
            strict: bool = False, parent_search=(), force: bool = False, untrusted: bool = False,
            force_share: bool = False, progress: Progress = NO_PROGRESS) -> CompareResult:
    """qemu-img compare: whether ``path_a`` and ``path_b`` (each with its
    chain) show the same disk.  Without ``strict``, a longer image must read
    as zeros past the shorter one's end; with it, the sizes and the block
    status (allocated, zero, data) must be the same too."""
    opts = dict(parent_search=parent_search, force=force, untrusted=untrusted, force_share=force_share)
    with open_image(path_a, fmt_a, **opts) as a:
        with open_image(path_b, fmt_b, **opts) as b:
            try:
                return compare_stacks(a, b, strict=strict, progress=progress)
            except MemoryError:
                raise VdError("out of memory while comparing", path_a) from None

"""``VdiBackend``: the ImageBackend for VDI images.  It holds one VdiState
(``self.state``) and does the data path itself (block_status, read,
write, write_zeroes); opening, creating, the parent link, resize, compact
and check are the package's other modules."""

from __future__ import annotations

from vdtool.core.backend import Cap, CheckResult, FormatOption, ImageBackend, MapExtent, ParentRef, ParentSpec, Status
from vdtool.core.extents import flat_extent
from vdtool.core.bytesutil import zeros
from vdtool.core.fileio import ImageFile, create_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.vdi import check as check_mod
from vdtool.formats.vdi import compact as compact_mod
from vdtool.formats.vdi import resize as resize_mod
from vdtool.formats.vdi.blockmap import status_of
from vdtool.formats.vdi.create import new_header, write_image
from vdtool.formats.vdi.layout import (NULL_UUID, TYPE_NAMES, VARIANTS, VDI_IMAGE_BLOCK_FREE, VDI_IMAGE_BLOCK_ZERO,
                                       VDI_IMAGE_FLAGS_ZERO_EXPAND, cstr, has_lchs, probe_score, uuid_str)
from vdtool.formats.vdi.load import load
from vdtool.formats.vdi.metadata import alloc, begin_write, close_holes, renew_modification_uuid, set_entry, sync
from vdtool.formats.vdi.parent import external_references, parent_ref, write_parent
from vdtool.formats.vdi.state import VdiState


class VdiBackend(ImageBackend):
    name = "vdi"
    extensions = (".vdi",)
    capabilities = (Cap.CREATE_DYNAMIC | Cap.CREATE_FIXED | Cap.DIFF | Cap.WRITE | Cap.DISCARD | Cap.COMPACT
                    | Cap.RESIZE | Cap.SHRINK | Cap.CHECK | Cap.REPAIR | Cap.UUID | Cap.ZERO_MARKER)
    variants = VARIANTS
    options = (
        FormatOption("uuid", str, None, "image UUID (default: a new random one)"),
        FormatOption("comment", str, None, "image comment (at most 255 bytes of UTF-8)"),
        FormatOption("static", bool, False, "preallocated image, as qemu-img's static=on (same as --variant fixed)"),
    )
    amend_options = (
        FormatOption("uuid", str, None, "a new image UUID (children that recorded the old one no longer match)"),
        FormatOption("parent_uuid", str, None, "the parent UUID a differencing image records"),
    )

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.state: VdiState | None = None  # set by _load_image or create
        self._closed = False

    # == class level ==============================================================================
    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return probe_score(head)

    def _load_image(self, options: dict) -> None:
        self.state = load(self.file, lenient=bool(options.get("check") or options.get("repair")))

    @classmethod
    def create(cls, path: str, size: int, *, variant: str | None = None, block_size: int | None = None,
               parent: ParentSpec | None = None, options: dict | None = None,
               progress: Progress = NO_PROGRESS) -> "VdiBackend":
        hdr = new_header(size, variant, block_size, parent, options)
        f = create_file(path)
        try:
            self = cls(f)
            self.state = write_image(f, hdr, parent, progress)
            return self
        except BaseException:
            f.close()
            raise

    @classmethod
    def measure(cls, size: int, source, *, variant: str | None = None, block_size: int | None = None,
                options: dict | None = None) -> dict:
        from vdtool.formats.vdi.create import measure

        return measure(size, source, variant, block_size, cls.parse_options(dict(options or {})))

    # == facts =====================================================================================
    @property
    def virtual_size(self) -> int:
        return self.state.virtual_size

    @property
    def block_size(self) -> int:
        return self.state.hdr.cbBlock

    @property
    def variant(self) -> str:
        return "fixed" if self.state.fixed else "dynamic"

    @property
    def uuid(self) -> str:
        return uuid_str(self.state.hdr.uuidCreate)

    @property
    def modification_uuid(self) -> str:
        return uuid_str(self.state.hdr.uuidModify)

    @property
    def is_diff(self) -> bool:
        return self.state.is_diff

    @property
    def parent(self) -> ParentRef | None:
        return parent_ref(self.state)

    def external_references(self) -> list:
        return external_references(self.state)

    def info(self) -> dict:
        st = self.state
        hdr = st.hdr
        ver = st.version
        d: dict = {
            "image-type": TYPE_NAMES[hdr.u32Type],
            "version": f"{ver >> 16}.{ver & 0xffff}",
            "header-size": hdr.cbHeader,
            "block-size": hdr.cbBlock,
            "blocks": hdr.cBlocks,
            "allocated-blocks": hdr.cBlocksAllocated,
            "offset-blocks": hdr.offBlocks,
            "offset-data": hdr.offData,
            "uuid": self.uuid,
            "modification-uuid": self.modification_uuid,
            "comment": cstr(hdr.szComment),
            "geometry": f"{hdr.cCylinders}/{hdr.cHeads}/{hdr.cSectors}",
        }
        if has_lchs(hdr):
            d["lchs-geometry"] = f"{hdr.LCHS_cCylinders}/{hdr.LCHS_cHeads}/{hdr.LCHS_cSectors}"
        if hdr.cbBlockExtra:
            d["block-extra"] = hdr.cbBlockExtra
        if hdr.fFlags & VDI_IMAGE_FLAGS_ZERO_EXPAND:
            d["zero-expand"] = True
        if hdr.uuidLinkage != NULL_UUID:
            d["parent-uuid"] = uuid_str(hdr.uuidLinkage)
        if hdr.uuidParentModify != NULL_UUID:
            d["parent-modification-uuid"] = uuid_str(hdr.uuidParentModify)
        if st.hint is not None:
            d["parent-name"] = st.hint
        problems = st.map_problems()
        if problems:
            d["block-map-errors"] = len(problems)
        return d

    # == reading ===================================================================================
    def block_status(self, offset: int, length: int) -> tuple:
        st = self.state
        size = st.virtual_size
        if offset >= size or length <= 0:
            return Status.ZERO, max(length, 1)
        end = min(offset + length, size)
        shift = st.shift
        b = offset >> shift
        last = (end - 1) >> shift
        e = st.map.mv[b]
        status = status_of(e)
        if status == Status.DATA:
            nb = st.map.data_run_end(b + 1, last + 1)
        else:
            nb = st.map.marker_run_end(b + 1, last + 1, e)
        run_end = min(nb << shift, end)
        return status, run_end - offset

    def map_extent(self, offset: int, length: int) -> MapExtent:
        """Blocks stored one after another in the file are one run.  A free
        block of an image without a parent is ZERO (qemu-img map: present
        zeros); a fixed image's blocks over holes of the file are data that
        reads as zeros, as QEMU reports them."""
        st = self.state
        status, n = self.block_status(offset, length)
        if offset >= st.virtual_size:
            return MapExtent(status, n)
        if status == Status.UNALLOCATED and self.parent is None:
            return MapExtent(Status.ZERO, n)
        if status != Status.DATA:
            return MapExtent(status, n)
        shift = st.shift
        bs = 1 << shift
        entries = st.map.mv
        b = offset >> shift
        host = st.data_pos(b, entries[b]) + (offset & (bs - 1))
        run = min(n, ((b + 1) << shift) - offset)
        while run < n:
            b2 = (offset + run) >> shift
            if st.data_pos(b2, entries[b2]) != host + run:
                break
            run = min(n, run + bs)
        if st.fixed:
            return flat_extent(self.file, host, run)
        return MapExtent(Status.DATA, run, host)

    def readinto(self, offset: int, buf) -> None:
        st = self.state
        mv = memoryview(buf).cast("B")
        total = len(mv)
        bs = st.hdr.cbBlock
        shift = st.shift
        entries, cblocks = st.map.mv, st.hdr.cBlocks
        pos = 0
        while pos < total:
            off = offset + pos
            b = off >> shift
            within = off & (bs - 1)
            n = min(bs - within, total - pos)
            e = entries[b] if b < cblocks else VDI_IMAGE_BLOCK_FREE
            if e < VDI_IMAGE_BLOCK_ZERO:
                self.file.readinto(st.data_pos(b, e) + within, mv[pos:pos + n])
            else:
                mv[pos:pos + n] = zeros(n)
            pos += n

    # == writing ===================================================================================
    def defer_identity_change(self) -> None:
        self.state.modified = True  # no new modification UUID for this session's writes

    def change_identity(self) -> None:
        renew_modification_uuid(self.state)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self.check_range(offset, len(mv))
        if not len(mv):
            return
        st = self.state
        begin_write(st)
        bs = st.hdr.cbBlock
        shift = st.shift
        entries = st.map.mv
        pos = 0
        total = len(mv)
        while pos < total:
            off = offset + pos
            b = off >> shift
            within = off & (bs - 1)
            n = min(bs - within, total - pos)
            e = entries[b]
            if e < VDI_IMAGE_BLOCK_ZERO:
                self.file.pwrite(st.data_pos(b, e) + within, mv[pos:pos + n])
            elif n == bs:
                alloc(st, b, mv[pos:pos + n])
            else:
                alloc(st, b, self._partial_block(b, e, within, mv[pos:pos + n]))
            pos += n

    def _partial_block(self, b: int, e: int, within: int, data) -> bytearray:
        """A whole block for a write of ``data`` at ``within`` into unallocated
        block ``b``: a FREE block starts from what the parent shows there."""
        bs = self.state.hdr.cbBlock
        block = bytearray(bs)
        if e == VDI_IMAGE_BLOCK_FREE:
            start = b << self.state.shift
            inside = max(0, min(bs, self.state.virtual_size - start))
            if inside:
                block[:inside] = self.parent_read(start, inside)
        block[within:within + len(data)] = data
        return block

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        self.check_range(offset, length)
        if not length:
            return
        st = self.state
        begin_write(st)
        bs = st.hdr.cbBlock
        shift = st.shift
        vsize = st.virtual_size
        fixed, diff = st.fixed, st.is_diff
        marker = VDI_IMAGE_BLOCK_ZERO if diff else VDI_IMAGE_BLOCK_FREE
        entries = st.map.mv
        release = {}  # allocated blocks that become the marker: close_holes gives them up in a crash-safe order
        pos, end = offset, offset + length
        while pos < end:
            b = pos >> shift
            within = pos & (bs - 1)
            n = min(bs - within, end - pos)
            e = entries[b]
            allocated = e < VDI_IMAGE_BLOCK_ZERO
            whole = within == 0 and (n == bs or pos + n >= vsize)
            if allocated and (not whole or fixed or not unmap):
                self.file.write_zeroes(st.data_pos(b, e) + within, n)
            elif whole:
                # a ZERO entry reads as zeros whatever the marker would be
                if e != marker and e != VDI_IMAGE_BLOCK_ZERO:
                    if allocated:
                        release[b] = marker
                    else:
                        set_entry(st, b, marker)
            elif e == VDI_IMAGE_BLOCK_FREE and diff:
                self._zero_over_parent(b, within, n)
            pos += n
        if release:
            close_holes(st, release=release)

    def _zero_over_parent(self, b: int, within: int, n: int) -> None:
        """Part of a FREE block of a differencing image reads as zeros: it gets
        a block of its own unless the parent shows zeros there already."""
        bs = self.state.hdr.cbBlock
        start = b << self.state.shift
        inside = min(bs, self.state.virtual_size - start)
        if self.parent_read(start + within, n) != bytes(n):
            block = bytearray(self.parent_read(start, inside))
            block[within:within + n] = bytes(n)
            block.extend(bytes(bs - len(block)))
            alloc(self.state, b, block)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def flush(self) -> None:
        if self.writable:
            sync(self.state)
            self.file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable:
                sync(self.state)
        finally:
            self.state.map.release()
            self.file.close()

    def amend(self, options: dict, progress: Progress = NO_PROGRESS) -> list:
        from vdtool.formats.vdi.amend import amend  # when used

        return amend(self.state, options)

    # == whole-image operations ======================================================================
    def set_parent(self, parent: ParentSpec | None) -> None:
        begin_write(self.state, content=False)
        sync(self.state)
        write_parent(self.state, parent)

    def resize(self, new_size: int) -> None:
        resize_mod.resize(self.state, new_size)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        compact_mod.compact(self.state, self.parent_read, progress)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        check_mod.check(self.state, res, repair, progress)

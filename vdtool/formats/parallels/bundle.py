"""``BundleBackend``: a Parallels ``.hdd`` bundle (a folder holding
``DiskDescriptor.xml`` and its images) as one image.  It reads the chain
the descriptor describes: in each storage (a sector range), a sector comes
from the top snapshot's image that has it (an expanding image's allocated
cluster, or a flat image), else it reads as zeros.

A bundle with one storage and one expanding image (what Parallels Desktop
makes without snapshots, and what vdtool creates) is written, checked,
compacted and resized through that image (resize also rewrites the
descriptor's sizes); writing a bundle with snapshots or several storages
is not implemented yet and refused by name."""

from __future__ import annotations

import os

from vdtool.core.backend import Cap, CheckResult, ImageBackend, Status
from vdtool.core.bytesutil import zeros
from vdtool.core.errors import NotSupported, ReadOnlyError
from vdtool.core.fileio import ImageFile, open_file
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.formats.parallels.descriptor import DESCRIPTOR, MAX_DESCRIPTOR, parse
from vdtool.formats.parallels.layout import SECTOR

_SINGLE = Cap.WRITE | Cap.DISCARD | Cap.COMPACT | Cap.CHECK | Cap.REPAIR | Cap.RESIZE | Cap.SHRINK


def is_bundle(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DESCRIPTOR))


class _Layer:
    """One image of a storage: an opened expanding image (its backend) or
    a flat file."""

    __slots__ = ("image", "flat", "name")

    def __init__(self, name: str, image=None, flat=None):
        self.name = name
        self.image = image  # ParallelsBackend for "Compressed"
        self.flat = flat  # ImageFile for "Plain"

    def has(self, local: int) -> bool:
        if self.flat is not None:
            return True
        st = self.image.state
        i = local // st.cluster
        return i < len(st.bat) and bool(st.bat[i])

    def readinto(self, local: int, mv) -> None:
        if self.flat is not None:
            self.flat.readinto(local, mv)
        else:
            self.image.readinto(local, mv)

    def close(self) -> None:
        (self.flat or self.image).close()


class BundleBackend(ImageBackend):
    name = "parallels"
    extensions = (".hdd",)
    capabilities = Cap.NONE  # per instance: see _SINGLE
    variants = ("bundle",)

    def __init__(self, file):
        super().__init__(file)
        self.folder = os.path.dirname(file.path)
        self.path = self.folder
        self.bundle = None
        self.storages: list = []  # (start byte, end byte, [_Layer] top first)
        self.refs: list = []  # image files as recorded
        self.grain = 1 << 20  # the smallest cluster of any layer: runs never straddle one

    @classmethod
    def open_bundle(cls, folder: str, image_class, *, writable: bool = False, options: dict | None = None):
        """The bundle at ``folder``; its expanding images are opened with
        ``image_class`` (the bare-image backend, handed in by it)."""
        desc = open_file(os.path.join(folder, DESCRIPTOR), writable=False)
        self = cls(desc)
        try:
            self._load(image_class, writable, options or {})
            return self
        except BaseException:
            self._abandon()
            raise

    def _load(self, image_class, writable: bool, options: dict) -> None:
        size = self.file.size()
        if size > MAX_DESCRIPTOR:
            raise self._corrupt(f"{DESCRIPTOR} is {size} bytes (at most {MAX_DESCRIPTOR})")
        self.bundle = b = parse(self.file.pread_exact(0, size, DESCRIPTOR), self.path)
        single = len(b.storages) == 1 and len(b.storages[0].layers) == 1 and b.storages[0].layers[0].type == \
            "Compressed"
        if writable and not single:
            raise ReadOnlyError("writing a .hdd bundle with snapshots or several storages is not implemented yet "
                                "in vdtool", self.path)
        for s in b.storages:
            layers = []
            for k, im in enumerate(s.layers):
                self.refs.append(im.file)
                p = im.file if os.path.isabs(im.file) else os.path.join(self.folder, im.file)
                top = k == 0 and writable
                if im.type == "Plain":
                    layers.append(_Layer(p, flat=open_file(p, writable=False)))
                    continue
                img = image_class.open(p, writable=top, options=options)
                layers.append(_Layer(p, image=img))
                if img.virtual_size < (s.end - s.start) * SECTOR:
                    raise self._corrupt(f"image {im.file} holds {img.virtual_size} bytes, less than its storage's "
                                        f"{(s.end - s.start) * SECTOR}")
            self.storages.append((s.start * SECTOR, s.end * SECTOR, layers))
        clusters = [la.image.block_size for _, _, ls in self.storages for la in ls if la.image is not None]
        self.grain = min(clusters, default=1 << 20)
        if single:
            self.capabilities = _SINGLE
            self.writable = writable

    def _abandon(self) -> None:
        for _, _, layers in self.storages:
            for layer in layers:
                layer.close()
        self.storages = []
        self.file.close()

    # == facts =====================================================================================
    @property
    def virtual_size(self) -> int:
        return self.bundle.sectors * SECTOR

    @property
    def block_size(self) -> int:
        return self.grain

    @property
    def variant(self) -> str:
        return "bundle"

    def _single(self):
        return self.storages[0][2][0].image

    def info(self) -> dict:
        b = self.bundle
        return {"bundle": True, "snapshot-chain": list(b.chain), "storages": [
            {"start": s.start * SECTOR, "end": s.end * SECTOR, "images": [im.file for im in s.layers]}
            for s in b.storages]}

    def external_references(self) -> list:
        """Image files that lie outside the bundle folder (what --untrusted
        refuses); the bundle's own images are part of the image."""
        from vdtool.core.untrusted import outside_folder

        found = (outside_folder(r, self.folder, self.folder) for r in self.refs)
        return [full for full in found if full]

    def actual_size(self) -> int:
        total = self.file.allocated_size()
        for _, _, layers in self.storages:
            for layer in layers:
                total += (layer.flat or layer.image.file).allocated_size()
        return total

    # == reading ===================================================================================
    def _where(self, offset: int) -> tuple:
        """(storage index or -1, end of the storage or the gap)."""
        for n, (start, end, _) in enumerate(self.storages):
            if offset < start:
                return -1, start
            if offset < end:
                return n, end
        return -1, self.virtual_size

    def _layer_run(self, n: int, offset: int, end: int) -> tuple:
        """(layer or None, run end) for ``offset`` in storage ``n``: runs stay
        inside one grain (no layer's cluster boundary inside) so the answer
        holds for the whole run."""
        start, _, layers = self.storages[n]
        local = offset - start
        cs = self.grain
        run_end = min(end, start + (local // cs + 1) * cs)
        for layer in layers:
            if layer.has(local):
                return layer, run_end
        return None, run_end

    def block_status(self, offset: int, length: int) -> tuple:
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return Status.ZERO, max(length, 1)
        n, limit = self._where(offset)
        if n < 0:
            return Status.UNALLOCATED, min(limit, end) - offset
        layer, run = self._layer_run(n, offset, min(limit, end))
        status = Status.DATA if layer else Status.UNALLOCATED
        while run < min(limit, end):
            nxt, r2 = self._layer_run(n, run, min(limit, end))
            if (nxt is not None) != (layer is not None):
                break
            run = r2
        return status, run - offset

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        pos, total = 0, len(mv)
        while pos < total:
            off = offset + pos
            n, limit = self._where(off)
            if n < 0:
                k = min(limit - off, total - pos) if off < self.virtual_size else total - pos
                mv[pos:pos + k] = zeros(k)
                pos += k
                continue
            layer, run_end = self._layer_run(n, off, limit)
            k = min(run_end - off, total - pos)
            if layer is None:
                mv[pos:pos + k] = zeros(k)
            else:
                layer.readinto(off - self.storages[n][0], mv[pos:pos + k])
            pos += k

    # == writing (one storage, one expanding image) ===================================================
    def write(self, offset: int, data) -> None:
        if not self.capabilities & Cap.WRITE:
            raise ReadOnlyError("writing a .hdd bundle with snapshots is not implemented yet in vdtool", self.path)
        self._single().write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        if not self.capabilities & Cap.WRITE:
            raise ReadOnlyError("writing a .hdd bundle with snapshots is not implemented yet in vdtool", self.path)
        self._single().write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=True)

    def compact(self, progress: Progress = NO_PROGRESS) -> None:
        if not self.capabilities & Cap.COMPACT:
            raise NotSupported("compact", "parallels bundle", self.path, "not implemented yet for snapshots")
        self._single().compact(progress)

    def _check(self, res: CheckResult, repair: str | None, progress: Progress) -> None:
        self._single()._check(res, repair, progress)

    def resize(self, new_size: int) -> None:
        """One storage, one image: the image and the descriptor's sizes.
        The larger of old and new is always what the descriptor's image can
        hold: growing resizes the image first, shrinking rewrites the
        descriptor first."""
        if not self.capabilities & Cap.WRITE:
            raise NotSupported("resize", "parallels bundle", self.path, "not implemented yet for bundles with "
                               "snapshots or several storages")
        from vdtool.core.bytesutil import align_up

        img = self._single()
        new_size = align_up(max(new_size, 0), SECTOR)
        if new_size >= self.virtual_size:
            img.resize(new_size)
            img.flush()
            self._rewrite_descriptor(new_size // SECTOR)
        else:
            self._rewrite_descriptor(new_size // SECTOR)
            img.resize(new_size)

    def _rewrite_descriptor(self, sectors: int) -> None:
        """The descriptor with the new disk size, written beside the old one
        and renamed over it (a crash leaves the old or the new)."""
        from vdtool.formats.parallels.descriptor import resized

        raw = resized(self.file.pread_exact(0, self.file.size(), DESCRIPTOR), sectors, self.path)
        final = os.path.join(self.folder, DESCRIPTOR)
        tmp = final + ".vdtool-new"
        f = ImageFile(tmp, create=True)
        try:
            f.truncate(0)
            f.pwrite(0, raw)
            f.flush()
        finally:
            f.close()
        os.replace(tmp, final)
        start, _, layers = self.storages[0]
        self.storages[0] = (start, sectors * SECTOR, layers)
        self.bundle = self.bundle._replace(sectors=sectors)

    def flush(self) -> None:
        for _, _, layers in self.storages:
            for layer in layers:
                if layer.image is not None and layer.image.writable:
                    layer.image.flush()

    def close(self) -> None:
        try:
            for _, _, layers in self.storages:
                for layer in layers:
                    layer.close()
        finally:
            self.storages = []
            self.file.close()


def create_bundle(image_class, folder: str, size: int, block_size: int | None, options: dict):
    """A new bundle at ``folder`` (which must not exist): one storage, one
    expanding image made by ``image_class``; returned open for writing."""
    import uuid

    from vdtool.formats.parallels.descriptor import render

    guid = "{" + str(uuid.uuid4()) + "}"
    name = f"{os.path.basename(folder.rstrip(os.sep))}.0.{guid}.hds"
    os.mkdir(folder)
    img = image_class.create(os.path.join(folder, name), size, block_size=block_size, options=options)
    sectors = img.virtual_size // SECTOR
    cluster = img.block_size // SECTOR
    img.close()
    f = ImageFile(os.path.join(folder, DESCRIPTOR), create=True)
    try:
        f.pwrite(0, render(sectors, cluster, name, guid, "{" + str(uuid.uuid4()) + "}"))
        f.flush()
    finally:
        f.close()
    return BundleBackend.open_bundle(folder, image_class, writable=True)



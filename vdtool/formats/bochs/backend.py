"""``BochsBackend``: the read-only ImageBackend for Bochs redolog images.
A Growing disk stands alone; an Undoable or Volatile journal names its flat
base image as its parent (``BASE`` for ``BASE.redolog``, as Bochs finds it),
so the stack shows the base under the sectors the journal lacks."""

from __future__ import annotations

from vdtool.core.backend import Cap, ImageBackend, MapExtent, ParentRef
from vdtool.core.errors import UnsupportedFeature
from vdtool.core.fileio import ImageFile
from vdtool.formats.bochs import extents
from vdtool.formats.bochs.layout import (CATALOG_FREE, JOURNALS, SUBTYPE_GROWING, VERSION_1, journal_base_name,
                                         sniff)
from vdtool.formats.bochs.load import load
from vdtool.formats.bochs.state import BochsState


class BochsBackend(ImageBackend):
    name = "bochs"
    extensions = (".img",)
    capabilities = Cap.NONE  # read-only: every write op refuses (core.ops checks Cap.WRITE)
    variants = ("growing", "undoable", "volatile")

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.st: BochsState | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        self.st = load(self.file)
        if self.st.subtype in JOURNALS and journal_base_name(self.path) is None:
            raise UnsupportedFeature(f"a Bochs {self.st.subtype.decode()} redolog does not record its base "
                                     f"image; Bochs finds it by the name BASE.redolog, which this file does not "
                                     f"have: rename it so", self.path)

    @property
    def virtual_size(self) -> int:
        return self.st.size

    @property
    def block_size(self) -> int:
        return self.st.extent

    @property
    def variant(self) -> str:
        return self.st.subtype.decode().lower()

    @property
    def parent(self) -> ParentRef | None:
        if self.st.subtype == SUBTYPE_GROWING:
            return None
        return ParentRef(filename=journal_base_name(self.path), format="raw")

    def info(self) -> dict:
        st = self.st
        hdr = st.hdr
        d = {
            "subtype": st.subtype.decode("latin-1"),
            "version": 1 if hdr.version == VERSION_1 else 2,
            "extent-size": hdr.extent,
            "catalog-entries": hdr.catalog,
            "allocated-extents": sum(1 for e in st.catalog if e != CATALOG_FREE),
        }
        if hdr.version != VERSION_1 and st.subtype != SUBTYPE_GROWING:
            d["timestamp"] = hdr.timestamp  # the base image's modification time (FAT date and time)
        return d

    def block_status(self, offset: int, length: int) -> tuple:
        return extents.block_status(self.st, offset, length)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        return extents.map_extent(self.st, offset, length)

    def readinto(self, offset: int, buf) -> None:
        extents.readinto(self.st, offset, buf)

"""``CloopBackend``: the read-only ImageBackend for cloop V2.0 images."""

from __future__ import annotations

from vdtool.core.backend import Cap, ImageBackend, MapExtent
from vdtool.core.fileio import ImageFile
from vdtool.formats.cloop import blocks
from vdtool.formats.cloop.layout import preamble_version, sniff
from vdtool.formats.cloop.load import load
from vdtool.formats.cloop.state import CloopState


class CloopBackend(ImageBackend):
    name = "cloop"
    extensions = (".cloop",)
    capabilities = Cap.NONE  # read-only: every write op refuses (core.ops checks Cap.WRITE)
    variants = ("v2",)

    def __init__(self, file: ImageFile):
        super().__init__(file)
        self.st: CloopState | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return sniff(head, tail, file_size)

    def _load_image(self, options: dict) -> None:
        self.st = load(self.file)

    @property
    def virtual_size(self) -> int:
        return self.st.size

    @property
    def block_size(self) -> int:
        return self.st.block

    @property
    def variant(self) -> str:
        return "v2"

    def info(self) -> dict:
        st = self.st
        return {"version": (preamble_version(st.hdr) or b"?").decode(), "block-size": st.block,
                "blocks": st.hdr.num_blocks, "compression": "zlib"}

    def block_status(self, offset: int, length: int) -> tuple:
        return blocks.block_status(self.st, offset, length)

    def map_extent(self, offset: int, length: int) -> MapExtent:
        return blocks.map_extent(self.st, offset, length)

    def readinto(self, offset: int, buf) -> None:
        blocks.readinto(self.st, offset, buf)

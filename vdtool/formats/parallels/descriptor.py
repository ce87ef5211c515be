"""A ``.hdd`` bundle's ``DiskDescriptor.xml``: the disk size, the storages
(sector ranges, each with one image file per snapshot: ``Compressed`` for
an expanding image, ``Plain`` for a flat one) and the snapshot tree, read
into a ``Bundle`` with the chain of images to read, top first.

The descriptor is untrusted XML: its size is capped before it is read, a
DTD or entity declaration is refused (Parallels writes neither), and
every number, name and link is checked: storages inside the disk and not
overlapping, a snapshot chain without loops that ends at the null GUID,
an image for every snapshot of the chain in every storage."""

from __future__ import annotations

from collections import namedtuple

from vdtool.core.errors import CorruptImageError, UnsupportedFeature

DESCRIPTOR = "DiskDescriptor.xml"
MAX_DESCRIPTOR = 1 << 20
MAX_STORAGES = 4096
MAX_SNAPSHOTS = 256
NULL_GUID = "{00000000-0000-0000-0000-000000000000}"
TYPES = ("Compressed", "Plain")


# guid; type: "Compressed" (an expanding image) or "Plain" (flat); file: as
# recorded, relative to the bundle folder or absolute
Image = namedtuple("Image", ("guid", "type", "file"))
# start, end: sectors; layers: Image, top snapshot first
Storage = namedtuple("Storage", ("start", "end", "layers"))
# sectors; storages: Storage, by start; chain: snapshot GUIDs, top first
Bundle = namedtuple("Bundle", ("sectors", "storages", "chain"))


def _int(el, tag: str, path: str) -> int:
    node = el.find(tag)
    text = (node.text or "").strip() if node is not None else ""
    if not text.isdigit() or len(text) > 20:
        raise CorruptImageError(f"{DESCRIPTOR}: <{tag}> is {text!r}, not a number", path)
    return int(text)


def _text(el, tag: str) -> str:
    node = el.find(tag)
    return (node.text or "").strip() if node is not None else ""


def parse(raw: bytes, path: str) -> Bundle:
    """The bundle ``raw`` (the descriptor's bytes, at most MAX_DESCRIPTOR)
    describes; ``path`` names it in errors."""
    import xml.etree.ElementTree as ET

    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise CorruptImageError(f"{DESCRIPTOR} declares a DTD or entities; refused", path)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise CorruptImageError(f"{DESCRIPTOR} does not parse ({e})", path) from None
    if root.tag != "Parallels_disk_image":
        raise CorruptImageError(f"{DESCRIPTOR}: root element <{root.tag}> is not <Parallels_disk_image>", path)
    params = root.find("Disk_Parameters")
    if params is None:
        raise CorruptImageError(f"{DESCRIPTOR} has no <Disk_Parameters>", path)
    sectors = _int(params, "Disk_size", path)
    chain = _chain(root, path)
    storages = _storages(root, sectors, chain, path)
    return Bundle(sectors, storages, chain)


def _chain(root, path: str) -> tuple:
    shots = root.findall("Snapshots/Shot")
    if len(shots) > MAX_SNAPSHOTS:
        raise CorruptImageError(f"{DESCRIPTOR} lists {len(shots)} snapshots (at most {MAX_SNAPSHOTS})", path)
    parent = {}
    for s in shots:
        guid = _text(s, "GUID")
        if not guid or guid in parent:
            raise CorruptImageError(f"{DESCRIPTOR}: a snapshot GUID is empty or listed twice ({guid!r})", path)
        parent[guid] = _text(s, "ParentGUID") or NULL_GUID
    top = _text(root, "Snapshots/TopGUID")
    if not parent:  # no snapshot tree: the storages' single images
        return ()
    if top not in parent:
        raise CorruptImageError(f"{DESCRIPTOR}: the top snapshot {top!r} is not among the snapshots", path)
    chain, guid = [], top
    while guid != NULL_GUID:
        if guid in chain:
            raise CorruptImageError(f"{DESCRIPTOR}: the snapshot chain loops at {guid}", path)
        if guid not in parent:
            raise CorruptImageError(f"{DESCRIPTOR}: snapshot {chain[-1]} names a parent {guid} that is not "
                                    f"listed", path)
        chain.append(guid)
        guid = parent[guid]
    return tuple(chain)


def _storages(root, sectors: int, chain: tuple, path: str) -> tuple:
    els = root.findall("StorageData/Storage")
    if not els or len(els) > MAX_STORAGES:
        raise CorruptImageError(f"{DESCRIPTOR} lists {len(els)} storages (1 to {MAX_STORAGES})", path)
    out = []
    for n, el in enumerate(els):
        start, end = _int(el, "Start", path), _int(el, "End", path)
        if not start < end <= sectors:
            raise CorruptImageError(f"{DESCRIPTOR}: storage {n} covers sectors {start}..{end} of a disk of "
                                    f"{sectors}", path)
        images = {}
        for im in el.findall("Image"):
            img = Image(_text(im, "GUID"), _text(im, "Type"), _text(im, "File"))
            if img.type not in TYPES:
                raise UnsupportedFeature(f"{DESCRIPTOR}: storage {n} image type {img.type!r} is not supported "
                                         f"({' or '.join(TYPES)})", path)
            if not img.file or "\0" in img.file:
                raise CorruptImageError(f"{DESCRIPTOR}: storage {n} has an image without a file name", path)
            images[img.guid] = img
        if not images:
            raise CorruptImageError(f"{DESCRIPTOR}: storage {n} has no image", path)
        want = chain or tuple(images)
        if not chain and len(images) > 1:
            raise CorruptImageError(f"{DESCRIPTOR}: storage {n} has {len(images)} images but no snapshot tree "
                                    f"says which is on top", path)
        missing = [g for g in want if g not in images]
        if missing:
            raise CorruptImageError(f"{DESCRIPTOR}: storage {n} has no image for snapshot {missing[0]}", path)
        out.append(Storage(start, end, tuple(images[g] for g in want)))
    out.sort(key=lambda s: s.start)
    for a, b in zip(out, out[1:]):
        if b.start < a.end:
            raise CorruptImageError(f"{DESCRIPTOR}: storages {a.start}..{a.end} and {b.start}..{b.end} overlap",
                                    path)
    return tuple(out)


def resized(raw: bytes, sectors: int, path: str) -> bytes:
    """The descriptor ``raw`` (one storage) with the disk and its storage
    ``sectors`` long; everything else as it was."""
    import re

    def sub(pattern: str, value: str, text: bytes) -> bytes:
        out, n = re.subn(pattern.encode(), value.encode(), text, count=1)
        if n != 1:
            raise CorruptImageError(f"{DESCRIPTOR}: cannot find {pattern!r} to change", path)
        return out

    raw = sub(r"(<Disk_size>)\s*\d+\s*(</Disk_size>)", rf"\g<1>{sectors}\g<2>", raw)
    raw = sub(r"(<End>)\s*\d+\s*(</End>)", rf"\g<1>{sectors}\g<2>", raw)
    if b"<Cylinders>" in raw:
        raw = sub(r"(<Cylinders>)\s*\d+\s*(</Cylinders>)", rf"\g<1>{max(1, sectors // (16 * 63))}\g<2>", raw)
    return raw


def render(sectors: int, cluster_sectors: int, file: str, guid: str, disk_uid: str) -> bytes:
    """The descriptor of a new bundle with one storage and one expanding
    image, laid out as Parallels Desktop writes it."""
    from xml.sax.saxutils import escape

    file = escape(file)
    cyl = max(1, sectors // (16 * 63))
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{cyl}</Cylinders>
        <PhysicalSectorSize>512</PhysicalSectorSize>
        <Heads>16</Heads>
        <Sectors>63</Sectors>
        <Padding>0</Padding>
        <UID>{disk_uid}</UID>
        <Name>disk</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <SuspendState>0</SuspendState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{cluster_sectors}</Blocksize>
            <Image>
                <GUID>{guid}</GUID>
                <Type>Compressed</Type>
                <File>{file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <TopGUID>{guid}</TopGUID>
        <Shot>
            <GUID>{guid}</GUID>
            <ParentGUID>{NULL_GUID}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
""".encode()

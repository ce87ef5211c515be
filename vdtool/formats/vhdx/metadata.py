"""The metadata region: its table, the system items (file parameters,
virtual disk size, page 83 data, logical and physical sector size, parent
locator), checking them, and building a metadata region for a new image."""

from __future__ import annotations

from vdtool.core.errors import CorruptImageError, UnsupportedFeature
from vdtool.formats.vhdx.layout import (FILE_PARAMETERS, FILE_PARAMETERS_GUID, HAS_PARENT, KNOWN_METADATA,
                                        LEAVE_BLOCK_ALLOCATED, LOGICAL_SECTOR_SIZE, LOGICAL_SECTOR_SIZE_GUID,
                                        MAX_BLOCK, MAX_DISK, MAX_METADATA_ENTRIES, MAX_METADATA_ITEM,
                                        META_IS_REQUIRED, META_IS_VIRTUAL_DISK, METADATA_SIGNATURE,
                                        METADATA_TABLE_BYTES, METADATA_TABLE_ENTRY, METADATA_TABLE_HEADER, MIN_BLOCK,
                                        PAGE_83_DATA, PAGE_83_DATA_GUID, PARENT_LOCATOR_GUID, PHYSICAL_SECTOR_SIZE,
                                        PHYSICAL_SECTOR_SIZE_GUID, SECTOR_SIZES, VIRTUAL_DISK_SIZE,
                                        VIRTUAL_DISK_SIZE_GUID, guid_text, is_pow2)
from vdtool.formats.vhdx.parent import decode_locator
from vdtool.formats.vhdx.state import VhdxState

ITEMS_START = 64 * 1024  # items follow the 64 KiB table
REQUIRED_ITEMS = (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, LOGICAL_SECTOR_SIZE_GUID, PHYSICAL_SECTOR_SIZE_GUID)


def read_metadata(st: VhdxState) -> None:
    """Read and check the metadata table and items into ``st``."""
    table = st.read(st.meta_offset, METADATA_TABLE_BYTES)
    th = METADATA_TABLE_HEADER.unpack(table.ljust(METADATA_TABLE_BYTES, b"\0"))
    if th.Signature != METADATA_SIGNATURE:
        raise CorruptImageError(f"metadata table signature {th.Signature!r} is not {METADATA_SIGNATURE!r}", st.path)
    if th.EntryCount > MAX_METADATA_ENTRIES:
        raise CorruptImageError(f"metadata table entry count {th.EntryCount} is above {MAX_METADATA_ENTRIES}",
                                st.path)
    entries = [METADATA_TABLE_ENTRY.unpack(table, (i + 1) * METADATA_TABLE_ENTRY.size) for i in range(th.EntryCount)]
    items = {}
    for e in entries:
        name = KNOWN_METADATA.get(e.ItemId, guid_text(e.ItemId))
        if e.ItemId in items:
            raise CorruptImageError(f"metadata item {name} appears twice", st.path)
        if e.ItemId not in KNOWN_METADATA and e.Flags & META_IS_REQUIRED:
            raise UnsupportedFeature(f"unknown required metadata item {name}", st.path)
        if e.Length > MAX_METADATA_ITEM or (e.Length and (e.Offset < ITEMS_START
                                                          or e.Offset + e.Length > st.meta_length)):
            raise CorruptImageError(f"metadata item {name} at offset {e.Offset}, length {e.Length} lies outside "
                                    f"the metadata region (length {st.meta_length})", st.path)
        items[e.ItemId] = e
    st.meta_entries = entries
    for g in REQUIRED_ITEMS:
        if g not in items:
            raise CorruptImageError(f"metadata item {KNOWN_METADATA[g]} is missing", st.path)
    _read_items(st, items)


def _item(st: VhdxState, e, layout) -> object:
    if e.Length < layout.size:
        raise CorruptImageError(f"metadata item {KNOWN_METADATA[e.ItemId]} is {e.Length} bytes, "
                                f"shorter than its {layout.size}", st.path)
    raw = st.read(st.meta_offset + e.Offset, layout.size)
    if len(raw) < layout.size:
        raise CorruptImageError(f"metadata item {KNOWN_METADATA[e.ItemId]} lies past the end of the file", st.path)
    return layout.unpack(raw)


def _read_items(st: VhdxState, items: dict) -> None:
    fp = _item(st, items[FILE_PARAMETERS_GUID], FILE_PARAMETERS)
    st.block_size, st.param_flags = fp.BlockSize, fp.Flags
    st.size = _item(st, items[VIRTUAL_DISK_SIZE_GUID], VIRTUAL_DISK_SIZE).VirtualDiskSize
    st.logical_sector = _item(st, items[LOGICAL_SECTOR_SIZE_GUID], LOGICAL_SECTOR_SIZE).LogicalSectorSize
    st.physical_sector = _item(st, items[PHYSICAL_SECTOR_SIZE_GUID], PHYSICAL_SECTOR_SIZE).PhysicalSectorSize
    if PAGE_83_DATA_GUID in items:
        st.page83 = _item(st, items[PAGE_83_DATA_GUID], PAGE_83_DATA).Page83Data
    for problem in parameter_problems(st.block_size, st.param_flags, st.size, st.logical_sector,
                                      st.physical_sector):
        raise CorruptImageError(problem, st.path)
    if st.has_parent:
        e = items.get(PARENT_LOCATOR_GUID)
        if e is None or not e.Length:
            raise CorruptImageError("differencing image (HasParent) without a parent locator", st.path)
        raw = st.read(st.meta_offset + e.Offset, e.Length)
        st.locator_type, st.locator = decode_locator(raw, e.Length, st.path)


def parameter_problems(block: int, flags: int, size: int, lss: int, pss: int) -> list:
    out = []
    if not is_pow2(block) or not MIN_BLOCK <= block <= MAX_BLOCK:
        out.append(f"block size {block} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
    if flags & ~(LEAVE_BLOCK_ALLOCATED | HAS_PARENT):
        out.append(f"file parameter flags 0x{flags:x} has unknown bits")
    if lss not in SECTOR_SIZES:
        out.append(f"logical sector size {lss} is not 512 or 4096")
    if pss not in SECTOR_SIZES:
        out.append(f"physical sector size {pss} is not 512 or 4096")
    if not size or size > MAX_DISK or (lss in SECTOR_SIZES and size % lss):
        out.append(f"virtual disk size {size} is not a multiple of the sector size {lss} up to 64 TiB")
    return out


def item_location(st: VhdxState, item_id: bytes) -> tuple:
    """(file offset, length) of a metadata item."""
    for e in st.meta_entries:
        if e.ItemId == item_id:
            return st.meta_offset + e.Offset, e.Length
    raise CorruptImageError(f"metadata item {KNOWN_METADATA.get(item_id, guid_text(item_id))} is missing", st.path)


# -- a new metadata region ------------------------------------------------------------------------

def build_region(block: int, flags: int, size: int, lss: int, pss: int, page83: bytes,
                 locator: bytes = b"") -> bytes:
    """A metadata region's used bytes (table and items), as Hyper-V lays
    them out: the table, then each item in its own 4 KiB from 64 KiB on
    (the locator, which may be larger, last)."""
    items = [
        (FILE_PARAMETERS_GUID, FILE_PARAMETERS.pack(BlockSize=block, Flags=flags), META_IS_REQUIRED),
        (VIRTUAL_DISK_SIZE_GUID, VIRTUAL_DISK_SIZE.pack(VirtualDiskSize=size), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PAGE_83_DATA_GUID, PAGE_83_DATA.pack(Page83Data=page83), META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (LOGICAL_SECTOR_SIZE_GUID, LOGICAL_SECTOR_SIZE.pack(LogicalSectorSize=lss),
         META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (PHYSICAL_SECTOR_SIZE_GUID, PHYSICAL_SECTOR_SIZE.pack(PhysicalSectorSize=pss),
         META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ]
    if locator:
        items.append((PARENT_LOCATOR_GUID, locator, META_IS_REQUIRED | META_IS_VIRTUAL_DISK))
    buf = bytearray(ITEMS_START + 4096 * len(items) + len(locator))
    METADATA_TABLE_HEADER.pack_into(buf, 0, METADATA_TABLE_HEADER.new(Signature=METADATA_SIGNATURE,
                                                                      EntryCount=len(items)))
    pos = ITEMS_START
    for i, (gid, data, flags_) in enumerate(items):
        METADATA_TABLE_ENTRY.pack_into(buf, (i + 1) * METADATA_TABLE_ENTRY.size, METADATA_TABLE_ENTRY.new(
            ItemId=gid, Offset=pos, Length=len(data), Flags=flags_))
        buf[pos:pos + len(data)] = data
        pos += -(-len(data) // 4096) * 4096
    return bytes(buf[:pos])

"""Reading the qcow2 header into the state at open, and rewriting it whole
(set_parent, create).

Every header field and table place is checked (``layout``'s problem
functions) before it is used, so a hostile file costs a VdError, never a
traceback, a hang or a huge allocation."""

from __future__ import annotations

import struct
from array import array

from vdtool.core.bytesutil import be_array, ceil_div
from vdtool.core.errors import FormatError, UnsupportedFeature, UsageError
from vdtool.formats.qcow2 import snapshot
from vdtool.formats.qcow2.layout import (EXT_BACKING_FORMAT, INCOMPAT_EXTL2, MAX_BACKING_NAME, NOT_QCOW2,
                                         UNSUPPORTED, V2_HEADER_LENGTH, V3_HEADER_LENGTH, compression_type,
                                         decode_name, encode_name, extensions_end, feature_names,
                                         fixed_header_problems, header_bytes, header_problems, l2_bits,
                                         parse_extensions, unpack_header, version_defaults)
from vdtool.formats.qcow2.refcount import RefCodec


def load(st) -> None:
    """Fill ``st`` from its file's header and tables."""
    try:
        _parse(st)
    except (struct.error, ValueError, OverflowError, IndexError, KeyError) as e:
        raise st.corrupt(f"malformed qcow2 header ({e})") from None


def _raise_first(st, problems) -> None:
    for kind, text in problems:
        if kind == NOT_QCOW2:
            raise FormatError(text, st.path)
        if kind == UNSUPPORTED:
            raise UnsupportedFeature(text, st.path)
        raise st.corrupt(text)


def _parse(st) -> None:
    f = st.file
    fsize = f.size()
    hdr = unpack_header(f.pread(0, V2_HEADER_LENGTH))
    _raise_first(st, fixed_header_problems(hdr, fsize))
    hc = f.pread(0, min(1 << hdr.cluster_bits, fsize))  # the header lives in the first cluster
    if hdr.version == 3:
        hdr = unpack_header(hc)
    else:
        version_defaults(hdr)
    _raise_first(st, header_problems(hdr, hc, fsize))
    _take_header(st, hdr, hc)
    _take_geometry(st, hdr)
    if st.nb_snapshots:
        st.snapshots, st.snapshots_size = snapshot.read_table(st, fsize)
    # tables are read only now that their sizes are known to fit in the file
    st.l1 = be_array(f.pread_exact(st.l1_offset, st.l1_size * 8, "L1 table")) if st.l1_size else array("Q")
    st.rt = be_array(f.pread_exact(st.rt_offset, st.rt_clusters * st.cs, "refcount table"))
    st.file_size = fsize
    st.alloc_end = ceil_div(fsize, st.cs)


def _take_header(st, hdr, hc) -> None:
    """The feature bits, extensions and backing file of a checked header."""
    cs = 1 << hdr.cluster_bits
    st.version, st.cb, st.cs = hdr.version, hdr.cluster_bits, cs
    st.incompat, st.compat, st.autoclear = (hdr.incompatible_features, hdr.compatible_features,
                                            hdr.autoclear_features)
    st.refcount_order = hdr.refcount_order
    st.header_length = hdr.header_length
    st.header_extra = bytes(hc[V3_HEADER_LENGTH:hdr.header_length]) if hdr.version == 3 else b""
    st.compression_type = compression_type(st.header_extra)
    st.exts, pos, _ = parse_extensions(hc, hdr.header_length, extensions_end(hdr, cs))
    st.header_used = min(pos, cs)
    st.features = feature_names(st.exts)
    for etype, data in st.exts:
        if etype == EXT_BACKING_FORMAT:
            st.backing_format = data.decode("utf-8", "replace") or None
    st.extl2 = bool(st.incompat & INCOMPAT_EXTL2)
    bfo, bfs = hdr.backing_file_offset, hdr.backing_file_size
    if bfo and bfs:
        st.backing_name = decode_name(bytes(hc[bfo:bfo + bfs]))
        st.header_used = max(st.header_used, bfo + bfs)
    if not st.backing_name:
        st.backing_name = None


def _take_geometry(st, hdr) -> None:
    """Table sizes and places of a checked header."""
    set_geometry(st, hdr.cluster_bits, st.extl2, hdr.refcount_order)
    st.size = hdr.size
    st.l1_size = hdr.l1_size
    st.l1_offset = hdr.l1_table_offset
    st.rt_offset = hdr.refcount_table_offset
    st.rt_clusters = hdr.refcount_table_clusters
    st.nb_snapshots = hdr.nb_snapshots
    st.snapshots_offset = hdr.snapshots_offset


def set_geometry(st, cluster_bits: int, extended_l2: bool, refcount_order: int) -> None:
    """The cluster size, L2 and refcount block geometry (open and create)."""
    st.cb, st.cs = cluster_bits, 1 << cluster_bits
    st.extl2 = extended_l2
    st.l2_bits = l2_bits(cluster_bits, extended_l2)
    st.l2_entries = 1 << st.l2_bits
    st.l2_words = 2 if extended_l2 else 1
    st.refcount_order = refcount_order
    st.rc = RefCodec(refcount_order, st.cs)
    st.rb_shift = st.rc.entries.bit_length() - 1


def whole_header(st, exts: list, backing: bytes | None) -> bytes:
    """The header (fields, extensions, backing file name) from the state."""
    return header_bytes(st.header_record(), st.header_extra, exts, backing)


def backing_name_bytes(name: str | None) -> bytes | None:
    backing = encode_name(name) if name else None
    if backing is not None and len(backing) > MAX_BACKING_NAME:
        raise UsageError(f"backing file name is {len(backing)} bytes, above the limit of {MAX_BACKING_NAME}")
    return backing


def set_backing(st, name: str | None, fmt: str | None) -> None:
    """Rewrite the header with a new backing file name and format (QEMU's
    driver name) in place; the header must still fit the first cluster."""
    backing = backing_name_bytes(name)
    exts = [list(x) for x in st.exts if x[0] != EXT_BACKING_FORMAT]
    if backing and fmt:
        exts.insert(0, [EXT_BACKING_FORMAT, fmt.encode()])
    hdr = whole_header(st, exts, backing)
    cs = st.cs
    if len(hdr) > cs:
        raise UnsupportedFeature(f"the header with the new backing file name needs {len(hdr)} bytes, more "
                                 f"than the first cluster ({cs} bytes)", st.path)
    pad = max(0, st.header_used - len(hdr))
    st.file.pwrite(0, hdr + bytes(pad))
    st.sync()
    st.exts = exts
    st.header_used = len(hdr)
    st.backing_name = name or None
    st.backing_format = fmt if backing and fmt else None

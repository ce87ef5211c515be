"""QCOW (version 1)'s on-disk structures as QEMU's block/qcow.c and Xen
tapdisk's block-qcow.c name them, the format's constants and limits, and
pure functions over header bytes (no I/O): recognising the format,
validating a header, and what ``--untrusted`` finds.

Tapdisk writes an extended header after QEMU's (magic "XEN\\xfb", an L1
checksum, ``min_cluster_alloc`` and flags), puts the L1 table on a 4 KiB
boundary, and its older versions stored the L1 table little-endian (flag
``EXTHDR_L1_BIG_ENDIAN`` clear)."""

from __future__ import annotations

import struct

from vdtool.core.layout import Layout, Record

# -- structures ------------------------------------------------------------------------------------
HEADER = Layout("qcow header", ">", (
    ("magic", "I"), ("version", "I"), ("backing_file_offset", "Q"), ("backing_file_size", "I"),
    ("mtime", "I"), ("size", "Q"), ("cluster_bits", "B"), ("l2_bits", "B"), (None, "2x"),
    ("crypt_method", "I"), ("l1_table_offset", "Q")))
XEN_HEADER = Layout("qcow xen extended header", ">", (
    ("xmagic", "I"), ("cksum", "I"), ("min_cluster_alloc", "I"), ("flags", "I")))
XEN_HEADER_OFFSET = HEADER.size  # 48: right after QEMU's header

# -- constants -------------------------------------------------------------------------------------
QCOW_MAGIC = 0x514649FB  # "QFI\xfb"
MAGIC_BYTES = b"QFI\xfb"
QCOW_VERSION = 1
XEN_MAGIC = 0x58454EFB  # "XEN\xfb"
SPARSE_FILE = 0x01
EXTHDR_L1_BIG_ENDIAN = 0x02
QCOW_CRYPT_NONE, QCOW_CRYPT_AES = 0, 1
QCOW_OFLAG_COMPRESSED = 1 << 63

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13  # L2 tables of 512 bytes to 64 KiB, as QEMU accepts
MAX_BACKING_NAME = 1023
MAX_SIZE = 1 << 60
SECTOR = 512
VARIANTS = ("dynamic",)

# QEMU's choices for new images: 4 KiB clusters and one-cluster L2 tables,
# or with a backing file 512-byte clusters (no copy of unchanged sectors)
# and 32 KiB L2 tables
DEFAULT_BITS = (12, 9)
BACKING_BITS = (9, 12)


def l1_entries(hdr: Record) -> int:
    shift = hdr.cluster_bits + hdr.l2_bits
    return (hdr.size + (1 << shift) - 1) >> shift


def l1_checksum(l1_big_endian: bytes) -> int:
    """Tapdisk's L1 checksum: the first word of the table's MD5, read in the
    host's (little-endian) order."""
    import hashlib  # here: probing a qcow2 file imports this module, and hashlib costs 4 ms

    return struct.unpack_from("<I", hashlib.md5(l1_big_endian).digest())[0]


# -- recognising -------------------------------------------------------------------------------------

def sniff(head: bytes, tail: bytes, size: int) -> int:
    """100 for the QCOW magic with version 1 (qcow2's layout takes the others)."""
    if head[:4] == MAGIC_BYTES and len(head) >= 8:
        return 100 if HEADER.unpack(head + bytes(HEADER.size)).version == QCOW_VERSION else 0
    return 0


def inspect_untrusted(head: bytes, tail: bytes, size: int, read) -> tuple:
    out: list = []
    if len(head) < HEADER.size or head[:4] != MAGIC_BYTES:
        return out, False
    hdr = HEADER.unpack(head)
    if hdr.backing_file_offset:
        raw = read(hdr.backing_file_offset, min(hdr.backing_file_size, MAX_BACKING_NAME))
        out.append(("external-reference", f"backing file {raw.decode('utf-8', 'replace')!r}"))
    if hdr.crypt_method:
        out.append(("unknown-features", f"qcow encryption method {hdr.crypt_method}"))
    return out, True


# -- validating ----------------------------------------------------------------------------------------

CORRUPT, UNSUPPORTED = "corrupt", "unsupported"


def header_problems(hdr: Record, file_size: int) -> list:
    """(kind, text) for everything that makes the header unusable; an open
    refuses the image with the first."""
    out = []
    if hdr.version != QCOW_VERSION:
        out.append((UNSUPPORTED, f"qcow version {hdr.version} (vdtool's qcow reads version 1)"))
        return out
    if hdr.crypt_method == QCOW_CRYPT_AES:
        out.append((UNSUPPORTED, "image is AES-encrypted (crypt_method 1): vdtool does not decrypt qcow images; "
                                 "decrypt it with qemu-img convert first"))
        return out
    if hdr.crypt_method:
        out.append((CORRUPT, f"unknown encryption method {hdr.crypt_method}"))
        return out
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        out.append((CORRUPT, f"cluster_bits {hdr.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"))
        return out
    if not MIN_L2_BITS <= hdr.l2_bits <= MAX_L2_BITS:
        out.append((CORRUPT, f"l2_bits {hdr.l2_bits} is outside {MIN_L2_BITS}..{MAX_L2_BITS}"))
        return out
    if hdr.size > MAX_SIZE:
        out.append((CORRUPT, f"disk size {hdr.size} is above the limit of 2^60 bytes"))
        return out
    l1_bytes = l1_entries(hdr) * 8
    if hdr.l1_table_offset < HEADER.size or hdr.l1_table_offset + l1_bytes > file_size:
        out.append((CORRUPT, f"L1 table ({l1_bytes} bytes at offset {hdr.l1_table_offset}) lies inside the header "
                             f"or past the end of the file (file size {file_size})"))
    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME:
            out.append((CORRUPT, f"backing file name is {hdr.backing_file_size} bytes; at most "
                                 f"{MAX_BACKING_NAME} are allowed"))
        elif hdr.backing_file_offset + hdr.backing_file_size > file_size:
            out.append((CORRUPT, f"backing file name ({hdr.backing_file_size} bytes at "
                                 f"{hdr.backing_file_offset}) runs past the end of the file"))
    return out

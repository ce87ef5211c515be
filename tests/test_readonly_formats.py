"""The read-only formats: bochs (Growing disks and Undoable journals, header
versions 1 and 2) and cloop (V2.0, zlib blocks).  Images bximage and
create_compressed_fs make read byte-exactly, as qemu-img reads them (and as
bximage's own commit applies a journal); hostile headers and tables are one
error line; and no op changes an image of a format without Cap.WRITE."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
import zlib

import pytest

import peers
from helpers import file_bytes, poke, read_all, write_at
from vdrun import cli
from vdtool.core import ops, registry
from vdtool.core.backend import Cap
from vdtool.core.errors import NotSupported, VdError
from vdtool.core.stack import open_image
from vdtool.formats.bochs import layout as B
from vdtool.formats.cloop import layout as C

K, M = 1 << 10, 1 << 20


def _source(path, size: int, seed: int = 5) -> bytes:
    """Scattered random sectors, a longer run, and zeros between."""
    rng = random.Random(seed)
    data = bytearray(size)
    for off in range(0, size, 512 * 41):
        data[off:off + 512] = rng.randbytes(512)
    data[size // 3:size // 3 + 70000] = rng.randbytes(70000)
    path.write_bytes(data)
    return bytes(data)


def _bximage(*args):
    return peers.run("bximage", *args, "-q")


def _growing(tmp_path, size=6 * M, name="g.img"):
    src = tmp_path / "src.raw"
    data = _source(src, size)
    img = tmp_path / name
    _bximage("-func=convert", "-imgmode=growing", src, img)
    return img, data


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Images the makers wrote once for the module (tests copy them)."""
    d = tmp_path_factory.mktemp("made")
    bochs, _ = _growing(d, 1 * M)
    cloop, _ = _cloop(d)
    return {"bochs": bochs, "cloop": cloop}


def _copy(made, fmt, folder):
    p = folder / made[fmt].name
    shutil.copy(made[fmt], p)
    return p


def _refused_in_process(path, fmt) -> str:
    """The error reading ``path`` raises: a VdError of one line."""
    with pytest.raises(VdError) as e:
        read_all(path, fmt)
    assert "\n" not in str(e.value)
    return str(e.value)


def _one_error_line(*args) -> str:
    proc = cli(*args, expect=1)
    assert proc.stderr.startswith("vdtool: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


# -- bochs -------------------------------------------------------------------------------------------

def test_bochs_growing_reads_as_qemu_img_does(tmp_path):
    img, data = _growing(tmp_path)
    assert read_all(img) == data == peers.qemu_raw(img, tmp_path, "bochs")
    info = json.loads(cli("info", "--output", "json", img, expect=0).stdout)
    assert info["format"] == "bochs"  # probed by its magic, not as raw
    assert info["virtual-size"] == peers.qemu_info(img, "bochs")["virtual-size"]
    assert info["format-specific"]["data"]["subtype"] == "Growing"
    cli("compare", img, tmp_path / "src.raw", expect=0)


def test_bochs_empty_image_and_odd_size(tmp_path):
    img = tmp_path / "e.img"
    _bximage("-func=create", "-hd=10M", "-imgmode=growing", img)
    size = peers.qemu_info(img, "bochs")["virtual-size"]  # bximage rounds to a CHS geometry
    assert read_all(img) == bytes(size)
    assert json.loads(cli("map", "--output", "json", img, expect=0).stdout)[0]["data"] is False


def test_bochs_version_1_header(tmp_path):
    img, data = _growing(tmp_path, 2 * M)
    raw = bytearray(file_bytes(img))
    hdr = B.HEADER.unpack(raw)
    fields = {f: getattr(hdr, f) for f in B.HEADER_V1.fields}
    fields["version"] = B.VERSION_1  # the disk size moves up 4 bytes: no timestamp
    raw[:B.HEADER_V1.size] = B.HEADER_V1.pack(**fields)
    raw[B.HEADER_V1.size:B.HEADER.size] = bytes(B.HEADER.size - B.HEADER_V1.size)
    img.write_bytes(raw)
    assert B.decode(raw).version == B.VERSION_1
    assert read_all(img) == data == peers.qemu_raw(img, tmp_path, "bochs")


def _fat_time(path) -> int:
    t = time.localtime(os.stat(path).st_mtime)
    return ((t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday) << 16 | t.tm_hour << 11 | t.tm_min << 5 \
        | t.tm_sec // 2


def test_bochs_undoable_journal_over_its_base(tmp_path):
    """A journal shows its sectors over the flat base Bochs pairs it with
    (BASE.redolog); bximage -func=commit applying it is the judge."""
    grow, _ = _growing(tmp_path, 4 * M)
    base = tmp_path / "disk.img"
    base.write_bytes(bytes([7]) * (4 * M))
    journal = tmp_path / "disk.img.redolog"
    raw = bytearray(file_bytes(grow))
    off = B.HEADER.offset_of("subtype")
    raw[off:off + 16] = B.SUBTYPE_UNDOABLE.ljust(16, b"\0")
    struct.pack_into("<I", raw, B.HEADER.offset_of("timestamp"), _fat_time(base))  # bximage checks it
    journal.write_bytes(raw)
    view = read_all(journal)
    mine = tmp_path / "mine"  # vdtool merge applies the journal to its base as bximage -func=commit does
    mine.mkdir()
    shutil.copy(base, mine / base.name)
    shutil.copy(journal, mine / journal.name)
    os.utime(mine / base.name, ns=(os.stat(base).st_atime_ns, os.stat(base).st_mtime_ns))
    with pytest.raises(NotSupported, match="never changes them"):
        ops.merge(str(mine / journal.name), into="child")
    ops.merge(str(mine / journal.name))
    assert os.listdir(mine) == [base.name] and file_bytes(mine / base.name) == view
    info = json.loads(cli("info", "--output", "json", journal, expect=0).stdout)
    assert info["backing-filename"] == "disk.img"
    err = _one_error_line("info", "--untrusted", journal)
    assert "untrusted" in err or "reference" in err
    _bximage("-func=commit", base, journal)  # applies the journal to the base and removes it
    assert view == file_bytes(base)
    plain = tmp_path / "other.img"  # a journal under a name that names no base
    plain.write_bytes(raw)
    assert "BASE.redolog" in _one_error_line("info", plain)


BOCHS_POKES = {
    "catalog_huge": lambda p: poke(p, B.HEADER.offset_of("catalog"), "<I", 0xFFFFFFF0),
    "catalog_past_eof": lambda p: poke(p, B.HEADER.offset_of("catalog"), "<I", 0x100000),
    "extent_zero": lambda p: poke(p, B.HEADER.offset_of("extent"), "<I", 0),
    "extent_not_pow2": lambda p: poke(p, B.HEADER.offset_of("extent"), "<I", 3 * 4096),
    "extent_huge": lambda p: poke(p, B.HEADER.offset_of("extent"), "<I", 1 << 30),
    "bitmap_small": lambda p: poke(p, B.HEADER.offset_of("bitmap"), "<I", 0),
    "header_small": lambda p: poke(p, B.HEADER.offset_of("header"), "<I", 12),
    "header_past_eof": lambda p: poke(p, B.HEADER.offset_of("header"), "<I", 0x7FFFFFF0),
    "disk_beyond_catalog": lambda p: poke(p, B.HEADER.offset_of("disk"), "<Q", 1 << 50),
    "version": lambda p: poke(p, B.HEADER.offset_of("version"), "<I", 0x30000),
    "subtype": lambda p: write_at(p, B.HEADER.offset_of("subtype"), b"Sparse\0"),
    "entry_past_eof": lambda p: poke(p, 512 + 4 * 3, "<I", 0x00FFFFFF),
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) - 5000),
    "truncated_header": lambda p: os.truncate(p, 100),
}


def test_bochs_hostile_headers_are_one_error_line(tmp_path, made):
    for name, damage in sorted(BOCHS_POKES.items()):
        img = _copy(made, "bochs", tmp_path)
        damage(img)
        _refused_in_process(img, "bochs")
    # the same through the command line: one line, exit status 1
    img = _copy(made, "bochs", tmp_path)
    BOCHS_POKES["entry_past_eof"](img)
    assert "past the end of the file" in _one_error_line("convert", "-O", "raw", img, tmp_path / "out.raw")


# -- cloop -------------------------------------------------------------------------------------------

def _cloop(tmp_path, data_size=3 * M + 5000, block="65536", level="9", name="c.cloop"):
    src = tmp_path / "src.raw"
    data = _source(src, data_size)
    img = tmp_path / name
    peers.run("create_compressed_fs", "-q", "-B", block, "-L", level, src, img)
    return img, data


@pytest.mark.parametrize("block,level", [("65536", "9"), ("512", "0"), ("131072", "-2")])
def test_cloop_reads_as_qemu_img_does(tmp_path, block, level):
    size = {"9": 3 * M, "0": M, "-2": 192 * K}[level] + 5000  # -2 tries every compressor: slow
    img, data = _cloop(tmp_path, data_size=size, block=block, level=level)
    got = read_all(img)
    bs = int(block)
    assert len(got) == -(-len(data) // bs) * bs  # whole blocks, the last padded with zeros
    assert got[:len(data)] == data and not any(got[len(data):])
    assert got == peers.qemu_raw(img, tmp_path, "cloop")
    info = json.loads(cli("info", "--output", "json", img, expect=0).stdout)
    assert info["format"] == "cloop" and info["virtual-size"] == peers.qemu_info(img, "cloop")["virtual-size"]


def _table_entry(i: int) -> int:
    return C.TABLE_OFFSET + C.OFFSET_SIZE * i


CLOOP_POKES = {
    "block_size_zero": lambda p: poke(p, C.HEADER.offset_of("block_size"), ">I", 0),
    "block_size_odd": lambda p: poke(p, C.HEADER.offset_of("block_size"), ">I", 1000),
    "block_size_huge": lambda p: poke(p, C.HEADER.offset_of("block_size"), ">I", 0xFFFFFE00),
    "blocks_huge": lambda p: poke(p, C.HEADER.offset_of("num_blocks"), ">I", 0xFFFFFFFF),
    "blocks_past_eof": lambda p: poke(p, C.HEADER.offset_of("num_blocks"), ">I", 0x00FFFFFF),
    "offsets_backwards": lambda p: poke(p, _table_entry(2), ">Q", 200),
    "offset_in_table": lambda p: poke(p, _table_entry(0), ">Q", 8),
    "offset_past_eof": lambda p: poke(p, _table_entry(48), ">Q", 1 << 40),
    "block_too_large": lambda p: poke(p, _table_entry(1), ">Q", 1 << 30),
    "block_garbage": lambda p: write_at(p, struct.unpack(">Q", file_bytes(p)[_table_entry(3):_table_entry(4)])[0],
                                        b"\xff" * 64),
    "version_4": lambda p: write_at(p, 10, b"#V4.0 Format\n"),
    "preamble": lambda p: write_at(p, 10, b"#Vx.y Fmt\n"),
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) - 3000),
}


def test_cloop_hostile_headers_are_one_error_line(tmp_path, made):
    assert C.HEADER.unpack(file_bytes(made["cloop"])).num_blocks == 49
    for name, damage in sorted(CLOOP_POKES.items()):
        img = _copy(made, "cloop", tmp_path)
        damage(img)
        err = _refused_in_process(img, "cloop")
        if name == "version_4":
            assert "V4.0" in err
    img = _copy(made, "cloop", tmp_path)
    CLOOP_POKES["version_4"](img)
    assert "V4.0" in _one_error_line("info", img)  # recognised by its preamble, refused by name


def test_cloop_block_that_inflates_short_or_long(tmp_path):
    """Blocks rebuilt with other data: one block's worth is the only thing accepted."""
    img, _ = _cloop(tmp_path, data_size=2 * 64 * K)
    raw = bytearray(file_bytes(img))
    table = C.table_end(C.HEADER.unpack(raw))
    for body, word in ((zlib.compress(bytes(1000)), "1000 bytes"), (zlib.compress(bytes(70000)), "does not end")):
        out = raw[:table] + body + raw[table:]  # block 0 is now ``body``; the others shift
        offs = struct.unpack_from(">3Q", out, C.TABLE_OFFSET)
        struct.pack_into(">3Q", out, C.TABLE_OFFSET, offs[0], offs[0] + len(body), offs[2] + len(body))
        img.write_bytes(out)
        assert word in _one_error_line("convert", "-O", "raw", img, tmp_path / "o.raw")


# -- no write reaches a read-only format -------------------------------------------------------------

REFUSED = {
    "resize": lambda p: ops.resize(p, 20 * M),
    "resize-shrink": lambda p: ops.resize(p, M // 2, shrink=True),
    "discard": lambda p: ops.discard(p, ["0:64K"]),
    "discard-zeroes": lambda p: ops.discard(p, zeroes=True),
    "compact": lambda p: ops.compact(p),
    "amend": lambda p: ops.amend(p, {"size": "20M"}),
    "snapshot-create": lambda p: ops.snapshot(p, "create", "s1"),
    "snapshot-delete": lambda p: ops.snapshot(p, "delete", "s1"),
    "snapshot-apply": lambda p: ops.snapshot(p, "apply", "s1"),
    "rebase": lambda p: ops.rebase(p, None, unsafe=True),
    "check-repair-all": lambda p: ops.check(p, repair="all"),
    "check-repair-leaks": lambda p: ops.check(p, repair="leaks"),
    "write": lambda p: open_image(p, writable=True),
}


@pytest.mark.parametrize("fmt", ["bochs", "cloop"])
def test_every_write_op_refuses_a_readonly_format(tmp_path, made, fmt):
    img = _copy(made, fmt, tmp_path)
    before = file_bytes(img)
    for op, run in REFUSED.items():
        with pytest.raises(NotSupported, match=f"{fmt} images .*never changes them"):
            run(str(img))
        assert file_bytes(img) == before, op
    assert os.listdir(tmp_path) == [img.name]


@pytest.mark.parametrize("args", [("discard", "--zeroes", "{img}"), ("check", "-r", "all", "{img}")],
                         ids=lambda a: "-".join(a[:2]).replace("{img}", ""))
def test_write_refusal_is_one_error_line(tmp_path, made, args):
    img = _copy(made, "cloop", tmp_path)
    before = file_bytes(img)
    err = _one_error_line(*[a.format(img=img) for a in args])
    assert "cloop images" in err and "never changes them" in err
    assert file_bytes(img) == before


def test_readonly_formats_cannot_be_created_or_converted_to(tmp_path, made):
    for fmt in ("bochs", "cloop"):
        with pytest.raises(NotSupported, match="create"):
            ops.create(str(tmp_path / f"n.{fmt}"), M, fmt=fmt)
        with pytest.raises(NotSupported, match="create"):
            ops.convert(str(made["bochs"]), str(tmp_path / f"c.{fmt}"), fmt=fmt)
    assert "not supported" in _one_error_line("convert", "-O", "cloop", made["bochs"], tmp_path / "c.cloop")
    assert os.listdir(tmp_path) == []


def test_check_of_a_readonly_format_says_it_has_none(made):
    with pytest.raises(NotSupported, match="check"):
        ops.check(str(made["bochs"]))
    assert cli("check", made["cloop"]).returncode == 63


@pytest.mark.parametrize("name", registry.implemented())
def test_backends_without_write_refuse_a_writable_open(tmp_path, name):
    """The rule every op relies on: a backend without Cap.WRITE cannot be
    opened for writing, whichever op asks."""
    cls = registry.get_backend(name)
    if cls.capabilities & Cap.WRITE:
        return
    p = tmp_path / "x"
    p.write_bytes(bytes(4096))
    with pytest.raises(NotSupported, match="never changes them"):
        cls.open(str(p), writable=True)

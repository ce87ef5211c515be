"""DMG (UDIF) backend, read-only: images built from the specification
(tests/dmgkit.py: no tool here makes DMGs), judged by what dmg2img and
qemu-img read from them; hostile trailers, property lists and chunk
tables; writes refused."""

from __future__ import annotations

import base64
import json
import random
import struct

import pytest

import dmgkit
import peers
from helpers import read_all
from vdrun import cli
from vdtool.core.errors import VdError
from vdtool.formats.dmg.layout import CHUNK, KOLY, LZFSE, MISH

K = 1 << 10


def _text(n: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    words = [b"apple", b"disk", b"image", b"chunk", b"sector", b"\x00" * 7, b"\xff\xfe"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + bytes([rnd.randrange(256)])
    return bytes(out[:n])


def disk_layout(kinds) -> list:
    """Two partitions: a small raw one, then one chunk of each kind."""
    chunks = [(k, _text((i + 2) * 4 * K, seed=i) if k not in ("zero", "ignore") else bytes((i + 1) * K))
              for i, k in enumerate(kinds)]
    return [("Driver Descriptor Map (DDM : 0)", [("raw", b"\x11" * 1024)]), ("Apple_HFS (Apple_HFS : 1)", chunks)]


def dmg2img(path, out) -> bytes:
    peers.run("dmg2img", "-s", path, out)
    return out.read_bytes()


ALL_KINDS = ("zlib", "zero", "bzip2", "adc", "ignore", "raw")


@pytest.mark.parametrize("kinds", [ALL_KINDS, ("adc",), ("bzip2", "bzip2"), ("zlib", "raw", "zlib")],
                         ids=lambda k: "-".join(k))
def test_reads_like_dmg2img(tmp_path, kinds):
    p = tmp_path / "a.dmg"
    disk = dmgkit.build(p, disk_layout(kinds), comments=True)
    assert dmg2img(p, tmp_path / "d.img") == disk  # the builder makes what dmg2img reads
    assert read_all(p) == disk
    cli("convert", "-O", "raw", p, tmp_path / "v.img", expect=0)
    assert (tmp_path / "v.img").read_bytes() == disk


@pytest.mark.parametrize("rsrc", [False, True], ids=["plist", "resource-fork"])
def test_reads_like_qemu(tmp_path, rsrc):
    """qemu-img reads raw, zero, ignore and zlib chunks (bzip2 and lzfse
    need qemu-block-extra, ADC it does not read)."""
    p = tmp_path / "a.dmg"
    disk = dmgkit.build(p, disk_layout(("zlib", "zero", "raw", "ignore", "zlib")), rsrc=rsrc)
    peers.qemu_to_raw(p, tmp_path / "q.raw", "dmg")
    assert (tmp_path / "q.raw").read_bytes() == disk
    assert read_all(p) == disk
    assert peers.qemu_info(p, "dmg")["virtual-size"] == len(disk)


def test_info_lists_partitions(tmp_path):
    p = tmp_path / "a.img"  # probed by content, not by name
    dmgkit.build(p, disk_layout(ALL_KINDS))
    d = json.loads(cli("info", "--output", "json", p, expect=0).stdout)
    assert d["format"] == "dmg"
    data = d["format-specific"]["data"]
    listed = peers.run("dmg2img", "-l", p).stdout.decode()
    for i, part in enumerate(data["partitions"]):
        assert f"partition {i}: {part['name']}" in listed
    assert data["chunk-types"]["adc"] == 1 and data["chunks"] == 7


def test_writes_refused(tmp_path):
    p = tmp_path / "a.dmg"
    dmgkit.build(p, disk_layout(("zlib",)))
    before = p.read_bytes()
    for args in (("resize", p, "1M"), ("discard", p, "0:512"), ("compact", p), ("check", "-r", "all", p)):
        r = cli(*args)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "dmg" in r.stderr, (args, r.stderr)
    assert p.read_bytes() == before


# -- hostile input ------------------------------------------------------------------------------------

def _koly_at(data: bytes) -> int:
    return len(data) - KOLY.size


def _replace_plist(path, edit) -> None:
    """Rewrite the property list through ``edit(text) -> text``."""
    data = path.read_bytes()
    k = KOLY.unpack(data, _koly_at(data))
    xml = data[k.XMLOffset:k.XMLOffset + k.XMLLength]
    new = edit(xml)
    koly = KOLY.pack(k.replace(XMLLength=len(new)))
    path.write_bytes(data[:k.XMLOffset] + new + koly)


def _edit_mish(path, part: int, edit) -> None:
    """Rewrite partition ``part``'s mish block through ``edit(bytearray)``."""
    def fix(xml: bytes) -> bytes:
        blocks = xml.split(b"<data>")
        body, rest = blocks[part + 1].split(b"</data>", 1)
        mish = bytearray(base64.b64decode(body))
        edit(mish)
        blocks[part + 1] = base64.b64encode(bytes(mish)) + b"</data>" + rest
        return b"<data>".join(blocks)
    _replace_plist(path, fix)


def _chunk_field(k: int, field: str) -> int:
    return MISH.size + k * CHUNK.size + CHUNK.offset_of(field)


def _refused(p, *words, cmd=None):
    """Opening and reading ``p`` fails with one VdError line naming
    ``words`` (in-process: quick); with ``cmd``, the CLI's one error line."""
    if cmd is None:
        with pytest.raises(VdError) as ei:
            read_all(p)
        text = str(ei.value)
    else:
        r = cli(*cmd)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith("vdtool: error:") and r.stderr.count("\n") == 1, r.stderr
        text = r.stderr
    assert "\n" not in text.rstrip("\n"), text
    for w in words:
        assert w in text, text


BOMB = (b'<?xml version="1.0"?>\n<!DOCTYPE plist [\n<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">\n'
        + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">\n' % ((98 + i,) + (97 + i,) * 10)
                   for i in range(8))
        + b"]>\n<plist><dict><key>x</key><string>&i;</string></dict></plist>\n")


@pytest.mark.parametrize("case", ["bomb", "external-entity", "dtd-subset", "not-xml", "no-blkx", "huge-length"])
def test_hostile_plist(tmp_path, case):
    p = tmp_path / "a.dmg"
    dmgkit.build(p, disk_layout(("zlib",)))
    if case == "bomb":
        _replace_plist(p, lambda x: BOMB)
    elif case == "external-entity":
        _replace_plist(p, lambda x: x.replace(b"<plist", b'<!DOCTYPE p [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
                                                  b"<plist", 1).replace(b"<string>0x0050", b"<string>&e;", 1))
    elif case == "dtd-subset":
        _replace_plist(p, lambda x: x.replace(b'PropertyList-1.0.dtd">', b'PropertyList-1.0.dtd" [ ]>', 1))
    elif case == "not-xml":
        _replace_plist(p, lambda x: x[:len(x) // 2])
    elif case == "no-blkx":
        _replace_plist(p, lambda x: x.replace(b"<key>blkx</key>", b"<key>plst</key>"))
    else:
        data = bytearray(p.read_bytes())
        struct.pack_into(">Q", data, _koly_at(data) + KOLY.offset_of("XMLLength"), 1 << 40)
        p.write_bytes(data)
    _refused(p, "property list" if case != "no-blkx" else "blkx")


@pytest.mark.parametrize("case,words", [
    ("overlap", "overlap"), ("past-fork", "past the data fork"), ("past-disk", "pass the disk"),
    ("too-many-chunks", "do not fit"), ("huge-chunk", "at most"), ("bad-signature", "not a mish block"),
    ("loop", "overlap"), ("raw-too-long", "raw chunk"),
])
def test_hostile_chunk_table(tmp_path, case, words):
    p = tmp_path / "a.dmg"
    dmgkit.build(p, disk_layout(("zlib", "raw", "zero")))

    def edit(m):
        if case == "overlap":
            struct.pack_into(">Q", m, _chunk_field(1, "SectorNumber"), 3)
        elif case == "past-fork":
            struct.pack_into(">Q", m, _chunk_field(0, "CompressedOffset"), 1 << 40)
        elif case == "past-disk":
            struct.pack_into(">Q", m, MISH.offset_of("SectorNumber"), 1 << 30)
        elif case == "too-many-chunks":
            struct.pack_into(">I", m, MISH.offset_of("NumberOfBlockChunks"), 0xFFFFFFFF)
        elif case == "huge-chunk":
            struct.pack_into(">Q", m, _chunk_field(0, "SectorCount"), 1 << 20)
            struct.pack_into(">Q", m, MISH.offset_of("SectorCount"), 1 << 21)
        elif case == "bad-signature":
            m[:4] = b"MISH"
        elif case == "loop":  # every entry names the same sectors
            for k in range(3):
                struct.pack_into(">Q", m, _chunk_field(k, "SectorNumber"), 0)
        elif case == "raw-too-long":
            struct.pack_into(">Q", m, _chunk_field(1, "CompressedLength"), 1 << 20)
    if case == "huge-chunk":
        data = bytearray(p.read_bytes())
        struct.pack_into(">Q", data, _koly_at(data) + KOLY.offset_of("SectorCount"), 1 << 22)
        p.write_bytes(data)
    _edit_mish(p, 1, edit)
    _refused(p, words)


@pytest.mark.parametrize("case,words", [
    ("zlib-garbage", "does not decode"), ("zlib-short", "decodes to"), ("adc-before-start", "does not decode"),
    ("lzfse", "0x80000007 (lzfse)"), ("unknown", "0x80000042 is not supported"),
])
def test_bad_chunk_data_fails_reads_cleanly(tmp_path, case, words):
    p = tmp_path / "a.dmg"
    kind = "adc" if case.startswith("adc") else "zlib"
    dmgkit.build(p, disk_layout((kind,)))
    data = bytearray(p.read_bytes())
    start = 1024  # the first partition's raw chunk comes first in the data fork
    if case == "zlib-garbage":
        data[start + 10:start + 30] = b"\xde\xad" * 10
        p.write_bytes(data)
    elif case == "zlib-short":
        p.write_bytes(data)
        _edit_mish(p, 1, lambda m: struct.pack_into(">Q", m, _chunk_field(0, "SectorCount"), 15)
                   or struct.pack_into(">Q", m, MISH.offset_of("SectorCount"), 15))
    elif case == "adc-before-start":
        data[start:start + 3] = bytes([0x40, 0x10, 0x00])  # a copy from 4097 bytes back, first thing
        p.write_bytes(data)
    else:
        t = LZFSE if case == "lzfse" else 0x80000042
        _edit_mish(p, 1, lambda m: struct.pack_into(">I", m, _chunk_field(0, "EntryType"), t))
    cli("info", p, expect=0)  # the tables are sound: info works
    _refused(p, words, cmd=("convert", "-O", "raw", p, tmp_path / "out.img") if case == "lzfse" else None)


def test_truncated_and_junk_trailer(tmp_path):
    p = tmp_path / "a.dmg"
    dmgkit.build(p, disk_layout(("zlib",)))
    data = p.read_bytes()
    (tmp_path / "t.dmg").write_bytes(data[:-100])
    _refused(tmp_path / "t.dmg", "no UDIF trailer", cmd=("info", "-f", "dmg", tmp_path / "t.dmg"))
    bad = bytearray(data)
    struct.pack_into(">I", bad, _koly_at(data) + KOLY.offset_of("SegmentCount"), 3)
    (tmp_path / "s.dmg").write_bytes(bad)
    _refused(tmp_path / "s.dmg", "segmented")

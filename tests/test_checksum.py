"""vdtool checksum: one digest for one content, whatever holds it (formats,
variants, chains made by qemu-img and by vdtool), another for one changed
byte or another length, equal to a few-line reimplementation of the
documented construction, and equal to what convert --verify prints."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import xxhash

import chainkit as ck
import peers
from chainkit import M
from helpers import read_all
from vdrun import cli
from vdtool.core import ops
from vdtool.core.digest import ContentDigest, digest_stack
from vdtool.core.stack import open_image
from vdtool.formats.vhd import layout as V

HASHES = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def reference(data: bytes, algorithm: str = "xxh3-128", group: int = 65536) -> str:
    """The construction as the man page states it, over the disk's bytes."""
    H = HASHES[algorithm]
    B = 65536
    blocks = [H(data[i:i + B].ljust(B, b"\0")).digest() for i in range(0, len(data), B)]
    groups = [H(b"".join(blocks[j:j + group])).digest() for j in range(0, len(blocks), group)]
    return H(b"".join(groups) + len(data).to_bytes(8, "little")).hexdigest()


def checksum(path, *args) -> str:
    proc = cli("checksum", *args, path, expect=0)
    digest, name = proc.stdout.rstrip("\n").split("  ", 1)
    assert name == str(path)
    return digest


SIZE = 5 * M + 7 * 512  # not a whole 64 KiB block: the padded last block counts


def content(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray(SIZE)
    data[0:4096] = rng.randbytes(4096)
    data[M + 100:M + 70000] = rng.randbytes(70000 - 100)  # straddles blocks
    data[3 * M:3 * M + 128 * 1024] = rng.randbytes(128 * 1024)
    data[SIZE - 1000:] = rng.randbytes(1000)  # the short last block
    return bytes(data)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checksum")
    data = content()
    raw = folder / "disk.img"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 4096):
            piece = data[off:off + 4096]
            if piece.strip(b"\0"):
                f.seek(off)
                f.write(piece)
    # a stretch of written zeros as well as holes
    with open(raw, "r+b") as f:
        f.seek(2 * M)
        f.write(bytes(256 * 1024))
    return folder, raw, data


# -- the construction ------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256"])
def test_streaming_digest_matches_reference_across_groups(algorithm):
    """Arbitrary update/update_zeros pieces, groups of 4 blocks so that
    groups, zero groups and a short last group all occur."""
    rng = random.Random(7)
    data = bytearray()
    d = ContentDigest(algorithm, group_blocks=4)
    while len(data) < 40 * 65536:
        n = rng.choice([1, 511, 4096, 65536, 65537, 300000, 20 * 65536])
        if rng.random() < 0.5:
            piece = rng.randbytes(n)
            data += piece
            d.update(piece)
        else:
            data += bytes(n)
            d.update_zeros(n)
    assert d.hexdigest() == reference(bytes(data), algorithm, group=4)
    assert d.hexdigest() == d.hexdigest()  # final once, asked twice


def test_empty_and_zero_lengths():
    assert ContentDigest().hexdigest() == reference(b"")
    for n in (1, 65535, 65536, 65537, 3 * 65536):
        d = ContentDigest("sha256")
        d.update_zeros(n)
        assert d.hexdigest() == reference(bytes(n), "sha256")


@pytest.mark.parametrize("algorithm", ["xxh3-128", "sha256"])
def test_cli_equals_reimplementation(disk, algorithm):
    folder, raw, data = disk
    assert checksum(raw, "-a", algorithm) == reference(data, algorithm)


def test_parallel_equals_serial(tmp_path):
    """Bigger than a few chunks, holes and data mixed: the thread pool feeds
    the digests in disk order."""
    rng = random.Random(3)
    size = 37 * M + 4096
    path = tmp_path / "big.img"
    data = bytearray(size)
    for _ in range(40):
        off = rng.randrange(size - 300000)
        n = rng.randrange(1, 300000)
        data[off:off + n] = rng.randbytes(n)
    with open(path, "wb") as f:  # holes where the data is zero, written zeros elsewhere
        f.truncate(size)
        for off in range(0, size, 1 << 20):
            piece = data[off:off + (1 << 20)]
            if piece.count(0) < len(piece) or off % (3 << 20) == 0:
                f.seek(off)
                f.write(piece)
    want = reference(bytes(data))
    with open_image(str(path)) as s:
        assert digest_stack(s, workers=1) == want
        assert digest_stack(s, workers=4) == want
        assert digest_stack(s, workers=2, algorithm="sha256") == reference(bytes(data), "sha256")


def test_beyond_one_group(tmp_path):
    """A sparse raw disk just past 4 GiB: two groups, the second short."""
    size = (4 << 30) + 65536 + 1000
    path = tmp_path / "g.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(12345)
        f.write(b"start")
        f.seek((4 << 30) - 3)
        f.write(b"across")
        f.seek(size - 1)
        f.write(b"z")
    # the reference construction, read 64 KiB at a time (4 GiB would not fit comfortably)
    H, B, G = xxhash.xxh3_128, 65536, 65536
    groups, group = [], []
    with open(path, "rb") as f:
        while block := f.read(B):
            group.append(H(block.ljust(B, b"\0")).digest())
            if len(group) == G:
                groups.append(H(b"".join(group)).digest())
                group = []
    groups.append(H(b"".join(group)).digest())
    assert checksum(path) == H(b"".join(groups) + size.to_bytes(8, "little")).hexdigest()


# -- same content, any container -----------------------------------------------------

def qemu_variants(folder, raw):
    out = []

    def conv(name, fmt, *opts):
        dst = folder / name
        peers.qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(dst))
        out.append(dst)

    conv("full.img", "raw", "-S", "0")
    conv("plain.qcow2", "qcow2")
    conv("comp.qcow2", "qcow2", "-c")
    conv("small.qcow2", "qcow2", "-o", "cluster_size=4096")
    conv("dyn.vdi", "vdi")
    conv("static.vdi", "vdi", "-o", "static=on")
    for sub in ("monolithicSparse", "monolithicFlat", "streamOptimized", "twoGbMaxExtentSparse"):
        conv(f"{sub}.vmdk", "vmdk", "-o", f"subformat={sub}")
    conv("dyn.vhd", "vpc", "-o", "force_size=on")
    conv("fixed.vhd", "vpc", "-o", "subformat=fixed,force_size=on")
    return out


@pytest.mark.interop
def test_same_content_same_digest_everywhere(disk):
    folder, raw, data = disk
    want = reference(data)
    images = qemu_variants(folder, raw)
    for fmt, variant in (("qcow2", None), ("vdi", "fixed"), ("vmdk", "twoGbMaxExtentFlat"), ("vhd", "dynamic"),
                         ("raw", "full")):
        dst = folder / f"vd-{fmt}-{variant}.{ck.EXT[fmt]}"
        ops.convert(str(raw), str(dst), fmt=fmt, variant=variant)
        images.append(dst)
    # one call, many images: one line each, in order
    proc = cli("checksum", *images, expect=0)
    lines = proc.stdout.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [str(p) for p in images]
    assert {line.split("  ", 1)[0] for line in lines} == {want}, proc.stdout


@pytest.mark.interop
def test_qcow2_chain_by_qemu(disk):
    """The base holds other data where the overlay writes: only the chain's
    view counts."""
    folder, raw, data = disk
    base = folder / "qbase.qcow2"
    top = folder / "qtop.qcow2"
    wrong = bytearray(data)
    wrong[M + 100:M + 4000] = b"\x55" * 3900
    wrong[4 * M:4 * M + 8192] = b"\x66" * 8192  # hidden by a zero write in the overlay
    (folder / "wrong.img").write_bytes(bytes(wrong))
    peers.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(folder / "wrong.img"), str(base))
    peers.qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    (folder / "patch.bin").write_bytes(data[M + 100:M + 4000])
    peers.qemu_io(str(top), f"write -s {folder / 'patch.bin'} {M + 100} 3900", f"write -z {4 * M} 8192",
                  fmt="qcow2")
    assert checksum(top) == reference(data)
    assert checksum(base) == reference(bytes(wrong))


@pytest.mark.parametrize("formats", ck.MIXED_CHAINS + (("vhd", "vhd"), ("vmdk", "vmdk")),
                         ids=lambda f: "-".join(f))
def test_chains_by_vdtool(tmp_path, formats):
    paths = ck.make_chain(tmp_path, formats, size=4 * M, seed=len(formats))
    top = paths[-1]
    data = read_all(top)
    want = reference(data)
    assert checksum(top) == want
    flat = tmp_path / "flat.img"
    with open(flat, "wb") as f:
        f.write(data)
    assert checksum(flat) == want


# -- any difference shows ---------------------------------------------------------------

@pytest.mark.interop
def test_one_byte_anywhere_changes_it(disk, tmp_path):
    folder, raw, data = disk
    want = reference(data)
    img = tmp_path / "x.qcow2"
    peers.qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    seen = {want}
    for off in (0, SIZE - 1, 4 * M + 12345, 2 * M + 5):  # first, last, in a hole, in written zeros
        peers.qemu_io(str(img), f"write -P 0x01 {off} 1", fmt="qcow2")
        changed = bytearray(data)
        changed[off] = 1
        got = checksum(img)
        assert got == reference(bytes(changed)) and got not in seen
        seen.add(got)
        peers.qemu_io(str(img), f"write -P {data[off]} {off} 1", fmt="qcow2")
        assert checksum(img) == want


def test_length_counts(tmp_path):
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    a.write_bytes(b"hello" + bytes(65531))
    b.write_bytes(b"hello" + bytes(65531 + 512))
    assert checksum(a) != checksum(b)
    e1, e2 = tmp_path / "e1.img", tmp_path / "e2.img"
    with open(e1, "wb") as f:
        f.truncate(M)
    with open(e2, "wb") as f:
        f.truncate(M + 65536)
    assert checksum(e1) == reference(bytes(M)) != checksum(e2)


# -- convert --verify prints the same digest -------------------------------------------------

def test_convert_verify_prints_checksum(disk, tmp_path):
    folder, raw, data = disk
    proc = cli("convert", "--verify", raw, tmp_path / "v.vdi", expect=0)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if "xxh3-128" in line)
    assert lines["source xxh3-128"] == lines["output xxh3-128"] == checksum(raw) == reference(data)
    r = ops.convert(str(tmp_path / "v.vdi"), str(tmp_path / "v.qcow2"), verify=True, compress=True)
    assert r.source_digest == r.output_digest == reference(data)


# -- output and errors ----------------------------------------------------------------------

def test_json(disk):
    folder, raw, data = disk
    proc = cli("checksum", "--output", "json", "-a", "sha256", raw, expect=0)
    doc = json.loads(proc.stdout)
    assert doc == [{"filename": str(raw), "algorithm": "sha256", "checksum": reference(data, "sha256"),
                    "virtual-size": SIZE}]
    r = ops.checksum(str(raw))
    assert r["checksum"] == reference(data) and r["algorithm"] == "xxh3-128"


def hostile_images(folder):
    """(name, path) of images that must fail with one error line."""
    out = []
    q = folder / "trunc.qcow2"
    ops.create(str(q), 16 * M, fmt="qcow2")
    ck.write(str(q), [(0, b"x" * 70000)])
    with open(q, "r+b") as f:
        f.truncate(200)  # header cut short
    out.append(q)
    l1 = folder / "l1.qcow2"
    ops.create(str(l1), 16 * M, fmt="qcow2")
    with open(l1, "r+b") as f:
        f.seek(40)
        f.write((1 << 60).to_bytes(8, "big"))  # l1_table_offset far beyond the file
    out.append(l1)
    data_gone = folder / "gone.qcow2"
    ops.create(str(data_gone), 16 * M, fmt="qcow2")
    ck.write(str(data_gone), [(0, b"y" * 200000)])
    with open(data_gone, "r+b") as f:
        f.truncate(os.path.getsize(data_gone) - 65536)  # the last data cluster is gone
    out.append(data_gone)
    vhd = folder / "bad.vhd"
    ops.create(str(vhd), 8 * M, fmt="vhd")
    with open(vhd, "r+b") as f:  # the block table far past the end of the file
        f.seek(512)
        raw = bytearray(f.read(1024))
        raw = bytearray(V.DYNAMIC_HEADER.pack(V.DYNAMIC_HEADER.unpack(raw), table_offset=1 << 40))
        V.with_checksum(raw, V.DYNAMIC_HEADER)
        f.seek(512)
        f.write(raw)
    out.append(vhd)
    missing_parent = folder / "orphan.qcow2"
    peers_free = folder / "p.qcow2"
    ops.create(str(peers_free), 8 * M, fmt="qcow2")
    ops.create(str(missing_parent), None, fmt="qcow2", parent=str(peers_free))
    os.unlink(peers_free)
    out.append(missing_parent)
    out.append(folder / "does-not-exist.img")
    return out


def test_hostile_images_one_line_each_and_the_rest_go_on(disk, tmp_path):
    folder, raw, data = disk
    bad = hostile_images(tmp_path)
    args = [raw]
    for b in bad:
        args += [b, raw]
    proc = cli("checksum", *args, expect=1)
    errors = proc.stderr.splitlines()
    assert len(errors) == len(bad), proc.stderr
    assert all(line.startswith("vdtool: error: ") for line in errors), proc.stderr
    for b in bad:
        assert sum(str(b) in line for line in errors) == 1, (b, proc.stderr)
    good = proc.stdout.splitlines()
    # the truncated-data image may still read (the read is what fails); all goods are printed
    assert good.count(f"{reference(data)}  {raw}") == len(bad) + 1, proc.stdout


def test_usage_errors(disk):
    folder, raw, data = disk
    cli("checksum", expect=2)
    cli("checksum", "-a", "md5", raw, expect=2)


def test_help_documents_the_construction():
    text = cli("checksum", "--help", expect=0).stdout
    for fact in ("64 KiB", "65536", "little-endian", "big-endian", "zero bytes", "xxh3-128", "sha256"):
        assert fact in text, fact


def test_help_snippet_is_the_construction(disk):
    """The Python lines printed by --help, run as they are, give what the
    command prints."""
    folder, raw, data = disk
    text = cli("checksum", "--help", expect=0).stdout.splitlines()
    start = next(i for i, line in enumerate(text) if line.strip() == "B = G = 65536")
    end = next(i for i in range(start, len(text)) if text[i].strip().startswith("print("))
    lines = text[start:end + 1]
    indent = len(lines[0]) - len(lines[0].lstrip())
    code = "\n".join(line[indent:] for line in lines)
    printed = []
    for algorithm, H in HASHES.items():
        exec(code, {"DATA": data, "H": H, "print": printed.append})
        assert printed[-1] == checksum(raw, "-a", algorithm)

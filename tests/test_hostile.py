"""Hostile inputs: every case must end in a VdError (or a correct answer),
never another exception, never a hang, never a huge allocation.

The generic cases (missing file, directory, empty, 1 byte) run in-process
under an alarm; the fuzz cases (truncations of a valid qcow2 at many offsets,
seeded byte flips in its header and tables, a table of field pokes) run in a
worker process under ``RLIMIT_AS`` = 2 GiB with a per-case alarm."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import traceback

import pytest

import peers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASE_SECONDS = 10
MEMORY_LIMIT = 2 << 30
BIG = 64 << 20  # convert/read everything only below this virtual size


def implemented_formats():
    """Every built-in format whose module exists (formats are being added)."""
    from vdtool.core import registry

    out = []
    for name, spec in registry.BUILTIN.items():
        module = spec.split(":")[0]
        if os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"):
            out.append(name)
    return out


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def exercise(path: str, fmt, outdir: str, repair: bool = False) -> list:
    """Open, read, info, check, convert.  Returns the names of the steps that
    ended in a VdError; anything else propagates."""
    from vdtool.core import ops
    from vdtool.core.backend import Status
    from vdtool.core.errors import VdError
    from vdtool.core.stack import open_image

    refused = []

    def step(name, fn):
        try:
            fn()
        except VdError:
            refused.append(name)

    def read_some():
        with open_image(path, fmt) as s:
            size = s.virtual_size
            assert isinstance(size, int) and size >= 0
            pos, steps = 0, 0
            limit = min(size, BIG)
            while pos < limit and steps < 20000:
                status, n, level = s.block_status(pos, size - pos)
                assert status in (Status.DATA, Status.ZERO, Status.UNALLOCATED) and 0 < n <= size - pos
                pos += n
                steps += 1
            if size:
                s.read(0, min(size, 1 << 20))
                s.read(max(0, size - 65536), min(size, 65536))
                s.read(size // 2, min(size - size // 2, 4096))

    def convert():
        with open_image(path, fmt) as s:
            if s.virtual_size > BIG:
                return
        ops.convert(path, os.path.join(outdir, "out.img"), src_format=fmt, fmt="raw", force=True)

    step("info", lambda: ops.info(path, fmt, chain=True))
    step("read", read_some)
    step("check", lambda: ops.check(path, fmt))
    step("convert", convert)
    if repair:
        step("repair", lambda: ops.check(path, fmt, repair="all"))
        step("read-after-repair", read_some)
    return refused


def run_case(case: dict, outdir: str) -> dict:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, case.get("seconds", CASE_SECONDS))
    try:
        refused = exercise(case["path"], case["fmt"], outdir, case.get("repair", False))
        return {"name": case["name"], "ok": True, "refused": refused}
    except CaseTimeout:
        return {"name": case["name"], "ok": False, "error": f"timeout after {case.get('seconds', CASE_SECONDS)} s"}
    except BaseException as e:  # noqa: BLE001 -- any non-VdError is the finding
        return {"name": case["name"], "ok": False, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def worker_main():
    """Runs in a subprocess: cases as JSON on stdin, one JSON line per case out."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    cases = json.load(sys.stdin)
    for case in cases:
        outdir = os.path.join(os.path.dirname(case["path"]), "out")
        os.makedirs(outdir, exist_ok=True)
        result = run_case(case, outdir)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def run_in_worker(cases: list) -> list:
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {ROOT!r}]; "
            "import test_hostile; test_hostile.worker_main()")
    budget = 60 + sum(c.get("seconds", CASE_SECONDS) for c in cases)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases).encode(), capture_output=True,
                          timeout=budget, cwd=ROOT)
    lines = [json.loads(x) for x in proc.stdout.decode().splitlines() if x.startswith("{")]
    if proc.returncode != 0 or len(lines) != len(cases):
        done = {x["name"] for x in lines}
        missing = [c["name"] for c in cases if c["name"] not in done]
        raise AssertionError(f"worker exited {proc.returncode} after {len(lines)}/{len(cases)} cases; "
                             f"first unfinished: {missing[:3]}\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return lines


def assert_all_ok(results: list) -> None:
    bad = [r for r in results if not r["ok"]]
    if bad:
        msg = "\n".join(f"- {r['name']}: {r['error']}" for r in bad[:10])
        raise AssertionError(f"{len(bad)} of {len(results)} hostile cases did not end in a VdError:\n{msg}\n\n"
                             f"first traceback:\n{bad[0].get('traceback', '')}")


# -- generic cases, every format -------------------------------------------------------------

def _in_process(path, fmt, tmp_path):
    r = run_case({"name": f"{os.path.basename(path)} as {fmt}", "path": str(path), "fmt": fmt},
                 str(tmp_path / "out"))
    assert r["ok"], r
    return r["refused"]


@pytest.mark.parametrize("fmt", [None] + implemented_formats())
def test_missing_file(tmp_path, fmt):
    (tmp_path / "out").mkdir()
    refused = _in_process(tmp_path / "nope.qcow2", fmt, tmp_path)
    assert refused == ["info", "read", "check", "convert"]


@pytest.mark.parametrize("fmt", [None] + implemented_formats())
def test_directory(tmp_path, fmt):
    (tmp_path / "out").mkdir()
    d = tmp_path / "adir.img"
    d.mkdir()
    refused = _in_process(d, fmt, tmp_path)
    assert refused == ["info", "read", "check", "convert"]


@pytest.mark.parametrize("content", [b"", b"\x00", b"Q", b"\xff" * 3, b"QFI\xfb"])
@pytest.mark.parametrize("fmt", [None] + implemented_formats())
def test_tiny_files(tmp_path, fmt, content):
    (tmp_path / "out").mkdir()
    p = tmp_path / "tiny"
    p.write_bytes(content)
    refused = _in_process(p, fmt, tmp_path)
    if fmt not in (None, "raw"):
        # no image format fits in a few bytes
        assert {"info", "read", "check", "convert"} <= set(refused), refused


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    (tmp_path / "out").mkdir()
    p = tmp_path / "secret.img"
    p.write_bytes(b"x" * 4096)
    p.chmod(0)
    assert "read" in _in_process(p, None, tmp_path)


# -- fuzz: truncations, byte flips, field pokes of a valid qcow2 ------------------------------------------

def _valid_images(tmp_path) -> list:
    """(name, path) of valid qcow2 images made by qemu-img/qemu-io: small
    clusters (tables spread over many clusters), v2, an overlay, compressed."""
    out = []
    base = tmp_path / "base.img"
    base.write_bytes(bytes(range(256)) * 4096)  # 1 MiB raw parent
    specs = [
        ("c512", ["-o", "cluster_size=512"], None),
        ("c64k-v2", ["-o", "compat=0.10"], None),
        ("overlay", ["-o", "cluster_size=4096", "-b", "base.img", "-F", "raw"], None),
        ("compressed", [], "compressed"),
    ]
    for name, opts, special in specs:
        p = tmp_path / f"{name}.qcow2"
        if special == "compressed":
            src = tmp_path / "csrc.qcow2"
            peers.qemu_img("create", "-q", "-f", "qcow2", src, "1M")
            peers.qemu_io(src, "write -P 0x41 0 300k", "write -P 0x42 512k 64k", fmt="qcow2")
            peers.qemu_img("convert", "-c", "-O", "qcow2", src, p)
        else:
            peers.qemu_img("create", "-q", "-f", "qcow2", *opts, p, "1M")
            peers.qemu_io(p, "write -P 0x41 0 64k", "write -P 0x42 300k 5k", "write -z 600k 64k",
                          "write -P 0x43 1000k 24k", fmt="qcow2")
        out.append((name, p))
    return out


def _header_fields(data: bytes) -> dict:
    f = {}
    (f["version"], f["backing_file_offset"], f["backing_file_size"], f["cluster_bits"], f["size"],
     f["crypt_method"], f["l1_size"], f["l1_table_offset"], f["refcount_table_offset"],
     f["refcount_table_clusters"], f["nb_snapshots"], f["snapshots_offset"]) = struct.unpack(
        ">IQIIQIIQQIIQ", data[4:72])
    return f


def _truncation_offsets(size: int, cluster: int, rng: random.Random, n_random: int) -> list:
    offs = set(range(0, 120, 3)) | set(range(0, min(size, 3 * cluster), max(8, cluster // 16)))
    for b in range(0, size, cluster):
        offs.update((b - 1, b, b + 1, b + 8))
    offs.update(rng.randrange(0, size) for _ in range(n_random))
    return sorted(o for o in offs if 0 <= o < size)


def _cases_truncations(tmp_path, images, per_image: int, rng) -> list:
    cases = []
    for name, p in images:
        data = p.read_bytes()
        cluster = 1 << _header_fields(data)["cluster_bits"]
        offs = _truncation_offsets(len(data), cluster, rng, 20)
        rng.shuffle(offs)
        for off in sorted(offs[:per_image]):
            d = tmp_path / f"trunc-{name}-{off}"
            d.mkdir()
            q = d / "img.qcow2"
            q.write_bytes(data[:off])
            if name == "overlay":
                (d / "base.img").write_bytes((tmp_path / "base.img").read_bytes())
            cases.append({"name": f"{name} truncated at {off}", "path": str(q),
                          "fmt": "qcow2" if off % 2 else None, "repair": off % 3 == 0})
    return cases


def _cases_flips(tmp_path, images, count: int, rng) -> list:
    cases = []
    for i in range(count):
        name, p = images[i % len(images)]
        data = bytearray(p.read_bytes())
        h = _header_fields(bytes(data))
        cluster = 1 << h["cluster_bits"]
        region = rng.random()
        picks = []
        for _ in range(rng.randrange(1, 4)):
            if region < 0.6:  # the header proper
                picks.append(rng.randrange(4, 112))
            elif region < 0.8:  # the L1 table
                picks.append(h["l1_table_offset"] + rng.randrange(0, max(8, h["l1_size"] * 8)))
            else:  # the refcount table / first refcount block / L2 tables: anywhere in metadata
                picks.append(rng.randrange(0, min(len(data), 8 * cluster)))
        for off in picks:
            if off < len(data):
                data[off] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        d = tmp_path / f"flip-{i}"
        d.mkdir()
        q = d / "img.qcow2"
        q.write_bytes(bytes(data))
        if name == "overlay":
            (d / "base.img").write_bytes((tmp_path / "base.img").read_bytes())
        cases.append({"name": f"{name} flips at {picks}", "path": str(q), "fmt": "qcow2", "repair": i % 4 == 0})
    return cases


# (field, offset, struct format, values)
QCOW2_POKES = [
    ("version", 4, ">I", [0, 1, 4, 0xFFFFFFFF]),
    ("backing_file_offset", 8, ">Q", [1, 0xFFFFFFFF, 1 << 62, (1 << 64) - 1]),
    ("backing_file_size", 16, ">I", [1024, 1025, 0xFFFFFFFF]),
    ("cluster_bits", 20, ">I", [0, 8, 22, 31, 63, 0xFFFFFFFF]),
    ("size", 24, ">Q", [0, 1, 1 << 55, (1 << 63) - 1, (1 << 64) - 1]),
    ("crypt_method", 32, ">I", [1, 2, 99]),
    ("l1_size", 36, ">I", [0, 0x7FFFFFFF, 0xFFFFFFFF]),
    ("l1_table_offset", 40, ">Q", [0, 1, 1 << 62, (1 << 64) - 512]),
    ("refcount_table_offset", 48, ">Q", [0, 1, 1 << 62]),
    ("refcount_table_clusters", 56, ">I", [0, 0xFFFFFF, 0xFFFFFFFF]),
    ("nb_snapshots", 60, ">I", [1, 0xFFFFFFFF]),
    ("snapshots_offset", 64, ">Q", [7, 1 << 62]),
    ("incompatible_features", 72, ">Q", [1, 2, 4, 8, 16, 1 << 63]),
    ("autoclear_features", 88, ">Q", [2, 1 << 63]),
    ("refcount_order", 96, ">I", [0, 3, 5, 6, 7, 64, 0xFFFFFFFF]),
    ("header_length", 100, ">I", [0, 50, 103, 112, 4096, 0xFFFFFFFF]),
]


def _cases_pokes(tmp_path, images) -> list:
    cases = []
    name, p = images[0]  # 512-byte clusters: many tables
    data = p.read_bytes()
    h = _header_fields(data)
    pokes = [(f, off, fmt, v) for f, off, fmt, vals in QCOW2_POKES for v in vals]
    # table entries: first L1 entry, first refcount table entry, first L2 entry
    l1 = h["l1_table_offset"]
    l2 = struct.unpack(">Q", data[l1:l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    rt = h["refcount_table_offset"]
    for v in (1, len(data) + 512, 1 << 56, (1 << 63) | 0x200, 0x200):
        pokes.append(("L1[0]", l1, ">Q", v))
        pokes.append(("reftable[0]", rt, ">Q", v))
        if l2:
            pokes.append(("L2[0]", l2, ">Q", v | (1 << 63)))
            pokes.append(("L2[0] compressed", l2, ">Q", (1 << 62) | v))
    if l2:
        pokes.append(("L2[0] compressed huge", l2, ">Q", (1 << 62) | ((1 << 62) - 1)))
        pokes.append(("L2[0] zero+offset", l2, ">Q", 1 | (len(data) * 4)))
    for i, (field, off, fmt, v) in enumerate(pokes):
        buf = bytearray(data)
        struct.pack_into(fmt, buf, off, v)
        d = tmp_path / f"poke-{i}"
        d.mkdir()
        q = d / "img.qcow2"
        q.write_bytes(bytes(buf))
        cases.append({"name": f"{name}: {field} = {v:#x}", "path": str(q), "fmt": "qcow2", "repair": True})
    return cases


@pytest.fixture
def fuzz_images(tmp_path):
    return _valid_images(tmp_path)


def test_valid_images_open_cleanly(tmp_path, fuzz_images):
    (tmp_path / "out").mkdir()
    for name, p in fuzz_images:
        refused = _in_process(p, "qcow2", tmp_path)
        assert refused == [], (name, refused)
        from vdtool.core import ops

        r = ops.check(str(p))
        assert r.corruptions == 0 and r.leaks == 0, (name, r)


def test_truncations(tmp_path, fuzz_images):
    rng = random.Random(1234)
    assert_all_ok(run_in_worker(_cases_truncations(tmp_path, fuzz_images, 45, rng)))


def test_header_byte_flips(tmp_path, fuzz_images):
    rng = random.Random(5678)
    assert_all_ok(run_in_worker(_cases_flips(tmp_path, fuzz_images, 300, rng)))


def test_field_pokes(tmp_path, fuzz_images):
    assert_all_ok(run_in_worker(_cases_pokes(tmp_path, fuzz_images)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_long(tmp_path, fuzz_images, seed):
    rng = random.Random(seed * 1000003)
    cases = _cases_truncations(tmp_path, fuzz_images, 400, rng) + _cases_flips(tmp_path, fuzz_images, 1500, rng)
    for i in range(0, len(cases), 500):
        assert_all_ok(run_in_worker(cases[i:i + 500]))


def test_worker_reports_non_vderror(tmp_path, monkeypatch):
    """The harness itself: a non-VdError in a case is reported, not hidden."""
    p = tmp_path / "x.img"
    p.write_bytes(b"abc")
    from vdtool.core import ops

    def boom(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(ops, "info", boom)
    r = run_case({"name": "boom", "path": str(p), "fmt": "raw"}, str(tmp_path))
    assert not r["ok"] and "KeyError" in r["error"]


# -- special files, as the image or as its parent -----------------------------------------------------

@pytest.mark.parametrize("fmt", [None] + implemented_formats())
def test_fifo_does_not_hang(tmp_path, fmt):
    (tmp_path / "out").mkdir()
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    r = run_case({"name": "fifo", "path": str(fifo), "fmt": fmt, "seconds": 5}, str(tmp_path / "out"))
    assert r["ok"], r
    assert r["refused"] == ["info", "read", "check", "convert"]


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev_zero", "dev_null", "self", "empty"])
def test_hostile_parent(tmp_path, kind):
    (tmp_path / "out").mkdir()
    name = {"dev_zero": "/dev/zero", "dev_null": "/dev/null", "self": "top.qcow2"}.get(kind, "parent.img")
    if kind == "fifo":
        os.mkfifo(tmp_path / "parent.img")
    elif kind == "directory":
        (tmp_path / "parent.img").mkdir()
    elif kind == "empty":
        (tmp_path / "parent.img").write_bytes(b"")
    top = tmp_path / "top.qcow2"
    peers.qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", top, "1M")
    r = run_case({"name": kind, "path": str(top), "fmt": None, "seconds": 5}, str(tmp_path / "out"))
    assert r["ok"], r
    if kind in ("fifo", "directory", "self"):
        assert {"read", "convert"} <= set(r["refused"]), r

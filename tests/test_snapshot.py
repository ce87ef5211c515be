"""vdtool snapshot (qcow2 internal snapshots), judged by qemu-img: after
every -c/-a/-d qemu-img check is clean, qemu-img snapshot -l lists the
same, and every snapshot's content (qemu-img convert -l) is byte-exact."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

import crashsim
from peers import qemu_check, qemu_img, qemu_info, qemu_io
from vdrun import cli

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _make(tmp_path, name="d.qcow2", size="4M", opts=""):
    p = tmp_path / name
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else []) + [str(p), size]
    qemu_img(*args)
    return p


def _content(path, tmp_path, snap=None) -> bytes:
    out = tmp_path / "content.raw"
    args = ["convert", "-U", "-f", "qcow2", "-O", "raw"]
    if snap is not None:
        args += ["-l", f"snapshot.name={snap}"]
    qemu_img(*args, str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _applied(path, tmp_path, snap) -> bytes:
    """A snapshot's whole content, at its own disk size: applied by
    qemu-img on a copy (convert -l reads at the current size)."""
    cp = tmp_path / "applied.qcow2"
    shutil.copy(path, cp)
    qemu_img("snapshot", "-a", snap, str(cp))
    data = _content(cp, tmp_path)
    cp.unlink()
    return data


def _clean(path):
    r = qemu_check(path)
    assert r["_exit"] == 0 and not r.get("corruptions") and not r.get("leaks"), r


def _same_list(path):
    v = cli("snapshot", "-l", path, expect=0).stdout
    q = qemu_img("snapshot", "-l", str(path)).stdout.decode()
    assert v == q
    vj = json.loads(cli("snapshot", "-l", "--output", "json", path, expect=0).stdout)
    assert vj == qemu_info(path).get("snapshots", [])
    return vj


@pytest.mark.parametrize("opts", ["", "compat=0.10", "cluster_size=4096", "extended_l2=on",
                                  "refcount_bits=8"])
def test_create_apply_delete(tmp_path, opts):
    p = _make(tmp_path, opts=opts)
    qemu_io(p, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k")
    a = _content(p, tmp_path)
    cli("snapshot", "-c", "s1", p, expect=0)
    _clean(p)
    qemu_io(p, "write -P 3 512k 1M", "write -P 4 2M 4k", "discard 0 64k")
    b = _content(p, tmp_path)
    cli("snapshot", "-c", "s2", p, expect=0)
    _clean(p)
    snaps = _same_list(p)
    assert [s["name"] for s in snaps] == ["s1", "s2"] and [s["id"] for s in snaps] == ["1", "2"]
    assert _content(p, tmp_path, "s1") == a and _content(p, tmp_path, "s2") == b
    qemu_io(p, "write -P 5 0 3M")
    cli("snapshot", "-a", "s1", p, expect=0)
    _clean(p)
    assert _content(p, tmp_path) == a
    assert _content(p, tmp_path, "s2") == b
    qemu_io(p, "write -P 6 1M 64k")
    _clean(p)
    assert _content(p, tmp_path, "s1") == a
    cli("snapshot", "-d", "s1", p, expect=0)
    _clean(p)
    assert [s["name"] for s in _same_list(p)] == ["s2"]
    assert _content(p, tmp_path, "s2") == b
    cli("snapshot", "-a", "2", p, expect=0)  # by id
    assert _content(p, tmp_path) == b
    cli("snapshot", "-d", "s2", p, expect=0)
    _clean(p)
    assert _same_list(p) == []
    assert _content(p, tmp_path) == b
    assert qemu_info(p)["actual-size"] < 3 * MiB  # what only the snapshots held was freed


def test_interop_both_ways(tmp_path):
    p = _make(tmp_path)
    qemu_io(p, "write -P 7 0 2M")
    a = _content(p, tmp_path)
    qemu_img("snapshot", "-c", "q1", str(p))
    qemu_io(p, "write -P 8 1M 2M")
    b = _content(p, tmp_path)
    cli("snapshot", "-c", "v1", p, expect=0)
    qemu_img("snapshot", "-c", "q2", str(p))
    ids = [s["id"] for s in _same_list(p)]
    assert ids == ["1", "2", "3"]
    cli("snapshot", "-a", "q1", p, expect=0)  # qemu's snapshot, applied by vdtool
    _clean(p)
    assert _content(p, tmp_path) == a
    qemu_img("snapshot", "-a", "v1", str(p))  # vdtool's, applied by qemu
    _clean(p)
    assert _content(p, tmp_path) == b
    qemu_img("snapshot", "-d", "v1", str(p))
    _clean(p)
    cli("snapshot", "-d", "q2", p, expect=0)
    _clean(p)
    cli("snapshot", "-d", "q1", p, expect=0)
    _clean(p)
    assert _same_list(p) == []
    assert _content(p, tmp_path) == b
    qemu_img("snapshot", "-c", "after", str(p))  # qemu numbers on from what is left
    assert [s["id"] for s in _same_list(p)] == ["1"]


def test_ids_duplicate_names_and_lookup(tmp_path):
    p = _make(tmp_path)
    qemu_io(p, "write -P 1 0 64k")
    for n in ("x", "y", "x", "1"):
        cli("snapshot", "-c", n, p, expect=0)
    assert [(s["id"], s["name"]) for s in _same_list(p)] == [("1", "x"), ("2", "y"), ("3", "x"), ("4", "1")]
    # -d takes a name (the first with it), as qemu-img does: "1" is snapshot 4
    cli("snapshot", "-d", "1", p, expect=0)
    cli("snapshot", "-d", "x", p, expect=0)
    assert [(s["id"], s["name"]) for s in _same_list(p)] == [("2", "y"), ("3", "x")]
    r = cli("snapshot", "-d", "2", p, expect=1)
    assert "snapshot '2'" in r.stderr and "not found" in r.stderr
    r = cli("snapshot", "-a", "nope", p, expect=1)
    assert r.stderr.startswith("vdtool: error: ") and "not found" in r.stderr
    _clean(p)


def test_json_output_of_changes(tmp_path):
    p = _make(tmp_path)
    doc = json.loads(cli("snapshot", "-c", "j", "--output", "json", p, expect=0).stdout)
    assert doc["action"] == "create" and doc["snapshot"]["name"] == "j" and doc["snapshot"]["id"] == "1"
    assert doc["snapshot"] == qemu_info(p)["snapshots"][0]
    assert cli("snapshot", "-c", "k", p, expect=0).stdout == ""  # quiet on success, as qemu-img


@pytest.mark.parametrize("opts", ["", "cluster_size=512"])  # 512: the L1 table grows and moves
def test_apply_restores_disk_size(tmp_path, opts):
    p = _make(tmp_path, size="2M", opts=opts)
    qemu_io(p, "write -P 9 0 2M")
    a = _content(p, tmp_path)
    cli("snapshot", "-c", "small", p, expect=0)
    cli("resize", p, "10M", expect=0)
    qemu_io(p, "write -P 10 8M 1M")
    _clean(p)
    cli("snapshot", "-c", "big", p, expect=0)
    cli("snapshot", "-a", "small", p, expect=0)
    _clean(p)
    assert qemu_info(p)["virtual-size"] == 2 * MiB
    assert _content(p, tmp_path) == a
    cli("snapshot", "-a", "big", p, expect=0)
    _clean(p)
    assert qemu_info(p)["virtual-size"] == 10 * MiB
    assert _content(p, tmp_path)[8 * MiB:9 * MiB] == b"\x0a" * MiB


def test_resize_and_check_with_snapshots(tmp_path):
    p = _make(tmp_path)
    qemu_io(p, "write -P 1 0 4M")
    cli("snapshot", "-c", "s", p, expect=0)
    snap = _content(p, tmp_path, "s")
    cli("resize", "--shrink", p, "1M", expect=0)  # qemu-img 7.2 shrinks v3 images with snapshots
    _clean(p)
    assert _applied(p, tmp_path, "s") == snap
    cli("resize", p, "6M", expect=0)
    _clean(p)
    assert _applied(p, tmp_path, "s") == snap
    cli("snapshot", "-a", "s", p, expect=0)
    _clean(p)
    assert _content(p, tmp_path) == snap
    cli("check", "-r", "all", p, expect=0)
    _clean(p)
    # compact: zero clusters only the disk uses are released, shared ones stay
    qemu_io(p, "write -z 0 512k", "write -P 7 512k 512k")
    cli("snapshot", "-c", "t", p, expect=0)
    qemu_io(p, "write -P 0 512k 256k")
    t = _applied(p, tmp_path, "t")
    cur = _content(p, tmp_path)
    cli("compact", p, expect=0)
    _clean(p)
    assert _content(p, tmp_path) == cur
    assert _applied(p, tmp_path, "s") == snap and _applied(p, tmp_path, "t") == t
    v2 = _make(tmp_path, "v2.qcow2", opts="compat=0.10")
    cli("snapshot", "-c", "s", v2, expect=0)
    r = cli("resize", v2, "8M", expect=1)
    assert "snapshots" in r.stderr


def test_other_formats(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(MiB))
    r = cli("snapshot", "-c", "s", "-f", "raw", raw, expect=1)
    assert "raw images have no internal snapshots" in r.stderr
    r = cli("snapshot", "-l", "-f", "raw", raw, expect=0)  # qemu-img lists nothing and succeeds
    assert r.stdout == "" and "no internal snapshots" in r.stderr
    assert cli("snapshot", "-l", "-q", "--output", "json", "-f", "raw", raw, expect=0).stdout.strip() == "[]"
    vmdk = tmp_path / "d.vmdk"
    qemu_img("create", "-f", "vmdk", str(vmdk), "1M")
    r = cli("snapshot", "-a", "s", vmdk, expect=1)
    assert "vmdk images have no internal snapshots" in r.stderr


def test_usage(tmp_path):
    p = _make(tmp_path)
    cli("snapshot", p, expect=2)
    cli("snapshot", "-l", "-c", "x", p, expect=2)
    cli("snapshot", "-c", "x", "-U", p, expect=2)
    assert "--create NAME" in cli("snapshot", "--help", expect=0).stdout
    assert qemu_img("snapshot", "-l", str(p)).stdout == b""
    assert cli("snapshot", "-l", p, expect=0).stdout == ""


# -- hostile input ----------------------------------------------------------------------

def _snap_table(p):
    d = p.read_bytes()
    n, off = struct.unpack(">IQ", d[60:72])
    return n, off


def test_hostile_snapshot_l1(tmp_path):
    p = _make(tmp_path)
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s", str(p))
    n, off = _snap_table(p)
    before = p.read_bytes()
    size = len(before)
    # the snapshot's L1 table points at an L2 table past the end of the file
    l1off = struct.unpack(">Q", before[off:off + 8])[0]
    bad = bytearray(before)
    bad[l1off:l1off + 8] = struct.pack(">Q", (size + (1 << 30)) & ~0xFFFF)
    p.write_bytes(bytes(bad))
    for args in (("-d", "s"), ("-a", "s")):
        r = cli("snapshot", *args, p, expect=1)
        assert r.stderr.startswith("vdtool: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert p.read_bytes() == bytes(bad), "a refused change must write nothing"
    # the snapshot's L1 offset itself outside the file
    bad = bytearray(before)
    bad[off:off + 8] = struct.pack(">Q", 1 << 40)
    p.write_bytes(bytes(bad))
    for args in (("-l",), ("-d", "s"), ("-c", "t")):
        r = cli("snapshot", *args, p, expect=1)
        assert r.stderr.startswith("vdtool: error: ") and "snapshot" in r.stderr


def test_hostile_truncated_table(tmp_path):
    p = _make(tmp_path)
    qemu_img("snapshot", "-c", "s", str(p))
    n, off = _snap_table(p)
    with open(p, "r+b") as f:
        f.truncate(off + 20)
    r = cli("snapshot", "-l", p, expect=1)
    assert r.stderr.startswith("vdtool: error: ")
    with open(p, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">I", 70000))
    r = cli("snapshot", "-c", "x", p, expect=1)
    assert "nb_snapshots" in r.stderr


# -- crash points ---------------------------------------------------------------------------

def _crash_ok(path) -> str:
    """qemu-img check after a crash: leaks are fine; the only corruption
    allowed is an OFLAG_COPIED flag out of step with a refcount written
    just before or after it (QEMU leaves the same window; no snapshot
    depends on the flag there, and check -r all sets it right)."""
    r = qemu_check(path)
    if r["_exit"] in (0, 3):
        return ""
    bad = [ln for ln in r["_stderr"].splitlines() if ln.startswith("ERROR") and "OFLAG_COPIED" not in ln]
    return "; ".join(bad) if bad or r["_exit"] != 2 else ""


@pytest.mark.parametrize("action", ["-c", "-d", "-a"])
def test_crash_points(tmp_path, action):
    base = _make(tmp_path, "base.qcow2")
    qemu_io(base, "write -P 1 0 2M", "write -c -P 2 3M 64k")
    qemu_img("snapshot", "-c", "old", str(base))
    qemu_io(base, "write -P 3 1M 2M")
    old = _content(base, tmp_path, "old")
    cur = _content(base, tmp_path)
    name = "new" if action == "-c" else "old"
    work = tmp_path / "work"
    work.mkdir()
    p = work / "d.qcow2"
    shutil.copy(base, p)
    first = crashsim.run_forked(["snapshot", action, name, str(p)], workdir=str(work))
    count = first.count
    assert first.status == 0 and count > 0, first
    problems = []
    for at in crashsim.kill_points(count, 8):
        shutil.copy(base, p)
        res = crashsim.run_forked(["snapshot", action, name, str(p)], at=at, workdir=str(work))
        why = _crash_ok(p)
        if why:
            problems.append(f"at {at}: {why}")
            continue
        # whatever the crash left, what the snapshots and the disk hold is one of the two states
        listed = {s["name"] for s in qemu_info(p).get("snapshots", [])}
        if "old" in listed:
            assert _content(p, tmp_path, "old") == old, at
        disk = _content(p, tmp_path)
        assert disk in ((cur, old) if action == "-a" else (cur,)), at
        # vdtool check -r all repairs what the crash left (leaks, COPIED flags) on an image with snapshots
        r = cli("check", "-r", "all", p)
        assert r.returncode == 0, (at, res, r.stdout, r.stderr)
        _clean(p)
        if "old" in listed:
            assert _content(p, tmp_path, "old") == old, at
    assert not problems, problems


def test_list_old_entries_and_long_names(tmp_path):
    """Entries without icount (older QEMU: 16 bytes of extra data) show an
    empty ICOUNT column and stay as they are when the table is rewritten;
    long names push the columns as qemu-img's do."""
    p = _make(tmp_path)
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "a-rather-long-snapshot-name", str(p))
    n, off = _snap_table(p)
    with open(p, "r+b") as f:
        f.seek(off)
        ent = bytearray(f.read(40 + 24 + 1 + 27))
        extra, sid, name = ent[40:64], ent[64:65], ent[65:]
        ent[36:40] = struct.pack(">I", 16)
        f.seek(off)
        f.write(bytes(ent[:40]) + bytes(extra[:16]) + bytes(sid) + bytes(name) + bytes(8))
    _clean(p)
    cli("snapshot", "-c", "x" * 40, p, expect=0)
    snaps = _same_list(p)
    assert "icount" not in snaps[0] and snaps[1]["icount"] == 0
    cli("snapshot", "-d", "x" * 40, p, expect=0)
    _clean(p)
    _same_list(p)
    cli("snapshot", "-a", "1", p, expect=0)
    _clean(p)

"""qcow2 check judges runs of plain L2 entries (e, e+cs, e+2cs ...) as a
whole.  These tests hold it to the entry-by-entry rules: the run splitter
on random tables, and whole checks and repairs of randomly damaged images
with runs on and off (same counts, same messages, same repaired bytes),
with qemu-img check as the outside judge of the counts."""

from __future__ import annotations

import json
import random
import shutil
import struct
from array import array

import pytest
from hypothesis import given, settings, strategies as st

import peers
from vdtool.formats.qcow2 import check as chk
from vdtool.formats.qcow2.backend import Qcow2Backend
from vdtool.formats.qcow2.layout import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO

K, M = 1 << 10, 1 << 20


def _one_by_one(tbl, cs):
    """The splitter with runs switched off: every entry alone."""
    for i in range(len(tbl)):
        yield i, 1, tbl[i]


@st.composite
def tables(draw):
    cs = 1 << draw(st.integers(9, 21))
    n = draw(st.sampled_from([1, 2, 3, 64, 65, 512]))
    out = []
    while len(out) < n:
        kind = draw(st.sampled_from(["zeros", "run", "run", "odd"]))
        k = draw(st.integers(1, 200))
        if kind == "zeros":
            out += [0] * k
        elif kind == "run":
            flags = draw(st.sampled_from([0, OFLAG_COPIED, OFLAG_ZERO, OFLAG_COPIED | OFLAG_ZERO]))
            host = draw(st.integers(1, (L2E_OFFSET_MASK >> 9) // (cs >> 9))) * cs
            host = min(host, L2E_OFFSET_MASK & ~(cs - 1))
            out += [(host + j * cs) & L2E_OFFSET_MASK | flags for j in range(k)]
        else:
            out.append(draw(st.integers(0, (1 << 64) - 1)))
    return array("Q", out[:n]), cs


@given(tables())
@settings(max_examples=300, deadline=None)
def test_runs_partition_the_table_and_each_run_steps_by_one_cluster(case):
    tbl, cs = case
    pos = 0
    for i, run, e in chk.l2_runs(tbl, cs):
        assert i == pos and run >= 1 and e == tbl[i]
        if run > 1:
            if e == 0:
                assert not any(tbl[i:i + run])
            else:
                assert not e & chk.NOT_PLAIN and e & L2E_OFFSET_MASK and not e & L2E_OFFSET_MASK & (cs - 1)
                assert list(tbl[i:i + run]) == [e + j * cs for j in range(run)]
        # maximal: a plain run or a zero run stops where the pattern does
        nxt = i + run
        if nxt < len(tbl) and run > 1:
            want = e + run * cs if e else 0
            plain_ok = e == 0 or (want & L2E_OFFSET_MASK) == (e & L2E_OFFSET_MASK) + run * cs
            assert tbl[nxt] != want or not plain_ok
        pos = nxt
    assert pos == len(tbl)


def _image(tmp_path, seed):
    """A 4 KiB-cluster image with runs (sequential writes), a snapshot (shared
    tables, refcount 2) and scattered rewrites."""
    p = str(tmp_path / f"img{seed}.qcow2")
    peers.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "8M")
    rng = random.Random(seed)
    cmds = [f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 7 * M) // 4096 * 4096} "
            f"{rng.choice([4, 16, 64, 300]) * K}" for _ in range(6)]
    peers.qemu_io(p, *cmds, fmt="qcow2")
    if seed % 2:
        peers.qemu_img("snapshot", "-c", "s1", p)
        peers.qemu_io(p, "write -P 9 1M 40k", fmt="qcow2")
    return p


def _l2_offsets(path):
    with Qcow2Backend.open(path) as b:
        return [e & 0x00FFFFFFFFFFFE00 for e in b.st.l1 if e & 0x00FFFFFFFFFFFE00], b.st.rt[0] & ~0x1FF


def _damage(path, rng):
    l2s, rb = _l2_offsets(path)
    with open(path, "r+b") as f:
        for _ in range(rng.randrange(1, 6)):
            what = rng.choice(["copied", "copied", "refcount", "dup", "reserved", "past_eof", "zero_flag",
                               "unaligned"])
            if what == "refcount":
                f.seek(rb + 2 * rng.randrange(0, 200))
                f.write(struct.pack(">H", rng.choice([0, 1, 2, 3])))
                continue
            t = rng.choice(l2s)
            f.seek(t)
            used = [i for i, (v,) in enumerate(struct.iter_unpack(">Q", f.read(4096))) if v]
            if not used:
                continue
            idx = rng.choice(used)
            f.seek(t + 8 * idx)
            (e,) = struct.unpack(">Q", f.read(8))
            if what == "copied":
                e ^= OFLAG_COPIED
            elif what == "dup":  # a second reference to the neighbour's cluster
                f.seek(t + 8 * ((idx + 1) % 512))
                (e2,) = struct.unpack(">Q", f.read(8))
                e = e2 if e2 else e
            elif what == "reserved":
                e |= 1 << rng.choice([1, 5, 57])
            elif what == "past_eof":
                e = OFLAG_COPIED | (1 << 40)
            elif what == "zero_flag":
                e |= OFLAG_ZERO
            elif what == "unaligned":
                e = (e & ~0xFFF) | 0x200 if not e & OFLAG_COMPRESSED else e
            f.seek(t + 8 * idx)
            f.write(struct.pack(">Q", e))


def _check(path, repair, runs, monkeypatch):
    if not runs:
        monkeypatch.setattr(chk, "l2_runs", _one_by_one)
    try:
        with Qcow2Backend.open(path, writable=bool(repair)) as b:
            r = b.check(repair)
    finally:
        monkeypatch.undo()
    return (r.corruptions, r.leaks, r.corruptions_fixed, r.leaks_fixed, r.check_errors, r.allocated_clusters,
            r.fragmented_clusters, r.compressed_clusters, r.image_end_offset, tuple(r.messages))


@pytest.mark.parametrize("seed", range(40))
def test_damaged_images_judged_the_same_with_and_without_runs(tmp_path, seed, monkeypatch):
    p = _image(tmp_path, seed)
    _damage(p, random.Random(seed))
    fast = _check(p, None, True, monkeypatch)
    slow = _check(p, None, False, monkeypatch)
    assert fast == slow
    theirs = json.loads(peers.qemu_img("check", "--output=json", p, check=False).stdout or "{}")
    if theirs and not theirs.get("check-errors"):
        assert fast[0] == theirs.get("corruptions", 0) and fast[1] == theirs.get("leaks", 0), (fast, theirs)
    for repair in ("leaks", "all"):
        a, b = tmp_path / f"a-{repair}.qcow2", tmp_path / f"b-{repair}.qcow2"
        shutil.copy(p, a)
        shutil.copy(p, b)
        assert _check(str(a), repair, True, monkeypatch) == _check(str(b), repair, False, monkeypatch)
        assert a.read_bytes() == b.read_bytes()

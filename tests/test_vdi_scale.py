"""VDI at scale: info, check and convert cost what the allocated data costs
(plus reading the block map, which the format requires), and the sieved map
scans report exactly what the per-entry loops they replaced reported."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from array import array

import pytest

import peers
from helpers import poke, timed
from vdrun import cli
from vdtool.core.backend import Status
from vdtool.core.errors import CorruptImageError
from vdtool.core.ops._check import check as check_op
from vdtool.formats.vdi import blockmap
from vdtool.formats.vdi.backend import VdiBackend

M = 1 << 20
T = 1 << 40
FREE, ZERO = 0xFFFFFFFF, 0xFFFFFFFE
H = 72


def map_of(path) -> array:
    with open(path, "rb") as f:
        hdr = f.read(H + 400)
        off_blocks, = struct.unpack_from("<I", hdr, H + 268)
        blocks, = struct.unpack_from("<I", hdr, H + 312)
        f.seek(off_blocks)
        a = array("I", f.read(4 * blocks))
    if sys.byteorder != "little":
        a.byteswap()
    return a


def set_entry(path, i, v):
    with open(path, "rb") as f:
        f.seek(H + 268)
        off_blocks, = struct.unpack("<I", f.read(4))
    poke(path, off_blocks + 4 * i, "<I", v)


# -- the per-entry loops that the sieves replaced: the reference ---------------------------------

def ref_problems(entries, n, cblocks, limit):
    problems = []
    seen = bytearray(n)
    for i, e in enumerate(entries):
        if e >= ZERO:
            continue
        if e >= limit or e >= cblocks:
            problems.append(("eof", i, e))
        elif e >= n:
            problems.append(("count", i, e))
        elif seen[e]:
            problems.append(("dup", i, e))
        else:
            seen[e] = 1
    return problems


def ref_check(entries, n, cblocks, limit, fsize, block_pos) -> dict:
    """What check (without repair) reported before the sieves."""
    problems = ref_problems(entries, n, cblocks, limit)
    used = bytearray(n)
    for e in entries:
        if e < n:
            used[e] = 1
    messages = []
    for kind, b, e in problems:
        if kind == "eof":
            messages.append(f"ERROR: block map entry {b} points to data block {e}, past the end of the file")
        elif kind == "count":
            messages.append(f"ERROR: block map entry {b} points to data block {e}, not below the allocated count {n}")
        else:
            messages.append(f"ERROR: block map entry {b} points to data block {e}, which another entry uses")
    corruptions = len(problems)
    if n and fsize < block_pos(n) and any(used):
        corruptions += 1
        messages.append(f"ERROR: the file ends at {fsize}, inside the {n} allocated blocks "
                        f"(they end at {block_pos(n)})")
    leaks = n - sum(used)
    if leaks:
        messages.append(f"Leaked: {leaks} of the {n} allocated blocks are not in the block map")
    frag, prev = 0, None
    for e in entries:
        if e < ZERO:
            if prev is not None and e != prev + 1:
                frag += 1
            prev = e
    return {"messages": messages, "corruptions": corruptions, "leaks": leaks,
            "allocated": sum(1 for e in entries if e < ZERO), "fragmented": frag, "total": cblocks}


def ref_run_end(entries, b, last):
    """Old block_status: end (exclusive block) of the run starting at block b."""
    e = entries[b]
    nb = b + 1
    if e < ZERO:
        while nb <= last and entries[nb] < ZERO:
            nb += 1
    else:
        while nb <= last and entries[nb] == e:
            nb += 1
    return nb


def result_of(r) -> dict:
    return {"messages": r.messages, "corruptions": r.corruptions, "leaks": r.leaks,
            "allocated": r.allocated_clusters, "fragmented": r.fragmented_clusters, "total": r.total_clusters}


def expected_check(path) -> dict:
    """ref_check applied to the image's map as it is on disk."""
    with VdiBackend.open(str(path), options={"check": True}) as b:
        h = b.state.hdr
        total = h.cbBlockExtra + h.cbBlock
        fsize = os.path.getsize(path)
        limit = (fsize - h.offData) // total + bool((fsize - h.offData) % total) if fsize > h.offData else 0
        return ref_check(map_of(path), h.cBlocksAllocated, h.cBlocks, limit, fsize,
                         lambda k: h.offData + k * total)


def check_of(path) -> dict:
    with VdiBackend.open(str(path), options={"check": True}) as b:
        return result_of(b.check())


# -- (a) big sparse images: right answers, judged by qemu --------------------------------------

def test_sparse_2t_check_info_convert_compare(tmp_path):
    p = tmp_path / "big.vdi"
    peers.qemu_img("create", "-q", "-f", "vdi", p, "2T")
    far = 2 * T - M - 4096  # straddles the last two blocks
    peers.qemu_io(p, "write -P 0x5a 0 1M", "write -P 0x33 1T 1M", f"write -P 0x71 {far} 8192", fmt="vdi")
    r = cli("check", "--output", "json", p)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert (rep["corruptions"], rep["leaks"], rep["allocated-clusters"], rep["total-clusters"]) == (0, 0, 4, 2 * M)
    assert rep["fragmented-clusters"] == 0  # qemu-io allocated them in map order
    info = json.loads(cli("info", "--output", "json", p).stdout)
    assert info["virtual-size"] == 2 * T
    assert info["format-specific"]["data"]["allocated-blocks"] == 4
    assert "block-map-errors" not in info["format-specific"]["data"]
    out = tmp_path / "out.qcow2"
    r = cli("convert", "-O", "qcow2", p, out)
    assert r.returncode == 0, r.stderr
    peers.assert_qemu_check_clean(out)
    peers.assert_qemu_compare(p, out, "vdi", "qcow2")
    with VdiBackend.open(str(p)) as b:
        walk, pos = [], 0
        while pos < b.virtual_size:
            st, n = b.block_status(pos, b.virtual_size - pos)
            walk.append((st, pos, n))
            pos += n
    assert [(s, o, n) for s, o, n in walk if s == Status.DATA] == [
        (Status.DATA, 0, M), (Status.DATA, T, M), (Status.DATA, 2 * T - 2 * M, 2 * M)]
    assert len(walk) == 5


def test_64t_costs_follow_the_data(tmp_path):
    p = tmp_path / "huge.vdi"
    r, t = timed(cli, "create", "-q", p, "64T")
    assert r.returncode == 0 and t < 5, (t, r.stderr)
    peers.qemu_io(p, "write -P 0x5a 40T 1M", f"write -P 0x66 {64 * T - M} 1M", fmt="vdi")
    r, t = timed(cli, "check", "--output", "json", p)
    assert r.returncode == 0 and t < 5, (t, r.stdout + r.stderr)
    rep = json.loads(r.stdout)
    assert (rep["allocated-clusters"], rep["total-clusters"], rep["corruptions"], rep["leaks"]) == (2, 64 * M, 0, 0)
    r, t = timed(cli, "info", "--output", "json", p)
    assert r.returncode == 0 and t < 5, (t, r.stderr)
    assert json.loads(r.stdout)["format-specific"]["data"]["allocated-blocks"] == 2
    out = tmp_path / "huge.qcow2"
    r, t = timed(cli, "convert", "-q", "-O", "qcow2", p, out)
    assert r.returncode == 0 and t < 5, (t, r.stderr)
    extents = json.loads(peers.qemu_img("map", "--output=json", "-f", "qcow2", out).stdout)
    assert [(e["start"], e["length"]) for e in extents if e["data"]] == [(40 * T, M), (64 * T - M, M)]
    peers.qemu_io(out, "read -P 0x5a 40T 1M", f"read -P 0x66 {64 * T - M} 1M", fmt="qcow2")


# -- (b) damaged maps: reported exactly as before -------------------------------------------------

def _sparse_image(tmp_path):
    """1 TiB of 1 MiB blocks (a 1 Mi-entry map) with three data blocks far apart."""
    p = tmp_path / "d.vdi"
    VdiBackend.create(str(p), T).close()
    with VdiBackend.open(str(p), writable=True) as b:
        for i, v in enumerate((0, 300_000, 1_048_575)):
            b.write(v * M, bytes([i + 1]) * M)
    return p


DAMAGE = [
    # (name, changes: [(entry, value)] or ("count", n), expected messages, corruptions, leaks)
    ("past the end", [(500_000, 1000)],
     ["ERROR: block map entry 500000 points to data block 1000, past the end of the file"], 1, 0),
    ("duplicate", [(700_000, 0)],
     ["ERROR: block map entry 700000 points to data block 0, which another entry uses"], 1, 0),
    ("past the count", [("count", 2)],
     ["ERROR: block map entry 1048575 points to data block 2, not below the allocated count 2"], 1, 0),
    ("leak in the middle", [(300_000, FREE)],
     ["Leaked: 1 of the 3 allocated blocks are not in the block map"], 0, 1),
    ("moved to the middle", [(300_000, FREE), (650_000, 1)], [], 0, 0),
    ("zero marker far out", [(900_000, ZERO), (300_000, ZERO)],
     ["Leaked: 1 of the 3 allocated blocks are not in the block map"], 0, 1),
    ("several", [(12, 1), (524_288, 7), (524_289, 0xFFFFFF00), (1_048_575, 0)],
     ["ERROR: block map entry 300000 points to data block 1, which another entry uses",
      "ERROR: block map entry 524288 points to data block 7, past the end of the file",
      "ERROR: block map entry 524289 points to data block 4294967040, past the end of the file",
      "ERROR: block map entry 1048575 points to data block 0, which another entry uses",
      "Leaked: 1 of the 3 allocated blocks are not in the block map"], 4, 1),
]


@pytest.mark.parametrize("name,changes,messages,corruptions,leaks", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_maps_reported_as_before(tmp_path, name, changes, messages, corruptions, leaks):
    p = _sparse_image(tmp_path)
    for i, v in changes:
        if i == "count":
            poke(p, H + 316, "<I", v)
        else:
            set_entry(p, i, v)
    got = check_of(p)
    assert got == expected_check(p)
    assert (got["messages"], got["corruptions"], got["leaks"]) == (messages, corruptions, leaks)
    eof = [(i, e) for kind, i, e in ref_problems(map_of(p), 3, M, 3) if kind == "eof"]
    if eof:
        with pytest.raises(CorruptImageError, match=f"block map entry {eof[0][0]} points to data block {eof[0][1]}, "
                                                    r"past the end of the file \(room for 3 blocks\)"):
            VdiBackend.open(str(p)).close()
    else:
        with VdiBackend.open(str(p)) as b:
            assert ("block-map-errors" in b.info()) == bool(corruptions)
    with VdiBackend.open(str(p), options={"check": True}) as b:
        assert b.info().get("block-map-errors", 0) == corruptions
    r = check_op(str(p))
    assert r.messages == messages and r.exit_code == (2 if corruptions else 3 if leaks else 0)
    if corruptions or leaks:
        # (a leak whose slot the repair fills with a copy of a shared block still counts as found: exit 3)
        assert check_op(str(p), repair="all").exit_code in (0, 3)
        assert check_of(p) == expected_check(p)
        assert not check_of(p)["messages"]
        peers.assert_qemu_check_clean(p)


# -- the sieves against the per-entry loops, on hostile maps ------------------------------------

S = blockmap.SCAN
ODD = [0xFFFFFFFD, 0xFFFFFF00, 0x00FFFFFF, 0xFFFF00FF, 0xFEFFFFFF, 0xFFFFFEFF, 0x7FFFFFFF, 0x80000000, 0]


def _random_map(rng, blocks, n):
    m = array("I", [FREE]) * blocks
    pos = 0
    while pos < blocks:
        k = rng.choice([1, 3, 50, S - 1, S, S + 2, 2 * S])
        end = min(blocks, pos + k)
        kind = rng.randrange(6)
        if kind == 1:
            m[pos:end] = array("I", [ZERO]) * (end - pos)
        elif kind == 2:  # scattered, some hostile
            for _ in range(rng.randrange(1, 6)):
                m[rng.randrange(pos, end)] = rng.choice([rng.randrange(n + 3), rng.choice(ODD), ZERO])
        elif kind == 3:  # dense, in order
            base = rng.randrange(n + 1)
            m[pos:end] = array("I", range(base, base + end - pos))
        elif kind == 4:  # markers mixed
            for i in range(pos, end, rng.choice([1, 2, 7])):
                m[i] = ZERO
        elif kind == 5:  # many scattered: more than one find at a time takes
            for _ in range(rng.randrange(50, 200)):
                m[rng.randrange(pos, end)] = rng.choice([rng.randrange(n), rng.choice(ODD), ZERO])
        pos = end
    return m


@pytest.mark.parametrize("seed", range(6))
def test_sieves_match_per_entry_loops(tmp_path, seed):
    rng = random.Random(seed)
    blocks = rng.choice([5, S, 3 * S + 7, 4 * S + 1])
    p = tmp_path / "s.vdi"
    with VdiBackend.create(str(p), blocks * 512, block_size=512) as b:
        entries = _random_map(rng, blocks, 2 * S)
        b.state.map.mv[:] = entries  # the map in memory, native order
        assert b.state.map.mv.tolist() == entries.tolist()
        idx, vals = b.state.map.allocated()
        assert list(zip(idx, vals)) == [(i, e) for i, e in enumerate(entries) if e < ZERO]
        assert b.state.map.allocated_count() == len(idx)
        frag = sum(1 for a, c in zip(vals, vals[1:]) if c != a + 1)
        assert b.state.map.stats() == (len(idx), frag)
        lo, hi = sorted(rng.randrange(blocks + 1) for _ in range(2))
        assert b.state.map.allocated(lo, hi)[0] == [i for i in range(lo, hi) if entries[i] < ZERO]
        # open-time and check-time scan, with the count and the file end anywhere
        for _ in range(4):
            n = rng.choice([0, len(idx), rng.randrange(2 * S), 2 * S + 3])
            limit = rng.choice([n, n + 1, rng.randrange(2 * S + 5)])
            b.state.hdr.cBlocksAllocated = n
            b.state.fsize = b.state.hdr.offData + limit * 512
            b.state.scan_map(lenient=True)
            want = ref_problems(entries, n, blocks, limit)
            assert b.state.problems == want
            eof = [x for x in want if x[0] == "eof"]
            if eof:
                with pytest.raises(CorruptImageError, match=f"block map entry {eof[0][1]} points"):
                    b.state.scan_map(lenient=False)
            rev = b.state.map.reverse(n)
            ref = array("q", [-1]) * n
            for i, e in enumerate(entries):
                if e < n:
                    ref[e] = i
            assert rev == ref
        # block_status: markers in runs as long as they go, DATA runs at most _DATA_RUN_CAP blocks
        size = blocks * 512
        starts = [rng.randrange(blocks) for _ in range(30)] + [0, blocks - 1]
        for b0 in starts:
            for last in (blocks - 1, min(blocks - 1, b0 + rng.randrange(70))):
                st, got = b.block_status(b0 * 512, (last + 1) * 512 - b0 * 512)
                e = entries[b0]
                want_st = Status.DATA if e < ZERO else Status.ZERO if e == ZERO else Status.UNALLOCATED
                end = ref_run_end(entries, b0, last)
                if want_st == Status.DATA:
                    end = min(end, b0 + 1 + blockmap.DATA_RUN_CAP)
                assert (st, got) == (want_st, end * 512 - b0 * 512), (b0, last)
        pos = 0
        while pos < size:
            st, got = b.block_status(pos, size - pos)
            assert 0 < got <= size - pos and st == blockmap.status_of(entries[pos // 512])
            pos += got

"""check looks at clean tables whole (core.tablemap.distinct_entries and
Claimed, vhd.space's BAT test) and walks the others entry by entry; these
images mix the two, so that a problem in a walked table that involves a
table looked at whole (a cluster named twice, a block over metadata) is
reported with the same words, counts and owners as a walk of every entry
reports it."""

from __future__ import annotations

from array import array

from helpers import peek, poke
from peers import qemu_make
from vdtool.core.ops import check
from vdtool.core.tablemap import Claimed, distinct_entries


def test_distinct_entries_and_claimed():
    t = array("Q", [0, 4096, 0, 8192, 12288, 0])
    assert distinct_entries(t, 4096, 1 << 20) == ([4096, 8192, 12288], 4096, 12288)
    assert distinct_entries(t, 8192, 1 << 20) is None  # 4096 is below the floor
    assert distinct_entries(t, 0, 12288) is None  # 12288 is past the end
    assert distinct_entries(array("Q", [0, 8192, 4096, 8192]), 0, 1 << 20) is None  # a repeat, out of order
    vals, least, greatest = distinct_entries(array("Q", [1, 8192, 4096, 1]), 0, 1 << 20, 1)
    assert set(vals) == {4096, 8192} and (least, greatest) == (4096, 8192)
    assert distinct_entries(array("Q", [0, 0]), 0, 10) == ([], None, None)
    c = Claimed()
    assert c.claim_all([10, 20], 10, 20) and c.claim_all({40, 30}, 30, 40)
    assert 20 in c and 25 not in c and 50 not in c
    assert not c.claim_all([5, 30], 5, 30)  # 30 was claimed: nothing of this is
    assert 5 not in c
    c.add(25)
    assert 25 in c and c.claim_all([26], 26, 26)


def _report(path) -> tuple:
    r = check(str(path), None)
    return r.exit_code, r.corruptions, r.leaks, r.allocated_clusters, [str(m) for m in r.messages]


def test_qcow1_entry_named_twice_across_tables(tmp_path):
    # 4 KiB clusters, 512 entries to an L2 table: one table per 2 MiB
    p = qemu_make(tmp_path, "a.qcow", "qcow", "8M", "write -P 1 0 8k", "write -P 2 2M 8k", "write -P 3 4M 4k")
    l1 = peek(p, 40, ">Q")
    t0, t1 = peek(p, l1, ">Q"), peek(p, l1 + 8, ">Q")
    first = peek(p, t0, ">Q")
    poke(p, t1 + 8, ">Q", first)  # cluster 513 names cluster 0's data
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert (code, corrupt) == (2, 1), msgs
    assert msgs == [f"ERROR: cluster 513 names data at offset {first}, which another entry uses"]
    assert allocated == 5
    poke(p, t1 + 8, ">Q", 1 << 40)  # past the end instead
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert corrupt == 1 and "cluster 513: entry 0x10000000000 lies past the end of the file" in msgs[0], msgs


def test_qed_cluster_named_twice_and_unaligned(tmp_path):
    # 64 KiB clusters, 4-cluster tables: 32768 entries, one table per 2 GiB
    p = qemu_make(tmp_path, "a.qed", "qed", "4G", "write -P 1 0 128k", "write -P 2 2G 64k")
    cs, ts = peek(p, 4, "<I"), peek(p, 8, "<I")
    l1 = peek(p, 40, "<Q")
    t0, t1 = peek(p, l1, "<Q"), peek(p, l1 + 8, "<Q")
    first = peek(p, t0, "<Q")
    assert ts * cs // 8 == 32768
    poke(p, t1 + 8, "<Q", first)
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert (code, corrupt) == (2, 1), msgs
    assert msgs == [f"ERROR: cluster 32769 names data at offset {first}, which another entry or table uses"]
    poke(p, t1 + 8, "<Q", first + 512)  # not on a cluster
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert corrupt == 1 and f"data offset {first + 512} is not aligned" in msgs[0], msgs


def _vmdk_tables(p) -> list:
    """Byte offsets of grain tables 0 and 1, each with its redundant copy's."""
    gd, rgd = peek(p, 56, "<Q"), peek(p, 48, "<Q")
    return [(peek(p, gd * 512 + 4 * i, "<I") * 512, peek(p, rgd * 512 + 4 * i, "<I") * 512) for i in range(2)]


def _vmdk_set(p, table, k: int, *values) -> None:
    for at in table:  # the table and its redundant copy alike
        poke(p, at + 4 * k, f"<{len(values)}I", *values)


def test_vmdk_grain_named_twice_names_the_first_owner(tmp_path):
    # 64 KiB grains, 512 entries to a grain table: one table per 32 MiB
    p = qemu_make(tmp_path, "a.vmdk", "vmdk", "64M", "write -P 1 0 192k", "write -P 2 32M 64k")
    g0, g1 = _vmdk_tables(p)
    second = peek(p, g0[0] + 4, "<I")  # grain 1's sector
    _vmdk_set(p, g1, 2, second)  # grain 514 too
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert (code, corrupt, allocated) == (2, 1, 4), msgs
    assert msgs == [f"ERROR: a.vmdk: grain 514 and grain 1 share sector {second}"]
    # a table out of order is looked at whole as well (a set, not a run)
    a, b, c = (peek(p, g0[0] + 4 * k, "<I") for k in range(3))
    _vmdk_set(p, g0, 0, c, a, b)
    _vmdk_set(p, g1, 2, 0)
    assert _report(p)[:4] == (0, 0, 0, 4)
    _vmdk_set(p, g1, 2, 1)  # onto the header and descriptor
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert corrupt == 1 and "grain 514 at sector 1 overlaps metadata" in msgs[0], msgs


def test_vhd_bat_entries_looked_at_whole(tmp_path):
    p = qemu_make(tmp_path, "a.vhd", "vpc", "16M", "write -P 1 0 64k", "write -P 2 4M 64k", "write -P 3 8M 64k")
    assert _report(p)[:4] == (0, 0, 0, 3)
    hdr = peek(p, 16, ">Q")
    bat = peek(p, hdr + 16, ">Q")
    entries = [peek(p, bat + 4 * k, ">I") for k in range(8)]
    used = [k for k, e in enumerate(entries) if e != 0xFFFFFFFF]
    assert len(used) == 3
    poke(p, bat + 4 * used[2], ">I", entries[used[0]])  # block 4 on block 0
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert corrupt == 1 and f"BAT entry {used[2]}: block at offset {entries[used[0]] * 512} overlaps block " \
                            f"{used[0]}" in msgs[0], msgs
    poke(p, bat + 4 * used[2], ">I", bat // 512)  # over the BAT
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert corrupt == 1 and "overlaps the BAT" in msgs[0], msgs
    poke(p, bat + 4 * used[2], ">I", entries[used[2]])
    bitmap_at = entries[used[1]] * 512
    poke(p, bitmap_at, "512x")  # block 2's bitmap: no sector in use
    code, corrupt, leaks, allocated, msgs = _report(p)
    assert (code, corrupt, leaks) == (3, 0, 1), msgs
    assert msgs == [f"Leaked: 1 allocated blocks have no sector in use (first: block {used[1]})"]

"""One behaviour everywhere: every op on every format and variant, and on
mixed chains, judged by content digests against what the op promises and,
where qemu can read the result, by ``qemu-img check`` and ``qemu-img
compare``.  Every op runs with a progress recorder (monotonic, below 100
while working, 100 exactly once at the end of a success); where a format
cannot do an op, the op must say so in one line (NotSupported with a
reason), never silently do less."""

from __future__ import annotations

import os

import pytest

import chainkit as ck
import peers
from chainkit import K, M
from helpers import Recorder, read_all
from vdtool.core import ops
from vdtool.core.digest import ContentDigest
from vdtool.core.errors import NotSupported, OperationCancelled


def digest(data: bytes) -> str:
    d = ContentDigest()
    d.update(data)
    return d.hexdigest()


def assert_content(path, want: bytes, what=""):
    got = read_all(path)
    assert len(got) == len(want), f"{what}: size {len(got)}, want {len(want)}"
    assert digest(got) == digest(want), f"{what}: content digest differs"


def qemu_judge(path, want: bytes, tmp_path, fmt: str) -> None:
    """qemu-img check (formats qemu checks) and compare against the expected
    content, for images qemu can read."""
    qfmt = ck.QEMU_NAME[fmt]
    if fmt in ("qcow2", "vdi", "vmdk", "parallels", "qed"):
        r = peers.qemu_check(path, qfmt)
        if r["_exit"] != 63:  # 63: qemu has no check for this variant
            assert r["_exit"] == 0 and not r.get("corruptions"), f"qemu-img check {path}: {r}"
    ref = tmp_path / "expected.raw"
    ref.write_bytes(want)
    peers.assert_qemu_compare(ref, path, "raw", qfmt)


def qemu_reads_chain(formats) -> bool:
    """qemu follows qcow2, QED and QCOW backing files (any format) and VMDK
    parent hints (to VMDK parents only); it has no VDI or VHD differencing
    images."""
    for below, f in zip(formats, formats[1:]):
        if f not in ("qcow2", "vmdk", "qed", "qcow") or (f == "vmdk" and below != "vmdk"):
            return False
    return True


# -- single images: every format and variant ---------------------------------------------------

SINGLE_OPS = ("compact", "resize-grow", "resize-shrink", "discard", "discard-zeroes", "check", "convert-same",
              "convert-qcow2")
VARIANTS = ck.WRITABLE_VARIANTS + (("vmdk", "streamOptimized"),)


def _make_single(tmp_path, fmt, variant):
    writes = ck.pattern_writes(11, 4 * M) + [(3 * M, bytes(200 * K))]
    if variant == "streamOptimized":  # written once, by convert
        src = ck.make_image(tmp_path, "src", "raw", 4 * M, writes=writes)
        p = str(tmp_path / "a.vmdk")
        ops.convert(src, p, fmt="vmdk", variant=variant)
        os.unlink(src)
        return p
    return ck.make_image(tmp_path, "a", fmt, 4 * M, variant=variant, writes=writes)


@pytest.mark.parametrize("op", SINGLE_OPS)
@pytest.mark.parametrize("fmt,variant", VARIANTS, ids=[f"{f}-{v}" for f, v in VARIANTS])
def test_single(tmp_path, fmt, variant, op):
    p = _make_single(tmp_path, fmt, variant)
    old = read_all(p)
    rec = Recorder()
    prog = rec.progress()
    judged = p
    try:
        if op == "compact":
            ops.compact(p, progress=prog)
            want = old
        elif op == "resize-grow":
            ops.resize(p, 6 * M, progress=prog)
            want = old + bytes(2 * M)
        elif op == "resize-shrink":
            ops.resize(p, 3 * M, shrink=True, progress=prog)
            want = old[:3 * M]
        elif op == "discard":
            ops.discard(p, [(0, M), (2 * M + 4 * K, 700 * K)], progress=prog)
            want = bytes(M) + old[M:2 * M + 4 * K] + bytes(700 * K) + old[2 * M + 704 * K:]
        elif op == "discard-zeroes":
            ops.discard(p, zeroes=True, progress=prog)
            want = old
        elif op == "check":
            if fmt == "raw":
                with pytest.raises(NotSupported, match="check is not supported for raw"):
                    ops.check(p)
                return
            r = ops.check(p)
            assert (r.corruptions, r.leaks, r.check_errors) == (0, 0, 0), r.messages
            r = ops.check(p, repair="all")
            assert (r.corruptions, r.leaks) == (0, 0), r.messages
            want = old
            rec.values = [100.0]  # check reports no progress of its own
        else:
            out_fmt = fmt if op == "convert-same" else "qcow2"
            judged = str(tmp_path / f"out.{ck.EXT[out_fmt]}")
            ops.convert(p, judged, fmt=out_fmt, variant=variant if op == "convert-same" else None,
                        progress=prog)
            want = old
            if out_fmt == fmt:
                assert ops.info(judged).get("variant", variant) == variant
    except NotSupported as e:
        msg = str(e)
        assert "\n" not in msg and "not supported" in msg, msg
        assert _expected_unsupported(fmt, variant, op), f"unexpected refusal: {msg}"
        assert "(" in msg, f"refusal without a reason: {msg}"
        assert read_all(p) == old, "a refused op changed the image"
        rec.assert_good(success=False)
        return
    assert not _expected_unsupported(fmt, variant, op), f"{fmt} {variant} {op} should have been refused"
    rec.assert_good()
    assert_content(judged, want, f"{fmt}/{variant} {op}")
    ck.assert_checks_clean(judged)
    qemu_judge(judged, want, tmp_path, _fmt_of(judged))


def _fmt_of(path):
    ext = path.rsplit(".", 1)[1]
    return {v: k for k, v in ck.EXT.items()}[ext]


def _expected_unsupported(fmt, variant, op) -> bool:
    if variant == "streamOptimized":
        return op in ("resize-grow", "resize-shrink", "discard")
    if (fmt, variant) == ("vdi", "fixed"):
        return op == "compact"
    return False


# -- mixed chains -----------------------------------------------------------------------------------

CHAINS = [(f, f) for f in ck.DIFF_FORMATS] + list(ck.MIXED_CHAINS)
CHAIN_OPS = ("merge-parent", "merge-parent-base", "merge-child", "merge-child-base", "rebase-other",
             "rebase-none", "rebase-unsafe", "compact", "discard", "resize", "convert", "convert-parent")


# merge --into child --base needs an image between the base and the top
CHAIN_CASES = [pytest.param(chain, op, id=f"{'-'.join(chain)}-{op}") for chain in CHAINS for op in CHAIN_OPS
               if not (op == "merge-child-base" and len(chain) < 3)]


@pytest.mark.parametrize("chain,op", CHAIN_CASES)
def test_chain(tmp_path, chain, op):
    paths = ck.make_chain(tmp_path, chain, seed=len(chain) + 5)
    top, base = paths[-1], paths[0]
    old = read_all(top)
    rec = Recorder()
    prog = rec.progress()
    judged, judged_chain = top, list(chain)
    want = old
    if op == "merge-parent":
        r = ops.merge(top, progress=prog)
        judged, judged_chain = paths[-2], list(chain[:-1])
        assert not os.path.exists(top) and r["deleted"] == [top]
        assert any("rebased" in w for w in r["warnings"])
    elif op == "merge-parent-base":
        r = ops.merge(top, base=base, keep=True, progress=prog)
        judged, judged_chain = base, [chain[0]]
        assert os.path.exists(top)
    elif op == "merge-child":
        ops.merge(top, into="child", progress=prog)
        judged_chain = [chain[-1]]
        assert len(ck.chain_paths(top)) == 1
    elif op == "merge-child-base":
        ops.merge(top, into="child", base=paths[1], progress=prog)
        assert ck.chain_paths(top) == [base, top]
        judged_chain = [chain[0], chain[-1]]
    elif op == "rebase-other":
        other = ck.make_image(tmp_path, "other", chain[0], 4 * M, writes=ck.pattern_writes(77, 4 * M))
        ops.rebase(top, other, progress=prog)
        assert ck.chain_paths(top) == [other, top]
        judged_chain = [chain[0], chain[-1]]
    elif op == "rebase-none":
        ops.rebase(top, None, progress=prog)
        assert ck.chain_paths(top) == [top]
        judged_chain = [chain[-1]]
    elif op == "rebase-unsafe":
        other = ck.make_image(tmp_path, "other", chain[-2], 4 * M, writes=ck.pattern_writes(78, 4 * M))
        ops.rebase(top, other, unsafe=True, progress=prog)
        judged_chain = [chain[-2], chain[-1]]
        # only the reference changed: the top's own data over the new parent
        with ck.open_image(top) as s:
            assert [layer.path for layer in s.layers] == [other, top]
        want = None
    elif op == "compact":
        ops.compact(top, progress=prog)
    elif op == "discard":
        ops.discard(top, [(M, M)], progress=prog)
        want = old[:M] + bytes(M) + old[2 * M:]
    elif op == "resize":
        ops.resize(top, 5 * M, progress=prog)
        want = old + bytes(M)
    elif op == "convert":
        judged = str(tmp_path / "flat.qcow2")
        ops.convert(top, judged, progress=prog)
        judged_chain = ["qcow2"]
    elif op == "convert-parent":
        judged = str(tmp_path / f"delta.{ck.EXT[chain[-1]]}")
        ops.convert(top, judged, parent=paths[-2], progress=prog)
        judged_chain = list(chain[:-1]) + [chain[-1]]
    rec.assert_good()
    if want is None:
        _assert_unsafe_rebase(top, other)
        ck.assert_checks_clean(top)
        return
    assert_content(judged, want, f"{'-'.join(chain)} {op}")
    ck.assert_checks_clean(judged)
    if qemu_reads_chain(judged_chain):
        qemu_judge(judged, want, tmp_path, judged_chain[-1])


def _assert_unsafe_rebase(top, other):
    """Unsafe rebase copies nothing: where the top holds data it reads its
    own, elsewhere the new parent shows through."""
    from vdtool.core.backend import Status

    with ck.open_image(top) as s:
        size = s.virtual_size
        pos = 0
        while pos < size:
            st, n, level = s.block_status(pos, size - pos)
            if level == 0 or level == -1:
                got = s.read(pos, n)
                with ck.open_image(other) as o:
                    assert got == o.read(pos, min(n, o.virtual_size - pos)).ljust(n, b"\0")
            pos += n
        assert st in (Status.DATA, Status.ZERO, Status.UNALLOCATED)


# -- cancelled ops: the same guarantees as a crash ------------------------------------------------

CANCEL_OPS = ("compact", "discard", "resize", "merge-parent", "merge-child", "rebase", "convert")


CANCEL_CHAINS = [("qcow2",), ("vdi",), ("vmdk",), ("vhd",), ("raw",), ("vdi", "qcow2"), ("raw", "vhd"),
                 ("qcow2", "vmdk"), ("vhd", "vdi")]
# merge and rebase need a parent
CANCEL_CASES = [pytest.param(chain, op, id=f"{'-'.join(chain)}-{op}") for chain in CANCEL_CHAINS
                for op in CANCEL_OPS if len(chain) >= 2 or op not in ("merge-parent", "merge-child", "rebase")]


@pytest.mark.parametrize("chain,op", CANCEL_CASES)
def test_cancel(tmp_path, chain, op):
    paths = ck.make_chain(tmp_path, chain, seed=9)
    top = paths[-1]
    old = read_all(top)
    for after in (0, 2):
        rec = Recorder(cancel_after=after)
        prog = rec.progress()
        dst = str(tmp_path / "conv.qcow2")
        try:
            if op == "compact":
                ops.compact(top, progress=prog)
            elif op == "discard":
                ops.discard(top, [(0, M), (2 * M, M)], progress=prog)
            elif op == "resize":
                ops.resize(top, 6 * M, progress=prog)
            elif op == "merge-parent":
                ops.merge(top, keep=True, progress=prog)
            elif op == "merge-child":
                ops.merge(top, into="child", progress=prog)
            elif op == "rebase":
                ops.rebase(top, None, progress=prog)
            elif op == "convert":
                ops.convert(top, dst, progress=prog)
        except OperationCancelled:
            rec.assert_good(success=False)
        else:
            rec.assert_good(success=True)
        got = read_all(top)
        if op == "discard":
            assert len(got) == len(old)
            for i in range(0, len(old), 512):
                assert got[i:i + 512] in (old[i:i + 512], bytes(512)), f"sector {i}"
        elif op == "resize":
            assert got in (old, old + bytes(len(got) - len(old)))
        else:
            assert got == old
        ck.assert_checks_clean(top)
        if op == "convert":
            assert not os.path.exists(dst) or read_all(dst) == old
            assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]


@pytest.mark.parametrize("fmt,variant", [(f, v) for f, v in ck.WRITABLE_VARIANTS],
                         ids=[f"{f}-{v}" for f, v in ck.WRITABLE_VARIANTS])
def test_create_every_variant(tmp_path, fmt, variant):
    """create (preallocated variants too) reports progress, reads as zeros,
    checks clean, and qemu reads it."""
    p = str(tmp_path / f"new.{ck.EXT[fmt]}")
    rec = Recorder()
    ops.create(p, 3 * M, fmt=fmt, variant=variant, progress=rec.progress())
    rec.assert_good()
    want = bytes(3 * M)
    assert_content(p, want, f"{fmt}/{variant}")
    ck.assert_checks_clean(p)
    qemu_judge(p, want, tmp_path, fmt)
    # cancelled: nothing under the final name, no staging folder
    q = str(tmp_path / f"cancelled.{ck.EXT[fmt]}")
    rec = Recorder(cancel_after=0)
    try:
        ops.create(q, 3 * M, fmt=fmt, variant=variant, progress=rec.progress())
    except OperationCancelled:
        assert not os.path.exists(q)
        rec.assert_good(success=False)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vdtool-")]

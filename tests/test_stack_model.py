"""Model-based tests: hypothesis state machines drive an ImageStack with
writes, write_zeroes, discards, resizes, flushes, reopens, compacts and
discard --zeroes, checking every read against a ``bytearray`` model.  At the
end of each run qcow2 images are judged by qemu-img (check must be clean,
``convert -O raw`` must equal the model), and chains are folded with the
ops (merge into parent or child, rebase safe/unsafe, convert with --parent).

This is the test that catches off-by-one block boundaries and stale parent
reads: cluster sizes 512, 4K and 64K, offsets biased to cluster boundaries,
unaligned lengths."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import peers
from helpers import assert_same, payload
from vdtool.core import ops
from vdtool.core.backend import Cap, Status
from vdtool.core.ops.common import parent_spec
from vdtool.core.registry import get_backend
from vdtool.core.stack import open_image

HERE = os.path.dirname(os.path.abspath(__file__))

K, M = 1 << 10, 1 << 20


QEMU_NAME = {"vhd": "vpc"}
PATTERNS = st.sampled_from(["fill", "zeros", "random", "mixed"])


class DiskMachine(RuleBasedStateMachine):
    """Configured by subclass attributes: ``top_fmt`` ('raw' or 'qcow2'),
    ``base_fmt`` (None, 'raw' or 'qcow2'), ``cluster`` (the top's cluster
    size), ``sizes`` (candidate disk sizes), ``final_ops``."""

    top_fmt = "raw"
    base_fmt = None
    cluster = 4096
    sizes = (1 * M,)
    final_ops = ("none",)
    max_size = 4 * M
    top_options = None  # backend create options, e.g. {"extended_l2": True}
    mid_layer = False  # a qemu-made qcow2 between the base and the top

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vdtool-model-")
        self.stack = None
        self.model = bytearray()
        self.base_path = None
        self.base_content = b""
        self.mid_path = None
        # the top's immediate parent (the base, or the mid layer)
        self.parent_path = None
        self.parent_fmt = None
        self.parent_content = b""
        self.final = "none"
        self.log = []

    # -- helpers --------------------------------------------------------------
    @property
    def top_path(self):
        return os.path.join(self.tmp, "top." + ("img" if self.top_fmt == "raw" else "qcow2"))

    @property
    def align(self) -> int:
        # qemu wants qcow2 sizes in whole sectors; a standalone raw disk may
        # have any size
        return 1 if (self.top_fmt == "raw" and self.base_fmt is None) else 512

    def open(self):
        self.stack = open_image(self.top_path, self.top_fmt, writable=True)
        assert self.stack.virtual_size == len(self.model)
        assert len(self.stack) == (1 if not self.base_fmt else 3 if self.mid_layer else 2)

    def close(self):
        if self.stack is not None:
            s, self.stack = self.stack, None
            s.close()

    def draw_range(self, data, *, allow_empty=False):
        size = len(self.model)
        c = self.cluster
        kind = data.draw(st.sampled_from(["boundary", "boundary", "any", "whole"]), label="where")
        if kind == "whole":
            return 0, size
        if kind == "boundary":
            if self.top_options and self.top_options.get("extended_l2") and data.draw(st.booleans()):
                c //= 32  # a subcluster boundary
            b = data.draw(st.integers(0, max(0, size // c)), label="cluster") * c
            off = min(max(b + data.draw(st.integers(-700, 700), label="delta"), 0), size - 1)
        else:
            off = data.draw(st.integers(0, size - 1), label="offset")
        room = size - off
        length = data.draw(st.one_of(st.integers(0 if allow_empty else 1, min(room, 3 * c + 1100)),
                                     st.integers(1, room)), label="length")
        return off, length

    def qcow2_layers(self):
        out = []
        if self.top_fmt == "qcow2" and os.path.exists(self.top_path):
            out.append(self.top_path)
        if self.base_fmt == "qcow2" and self.base_path and os.path.exists(self.base_path):
            out.append(self.base_path)
        if self.mid_path and os.path.exists(self.mid_path):
            out.append(self.mid_path)
        return out

    def judge_with_qemu(self, path, expected: bytes, fmt="qcow2"):
        """qemu-img check clean; qemu-img convert -O raw equals ``expected``."""
        if fmt != "vpc":  # qemu-img has no check for vpc
            peers.assert_qemu_check_clean(path, fmt)
        out = os.path.join(self.tmp, "judge.raw")
        peers.qemu_to_raw(path, out, fmt)
        with open(out, "rb") as f:
            got = f.read()
        os.unlink(out)
        assert_same(got, expected, f"qemu-img convert of {os.path.basename(path)} vs model")
        info = peers.qemu_info(path, fmt)
        assert info["virtual-size"] == len(expected)

    # -- setup -----------------------------------------------------------------
    @initialize(data=st.data())
    def setup(self, data):
        size = data.draw(st.sampled_from(self.sizes), label="size")
        if self.align == 1:
            size += data.draw(st.sampled_from([0, 0, 1, 511, 4097]), label="unaligned tail")
        self.final = data.draw(st.sampled_from(self.final_ops), label="final op")
        if self.base_fmt is None:
            backend = get_backend(self.top_fmt)
            kw = {} if self.top_fmt == "raw" else {"block_size": self.cluster, "options": self.top_options}
            backend.create(self.top_path, size, **kw).close()
            self.model = bytearray(size)
        else:
            base_size = data.draw(st.sampled_from([size, size + 64 * K, size + 256 * K + 512,
                                                   max(64 * K, size - 192 * K)]),
                                  label="base size")
            seed = data.draw(st.integers(0, 2 ** 32 - 1), label="base seed")
            self.base_path, self.base_content = self.make_base(base_size, seed, data)
            self.parent_path, self.parent_fmt, self.parent_content = \
                self.base_path, self.base_fmt, self.base_content
            if self.mid_layer:
                mid_size = data.draw(st.sampled_from([base_size, size, size + 128 * K]), label="mid size")
                self.make_mid(mid_size, seed + 1, data)
            pstack = open_image(self.parent_path, self.parent_fmt)
            try:
                spec = parent_spec(self.top_path, pstack)
            finally:
                pstack.close()
            get_backend(self.top_fmt).create(self.top_path, size, block_size=self.cluster, parent=spec,
                                             options=self.top_options).close()
            self.model = bytearray(self.parent_content[:size].ljust(size, b"\0"))
        self.open()

    def make_mid(self, size, seed, data):
        """A qcow2 made by qemu-img over the base, with its own data, zero
        clusters and discards, in a cluster size of its own."""
        rng = random.Random(seed)
        path = os.path.join(self.tmp, "mid.qcow2")
        cluster = data.draw(st.sampled_from([512, 4096, 65536]), label="mid cluster")
        peers.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b",
                       os.path.basename(self.base_path), "-F", self.base_fmt, path, size)
        cmds = []
        for _ in range(rng.randrange(1, 10)):
            off = rng.randrange(0, size // 512) * 512
            n = min(size - off, rng.randrange(1, 600) * 512)
            cmds.append(rng.choice([f"write -z {off} {n}", f"discard {off} {n}",
                                    f"write -P {rng.randrange(0, 256)} {off} {n}"]))
        peers.qemu_io(path, *cmds, fmt="qcow2")
        out = os.path.join(self.tmp, "mid-content.raw")
        peers.qemu_to_raw(path, out, "qcow2")
        with open(out, "rb") as f:
            content = f.read()
        os.unlink(out)
        self.mid_path = path
        self.parent_path, self.parent_fmt, self.parent_content = path, "qcow2", content

    def make_base(self, size, seed, data, name="base"):
        """A parent made by the peers (qemu-io writes for qcow2, plain file
        writes for raw), with extents of data, zeros and holes; returns
        (path, content)."""
        rng = random.Random(seed)
        ext = {"raw": "img"}.get(self.base_fmt, self.base_fmt)
        path = os.path.join(self.tmp, f"{name}.{ext}")
        if self.base_fmt == "raw":
            content = bytearray(size)
            with open(path, "wb") as f:
                f.truncate(size)
                for _ in range(rng.randrange(1, 8)):
                    off = rng.randrange(0, size)
                    n = min(size - off, rng.randrange(1, 300 * K))
                    chunk = payload(rng.choice(["fill", "random", "mixed"]), rng.randrange(1 << 30), n)
                    f.seek(off)
                    f.write(chunk)
                    content[off:off + n] = chunk
            return path, bytes(content)
        qfmt = QEMU_NAME.get(self.base_fmt, self.base_fmt)
        if self.base_fmt == "qcow2":
            base_cluster = data.draw(st.sampled_from([512, 4096, 65536]), label="base cluster")
            peers.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={base_cluster}", path, size)
        else:
            # vdi, vhd (vpc) and vmdk bases made by qemu-img (vpc rounds the
            # size to its disk geometry: take what qemu made)
            peers.qemu_img("create", "-q", "-f", qfmt, path, size)
            size = peers.qemu_info(path, qfmt)["virtual-size"]
        cmds = []
        for _ in range(rng.randrange(1, 10)):
            off = rng.randrange(0, size // 512) * 512
            n = min(size - off, rng.randrange(1, 600) * 512)
            if rng.random() < 0.2:
                cmds.append(f"write -z {off} {n}")
            else:
                cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        peers.qemu_io(path, *cmds, fmt=qfmt)
        out = os.path.join(self.tmp, f"{name}-content.raw")
        peers.qemu_to_raw(path, out, qfmt)
        with open(out, "rb") as f:
            content = f.read()
        os.unlink(out)
        return path, content

    # -- rules -----------------------------------------------------------------
    @rule(data=st.data(), kind=PATTERNS, seed=st.integers(0, 2 ** 32 - 1))
    def write(self, data, kind, seed):
        off, n = self.draw_range(data)
        buf = payload(kind, seed, n)
        self.stack.write(off, buf)
        self.model[off:off + n] = buf
        lo, hi = max(0, off - 1000), min(len(self.model), off + n + 1000)
        assert_same(self.stack.read(lo, hi - lo), self.model[lo:hi], f"read back after write {off}+{n}")

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        off, n = self.draw_range(data, allow_empty=True)
        self.stack.write_zeroes(off, n, unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off, n = self.draw_range(data, allow_empty=True)
        self.stack.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def read(self, data):
        off, n = self.draw_range(data, allow_empty=True)
        assert_same(self.stack.read(off, n), self.model[off:off + n], f"read {off}+{n}")

    @rule()
    def flush(self):
        self.stack.flush()

    @rule()
    def reopen(self):
        self.close()
        for p in self.qcow2_layers():
            peers.assert_qemu_check_clean(p, "qcow2")
        self.open()

    @rule(data=st.data())
    def resize(self, data):
        old = len(self.model)
        top_caps = get_backend(self.top_fmt).capabilities
        grow = data.draw(st.booleans(), label="grow") or not top_caps & Cap.SHRINK
        if grow:
            if old >= self.max_size:
                return
            new = old + data.draw(st.integers(1, max(1, min(self.max_size - old, 3 * self.cluster + 4096))),
                                  label="grow by")
        else:
            if old <= 2 * self.cluster + 1024:
                return
            new = old - data.draw(st.integers(1, min(old // 2, 3 * self.cluster + 4096)), label="shrink by")
        new = (new + self.align - 1) // self.align * self.align
        if new == old:
            return
        self.close()
        r = ops.resize(self.top_path, new, fmt=self.top_fmt, shrink=True)
        assert r["new-size"] == new and r["old-size"] == old
        if new < old:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - old))
        self.open()

    @rule()
    def compact(self):
        if not get_backend(self.top_fmt).capabilities & Cap.COMPACT:
            return
        self.close()
        r = ops.compact(self.top_path, self.top_fmt)
        # (ext4 may spend an extent-tree block on a punched hole: a little slack)
        assert r["after"] <= r["before"] + 8192, r
        self.open()

    @rule()
    def discard_zero_blocks(self):
        self.close()
        ops.discard(self.top_path, zeroes=True, fmt=self.top_fmt)
        self.open()

    # -- invariants --------------------------------------------------------------
    @invariant()
    def reads_match_model(self):
        if self.stack is None:
            return
        size = len(self.model)
        assert self.stack.virtual_size == size
        assert_same(self.stack.read(0, size), self.model, "whole-disk read")

    @invariant()
    def block_status_is_sane(self):
        if self.stack is None:
            return
        size = len(self.model)
        pos = 0
        zero = bytes(1 << 20)
        while pos < size:
            status, n, level = self.stack.block_status(pos, size - pos)
            assert 0 < n <= size - pos, f"block_status({pos}) returned length {n}"
            assert status in (Status.DATA, Status.ZERO, Status.UNALLOCATED)
            if status != Status.DATA:
                chunk = self.model[pos:pos + n]
                assert chunk == zero[:n] if n <= len(zero) else not any(chunk), \
                    f"block_status says {status.name} at {pos}+{n} (level {level}) but the model has data there"
            pos += n
        # the top's own answers stay inside the disk too
        top = self.stack.top
        pos = 0
        while pos < size:
            status, n = top.block_status(pos, size - pos)
            assert 0 < n <= size - pos
            pos += n

    # -- teardown: judges and end-of-chain ops ----------------------------------------
    def teardown(self):
        try:
            if self.stack is None and not self.model:
                return  # setup never ran
            self.close()
            expected = bytes(self.model)
            if self.top_fmt == "qcow2":
                # qemu-img reads the overlay together with its parent
                self.judge_with_qemu(self.top_path, expected)
            else:
                with open(self.top_path, "rb") as f:
                    assert_same(f.read(), expected, "raw file vs model")
            for p in self.qcow2_layers():
                peers.assert_qemu_check_clean(p, "qcow2")
            self.final_op(expected)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def final_op(self, expected: bytes):
        op = self.final
        tmp = self.tmp
        if op == "none":
            return
        if op == "convert_raw":
            out = os.path.join(tmp, "out.img")
            r = ops.convert(self.top_path, out, src_format=self.top_fmt, fmt="raw", verify=True)
            assert r.source_digest == r.output_digest
            with open(out, "rb") as f:
                assert_same(f.read(), expected, "convert to raw")
            return
        if op in ("convert_qcow2", "convert_qcow2_compressed"):
            out = os.path.join(tmp, "out.qcow2")
            ops.convert(self.top_path, out, src_format=self.top_fmt, fmt="qcow2",
                        compress=op.endswith("compressed"), verify=True)
            # qcow2 keeps whole sectors: an odd-sized raw source is padded
            self.judge_with_qemu(out, expected.ljust((len(expected) + 511) // 512 * 512, b"\0"))
            return
        if op == "convert_with_parent":
            out = os.path.join(tmp, "out.qcow2")
            ops.convert(self.top_path, out, src_format=self.top_fmt, fmt="qcow2", parent=self.parent_path,
                        parent_format=self.parent_fmt, verify=True)
            self.judge_with_qemu(out, expected)
            return
        if op == "merge_parent":
            ops.merge(self.top_path, into="parent")
            assert not os.path.exists(self.top_path)
            # the parent reads as the top did (a parent larger than the top
            # keeps its tail, as qemu-img commit does)
            want = expected + self.parent_content[len(expected):]
            if self.parent_fmt != "raw":
                self.judge_with_qemu(self.parent_path, want, QEMU_NAME.get(self.parent_fmt, self.parent_fmt))
            else:
                with open(self.parent_path, "rb") as f:
                    assert_same(f.read(), want, "raw base after merge into parent")
            return
        if op == "merge_base":
            # every layer above the base folded into it
            r = ops.merge(self.top_path, into="parent", base=self.base_path)
            assert not os.path.exists(self.top_path)
            assert len(r["deleted"]) == (2 if self.mid_layer else 1)
            want = expected + self.base_content[len(expected):]
            if self.base_fmt != "raw":
                self.judge_with_qemu(self.base_path, want, QEMU_NAME.get(self.base_fmt, self.base_fmt))
            else:
                with open(self.base_path, "rb") as f:
                    assert_same(f.read(), want, "raw base after merge into base")
            return
        if op == "merge_child_keep_base":
            # the layers between the top and the base folded into the top,
            # which then sits on the base
            ops.merge(self.top_path, into="child", base=self.mid_path or self.base_path)
            info = peers.qemu_info(self.top_path, "qcow2")
            if self.mid_layer:
                assert info["backing-filename"] == os.path.basename(self.base_path)
            else:
                assert "backing-filename" not in info
            self.judge_with_qemu(self.top_path, expected)
            return
        if op == "merge_child":
            ops.merge(self.top_path, into="child")
            with open_image(self.top_path) as s:
                assert len(s) == 1
            assert "backing-filename" not in peers.qemu_info(self.top_path, "qcow2")
            self.judge_with_qemu(self.top_path, expected)
            return
        if op == "rebase_none":
            ops.rebase(self.top_path, None)
            assert "backing-filename" not in peers.qemu_info(self.top_path, "qcow2")
            self.judge_with_qemu(self.top_path, expected)
            return
        if op == "rebase_other":
            seed = len(expected) * 7919 + sum(expected[::4099]) % 1000
            newbase, _ = self.make_base(len(expected) + 512 * (seed % 3) - 512 * (seed % 2), seed,
                                        _FixedData(512 * (1 << (seed % 3 * 3 % 8))), name="other")
            ops.rebase(self.top_path, newbase)
            info = peers.qemu_info(self.top_path, "qcow2")
            assert os.path.basename(info["backing-filename"]) == os.path.basename(newbase)
            self.judge_with_qemu(self.top_path, expected)
            return
        if op == "rebase_unsafe":
            # onto a byte-identical copy: only the reference changes
            copy = os.path.join(tmp, "copy-of-parent" + os.path.splitext(self.parent_path)[1])
            shutil.copyfile(self.parent_path, copy)
            before = os.path.join(tmp, "before.raw")
            peers.qemu_to_raw(self.top_path, before, "qcow2")
            ops.rebase(self.top_path, copy, unsafe=True)
            info = peers.qemu_info(self.top_path, "qcow2")
            assert os.path.basename(info["backing-filename"]) == os.path.basename(copy)
            self.judge_with_qemu(self.top_path, expected)
            return
        raise AssertionError(f"unknown final op {op}")


class _FixedData:
    """Stands in for hypothesis' data object in teardown (no drawing there)."""

    def __init__(self, value):
        self.value = value

    def draw(self, strategy, label=None):
        return self.value


# -- configurations ------------------------------------------------------------------------

CHAIN_FINAL_OPS = ("none", "merge_parent", "merge_child", "rebase_none", "rebase_other", "rebase_unsafe",
                   "convert_with_parent", "convert_raw", "merge_base", "merge_child_keep_base")
STANDALONE_FINAL_OPS_QCOW2 = ("none", "convert_raw", "convert_qcow2", "convert_qcow2_compressed")


def sizes_for(cluster: int) -> tuple:
    # enough clusters to cross L2 tables (512-byte clusters: 32 KiB per L2
    # table) and refcount blocks, small enough to read whole after each step
    if cluster <= 512:
        return (256 * K, 320 * K + 512)
    if cluster <= 4096:
        return (1 * M, 2 * M + 4096 * 3)
    return (2 * M, 3 * M + 65536 // 2)


def machine(top_fmt, base_fmt, cluster, final_ops, options=None, mid=False):
    attrs = dict(top_fmt=top_fmt, base_fmt=base_fmt, cluster=cluster, sizes=sizes_for(cluster),
                 final_ops=final_ops, top_options=options, mid_layer=mid)
    suffix = ("_extl2" if options else "") + ("_mid" if mid else "")
    return type(f"Machine_{top_fmt}_{base_fmt}_{cluster}{suffix}", (DiskMachine,), attrs)


def run(cls, examples, steps):
    run_state_machine_as_test(cls, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]))


RAW_FINAL_OPS = ("none", "convert_raw", "convert_qcow2")


@pytest.mark.parametrize("cluster", [4096])
def test_raw_standalone(cluster):
    run(machine("raw", None, cluster, RAW_FINAL_OPS), examples=15, steps=25)


@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_qcow2_standalone(cluster):
    run(machine("qcow2", None, cluster, STANDALONE_FINAL_OPS_QCOW2), examples=12, steps=25)


@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_qcow2_over_raw(cluster):
    run(machine("qcow2", "raw", cluster, CHAIN_FINAL_OPS), examples=12, steps=25)


@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_qcow2_over_qcow2(cluster):
    run(machine("qcow2", "qcow2", cluster, CHAIN_FINAL_OPS), examples=12, steps=25)


@pytest.mark.parametrize("base", ["vdi", "vmdk", "vhd"])
def test_qcow2_over_other_formats(base):
    # chains may mix formats: a qcow2 overlay over a base qemu-img made in
    # another format, merged into it and rebased off it at the end
    run(machine("qcow2", base, 4096, CHAIN_FINAL_OPS), examples=6, steps=20)


@pytest.mark.parametrize("base", [None, "raw"])
def test_qcow2_version2(base):
    # compat=0.10 has no zero flag: zeros over a parent must be written as data
    finals = CHAIN_FINAL_OPS if base else STANDALONE_FINAL_OPS_QCOW2
    run(machine("qcow2", base, 4096, finals, options={"compat": "0.10"}), examples=12, steps=25)


@pytest.mark.parametrize("cluster", [512, 65536])
def test_three_level_chain(cluster):
    # raw base <- qemu-made qcow2 (its own cluster size, zero clusters,
    # discards) <- vdtool's qcow2: fall-through across three block sizes
    run(machine("qcow2", "raw", cluster, CHAIN_FINAL_OPS, mid=True), examples=12, steps=25)


@pytest.mark.parametrize("base", [None, "qcow2"])
def test_qcow2_extended_l2(base):
    # 64K clusters with 32 subclusters of 2K: partial-cluster writes and zero
    # ranges land on subcluster boundaries
    finals = CHAIN_FINAL_OPS if base else STANDALONE_FINAL_OPS_QCOW2
    run(machine("qcow2", base, 65536, finals, options={"extended_l2": True}), examples=12, steps=25)


@pytest.mark.slow
@pytest.mark.parametrize("top,base", [("raw", None), ("qcow2", None), ("qcow2", "raw"), ("qcow2", "qcow2")])
@pytest.mark.parametrize("cluster", [512, 4096, 65536])
def test_model_slow(top, base, cluster):
    finals = CHAIN_FINAL_OPS if base else (STANDALONE_FINAL_OPS_QCOW2 if top == "qcow2" else RAW_FINAL_OPS)
    run(machine(top, base, cluster, finals), examples=60, steps=60)


@pytest.mark.slow
@pytest.mark.parametrize("cluster,extl2", [(512, False), (4096, False), (65536, False), (65536, True)])
def test_three_level_chain_slow(cluster, extl2):
    run(machine("qcow2", "raw", cluster, CHAIN_FINAL_OPS, mid=True,
                options={"extended_l2": True} if extl2 else None), examples=60, steps=60)

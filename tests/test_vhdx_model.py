"""Model-based tests for VHDX: a hypothesis state machine drives fixed,
dynamic and differencing VHDXs (over a VHDX or raw parent) with writes,
write_zeroes, discards, resizes, flushes, reopens, compacts and discard
--zeroes, checking every read against a bytearray model.  At the end,
standalone images are judged by qemu-img (convert -O raw equals the model,
check is clean) and every image by vdtool's check."""

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
from helpers import first_difference, payload
from vdtool.core import ops
from vdtool.core.ops._discard import discard_zero_blocks
from vdtool.core.stack import open_image

K, M = 1 << 10, 1 << 20


class VhdxMachine(RuleBasedStateMachine):
    variant = "dynamic"
    block = M
    parent_fmt = None  # None, "vhdx", "vhd" or "raw"

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vdtool-vhdx-model-")
        self.path = os.path.join(self.tmp, "top.vhdx")
        self.stack = None
        self.model = bytearray()
        self.parent = b""

    def open(self):
        self.stack = open_image(self.path, "vhdx", writable=True)
        assert self.stack.virtual_size == len(self.model)

    def close(self):
        if self.stack is not None:
            s, self.stack = self.stack, None
            s.close()

    def draw_range(self, data):
        size = len(self.model)
        c = self.block
        if data.draw(st.booleans(), label="near boundary"):
            b = data.draw(st.integers(0, size // c), label="block") * c
            off = min(max(b + data.draw(st.integers(-600, 600), label="delta"), 0), size - 1)
        else:
            off = data.draw(st.integers(0, size - 1), label="offset")
        room = size - off
        n = data.draw(st.one_of(st.integers(1, min(room, 3 * c + 700)), st.integers(1, room)), label="length")
        return off, n

    @initialize(size=st.sampled_from([2 * M, 3 * M + 7 * 512, 1 * M - 512]), seed=st.integers(0, 2 ** 32 - 1),
                psize=st.sampled_from([0, 64 * K, -M // 2]))
    def setup(self, size, seed, psize):
        bs = {"block_size": self.block} if self.variant != "fixed" else {}
        if self.parent_fmt:
            ppath = os.path.join(self.tmp, "base." + ({"raw": "img"}.get(self.parent_fmt, self.parent_fmt)))
            plen = max(size + psize, 32 * K)
            ops.create(ppath, plen, fmt=self.parent_fmt)
            rng = random.Random(seed)
            content = bytearray(plen)
            with open_image(ppath, writable=True) as s:
                for _ in range(4):
                    off = rng.randrange(0, plen - 1)
                    n = min(rng.randrange(1, 40 * K), plen - off)
                    d = payload("mixed", rng.randrange(1 << 30), n, data_share=0.6)
                    s.write(off, d)
                    content[off:off + n] = d
            ops.create(self.path, size, parent=ppath, fmt="vhdx", **bs)
            self.parent = bytes(content)
            self.model = bytearray(content[:size].ljust(size, b"\0"))
        else:
            ops.create(self.path, size, fmt="vhdx", variant=self.variant, **bs)
            self.model = bytearray(size)
        self.open()

    @rule(data=st.data(), kind=st.sampled_from(["fill", "zeros", "mixed"]), seed=st.integers(0, 2 ** 32 - 1))
    def write(self, data, kind, seed):
        off, n = self.draw_range(data)
        d = payload(kind, seed, n, data_share=0.6)
        self.stack.write(off, d)
        self.model[off:off + n] = d

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        off, n = self.draw_range(data)
        self.stack.write_zeroes(off, n, unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off, n = self.draw_range(data)
        self.stack.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule()
    def flush(self):
        self.stack.flush()

    @rule()
    def reopen(self):
        self.close()
        self.open()

    @rule(data=st.data())
    def resize(self, data):
        old = len(self.model)
        new = data.draw(st.sampled_from([old + 512, old + self.block + 1024, max(512, old - self.block // 2 - 512),
                                         old + 300 * K]), label="new size")
        new = min(new, 5 * M)
        self.close()
        ops.resize(self.path, new, fmt="vhdx", shrink=True)
        if new > old:
            self.model += bytes(new - old)
        else:
            del self.model[new:]
        self.open()

    @rule()
    def compact(self):
        self.close()
        ops.compact(self.path, "vhdx")
        self.open()

    @rule()
    def zero_blocks(self):
        discard_zero_blocks(self.stack)

    @invariant()
    def reads_match(self):
        if self.stack is None:
            return
        got = self.stack.read(0, len(self.model))
        assert got == bytes(self.model), first_difference(got, self.model)

    def teardown(self):
        try:
            self.close()
            if self.model:
                r = ops.check(self.path, "vhdx")
                assert r.exit_code == 0, r.messages
                if not self.parent_fmt:
                    out = os.path.join(self.tmp, "judge.raw")
                    peers.assert_qemu_check_clean(self.path, "vhdx")
                    peers.qemu_to_raw(self.path, out, "vhdx")
                    with open(out, "rb") as f:
                        got = f.read()
                    assert got == bytes(self.model), "qemu-img convert: " + first_difference(got, self.model)
                else:
                    # flatten through the ops: merge into child, then stand alone
                    ops.merge(self.path, into="child")
                    with open_image(self.path, "vhdx") as s:
                        assert len(s) == 1
                        got = s.read(0, s.virtual_size)
                    assert got == bytes(self.model), "after merge into child: " + first_difference(got, self.model)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def machine(variant, block, parent_fmt=None):
    return type(f"Vhdx_{variant}_{block}_{parent_fmt}", (VhdxMachine,),
                {"variant": variant, "block": block, "parent_fmt": parent_fmt})


def run(cls, examples, steps):
    run_state_machine_as_test(cls, settings=settings(max_examples=examples, stateful_step_count=steps,
                                                     deadline=None,
                                                     suppress_health_check=list(HealthCheck)))


@pytest.mark.parametrize("variant", ["fixed", "dynamic"])
def test_vhdx_standalone(variant):
    peers.need("qemu-img")
    run(machine(variant, M), 6, 12)


@pytest.mark.parametrize("parent_fmt", ["vhdx", "raw"])
def test_vhdx_differencing(parent_fmt):
    run(machine("dynamic", M, parent_fmt), 6, 12)


@pytest.mark.slow
@pytest.mark.parametrize("variant,block,parent_fmt", [
    ("fixed", M, None), ("dynamic", M, None), ("dynamic", 2 * M, None), ("dynamic", M, "vhdx"),
    ("dynamic", M, "raw"), ("dynamic", M, "vhd"),
])
def test_vhdx_model_slow(variant, block, parent_fmt):
    peers.need("qemu-img")
    run(machine(variant, block, parent_fmt), 60, 40)

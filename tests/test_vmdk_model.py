"""Model-based tests for VMDK: a hypothesis state machine drives sparse,
flat and differencing VMDKs with writes, zero writes, discards, resizes,
reopens and compacts, checking every read against a bytearray model; at the
end qemu-img judges the image (check clean, convert equal to the model)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import peers
from helpers import payload
from vdtool.core import ops
from vdtool.core.stack import open_image

K, M = 1 << 10, 1 << 20
PAYLOADS = ("fill", "random", "mixed")  # the kind of data a seed writes: PAYLOADS[seed % 3]


class VmdkMachine(RuleBasedStateMachine):
    variant = "monolithicSparse"
    block = 4096
    diff = False
    zeroed = False

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vmdk-model-")
        self.path = os.path.join(self.dir, "d.vmdk")
        self.stack = None

    @initialize(size_k=st.integers(1, 96), seed=st.integers(0, 1000))
    def setup(self, size_k, seed):
        size = size_k * 4 * K
        if self.diff:
            base = os.path.join(self.dir, "base.vmdk")
            ops.create(base, size + 8 * K, block_size=8192)
            pdata = bytearray(size + 8 * K)
            with open_image(base, writable=True) as s:
                d = payload(PAYLOADS[seed % 3], seed, size + 8 * K)
                s.write(0, d)
                pdata[:] = d
            ops.create(self.path, size, parent=base, block_size=self.block,
                       options={"zeroed_grain": self.zeroed})
            self.model = bytearray(pdata[:size])
        else:
            bs = self.block if "Sparse" in self.variant else None
            ops.create(self.path, size, variant=self.variant, block_size=bs)
            self.model = bytearray(size)
        self.stack = open_image(self.path, writable=True)

    def _range(self, a, b):
        size = len(self.model)
        a = min(a * 512 + (a % 7), size)
        n = min(b * 256 + (b % 5), size - a)
        return a, n

    @rule(a=st.integers(0, 800), b=st.integers(0, 100), seed=st.integers(0, 1000))
    def write(self, a, b, seed):
        off, n = self._range(a, b)
        d = payload(PAYLOADS[seed % 3], seed, n)
        self.stack.write(off, d)
        self.model[off:off + n] = d

    @rule(a=st.integers(0, 800), b=st.integers(0, 300))
    def write_zeroes(self, a, b):
        off, n = self._range(a, b)
        self.stack.write_zeroes(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(a=st.integers(0, 800), b=st.integers(0, 300))
    def discard(self, a, b):
        off, n = self._range(a, b)
        self.stack.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule()
    def reopen(self):
        self.stack.close()
        self.stack = open_image(self.path, writable=True)

    @rule(k=st.integers(1, 128))
    def resize(self, k):
        if self.diff:
            return
        new = k * 4 * K
        self.stack.close()
        ops.resize(self.path, new, shrink=True)
        old = len(self.model)
        if new < old:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - old))
        self.stack = open_image(self.path, writable=True)

    @rule()
    def compact(self):
        self.stack.close()
        ops.compact(self.path)
        self.stack = open_image(self.path, writable=True)

    @invariant()
    def reads_match(self):
        if self.stack is None:
            return
        got = self.stack.read(0, len(self.model))
        assert got == bytes(self.model)

    def teardown(self):
        try:
            if self.stack is not None:
                self.stack.close()
                r = ops.check(self.path)
                assert r.exit_code == 0, r.messages
                peers.assert_qemu_check_clean(self.path)
                out = os.path.join(self.dir, "out.raw")
                peers.qemu_to_raw(self.path, out)
                assert open(out, "rb").read() == bytes(self.model)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


SETTINGS = settings(max_examples=25, stateful_step_count=20, deadline=None,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("variant,block", [("monolithicSparse", 4096), ("monolithicSparse", 65536),
                                           ("twoGbMaxExtentSparse", 8192), ("monolithicFlat", None)])
def test_vmdk_model(variant, block):
    peers.need("qemu-img")
    cls = type("M", (VmdkMachine,), {"variant": variant, "block": block})
    run_state_machine_as_test(cls, settings=SETTINGS)


@pytest.mark.parametrize("zeroed", [False, True])
def test_vmdk_model_differencing(zeroed):
    peers.need("qemu-img")
    cls = type("D", (VmdkMachine,), {"diff": True, "block": 4096, "zeroed": zeroed})
    run_state_machine_as_test(cls, settings=SETTINGS)

"""Model-based test for Parallels: random writes, zero writes, discards,
resizes, flushes, reopens, compacts and check, every read checked against
a bytearray model; the final image is judged by qemu-img check and its
raw conversion."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import peers
from vdtool.core import ops
from vdtool.core.stack import open_image
from vdtool.formats.parallels.backend import ParallelsBackend


class ParallelsMachine(RuleBasedStateMachine):
    cs = 4096
    max_size = 96 * 1024

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="prlmodel-")
        self.path = os.path.join(self.dir, "a.hds")
        self.stack = None

    @initialize(size=st.integers(1, 64))
    def setup(self, size):
        size = min(size * 1536, self.max_size)
        self.model = bytearray(size)
        ops.create(self.path, size, fmt="parallels", options={"cluster_size": str(self.cs)})
        self.stack = open_image(self.path, writable=True)

    def teardown(self):
        try:
            if self.stack is not None:
                self.stack.close()
                self.stack = None
                peers.assert_qemu_check_clean(self.path, "parallels")
                raw = os.path.join(self.dir, "q.raw")
                peers.qemu_to_raw(self.path, raw, "parallels")
                assert open(raw, "rb").read() == bytes(self.model)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _range(self, data):
        size, cs = len(self.model), self.cs
        off = data.draw(st.one_of(st.integers(0, size - 1), st.integers(0, (size - 1) // cs).map(lambda b: b * cs)))
        n = data.draw(st.one_of(st.integers(1, 3 * cs), st.sampled_from([cs, 2 * cs, cs - 1, cs + 1])))
        return off, max(1, min(n, size - off))

    @rule(data=st.data(), byte=st.integers(0, 255))
    def write(self, data, byte):
        off, n = self._range(data)
        self.stack.write(off, bytes([byte]) * n)
        self.model[off:off + n] = bytes([byte]) * n

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        off, n = self._range(data)
        self.stack.write_zeroes(off, n, unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off, n = self._range(data)
        self.stack.discard(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(new=st.integers(1, 64), grow=st.booleans())
    def resize(self, new, grow):
        old = len(self.model)
        size = min(old + new * 512, self.max_size) if grow else max(512, old - new * 512)
        if size == old:
            return
        self.stack.close()
        self.stack = None
        ops.resize(self.path, size, shrink=True)
        if size < old:
            del self.model[size:]
        else:
            self.model.extend(bytes(size - old))
        self.stack = open_image(self.path, writable=True)

    @rule()
    def flush(self):
        self.stack.flush()

    @rule()
    def reopen(self):
        self.stack.close()
        self.stack = open_image(self.path, writable=True)

    @rule()
    def compact(self):
        self.stack.close()
        self.stack = None
        ops.compact(self.path)
        self.stack = open_image(self.path, writable=True)

    @invariant()
    def reads_match(self):
        if self.stack is not None:
            assert self.stack.read(0, len(self.model)) == bytes(self.model)

    @invariant()
    def check_clean(self):
        if self.stack is None:
            return
        self.stack.flush()
        with ParallelsBackend.open(self.path, options={"check": True}) as b:
            r = b.check()
            # the writer still has it open: its in-use flag is the one leftover
            assert (r.corruptions, r.leaks, r.check_errors) == (0, 1, 0), r.messages
            assert "in-use" in r.messages[0]


class BigClusters(ParallelsMachine):
    cs = 64 * 1024
    max_size = 600 * 1024


def _run(cls, n):
    run_state_machine_as_test(cls, settings=settings(
        max_examples=n, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)))


def test_model_small_clusters():
    _run(ParallelsMachine, 15)


def test_model_odd_sized_clusters():
    class Odd(ParallelsMachine):
        cs = 63 * 512  # the cluster size of Parallels Desktop 2's images
    _run(Odd, 6)


def test_model_big_clusters():
    _run(BigClusters, 6)

"""A model-based state machine for the two-level-table formats (QED, QCOW
v1): random writes, zero writes, discards, resizes, flushes, reopens,
compacts and check, standalone or over a parent, every read checked against
a bytearray model; the final image is judged by qemu-img (compare, and check
for QED).  Used by tests/test_qed.py and tests/test_qcow1.py."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import peers
from vdtool.core import ops
from vdtool.core.registry import get_backend
from vdtool.core.stack import open_image


class TableMachine(RuleBasedStateMachine):
    fmt = "qed"
    diff = False
    bs = 4096
    max_size = 96 * 1024

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix=f"{self.fmt}model-")
        self.path = os.path.join(self.dir, f"top.{self.fmt}")
        self.stack = None

    @initialize(size=st.integers(1, 64), seed=st.integers(0, 2 ** 31))
    def setup(self, size, seed):
        size = min(size * 1536, self.max_size)
        rnd = random.Random(seed)
        self.model = bytearray(size)
        parent = None
        if self.diff:
            parent = os.path.join(self.dir, "base.qcow2")
            psize = size + rnd.choice([0, -512, 4096]) if size > 4096 else size
            ops.create(parent, psize, fmt="qcow2")
            with open_image(parent, writable=True) as s:
                for _ in range(4):
                    off = rnd.randrange(0, psize)
                    n = min(rnd.randrange(1, self.bs * 3), psize - off)
                    s.write(off, bytes([rnd.randrange(1, 256)]) * n)
                pdata = s.read(0, psize)
            k = min(size, psize)
            self.model[:k] = pdata[:k]
        ops.create(self.path, size, fmt=self.fmt, parent=parent, parent_format="qcow2" if parent else None,
                   block_size=self.bs)
        self.stack = open_image(self.path, writable=True)

    def teardown(self):
        try:
            if self.stack is not None:
                self.stack.close()
                self.stack = None
                if self.fmt == "qed":
                    peers.assert_qemu_check_clean(self.path)
                raw = os.path.join(self.dir, "model.raw")
                with open(raw, "wb") as f:
                    f.write(self.model)
                peers.assert_qemu_compare(raw, self.path, "raw", self.fmt)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _range(self, data):
        size = len(self.model)
        bs = self.bs
        off = data.draw(st.one_of(st.integers(0, size - 1),
                                  st.integers(0, max(0, (size - 1) // bs)).map(lambda b: b * bs)))
        off = min(off, size - 1)
        n = data.draw(st.one_of(st.integers(1, 3 * bs), st.sampled_from([bs, 2 * bs, bs - 1, bs + 1])))
        return off, max(1, min(n, size - off))

    @rule(data=st.data(), byte=st.integers(0, 255))
    def write(self, data, byte):
        off, n = self._range(data)
        payload = bytes([byte]) * n
        self.stack.write(off, payload)
        self.model[off:off + n] = payload

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
        ops.resize(self.path, size, shrink=True)  # a grown part reads zeros, even over the parent
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
        with get_backend(self.fmt).open(self.path, options={"check": True}) as b:
            r = b.check()
            assert (r.corruptions, r.leaks, r.check_errors) == (0, 0, 0), r.messages


def run(cls, n=25):
    run_state_machine_as_test(cls, settings=settings(
        max_examples=n, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)))

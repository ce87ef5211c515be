"""A hypothesis state machine over one image format (VHD, VHDX): fixed,
dynamic and differencing images driven with writes, write_zeroes, discards,
resizes, flushes, reopens, compacts and discard --zeroes, every read checked
against a bytearray model.  At the end standalone images are judged by
qemu-img (convert -O raw equals the model) and every image by vdtool's
check; a differencing image is merged into itself and read again."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import peers
from helpers import first_difference, payload
from vdtool.core import ops
from vdtool.core.ops._discard import discard_zero_blocks
from vdtool.core.stack import open_image

K, M = 1 << 10, 1 << 20


class DiskMachine(RuleBasedStateMachine):
    """A subclass names the format and decorates ``setup`` with its sizes:

        @initialize(size=..., seed=st.integers(0, 2 ** 32 - 1), psize=...)
        def setup(self, size, seed, psize):
            self.start(size, seed, psize)"""

    fmt = ""  # vdtool's name
    qemu_fmt = ""  # qemu-img's name, to judge standalone images
    qemu_check = False  # also require a clean qemu-img check
    max_size = 2 * M
    variant = "dynamic"
    block = 4096
    parent_fmt = None  # None, the format itself, or another (raw...)

    def resize_choices(self, old: int) -> list:
        return [old + 512, old + 3 * self.block + 1024, max(512, old - self.block - 512), old + 300 * K]

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix=f"vdtool-{self.fmt}-model-")
        self.path = os.path.join(self.tmp, "top." + self.fmt)
        self.stack = None
        self.model = bytearray()
        self.parent = b""

    def open(self):
        self.stack = open_image(self.path, self.fmt, writable=True)
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

    def start(self, size, seed, psize):
        bs = {"block_size": self.block} if self.variant != "fixed" else {}
        if self.parent_fmt:
            ppath = os.path.join(self.tmp, "base." + {"raw": "img"}.get(self.parent_fmt, self.parent_fmt))
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
            ops.create(self.path, size, parent=ppath, fmt=self.fmt, **bs)
            self.parent = bytes(content)
            self.model = bytearray(content[:size].ljust(size, b"\0"))
        else:
            ops.create(self.path, size, fmt=self.fmt, variant=self.variant, **bs)
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
        new = min(data.draw(st.sampled_from(self.resize_choices(old)), label="new size"), self.max_size)
        self.close()
        ops.resize(self.path, new, fmt=self.fmt, shrink=True)
        if new > old:
            self.model += bytes(new - old)
        else:
            del self.model[new:]
        self.open()

    @rule()
    def compact(self):
        self.close()
        ops.compact(self.path, self.fmt)
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
                r = ops.check(self.path, self.fmt)
                assert r.exit_code == 0, r.messages
                if not self.parent_fmt:
                    out = os.path.join(self.tmp, "judge.raw")
                    if self.qemu_check:
                        peers.assert_qemu_check_clean(self.path, self.fmt)
                    peers.qemu_to_raw(self.path, out, self.qemu_fmt)
                    with open(out, "rb") as f:
                        got = f.read()
                    assert got == bytes(self.model), "qemu-img convert: " + first_difference(got, self.model)
                else:
                    # flatten through the ops: merge into child, then stand alone
                    ops.merge(self.path, into="child")
                    with open_image(self.path, self.fmt) as s:
                        assert len(s) == 1
                        got = s.read(0, s.virtual_size)
                    assert got == bytes(self.model), "after merge into child: " + first_difference(got, self.model)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def machine(base, variant, block, parent_fmt=None):
    return type(f"{base.__name__}_{variant}_{block}_{parent_fmt}", (base,),
                {"variant": variant, "block": block, "parent_fmt": parent_fmt})


def run(cls, examples, steps):
    run_state_machine_as_test(cls, settings=settings(max_examples=examples, stateful_step_count=steps,
                                                     deadline=None,
                                                     suppress_health_check=list(HealthCheck)))

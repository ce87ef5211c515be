"""Model-based test across formats and mixed chains: a hypothesis state
machine builds a chain of 1-3 images of random formats and applies random
writes, zero writes, discards, resizes, compacts, merges (into parent and
into child), safe rebases (onto a new image or onto nothing), new overlays
and reopens, checking what the top reads against a ``bytearray`` model after
every step, and ``check`` on every image at the end."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import chainkit as ck
from chainkit import K, M
from helpers import read_all
from vdtool.core import ops
from vdtool.core.stack import open_image

SIZE = 2 * M
FMT = st.sampled_from(ck.DIFF_FORMATS)
BASE_FMT = st.sampled_from(ck.FORMATS)
OFFSETS = st.one_of(st.integers(0, SIZE - 1), st.sampled_from([0, 512, 4 * K, 64 * K - 1, 64 * K, M - 3, M]))
LENGTHS = st.one_of(st.integers(1, 200 * K), st.sampled_from([1, 512, 4 * K, 64 * K, 64 * K + 1]))


class ChainMachine(RuleBasedStateMachine):
    @initialize(base=BASE_FMT, overlays=st.lists(FMT, min_size=0, max_size=2), seed=st.integers(0, 1000))
    def build(self, base, overlays, seed):
        self.dir = tempfile.mkdtemp(prefix="vdtool-chain-model-")
        self.n = 0
        self.formats = [base] + overlays
        self.paths = []
        prev = None
        for fmt in self.formats:
            prev = self._new(fmt, prev, ck.pattern_writes(seed + len(self.paths), SIZE, n=3))
            self.paths.append(prev)
        self.model = bytearray(read_all(self.paths[-1]))

    def _new(self, fmt, parent, writes=()):
        self.n += 1
        return ck.make_image(self.dir, f"i{self.n}", fmt, SIZE, parent=parent, writes=writes)

    def teardown(self):
        if getattr(self, "dir", None):
            try:
                for p in self.paths:
                    ck.assert_checks_clean(p, repair_leaks=False)
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def top(self):
        return self.paths[-1]

    def _clip(self, off, length):
        size = len(self.model)
        off = min(off, size - 1)
        return off, max(1, min(length, size - off))

    # -- data -------------------------------------------------------------------------------
    @rule(off=OFFSETS, length=LENGTHS, byte=st.integers(1, 255))
    def write(self, off, length, byte):
        off, length = self._clip(off, length)
        data = bytes([byte]) * length
        ck.write(self.top, [(off, data)])
        self.model[off:off + length] = data

    @rule(off=OFFSETS, length=LENGTHS)
    def write_zeroes(self, off, length):
        off, length = self._clip(off, length)
        with open_image(self.top, writable=True) as s:
            s.write_zeroes(off, length)
        self.model[off:off + length] = bytes(length)

    @rule(off=OFFSETS, length=LENGTHS)
    def discard(self, off, length):
        off, length = self._clip(off, length)
        ops.discard(self.top, [(off, length)])
        self.model[off:off + length] = bytes(length)

    @rule(grow=st.booleans(), amount=st.sampled_from([512, 64 * K, 300 * K + 512, M]))
    def resize(self, grow, amount):
        size = len(self.model)
        new = size + amount if grow else max(512, size - amount)
        if new > 4 * M:
            return
        ops.resize(self.top, new, shrink=not grow)
        with open_image(self.top) as s:
            new = s.virtual_size  # a format may round (VHD to sectors, ...)
        if new >= size:
            self.model += bytes(new - size)
        else:
            del self.model[new:]

    @rule()
    def compact(self):
        ops.compact(self.top)

    @rule()
    def discard_zeroes(self):
        ops.discard(self.top, zeroes=True)

    # -- chain ------------------------------------------------------------------------------------
    @precondition(lambda self: len(self.paths) < 4)
    @rule(fmt=FMT)
    def overlay(self, fmt):
        self.paths.append(self._new(fmt, self.top))
        self.formats.append(fmt)

    @precondition(lambda self: len(self.paths) >= 2)
    @rule()
    def merge_into_parent(self):
        base_before = read_all(self.paths[-2])
        ops.merge(self.top)
        self.paths.pop()
        self.formats.pop()
        # BASE reads as IMAGE did; a BASE larger than IMAGE keeps its size
        # and its tail (as qemu-img commit: the backing file is never shrunk)
        self.model += base_before[len(self.model):]

    @precondition(lambda self: len(self.paths) >= 2)
    @rule()
    def merge_into_child(self):
        ops.merge(self.top, into="child")
        for p in self.paths[:-1]:
            os.unlink(p)
        self.paths = [self.top]
        self.formats = [self.formats[-1]]

    @precondition(lambda self: len(self.paths) >= 2)
    @rule(fmt=BASE_FMT, seed=st.integers(0, 1000))
    def rebase_onto_new(self, fmt, seed):
        other = self._new(fmt, None, ck.pattern_writes(seed, SIZE, n=2))
        ops.rebase(self.top, other)
        self.paths = [other, self.top]
        self.formats = [fmt, self.formats[-1]]

    @precondition(lambda self: len(self.paths) >= 2)
    @rule()
    def rebase_alone(self):
        ops.rebase(self.top, None)
        self.paths = [self.top]
        self.formats = [self.formats[-1]]

    # -- invariant ------------------------------------------------------------------------------------
    @invariant()
    def reads_as_model(self):
        if not getattr(self, "paths", None):
            return
        got = read_all(self.top)
        assert len(got) == len(self.model), f"size {len(got)} != model {len(self.model)} ({self.formats})"
        if got != bytes(self.model):
            i = next(i for i in range(len(got)) if got[i] != self.model[i])
            raise AssertionError(f"chain {self.formats}: first difference at {i}")
        assert ck.chain_paths(self.top) == self.paths


ChainMachine.TestCase.settings = settings(max_examples=int(os.environ.get("CHAIN_MODEL_EXAMPLES", "25")),
                                          stateful_step_count=10, deadline=None,
                                          suppress_health_check=list(HealthCheck))
test_chain_model = ChainMachine.TestCase

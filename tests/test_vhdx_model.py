"""Model-based tests for VHDX: a hypothesis state machine drives fixed,
dynamic and differencing VHDXs (over a VHDX or raw parent) with writes,
write_zeroes, discards, resizes, flushes, reopens, compacts and discard
--zeroes, checking every read against a bytearray model.  At the end,
standalone images are judged by qemu-img (convert -O raw equals the model,
check is clean) and every image by vdtool's check."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize

import peers
from diskmodel import K, M, DiskMachine, machine, run


class VhdxMachine(DiskMachine):
    fmt = qemu_fmt = "vhdx"
    qemu_check = True
    max_size = 5 * M
    block = M

    def resize_choices(self, old: int) -> list:
        return [old + 512, old + self.block + 1024, max(512, old - self.block // 2 - 512), old + 300 * K]

    @initialize(size=st.sampled_from([2 * M, 3 * M + 7 * 512, 1 * M - 512]), seed=st.integers(0, 2 ** 32 - 1),
                psize=st.sampled_from([0, 64 * K, -M // 2]))
    def setup(self, size, seed, psize):
        self.start(size, seed, psize)


@pytest.mark.parametrize("variant", ["fixed", "dynamic"])
def test_vhdx_standalone(variant):
    peers.need("qemu-img")
    run(machine(VhdxMachine, variant, M), 6, 12)


@pytest.mark.parametrize("parent_fmt", ["vhdx", "raw"])
def test_vhdx_differencing(parent_fmt):
    run(machine(VhdxMachine, "dynamic", M, parent_fmt), 6, 12)


@pytest.mark.slow
@pytest.mark.parametrize("variant,block,parent_fmt", [
    ("fixed", M, None), ("dynamic", M, None), ("dynamic", 2 * M, None), ("dynamic", M, "vhdx"),
    ("dynamic", M, "raw"), ("dynamic", M, "vhd"),
])
def test_vhdx_model_slow(variant, block, parent_fmt):
    peers.need("qemu-img")
    run(machine(VhdxMachine, variant, block, parent_fmt), 60, 40)

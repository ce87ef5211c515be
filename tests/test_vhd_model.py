"""Model-based tests for VHD (tests/diskmodel.py): fixed, dynamic and
differencing VHDs (over a VHD or raw parent), judged by qemu-img and
vdtool's check."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize

import peers
from diskmodel import K, M, DiskMachine, machine, run


class VhdMachine(DiskMachine):
    fmt, qemu_fmt = "vhd", "vpc"

    @initialize(size=st.sampled_from([64 * K, 200 * K + 512, 1 * M]), seed=st.integers(0, 2 ** 32 - 1),
                psize=st.sampled_from([0, 64 * K, -64 * K]))
    def setup(self, size, seed, psize):
        self.start(size, seed, psize)


@pytest.mark.parametrize("variant,block", [("fixed", 4096), ("dynamic", 4096), ("dynamic", 64 * K)])
def test_vhd_standalone(variant, block):
    peers.need("qemu-img")
    run(machine(VhdMachine, variant, block), 30, 25)


@pytest.mark.parametrize("parent_fmt", ["vhd", "raw"])
def test_vhd_differencing(parent_fmt):
    run(machine(VhdMachine, "dynamic", 4096, parent_fmt), 30, 25)


@pytest.mark.slow
@pytest.mark.parametrize("variant,block,parent_fmt", [
    ("fixed", 4096, None), ("dynamic", 4096, None), ("dynamic", 2 * M, None), ("dynamic", 4096, "vhd"),
    ("dynamic", 64 * K, "raw"),
])
def test_vhd_model_slow(variant, block, parent_fmt):
    peers.need("qemu-img")
    run(machine(VhdMachine, variant, block, parent_fmt), 200, 50)

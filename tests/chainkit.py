"""Helpers for tests over every format and mixed chains: make images and
chains through vdtool's own API, list a chain, check them (what they read:
``helpers.read_all``)."""

from __future__ import annotations

import os
import random

from helpers import read_all
from vdtool.core import ops
from vdtool.core.backend import Cap
from vdtool.core.stack import open_backend, open_image

K, M = 1 << 10, 1 << 20

EXT = {"raw": "img", "qcow2": "qcow2", "vdi": "vdi", "vmdk": "vmdk", "vhd": "vhd", "parallels": "hds",
       "vhdx": "vhdx", "qed": "qed",
       "qcow": "qcow"}
FORMATS = tuple(EXT)
DIFF_FORMATS = ("qcow2", "vdi", "vmdk", "vhd", "vhdx", "qed", "qcow")
# the format qemu-img calls it by
QEMU_NAME = {"raw": "raw", "qcow2": "qcow2", "vdi": "vdi", "vmdk": "vmdk", "vhd": "vpc", "parallels": "parallels",
             "vhdx": "vhdx",
             "qed": "qed", "qcow": "qcow"}
# (format, variant) pairs that can be written in place
WRITABLE_VARIANTS = (
    ("raw", "sparse"), ("raw", "full"),
    ("qcow2", "sparse"), ("qcow2", "metadata"), ("qcow2", "full"),
    ("vdi", "dynamic"), ("vdi", "fixed"),
    ("vmdk", "monolithicSparse"), ("vmdk", "monolithicFlat"), ("vmdk", "twoGbMaxExtentSparse"),
    ("vmdk", "twoGbMaxExtentFlat"),
    ("vhd", "dynamic"), ("vhd", "fixed"),
    ("parallels", "dynamic"),
    ("vhdx", "dynamic"), ("vhdx", "fixed"),
    ("qed", "dynamic"), ("qcow", "dynamic"),
)
PREALLOCATED = {"raw": "full", "qcow2": "full", "vdi": "fixed", "vmdk": "monolithicFlat", "vhd": "fixed",
                "parallels": "dynamic", "vhdx": "fixed", "qed": "dynamic",
                "qcow": "dynamic"}  # parallels: no preallocated variant

# Mixed chains, base first: the overlay's format names its parent its own way
# (qcow2 backing file + format, VDI parent UUID, VMDK parentFileNameHint + CID,
# VHD locators + unique ID + timestamp).
MIXED_CHAINS = (
    ("vdi", "qcow2"),
    ("raw", "vhd"),
    ("qcow2", "vmdk"),
    ("vhd", "vdi"),
    ("vmdk", "qcow2"),
    ("raw", "vdi", "vhd"),
    ("qcow2", "vhd", "vmdk", "qcow2"),
    ("vhd", "vhdx"),
    ("vhdx", "qcow2"),
    ("qcow2", "qed"),
    ("qed", "qcow"),
    ("vdi", "qed", "qcow2"),
)


def image_path(folder, name: str, fmt: str) -> str:
    return os.path.join(str(folder), f"{name}.{EXT[fmt]}")


def make_image(folder, name: str, fmt: str, size: int | None = 4 * M, *, variant=None, parent=None,
               writes=()) -> str:
    path = image_path(folder, name, fmt)
    ops.create(path, None if parent else size, fmt=fmt, variant=variant, parent=parent)
    if writes:
        write(path, writes)
    return path


def write(path: str, writes, fmt=None) -> None:
    with open_image(path, fmt, writable=True) as s:
        for off, data in writes:
            s.write(off, data)
        s.flush()


def pattern_writes(seed: int, size: int, n: int = 5, zeros: bool = True) -> list:
    """Writes with data, explicit zeros and block-straddling ranges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([512, 3000, 4096, 65536, 70000, 200 * K])
        off = rng.randrange(0, size - length) // 512 * 512 + rng.choice([0, 0, 17])
        data = bytes(length) if zeros and i % 3 == 2 else rng.randbytes(length)
        out.append((off, data))
    return out


def make_chain(folder, formats, size: int = 4 * M, seed: int = 0, prefix: str = "l") -> list:
    """A chain base first, each layer with its own writes; returns paths."""
    paths = []
    prev = None
    for i, fmt in enumerate(formats):
        prev = make_image(folder, f"{prefix}{i}", fmt, size, parent=prev,
                          writes=pattern_writes(seed * 100 + i, size))
        paths.append(prev)
    return paths


def chain_paths(path: str) -> list:
    with open_image(path) as s:
        return [layer.path for layer in s.layers]


def check_one(path: str) -> tuple:
    """(corruptions, leaks, check_errors) from vdtool's check, or None when
    the format has no check."""
    img = open_backend(path)
    try:
        has = bool(img.capabilities & Cap.CHECK)
    finally:
        img.close()
    if not has:
        return None
    r = ops.check(path)
    return r.corruptions, r.leaks, r.check_errors


def assert_checks_clean(path: str, *, repair_leaks: bool = True) -> None:
    """No corruption in the image or any image of its chain; leaks are
    allowed and ``check -r leaks`` must clear them without changing what the
    image reads."""
    before = read_all(path)
    for p in chain_paths(path):
        res = check_one(p)
        if res is None:
            continue
        corruptions, leaks, errors = res
        assert corruptions == 0 and errors == 0, f"{p}: check found {corruptions} corruptions, {errors} errors"
        if leaks and repair_leaks:
            ops.check(p, repair="leaks")
            res2 = check_one(p)
            assert res2 == (0, 0, 0), f"{p}: check -r leaks left {res2}"
    if repair_leaks:
        assert read_all(path) == before, f"{path}: check -r leaks changed the content"

"""Start-up rules: what ``vdtool info`` and ``vdtool check`` import (no
timings here: what is imported is what start-up costs, and it does not
depend on the machine's load), the quick path of ``vdtool info FILE``
against the click command line, and the magic tests that spare probing
the import of every format's layout module."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from peers import qemu_make
from vdrun import vdtool_env
from vdtool.core import registry

# modules only some commands need; every one costs milliseconds of start-up
HEAVY = ("rich", "tqdm", "concurrent.futures", "xxhash", "hashlib", "dataclasses", "importlib.metadata", "isal",
         "zstandard", "backports.zstd", "secrets")
CLICK = ("click", "inspect")
# costs as much as the rest of info's start-up; click imports it, the quick paths must not
TYPING = "typing"

_LIST_MODULES = """
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write("\\nMODULES " + " ".join(sorted(sys.modules)) + "\\n"))
sys.argv = ["vdtool", *sys.argv[1:]]
runpy.run_module("vdtool", run_name="__main__")
"""


def _run(*args, env=None, flags=()) -> tuple:
    """(exit status, stdout, stderr without the module list, modules) of
    ``python FLAGS -m vdtool ARGS``, stdout a pipe as in a script."""
    proc = subprocess.run([sys.executable, *flags, "-c", _LIST_MODULES, *map(str, args)], capture_output=True,
                          text=True, env=env or vdtool_env(), timeout=120)
    err, _, mods = proc.stderr.rpartition("\nMODULES ")
    return proc.returncode, proc.stdout, err, set(mods.split())


def _loads_typing(*args) -> bool:
    """Whether ``python -S -m vdtool ARGS`` imports typing.  -S: site's .pth
    files (an editable install's finder, ...) may import typing before
    vdtool runs, which would hide vdtool's own import."""
    code, out, err, mods = _run(*args, flags=("-S",))
    assert "Traceback" not in err and "vdtool.core.registry" in mods, err  # vdtool did run
    return TYPING in mods


def _click_cli(*args) -> tuple:
    """(exit status, stdout, stderr) of the click command line itself."""
    code = "import sys; from vdtool.cli import main; sys.argv = ['vdtool', *sys.argv[1:]]; main()"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=vdtool_env(), timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("startup")
    out = {}
    for fmt, name in (("qcow2", "a.qcow2"), ("vpc", "a.vhd"), ("vmdk", "a.vmdk"), ("vdi", "a.vdi"),
                      ("qed", "a.qed"), ("vhdx", "a.vhdx"), ("qcow", "a.qcow"), ("parallels", "a.hdd")):
        out[fmt] = qemu_make(d, name, fmt, "64M", "write -P 7 1M 128k")
    return out


def test_info_imports_neither_click_nor_heavy_modules(images):
    for fmt, path in images.items():
        code, out, err, mods = _run("info", path)
        assert code == 0 and f"image: {path}" in out, err
        assert not mods & {*HEAVY, *CLICK, "json", "uuid"}, (fmt, sorted(mods & {*HEAVY, *CLICK, "json", "uuid"}))
        assert not _loads_typing("info", path), fmt
        # the probe imports the layouts of the formats whose magic matches, not all of them
        layouts = {m for m in mods if m.startswith("vdtool.formats.") and m.endswith(".layout")}
        assert len(layouts) <= 2, (fmt, sorted(layouts))
    code, out, err, mods = _run("info", "--output", "json", images["qcow2"])
    assert code == 0 and '"format": "qcow2"' in out and not mods & {*HEAVY, *CLICK}, sorted(mods & {*HEAVY, *CLICK})
    assert not _loads_typing("info", "--output", "json", images["qcow2"])


def test_check_and_version_import_only_what_they_need(images):
    for fmt in images:
        code, out, err, mods = _run("check", images[fmt])
        assert code == 0 and "No errors were found" in out, err
        assert not mods & {*HEAVY, *CLICK}, (fmt, sorted(mods & {*HEAVY, *CLICK}))
        assert not _loads_typing("check", images[fmt]), fmt
    code, out, err, mods = _run("check", "-q", images["qcow2"])  # an option: the click command line
    assert code == 0 and "click" in mods and not mods & set(HEAVY), sorted(mods & set(HEAVY))
    code, out, err, mods = _run("--version")
    assert code == 0 and out.startswith("vdtool ")
    assert not {m for m in mods if m.startswith(("vdtool.formats", "vdtool.core.ops", "vdtool.commands."))}


def test_read_only_formats_start_without_typing(tmp_path):
    """raw, bochs (bximage), cloop (create_compressed_fs) and DMG (built from
    the specification): info and check load no typing either."""
    import dmgkit
    import peers

    raw = tmp_path / "a.img"
    raw.write_bytes(bytes(range(256)) * 4096)
    paths = [raw, tmp_path / "a.bochs", tmp_path / "a.cloop", tmp_path / "a.dmg"]
    peers.run("bximage", "-func=convert", "-imgmode=growing", "-q", raw, paths[1])
    peers.run("create_compressed_fs", "-q", "-B", "16384", raw, paths[2])
    dmgkit.build(paths[3], [("Apple_HFS", [("zlib", bytes(range(256)) * 64), ("zero", bytes(4096))])])
    for path in paths:
        for cmd, want in (("info", 0), ("check", 63)):  # 63: check is not supported for these formats
            code, out, err, mods = _run(cmd, path)
            assert code == want, (cmd, path, err)
            assert not mods & {*HEAVY, *CLICK}, (cmd, path, sorted(mods & {*HEAVY, *CLICK}))
            assert not _loads_typing(cmd, path), (cmd, path)


def test_quick_info_prints_what_the_click_command_prints(images, tmp_path):
    odd = tmp_path / "with \x1b[31m escape.qcow2"  # click strips escape sequences when stdout is not a terminal
    os.link(images["qcow2"], odd)
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + bytes(60))  # a qcow2 magic with a header that cannot be
    cases = [("info", images["vpc"]), ("info", "--output", "json", images["vmdk"]),
             ("info", "--output=json", images["vdi"]), ("info", "--output=text", images["qcow"]),
             ("info", odd), ("info", tmp_path / "missing.img"), ("info", tmp_path), ("info", junk),
             ("info", "--output", "json", junk)]
    for args in cases:
        code, out, err, mods = _run(*args)
        assert ("click" in mods) == (args[-1] == odd), args  # click.echo itself prints escape sequences
        assert (code, out, err) == _click_cli(*args), args
    # forms the quick path leaves to click run there, as before
    for args in (("info", "-f", "qcow2", images["qcow2"]), ("info", "--backing-chain", images["qcow2"]),
                 ("info", images["qcow2"], "--output", "json"), ("info", "-U", images["qcow2"]), ("info",),
                 ("info", "--output", "yaml", images["qcow2"])):
        code, out, err, mods = _run(*args)
        assert "click" in mods, args
        assert (code, out, err) == _click_cli(*args), args
    code, out, err, mods = _run("info", images["qcow2"], env=vdtool_env(VDTOOL_UNTRUSTED="1"))
    assert "click" in mods and code == 0


def test_quick_check_prints_what_the_click_command_prints(images, tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(images["qcow2"].read_bytes())
    with open(bad, "r+b") as f:  # a refcount of 0 for the header cluster: one corruption
        f.seek(int.from_bytes(bad.read_bytes()[48:56], "big"))
        rt = int.from_bytes(f.read(8), "big")
        f.seek(rt)
        f.write(bytes(2))
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(65536))
    cases = [("check", images["vdi"]), ("check", "--output", "json", images["vpc"]), ("check", bad),
             ("check", "--output=json", bad), ("check", "--output=text", images["qed"]), ("check", raw),
             ("check", tmp_path / "missing.img"), ("check", tmp_path)]
    for args in cases:
        code, out, err, mods = _run(*args)
        assert "click" not in mods, args
        assert (code, out, err) == _click_cli(*args), args
    assert _run("check", bad)[0] == 2 and _run("check", raw)[0] == 63
    code, out, err, mods = _run("check", images["vdi"], env=vdtool_env(VDTOOL_PROGRESS="qemu"))
    assert "click" in mods and code == 0


def _probe_samples(images) -> list:
    """(head, tail, size) of real images, of files with each format's magic
    and random bytes after it, and of those with bytes changed."""
    rng = random.Random(17)
    out = []
    for path in images.values():
        data = open(path, "rb").read()
        out.append((data[:65536], data[-4096:], len(data)))
    for magic in (b"QFI\xfb\0\0\0\x01", b"QFI\xfb\0\0\0\x03", b"QED\0", b"KDMV", b"COWD", b"vhdxfile", b"conectix",
                  b"WithoutFreeSpace", b"WithouFreSpacExt", b"Bochs Virtual HD Image\0", b"#!/bin/sh\n#V2.0",
                  b"# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\n"):
        for n in (len(magic), 512, 4096):
            out.append((magic + rng.randbytes(n), b"", n + len(magic)))
    vdi = bytearray(512)
    vdi[64:68] = b"\x7f\x10\xda\xbe"
    out.append((bytes(vdi), b"", 512))
    tail = bytearray(4096)
    tail[-512:-504] = b"conectix"
    tail[-1024:-1020] = b"koly"
    out.append((bytes(512), bytes(tail), 1 << 20))
    for head, tail, size in list(out):
        for _ in range(3):
            h = bytearray(head)
            for _ in range(4):
                if h:
                    h[rng.randrange(min(len(h), 128))] = rng.randrange(256)
            out.append((bytes(h), tail, size))
    return out


def test_sniff_hints_pass_every_file_a_layout_recognises(images):
    assert set(registry.SNIFF_IF) <= set(registry.LAYOUTS)
    for head, tail, size in _probe_samples(images):
        for name in registry.LAYOUTS:
            hint = registry.SNIFF_IF.get(name)
            if hint is not None and registry.layout_module(name).sniff(head, tail, size):
                assert hint(head, tail), (name, head[:32], tail[-16:])
    for fmt, path in images.items():
        assert registry.probe_format(str(path)) == {"vpc": "vhd"}.get(fmt, fmt)

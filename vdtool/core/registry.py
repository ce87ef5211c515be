"""Which formats exist, how to load them, and probing by content.

Built-in backends are named by "module:Class" strings and imported only when
used, so ``vdtool --version`` and ``info`` on one format stay fast.  Formats of
the CLI contract without a backend yet are still recognised by their magic, so
a user gets "not implemented yet" rather than a wrong guess of raw."""

from __future__ import annotations

import importlib
import os
import sys
from collections import namedtuple

from vdtool.core.errors import NotImplementedFormat, UsageError, VdError

# name -> "module:Class"
BUILTIN = {
    "raw": "vdtool.formats.raw:RawBackend",
    "qcow2": "vdtool.formats.qcow2.backend:Qcow2Backend",
    "vhd": "vdtool.formats.vhd.backend:VhdBackend",
    "vmdk": "vdtool.formats.vmdk.backend:VmdkBackend",
    "vdi": "vdtool.formats.vdi.backend:VdiBackend",
    "vhdx": "vdtool.formats.vhdx.backend:VhdxBackend",
    "qed": "vdtool.formats.qed.backend:QedBackend",
    "qcow": "vdtool.formats.qcow.backend:QcowBackend",
    "parallels": "vdtool.formats.parallels.backend:ParallelsBackend",
    "dmg": "vdtool.formats.dmg.backend:DmgBackend",
    "bochs": "vdtool.formats.bochs.backend:BochsBackend",
    "cloop": "vdtool.formats.cloop.backend:CloopBackend",
}

ALL_FORMATS = ("raw", "qcow2", "qcow", "qed", "vdi", "vmdk", "vhd", "vhdx", "parallels", "dmg", "bochs", "cloop")
ALIASES = {"vpc": "vhd"}
EXTENSIONS = {
    ".img": "raw", ".raw": "raw", ".qcow2": "qcow2", ".qcow": "qcow", ".qed": "qed", ".vdi": "vdi",
    ".vmdk": "vmdk", ".vhd": "vhd", ".vhdx": "vhdx", ".hdd": "parallels", ".hds": "parallels", ".dmg": "dmg",
}

_loaded: dict = {}
_plugins: dict | None = None


def _plugins_declared() -> bool:
    """Does any installed distribution declare a vdtool.formats entry point?
    A look at the entry_points.txt files on sys.path (a few ms), so that
    importlib.metadata (~18 ms of imports) only loads where plugins exist.
    Anything this scan cannot see through (a zip or egg on sys.path) counts
    as yes."""
    for entry in sys.path:
        folder = entry or "."
        if not os.path.isdir(folder) or folder.endswith(".egg"):
            if os.path.exists(folder):
                return True
            continue
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                ep = os.path.join(folder, name, "entry_points.txt")
            elif name.endswith(".egg"):
                return True
            else:
                continue
            try:
                with open(ep, "rb") as f:
                    if b"vdtool.formats" in f.read():
                        return True
            except OSError:
                continue
    return False


def _plugin_specs() -> dict:
    global _plugins
    if _plugins is None:
        _plugins = {}
        if not _plugins_declared():
            return _plugins
        try:
            from importlib.metadata import entry_points

            for ep in entry_points(group="vdtool.formats"):
                _plugins[ep.name] = ep.value
        except Exception:  # a broken third-party plugin must not break vdtool
            _plugins = {}
    return _plugins


# Where vdtool's format name differs from the name QEMU's driver has (which
# is what qcow2's backing-format extension must hold for qemu-img to open it).
QEMU_DRIVER_NAMES = {"vhd": "vpc"}


def qemu_driver_name(name: str) -> str:
    return QEMU_DRIVER_NAMES.get(name, name)


def canonical_name(name: str) -> str:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in ALL_FORMATS and n not in BUILTIN and n not in _plugin_specs():
        import difflib

        close = difflib.get_close_matches(n, [*ALL_FORMATS, *ALIASES], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown format {name!r}{hint}; known formats: {', '.join(ALL_FORMATS)} (vpc = vhd)")
    return n


def implemented() -> list:
    return list(BUILTIN) + [n for n in _plugin_specs() if n not in BUILTIN]


def get_backend(name: str, path: str | None = None):
    n = canonical_name(name)
    if n in _loaded:
        return _loaded[n]
    spec = BUILTIN.get(n) or _plugin_specs().get(n)
    if spec is None:
        raise NotImplementedFormat(n, path)
    module, _, cls = spec.partition(":")
    if n in BUILTIN:
        backend = getattr(importlib.import_module(module), cls)
    else:
        # A broken third-party plugin must not break vdtool: probing asks
        # every backend, so an ImportError here used to be a traceback for
        # every file.  Report it as a VdError naming the plugin instead.
        try:
            backend = getattr(importlib.import_module(module), cls)
        except Exception as e:
            raise VdError(f"the {n} format plugin ({spec}) cannot be loaded: {e}", path) from None
    _loaded[n] = backend
    return backend


def format_for_extension(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return EXTENSIONS.get(ext)


# The built-in formats' layout modules: their ``sniff(head, tail, size)``
# recognises the format's magic (a layout module imports no backend, so
# probing a file costs a few small imports), ``inspect_untrusted`` reads
# what the header references (vdtool.core.untrusted).
LAYOUTS = {
    "qcow2": "vdtool.formats.qcow2.layout",
    "vdi": "vdtool.formats.vdi.layout",
    "vmdk": "vdtool.formats.vmdk.layout",
    "vhd": "vdtool.formats.vhd.layout",
    "vhdx": "vdtool.formats.vhdx.layout",
    "qed": "vdtool.formats.qed.layout",
    "qcow": "vdtool.formats.qcow.layout",
    "parallels": "vdtool.formats.parallels.layout",
    "dmg": "vdtool.formats.dmg.layout",
    "bochs": "vdtool.formats.bochs.layout",
    "cloop": "vdtool.formats.cloop.layout",
}

# A test on the probe data that every file a layout's ``sniff`` recognises
# passes (its magic, where it must be), so that probing one file imports
# the one or two layout modules that may match instead of all of them (about
# 10 ms of start-up).  A format without an entry here is always sniffed.
# tests/test_startup.py holds every entry to its sniff.
SNIFF_IF = {
    "qcow2": lambda head, tail: head[:4] == b"QFI\xfb",
    "qcow": lambda head, tail: head[:4] == b"QFI\xfb",
    "vdi": lambda head, tail: head[64:68] == b"\x7f\x10\xda\xbe",
    "vmdk": lambda head, tail: head[:4] in (b"KDMV", b"COWD") or b"# Disk DescriptorFile" in head[:1024],
    "vhd": lambda head, tail: head[:8] == b"conectix" or b"conectix" in tail[-512:],
    "vhdx": lambda head, tail: head[:8] == b"vhdxfile",
    "qed": lambda head, tail: head[:4] == b"QED\0",
    "parallels": lambda head, tail: head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"),
    "dmg": lambda head, tail: b"koly" in tail,
    "bochs": lambda head, tail: head[:22] == b"Bochs Virtual HD Image",
    "cloop": lambda head, tail: head[:12] == b"#!/bin/sh\n#V",
}

# Formats of the CLI contract without a backend yet, by the magic at their
# start (or a UDIF trailer's), so that they are refused by name instead of
# being read as raw.
_PENDING_MAGIC = (
)


def layout_module(name: str):
    """The layout module of built-in format ``name`` (see LAYOUTS)."""
    return importlib.import_module(LAYOUTS[name])


def _magic_scores(head: bytes, tail: bytes, size: int) -> dict:
    """Scores from magic alone; a backend's own probe can raise its entry,
    never lower it."""
    s = {}
    for name in LAYOUTS:
        maybe = SNIFF_IF.get(name)
        if maybe is not None and not maybe(head, tail):
            continue
        score = layout_module(name).sniff(head, tail, size)
        if score:
            s[name] = score
    for name, matches in _PENDING_MAGIC:
        if matches(head, tail):
            s[name] = 100
    return s


class ProbeData(namedtuple("ProbeData", ("head", "tail", "size"))):
    """What probing looks at: the first 64 KiB, the last 4 KiB and the size.
    Read once per open and handed to the probe and to the ``--untrusted``
    inspection (the backend reads its header again under its lock: bytes
    read before the lock may have changed by then)."""

    __slots__ = ()  # head: bytes, tail: bytes, size: int


def read_probe_data(path: str) -> ProbeData:
    from vdtool.core.fileio import open_file

    # a momentary look at the bytes: no lock (the open that follows locks)
    with open_file(path, lock=False) as f:
        size = f.size()
        head = f.pread(0, 65536)
        tail = f.pread(max(0, size - 4096), min(size, 4096)) if size else b""
    return ProbeData(head, tail, size)


def probe_scores(path: str, data: ProbeData | None = None) -> dict:
    """Scores by content.  Built-in backends are imported only when their
    magic matched (start-up time), then their own probe gives the score;
    third-party formats probe when no built-in one is sure; raw scores 1.
    ``data``: the file's probe data when the caller has read it already."""
    head, tail, size = data if data is not None else read_probe_data(path)
    scores = _magic_scores(head, tail, size)
    scores["raw"] = 1
    candidates = [n for n in scores if n in BUILTIN and n != "raw"]
    if max(scores.values()) < 100:
        # listing entry points costs ~15 ms of start-up: ask third-party
        # formats only when no built-in format is sure of the file
        candidates += [n for n in _plugin_specs() if n not in BUILTIN]
    for name in candidates:
        try:
            backend = get_backend(name)
        except VdError:
            continue
        # A backend may be surer than the magic, never less sure: a qcow2
        # magic with a version the backend does not know (4) used to drop
        # to raw, and opening a real image as raw lets writes destroy it.
        # Recognised by magic, it is now opened by its backend, which
        # refuses it with a VdError naming the version.
        scores[name] = max(scores.get(name, 0), backend.probe(head, tail, size))
    return {k: v for k, v in scores.items() if v > 0}


def probe_format(path: str, data: ProbeData | None = None) -> str:
    """The best-scoring format; raw (score 1) wins only when nothing else does."""
    scores = probe_scores(path, data)
    if not scores:
        return "raw"
    return max(scores.items(), key=lambda kv: (kv[1], kv[0] != "raw"))[0]

"""The package's shape, checked from the source: no import cycles (function-
level imports count too: they used to hide four), no module reaching into
another module's underscore names, and no header field read at a raw offset
outside a format's layout module."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "vdtool")


def _modules() -> dict:
    """dotted name -> (path, ast)"""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, os.path.join(ROOT, "..")).replace(os.sep, ".")[:-3]
            if rel.endswith(".__init__"):
                rel = rel[:-len(".__init__")]
            with open(path, encoding="utf-8") as fh:
                out[rel] = (path, ast.parse(fh.read(), path))
    return out


MODULES = _modules()


def _package(name: str) -> str:
    path = MODULES[name][0]
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def _resolve(mod: str, node) -> list:
    """(imported module, imported names) for an Import/ImportFrom inside
    ``mod``, vdtool modules only."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.startswith("vdtool"):
                out.append((a.name, None, a.asname))
        return out
    if node.level:
        base = _package(mod)
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if not target.startswith("vdtool"):
        return out
    for a in node.names:
        sub = f"{target}.{a.name}"
        if sub in MODULES:  # "from package import module"
            out.append((sub, None, a.asname or a.name))
        else:
            out.append((target, a.name, a.asname or a.name))
    return out


def _imports():
    for mod, (_, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name, alias in _resolve(mod, node):
                    yield mod, target, name, alias, node.lineno


def test_no_import_cycles():
    graph: dict = {m: set() for m in MODULES}
    for mod, target, _, _, _ in _imports():
        # importing a.b.c runs a and a.b first
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            t = ".".join(parts[:i])
            if t in MODULES and t != mod and not mod.startswith(t + "."):
                graph[mod].add(t)
    cycles = []
    state: dict = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    """``from x import _name`` of another module, an underscore module of
    another package, or ``alias._name`` on an imported module."""
    bad = []
    aliases: dict = {}
    for mod, target, name, alias, line in _imports():
        if name is not None and _private(name) and target != mod:
            bad.append(f"{mod}:{line} imports {target}.{name}")
        leaf = target.rpartition(".")[2]
        if name is None and _private(leaf) and _package(mod) != target.rpartition(".")[0]:
            bad.append(f"{mod}:{line} imports the private module {target}")
        if name is None or f"{target}.{name}" in MODULES:
            aliases.setdefault(mod, {})[alias or target] = target
    for mod, (_, tree) in MODULES.items():
        known = aliases.get(mod, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                if node.value.id in known:
                    bad.append(f"{mod}:{node.lineno} uses {known[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def _typing_imports(node):
    """Line numbers of ``import typing`` / ``from typing import`` under
    ``node`` that run: not inside an ``if TYPE_CHECKING:`` block."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        yield from (n for child in node.orelse for n in _typing_imports(child))
        return
    if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "typing" for a in node.names) or \
            isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "typing":
        yield node.lineno
    for child in ast.iter_child_nodes(node):
        yield from _typing_imports(child)


def test_no_typing_at_run_time():
    """Importing ``typing`` costs as much as the rest of ``vdtool info``'s
    start-up: annotations are never evaluated (``from __future__ import
    annotations``), so they use ``X | None`` and collections.abc, tuples are
    collections.namedtuple, and the rest waits under ``TYPE_CHECKING =
    False`` / ``if TYPE_CHECKING:`` (type checkers read it; nothing runs)."""
    bad = [f"{mod}:{line}" for mod, (_, tree) in MODULES.items() for line in _typing_imports(tree)]
    assert not bad, "typing imported at run time: " + ", ".join(bad)


def _const_int(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, int) else None


@pytest.mark.parametrize("mod", [m for m in MODULES if m.startswith("vdtool.core") or m.startswith("vdtool.formats")])
def test_headers_read_only_in_layout_modules(mod):
    """``unpack_from(buf, <constant offset>)`` and ``buf[<const>:<const>]``
    passed to ``unpack`` are a header field read at a raw offset: they
    belong in the format's layout module, declared with core.layout."""
    if mod.endswith(".layout") or mod == "vdtool.core.layout":
        return
    bad = []
    for node in ast.walk(MODULES[mod][1]):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "unpack_from":
            args = node.args[1:] if isinstance(node.func.value, ast.Name) and node.func.value.id == "struct" \
                else node.args
            offs = [a for a in args[1:2]] + [k.value for k in node.keywords if k.arg == "offset"]
            if any((_const_int(o) or 0) > 0 for o in offs):
                bad.append(f"line {node.lineno}: unpack_from at a constant offset")
        elif node.func.attr == "unpack":
            for a in node.args:
                if isinstance(a, ast.Subscript) and isinstance(a.slice, ast.Slice) and \
                        (_const_int(a.slice.lower) or 0) > 0:
                    bad.append(f"line {node.lineno}: unpack of a constant slice")
    assert not bad, f"{mod}: " + "; ".join(bad)

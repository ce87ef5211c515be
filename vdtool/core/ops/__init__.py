"""Operations: plain functions over images, used by the CLI and the Python
API alike (VirtualBox's VDCreate/VDCopy/VDCompact/VDResize/VDMerge).

``vdtool.core.ops.convert`` (and the others) load on first use: ``vdtool
info`` should not pay for importing convert's staging or merge's chain
logic.  The implementations live in ``_convert.py`` and so on; modules
named like the functions would replace them as package attributes the
moment anything imported them."""

from __future__ import annotations

import importlib

_WHERE = {
    "check": "_check", "compact": "_compact", "convert": "_convert", "ConvertResult": "_convert",
    "create": "_create", "discard": "_discard", "human_lines": "_info", "info": "_info", "merge": "_merge",
    "rebase": "_rebase", "resize": "_resize",
    "measure": "_measure",
    "checksum": "_checksum",
    "amend": "_amend",
    "snapshot": "_snapshot", "snapshot_table": "_snapshot",
    "map": "_map", "MapEntry": "_map", "map_human_lines": "_map",
    "compare": "_compare", "CompareResult": "_compare",
}

__all__ = ["check", "compact", "convert", "ConvertResult", "create", "discard", "human_lines", "info", "merge",
           "rebase", "resize"]
__all__ += ["measure"]
__all__ += ["snapshot", "snapshot_table"]
__all__ += ["checksum"]
__all__ += ["amend"]
__all__ += ["map", "MapEntry", "map_human_lines", "compare", "CompareResult"]


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

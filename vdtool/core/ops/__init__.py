"""Operations: plain functions over images, used by the CLI and the Python
API alike (VirtualBox's VDCreate/VDCopy/VDCompact/VDResize/VDMerge).

Each op lives in its own module and is imported on first use, so a command
pays only for the op it runs."""

import importlib

_OPS = {
    "check": "check", "compact": "compact", "convert": "convert", "ConvertResult": "convert",
    "create": "create", "discard": "discard", "info": "info", "merge": "merge", "rebase": "rebase",
    "resize": "resize",
}

__all__ = sorted(_OPS)


def __getattr__(name):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(name)
    value = getattr(importlib.import_module(f"vdtool.core.ops.{module}"), name)
    globals()[name] = value
    return value

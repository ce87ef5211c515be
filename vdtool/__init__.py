"""vdtool: read, write and convert virtual disk images.

Python API::

    import vdtool
    with vdtool.open("disk.qcow2") as disk:      # the whole chain, read-only
        data = disk.read(0, 512)
        status, n, level = disk.block_status(0, disk.virtual_size)

    vdtool.ops.convert("disk.qcow2", "disk.raw")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["open", "__version__", "VdError"]

from vdtool.core.errors import VdError  # noqa: E402  (cheap: no format imported)


def open(path: str, format: str | None = None, *, writable: bool = False, parent_search=(), force: bool = False):
    """Open an image and its chain of parents as an ImageStack (a context
    manager with read, readinto, write, write_zeroes, discard,
    block_status, flush, close)."""
    from vdtool.core.stack import open_image

    return open_image(path, format, writable=writable, parent_search=parent_search, force=force)


def __getattr__(name):
    if name == "ops":
        import importlib

        return importlib.import_module("vdtool.core.ops")
    raise AttributeError(name)

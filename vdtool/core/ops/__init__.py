"""Operations: plain functions over images, used by the CLI and the Python
API alike (VirtualBox's VDCreate/VDCopy/VDCompact/VDResize/VDMerge).

Imported eagerly: a lazy ``__getattr__`` here is shadowed by the submodule of
the same name as soon as anything imports ``vdtool.core.ops.info`` directly.
The op modules keep their own heavy imports (thread pools, xxhash) inside
the functions that need them, so this stays cheap."""

from vdtool.core.ops.check import check
from vdtool.core.ops.compact import compact
from vdtool.core.ops.convert import ConvertResult, convert
from vdtool.core.ops.create import create
from vdtool.core.ops.discard import discard
from vdtool.core.ops.info import info
from vdtool.core.ops.merge import merge
from vdtool.core.ops.rebase import rebase
from vdtool.core.ops.resize import resize

__all__ = ["check", "compact", "convert", "ConvertResult", "create", "discard", "info", "merge", "rebase",
           "resize"]

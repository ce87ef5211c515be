"""Error kinds.  Every message names the file and the actual values, so the
CLI can print it as one line: ``vdtool: error: MESSAGE``."""

from __future__ import annotations


class VdError(Exception):
    """Base of every error vdtool reports to the user (exit status 1)."""

    exit_code = 1

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class FormatError(VdError):
    """The file is not an image of the expected format (bad magic, version)."""


class CorruptImageError(VdError):
    """A field or table read from the file is out of range or inconsistent."""


class UnsupportedFeature(VdError):
    """The image uses a feature vdtool does not implement (encryption, ...)."""


class NotSupported(VdError):
    """An operation the format (or vdtool, for now) cannot do."""

    def __init__(self, op: str, fmt: str, path: str | None = None, why: str = ""):
        msg = f"{op} is not supported for {fmt} images"
        if why:
            msg += f" ({why})"
        super().__init__(msg, path)
        self.op = op
        self.fmt = fmt


class NotImplementedFormat(VdError):
    """A format named by the CLI contract that has no backend yet."""

    def __init__(self, fmt: str, path: str | None = None):
        super().__init__(f"the {fmt} format is not implemented yet in vdtool", path)
        self.fmt = fmt


class ReadOnlyError(VdError):
    """A write to an image opened read-only."""


class ChainError(VdError):
    """The chain of parents is broken: missing parent, mismatch, loop, depth."""


class ImageInUse(VdError):
    """Another process holds the image (QEMU-compatible locks)."""


class OperationCancelled(VdError):
    """A progress callback asked the operation to stop."""

    exit_code = 130

    def __init__(self, message: str = "operation cancelled", path: str | None = None):
        super().__init__(message, path)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (a cancelled CI job, ``docker stop``, a
    closed terminal).  A KeyboardInterrupt, so every cleanup that runs for
    Ctrl-C runs for it too; the exit status is 128 + the signal number."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class UsageError(VdError):
    """Bad arguments that only show up below the CLI (bad size, bad option)."""

    exit_code = 2

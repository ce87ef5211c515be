"""Notices: warnings from the core (probing, spooling, references outside
an image's folder) that the CLI prints as one line on stderr."""

from __future__ import annotations

from collections.abc import Callable

_handler: Callable[[str], None] | None = None
recent: list = []  # the last notices given, for tests and the Python API


def set_notice_handler(fn: Callable[[str], None] | None) -> None:
    """The CLI prints notices as ``vdtool: warning: ...`` on stderr."""
    global _handler
    _handler = fn


def notice(text: str) -> None:
    recent.append(text)
    del recent[:-100]
    if _handler is not None:
        _handler(text)

"""Output for a person at a terminal: colour for errors and warnings,
tables where a list reads better as one (rich).

Only when the stream is a terminal, TERM is not "dumb" and NO_COLOR is not
set (https://no-color.org): piped or JSON output stays plain text, exactly
as documented, so scripts never see escape codes.  rich is imported only
here and only when something is drawn (it costs tens of milliseconds of
start-up).  Progress bars stay on tqdm: they already draw in place with a
rate and ETA, and work where rich's Live display needs a full terminal."""

from __future__ import annotations

import os
import sys


def is_terminal(stream) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console(stream):
    from rich.console import Console

    return Console(file=stream, highlight=False, soft_wrap=True)


def message_line(prefix: str, text: str, style: str, stream=None) -> None:
    """``prefix`` (e.g. "vdtool: error:") then ``text`` on one line; the
    prefix coloured on a terminal."""
    stream = stream or sys.stderr
    if not is_terminal(stream):
        stream.write(f"{prefix} {text}\n")
        stream.flush()
        return
    from rich.markup import escape

    _console(stream).print(f"[{style}]{escape(prefix)}[/] {escape(text)}")


def table(columns: list, rows: list, stream=None, title: str | None = None) -> bool:
    """Draw ``rows`` under ``columns`` as a table on a terminal; False (and
    nothing drawn) when the stream is not one."""
    stream = stream or sys.stdout
    if not is_terminal(stream):
        return False
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c.endswith("size") else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    _console(stream).print(t)
    return True


def styled_lines(lines: list, styles: dict, stream=None) -> None:
    """Print ``lines``; on a terminal, a line found in ``styles`` gets that
    style (check's summary: green when clean, red for corruptions...)."""
    stream = stream or sys.stdout
    if not is_terminal(stream):
        stream.write("\n".join(lines) + "\n")
        stream.flush()
        return
    from rich.markup import escape

    con = _console(stream)
    for line in lines:
        style = next((s for key, s in styles.items() if key in line), None)
        con.print(f"[{style}]{escape(line)}[/]" if style else escape(line))

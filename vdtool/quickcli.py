"""The most common command lines, ``vdtool info FILE`` and ``vdtool check
FILE`` (also with ``--output json``), run without importing click: click
and what it imports (inspect, uuid, datetime, gettext) are about 20 ms,
half of what ``vdtool info`` takes over the interpreter's own start-up.

Only those exact forms are run here, with nothing in the environment that
click would read (VDTOOL_DEBUG, VDTOOL_UNTRUSTED, VDTOOL_PROGRESS, shell
completion); any other command line, option or doubt goes to the click
group (vdtool.cli), which runs the same operation and prints the same
bytes (tests/test_startup.py holds the two to each other).  Errors are
reported by vdtool.cliguard, as the group reports them."""

from __future__ import annotations

import os
import sys

from vdtool.cliguard import exit_status, install_stop_signals, warning

# What click reads from the environment for these command lines: the
# group's and the command's envvar options, and its shell completion
_CLICK_ENV = ("VDTOOL_DEBUG", "VDTOOL_UNTRUSTED", "VDTOOL_PROGRESS", "_VDTOOL_COMPLETE")


def plain_command(argv: list):
    """(command, FILE, output) when ``argv`` is ``info FILE`` or ``info
    --output text|json FILE`` (also ``--output=...``), or the same with
    check; else None."""
    if not argv or argv[0] not in ("info", "check") or any(k in os.environ for k in _CLICK_ENV):
        return None
    rest = list(argv[1:])
    output = "text"
    if len(rest) == 3 and rest[0] == "--output" and rest[1] in ("text", "json"):
        output = rest[1]
        rest = rest[2:]
    elif len(rest) == 2 and rest[0] in ("--output=text", "--output=json"):
        output = rest[0].partition("=")[2]
        rest = rest[1:]
    if len(rest) != 1 or not rest[0] or rest[0].startswith("-"):
        return None
    return argv[0], rest[0], output


def _plain_stdout() -> bool:
    """A standard output click would write to as it is (not missing, not
    an ASCII stream it would wrap)."""
    out = sys.stdout
    if out is None or not hasattr(out, "buffer"):
        return False
    try:
        import codecs

        return codecs.lookup(out.encoding or "ascii").name != "ascii"
    except (LookupError, TypeError):
        return False


def _echo(text: str, err: bool = False) -> None:
    """What click.echo writes for ``text``: the line and a newline, then a
    flush.  Escape sequences (which click strips when the stream is not a
    terminal) are rare in a report: those go through click itself."""
    if "\x1b" in text:
        import click

        click.echo(text, err=err)
        return
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _info(file: str, output: str) -> int:
    """vdtool.commands.info without its options."""
    from vdtool.core.ops import human_lines, info

    result = info(file, None, chain=False, parent_search=(), force=False, untrusted=False, force_share=False)
    if output == "json":
        import json

        _echo(json.dumps(result, indent=4))
    else:
        _echo("\n".join(human_lines(result)))
    return 0


def _check(file: str, output: str) -> int:
    """vdtool.commands.check without its options."""
    from vdtool.checkreport import print_report, run_check
    from vdtool.progressbar import operation

    with operation("Checking", quiet=False, force=False, mode=None, op="check") as progress:
        result = run_check(file, None, progress, repair=None, parent_search=(), force=False, untrusted=False,
                           force_share=False)
    print_report(result, file, output, False, _echo)
    return result.exit_code


def main(argv: list) -> None:
    """Run ``argv`` and exit when it is one of the plain forms; return
    (having done nothing) when it needs the full command line."""
    plan = plain_command(argv)
    if plan is None or not _plain_stdout():
        return
    command, file, output = plan
    from vdtool.core import untrusted

    untrusted.set_notice_handler(warning)  # no -q given: every notice is shown
    install_stop_signals()
    try:
        status = (_info if command == "info" else _check)(file, output)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- reported as the click group reports it
        status = exit_status(e, False)
    sys.exit(status)


def entry() -> None:
    """The command line: the quick path when it applies, else the click
    group (``python -m vdtool``; an installed ``vdtool`` script that names
    this function starts as fast)."""
    main(sys.argv[1:])
    from vdtool.cli import main as click_main

    click_main()

"""The vdtool command line: a click group whose subcommands live one per
module in vdtool/commands and are imported only when used, so that
``vdtool --version`` imports no command, no format, no rich and no tqdm.

Errors are turned into one line on stderr here, in one place:
``vdtool: error: MESSAGE``."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from vdtool import __version__
from vdtool.core.errors import Terminated

COMMANDS = ("create", "info", "convert", "compact", "resize", "merge", "discard", "check", "rebase", "measure", "checksum", "amend", "snapshot", "map", "compare")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def _error(message: str) -> None:
    try:
        from vdtool.terminal import message_line

        message_line("vdtool: error:", _one_line(message), "bold red")
    except Exception:
        pass


def _quiet_broken_pipe() -> None:
    """stdout went away (``vdtool info x | head -1``): no more output."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception:
        pass


def _notice(text: str) -> None:
    """Warnings from the core (probing, references outside the image's
    folder): one line on stderr, unless the command was given -q."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("quiet"):
        return
    try:
        from vdtool.terminal import message_line

        message_line("vdtool: warning:", _one_line(text), "bold yellow")
    except Exception:
        pass


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _raise_terminated(signum, frame):
    # once is enough: a second signal must not interrupt the cleanup
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_late_signals_hooked = False


def _ignore_late_stop_signals() -> None:
    """At exit: CPython puts the default actions back while it shuts down, so
    a SIGTERM in the last moments would kill vdtool after its work is done
    (status -15 instead of the one it has); from here on they are ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def _install_stop_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (staging folders removed,
    locks released) instead of killing the process where it stands;
    long operations first ask to stop at their next safe point (see
    vdtool.progressbar).  A signal ignored by whoever started vdtool
    (nohup) stays ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread (an embedding program)
            pass
    global _late_signals_hooked
    if not _late_signals_hooked:
        import atexit

        atexit.register(_ignore_late_stop_signals)
        _late_signals_hooked = True
    # SIGUSR1 asks a long operation for a progress line (vdtool.progressbar);
    # before or between operations it must not kill vdtool (its default)
    try:
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


class LazyGroup(click.Group):
    """Loads ``vdtool.commands.<name>`` only when the command is needed,
    and maps every exception a command raises to one error line."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"vdtool.commands.{name}")
        return module.command

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            hint = _did_you_mean(name, COMMANDS)
            raise click.UsageError(f"no such command {name!r}{hint}; the commands are {', '.join(COMMANDS)}",
                                   ctx)
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        """Usage errors as one line too: ``vdtool: error: MESSAGE (see
        'vdtool COMMAND --help')``, exit status 2.  ``standalone_mode=False``
        (an embedding program) gets click's exceptions as they are."""
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare "vdtool": the help, as click gives it
                click.echo(e.format_message())
                sys.exit(e.exit_code)
            names = []
            c = e.ctx
            while c is not None and c.parent is not None:
                names.insert(0, c.info_name)
                c = c.parent
            _error(f"{e.format_message()} (see '{' '.join(['vdtool', *names])} --help')")
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _error(e.format_message())
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def parse_args(self, ctx, args):
        # --progress=MODE: -p/--progress is a flag (a flag that took an
        # optional value would swallow the next argument: "-p SRC DST"), so
        # the valued form is handed to the hidden --progress-mode option
        out = []
        for i, a in enumerate(args):
            if a == "--":
                out += args[i:]
                break
            out.append("--progress-mode=" + a[len("--progress="):] if a.startswith("--progress=") else a)
        return super().parse_args(ctx, out)

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))
        from vdtool.core import untrusted

        untrusted.set_notice_handler(_notice)
        _install_stop_signals()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated as e:
            if debug:
                import traceback

                traceback.print_exc()
            _error(str(e))
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                import traceback

                traceback.print_exc()
            _error("interrupted")
            ctx.exit(130)
        except BrokenPipeError:
            # the reader of standard output went away: stop quietly, with
            # the status a process killed by SIGPIPE reports in a shell
            _quiet_broken_pipe()
            ctx.exit(128 + 13)
        except Exception as e:  # noqa: BLE001 -- this is the one place errors are reported
            from vdtool.core.errors import VdError

            if debug:
                import traceback

                traceback.print_exc()
            if isinstance(e, VdError):
                _error(str(e))
                ctx.exit(getattr(e, "exit_code", 1))
            if isinstance(e, OSError):
                what = e.strerror or str(e)
                if e.filename is not None:
                    what = f"{e.filename}: {what}"
                    if e.filename2 is not None:
                        what = f"{e.filename} -> {e.filename2}: {e.strerror or e}"
                _error(what)
                ctx.exit(1)
            hint = "" if debug else " (run with --debug for the traceback)"
            _error(f"internal error: {type(e).__name__}: {_one_line(e)}{hint}")
            ctx.exit(1)


EPILOG = """\b
Examples:
  vdtool create disk.qcow2 10G
  vdtool create -b base.qcow2 overlay.qcow2
  vdtool info --output json disk.qcow2
  vdtool convert -p disk.vmdk disk.qcow2
  vdtool resize disk.qcow2 +1G
  vdtool check disk.qcow2

\b
Exit status:
  0    success
  1    error (one line on stderr: vdtool: error: MESSAGE)
  2    usage error
  130  interrupted (Ctrl-C); 143 SIGTERM, 129 SIGHUP (nothing half-written is left)
  141  the reader of standard output went away (SIGPIPE)
  check has its own: 2 corruptions, 3 leaks only, 63 no check for the format"""


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@click.version_option(__version__, "--version", prog_name="vdtool", message="%(prog)s %(version)s",
                      help="Show the version and exit.")
@click.option("--debug", is_flag=True, envvar="VDTOOL_DEBUG", show_envvar=True,
              help="Show a traceback when something goes wrong (for bug reports).")
def main(debug: bool) -> None:
    """vdtool: create, inspect, convert and maintain virtual disk images.

    Formats: raw, qcow2, vdi, vmdk, vhd (also called vpc), vhdx, qed, qcow
    and parallels are read and written, alone and in chains that mix them; dmg,
    bochs and cloop are read.  An image may be '-' (standard input or
    output) or, to read, an http(s) URL.  Sizes are bytes or a number with a
    binary suffix (K M G T P E, also KiB, MiB ...): 512, 64K, 10G, 1.5T.  An input image's format is
    probed from its content, never from its name, unless -f names one.  Run
    'vdtool COMMAND --help' for a command's options and examples."""

"""The vdtool command line: a click group whose subcommands live one per
module in vdtool/commands and are imported only when used, so that
``vdtool --version`` imports no command, no format, no rich and no tqdm.

Errors are turned into one line on stderr here, in one place
(vdtool.cliguard, which the click-free quick path for ``vdtool info FILE``
in vdtool.quickcli shares): ``vdtool: error: MESSAGE``."""

from __future__ import annotations

import importlib
import sys

import click

from vdtool import __version__
from vdtool.cliguard import error, exit_status, install_stop_signals, warning

COMMANDS = ("create", "info", "convert", "compact", "resize", "merge", "discard", "check", "rebase", "measure", "checksum", "amend", "snapshot", "map", "compare")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _notice(text: str) -> None:
    """Warnings from the core (probing, references outside the image's
    folder): one line on stderr, unless the command was given -q."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("quiet"):
        return
    warning(text)


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
            error(f"{e.format_message()} (see '{' '.join(['vdtool', *names])} --help')")
            sys.exit(e.exit_code)
        except click.ClickException as e:
            error(e.format_message())
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            error("aborted")
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
        install_stop_signals()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- this is the one place errors are reported
            ctx.exit(exit_status(e, debug))


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

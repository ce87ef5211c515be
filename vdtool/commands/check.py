"""vdtool check"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, long_operation, force_open_option, force_share_option, format_option, image_options,
                                     output_option)
from vdtool.checkreport import EXIT_NO_CHECK, print_report, run_check, text_report

__all__ = ["command", "EXIT_NO_CHECK", "text_report"]  # the report's pieces live in vdtool.checkreport

EPILOG = """\b
Examples:
  vdtool check disk.qcow2
  vdtool check -r leaks disk.qcow2          # free leaked clusters
  vdtool check --output json disk.qcow2

\b
Exit status:
  0   no errors were found
  1   the check could not be completed
  2   the image is corrupted
  3   leaked clusters were found, no corruption
  63  the format has no check
  (the same codes as qemu-img check)"""


@click.command("check", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Check an image's metadata for corruptions and leaks.")
@format_option()
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]), default=None,
              help="Repair what is found: leaks only (safe), or all (corruptions too; may lose data that a "
                   "corrupt table points at).")
@output_option
@click.option("-p", "--progress", "show_progress", is_flag=True,
              help="Show a progress bar on stderr even when stderr is not a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing (text output); the exit status tells.")
@force_share_option
@force_open_option
@image_options
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
def command(file, fmt, repair, output, show_progress, quiet, force_share, parent_search, untrusted, force):
    """Check the metadata of the image FILE.

    Tables in range, no block used twice, reference counts and checksums
    right, parent reachable.  Reports corruptions, leaks (allocated but
    unused blocks) and what was repaired, and sets the exit status as
    qemu-img check does.

    Images are locked as QEMU locks them (OFD locks on their lock bytes):
    one that a running VM or qemu-img holds for writing is refused ("in
    use") unless -U/--force-share is given.

    FILE may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    if force_share and repair:
        raise click.UsageError("-U/--force-share can only be used with read-only access (not with --repair)")
    with long_operation("Checking", quiet=quiet, show_progress=show_progress) as progress:
        result = run_check(file, fmt, progress, repair=repair, parent_search=parent_search, force=force,
                           untrusted=untrusted, force_share=force_share)
    print_report(result, file, output, quiet, click.echo)
    ctx = click.get_current_context()
    ctx.exit(result.exit_code)

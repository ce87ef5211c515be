"""vdtool check"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, long_operation, force_open_option, force_share_option, format_option, image_options,
                                     output_option, print_json)

EXIT_NO_CHECK = 63

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
    from vdtool.core.errors import NotSupported, VdError
    from vdtool.core.ops import check

    try:
        with long_operation("Checking", quiet=quiet, show_progress=show_progress) as progress:
            result = check(file, fmt, repair=repair, parent_search=parent_search, force=force, untrusted=untrusted,
                           force_share=force_share, progress=progress)
    except NotSupported as e:
        if getattr(e, "op", None) != "check":
            raise
        err = VdError(str(e))
        err.exit_code = EXIT_NO_CHECK
        raise err from None
    from vdtool.core.registry import qemu_driver_name

    fmt_name = qemu_driver_name(result.format_name)  # as qemu-img names it: vpc for VHD
    if output == "json":
        for m in result.messages:
            if not quiet:
                click.echo(m, err=True)
        print_json(result.to_json(file, fmt_name))
    elif not quiet:
        from vdtool.terminal import styled_lines

        styled_lines(text_report(result), CHECK_STYLES)
    ctx = click.get_current_context()
    ctx.exit(result.exit_code)


# colours of the report's lines on a terminal (plain text when piped)
CHECK_STYLES = {"No errors were found": "bold green", "errors were found": "bold red", "ERROR": "red",
                "leaked clusters were found": "bold yellow", "Leaked": "yellow", "Repairing": "cyan",
                "internal errors": "bold red"}


def text_report(r) -> list:
    """qemu-img check's wording."""
    lines = [str(m) for m in r.messages]
    if r.corruptions_fixed or r.leaks_fixed:
        if lines:
            lines.append("")
        lines += ["The following inconsistencies were found and repaired:", "",
                  f"    {r.leaks_fixed} leaked clusters", f"    {r.corruptions_fixed} corruptions", ""]
    corruptions = max(r.corruptions - r.corruptions_fixed, 0)
    leaks = max(r.leaks - r.leaks_fixed, 0)
    if not (corruptions or leaks or r.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if corruptions:
            lines += ["", f"{corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if leaks:
            lines += ["", f"{leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if r.check_errors:
            lines += ["", f"{r.check_errors} internal errors have occurred during the check."]
    if r.total_clusters and r.allocated_clusters:
        total, alloc = r.total_clusters, r.allocated_clusters
        lines.append(f"{alloc}/{total} = {100.0 * alloc / total:.2f}% allocated, "
                     f"{100.0 * (r.fragmented_clusters or 0) / alloc:.2f}% fragmented, "
                     f"{100.0 * (r.compressed_clusters or 0) / alloc:.2f}% compressed clusters")
    if r.image_end_offset:
        lines.append(f"Image end offset: {r.image_end_offset}")
    while lines and lines[0] == "":
        lines.pop(0)
    return lines

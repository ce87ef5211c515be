"""What ``vdtool check`` does around the check operation, without click:
the exit status of a format that has no check, and the report in text
(qemu-img check's wording) or JSON.  The click command (vdtool.commands.
check) and the quick path that runs ``vdtool check FILE`` without
importing click (vdtool.quickcli) share it, so both print alike."""

from __future__ import annotations

EXIT_NO_CHECK = 63

# colours of the report's lines on a terminal (plain text when piped)
CHECK_STYLES = {"No errors were found": "bold green", "errors were found": "bold red", "ERROR": "red",
                "leaked clusters were found": "bold yellow", "Leaked": "yellow", "Repairing": "cyan",
                "internal errors": "bold red"}


def run_check(file: str, fmt, progress, **options):
    """``vdtool.core.ops.check`` (``options``: its keyword arguments); a
    format without a check is an error with exit status 63, as qemu-img's."""
    from vdtool.core.errors import NotSupported, VdError
    from vdtool.core.ops import check

    try:
        return check(file, fmt, progress=progress, **options)
    except NotSupported as e:
        if getattr(e, "op", None) != "check":
            raise
        err = VdError(str(e))
        err.exit_code = EXIT_NO_CHECK
        raise err from None


def print_report(result, file: str, output: str, quiet: bool, echo) -> None:
    """The report on stdout: JSON (the messages on stderr first, unless
    ``quiet``), or text unless ``quiet``.  ``echo(text, err=False)``
    prints a line as click.echo does."""
    from vdtool.core.registry import qemu_driver_name

    fmt_name = qemu_driver_name(result.format_name)  # as qemu-img names it: vpc for VHD
    if output == "json":
        import json

        for m in result.messages:
            if not quiet:
                echo(m, err=True)
        echo(json.dumps(result.to_json(file, fmt_name), indent=4))
    elif not quiet:
        from vdtool.terminal import styled_lines

        styled_lines(text_report(result), CHECK_STYLES)


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

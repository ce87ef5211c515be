"""vdtool snapshot"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, force_share_option, format_option,
                                     output_option, print_json, warn)

EPILOG = """\b
Examples:
  vdtool snapshot -l disk.qcow2                 # list (as qemu-img snapshot -l)
  vdtool snapshot -c before-upgrade disk.qcow2  # take a snapshot of the disk as it is
  vdtool snapshot -a before-upgrade disk.qcow2  # revert the disk to it
  vdtool snapshot -d before-upgrade disk.qcow2  # delete it
  vdtool snapshot -l --output json disk.qcow2 | jq '.[].name'"""


@click.command("snapshot", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="List, create, apply or delete internal snapshots (qcow2).")
@click.option("-l", "--list", "do_list", is_flag=True, help="List the snapshots (qemu-img's table).")
@click.option("-c", "--create", "create_name", metavar="NAME",
              help="Create a snapshot NAME of the disk as it is now.")
@click.option("-a", "--apply", "apply_name", metavar="NAME",
              help="Revert the disk to snapshot NAME (an id, else a name, as qemu-img looks it up); what "
                   "was written since is lost, the snapshot stays.")
@click.option("-d", "--delete", "delete_name", metavar="NAME",
              help="Delete the snapshot named NAME (the first with that name, as qemu-img does).")
@format_option()
@force_share_option
@output_option
@click.option("-q", "--quiet", is_flag=True, help="Print no warnings (errors only).")
@force_open_option
@click.option("--untrusted", is_flag=True, envvar="VDTOOL_UNTRUSTED", show_envvar=True,
              help="For images from untrusted sources: refuse an image whose content probes as more than one "
                   "format (or as another format than -f names), that references any other file or that "
                   "carries unknown feature bits.")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
def command(file, do_list, create_name, apply_name, delete_name, fmt, force_share, output, quiet, force,
            untrusted):
    """List, create, apply or delete the internal snapshots of the qcow2
    image FILE, as 'qemu-img snapshot' does (what libvirt's snapshot-create
    makes).  Exactly one of -l, -c, -a, -d.

    A snapshot shares every cluster with the disk until one side writes it
    (copy on write), so creating one is quick and takes little room.
    Names need not be unique (as in QEMU); each snapshot also has a
    numeric id.  -c, -a and -d print nothing on success (as qemu-img);
    with --output json they print the snapshot concerned.  The backing
    file, if any, is not opened.  Formats other than qcow2 have no internal
    snapshots: -l lists none (with a warning), -c/-a/-d fail.

    The image is locked as QEMU locks images: one that a running VM holds
    is refused ("in use"); -l reads it anyway with -U/--force-share."""
    chosen = [(a, n) for a, n in (("create", create_name), ("apply", apply_name), ("delete", delete_name))
              if n is not None]
    if do_list + len(chosen) != 1:
        raise click.UsageError("give exactly one of -l, -c NAME, -a NAME, -d NAME")
    action, name = chosen[0] if chosen else ("list", None)
    if force_share and action != "list":
        raise click.UsageError("-U/--force-share can only be used with -l (read-only access)")
    from vdtool.core.ops import snapshot, snapshot_table

    result = snapshot(file, action, name, fmt, force_share=force_share, force=force, untrusted=untrusted)
    if action == "list":
        snaps = result["snapshots"]
        if snaps is None:
            warn(quiet, f"{file}: {result['format']} images have no internal snapshots")
            snaps = []
        if output == "json":
            print_json(snaps)
        elif snaps:
            click.echo("\n".join(snapshot_table(snaps)))
        return
    if output == "json":
        print_json(result)

"""vdtool merge"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, format_option, image_options, long_operation,
                                     progress_options, say, warn)

EPILOG = """\b
Examples:
  vdtool merge overlay.qcow2                # fold overlay into its parent, delete it
  vdtool merge --keep overlay.qcow2         # ... but keep overlay.qcow2
  vdtool merge --base base.qcow2 top.qcow2  # fold top and every image down to base
  vdtool merge --into child top.qcow2       # make top.qcow2 stand alone"""


@click.command("merge", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Fold the images of a chain together.")
@format_option("Format of IMAGE (default: probed from its content).")
@click.option("--into", type=click.Choice(["parent", "child"]), default="parent", show_default=True,
              help="parent: write IMAGE's data (and that of every image between it and BASE) into BASE, then "
                   "delete the merged images unless --keep. child: copy the data of the chain below IMAGE, "
                   "down to BASE, into IMAGE where IMAGE has none; IMAGE then takes BASE's parent.")
@click.option("--base", metavar="FILE", default=None,
              help="The image of IMAGE's chain to merge down to (default: with --into parent, IMAGE's "
                   "parent; with --into child, the base of the chain).")
@click.option("--keep", is_flag=True, help="With --into parent: keep the merged images instead of deleting "
                                           "them.")
@progress_options
@force_open_option
@image_options
@click.argument("image", metavar="IMAGE", type=click.Path(dir_okay=True))
def command(image, fmt, into, base, keep, show_progress, quiet, parent_search, untrusted, force):
    """Merge the images of IMAGE's chain.

    With --into parent (the default) BASE afterwards reads as IMAGE did;
    with --into child IMAGE reads as before, standing alone or on a shorter
    chain.  Chains may mix formats.  Data is written and flushed before any
    parent reference changes; files are deleted only when everything else
    succeeded.  Other images that had a merged image as their parent must be
    rebased afterwards.

    The image is locked as QEMU locks images (OFD locks on its lock
    bytes): an image that a running VM, qemu-img or another vdtool holds
    is refused ("in use"), and QEMU refuses it while this runs."""
    from vdtool.core.ops import merge

    with long_operation("Merging", quiet=quiet, show_progress=show_progress) as progress:
        result = merge(image, into=into, base=base, keep=keep, fmt=fmt, parent_search=parent_search, force=force,
                       untrusted=untrusted, progress=progress)
    for w in result.get("warnings", ()):
        warn(quiet, w)
    if into == "parent":
        line = f"Merged '{image}' into '{result['target']}'"
        if result.get("deleted"):
            line += "; deleted " + ", ".join(f"'{p}'" for p in result["deleted"])
    else:
        line = f"Merged the chain below '{image}' into it"
    say(quiet, line)

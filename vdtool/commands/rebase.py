"""vdtool rebase"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, FORMAT, format_option, image_options, long_operation,
                                     progress_options, say)

EPILOG = """\b
Examples:
  vdtool rebase -b new-base.qcow2 overlay.qcow2     # overlay reads exactly as before
  vdtool rebase -u -b moved/base.qcow2 overlay.qcow2 # the parent was moved: fix the name only
  vdtool rebase -b "" overlay.qcow2                 # make overlay stand alone
  vdtool rebase -b base.vdi -F vdi overlay.vhd      # a VHD overlay onto a VDI parent"""


@click.command("rebase", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Change an image's parent.")
@format_option("Format of IMAGE (default: probed from its content).")
@click.option("-b", "--parent", "parent", metavar="NEWPARENT", required=True,
              help="The new parent image; an empty string (-b \"\") makes IMAGE stand alone.")
@click.option("-F", "--parent-format", "parent_format", type=FORMAT, default=None,
              help="Format of NEWPARENT (default: probed).")
@click.option("-u", "--unsafe", is_flag=True,
              help="Only rewrite the parent reference, copy no data (for a parent that was moved or "
                   "renamed, or one known to hold the same data).")
@progress_options
@force_open_option
@image_options
@click.argument("image", metavar="IMAGE", type=click.Path(dir_okay=True))
def command(image, fmt, parent, parent_format, unsafe, show_progress, quiet, parent_search, untrusted, force):
    """Change the parent of the image IMAGE to NEWPARENT.

    In safe mode (the default) every range where the old and the new parent
    differ is first copied into IMAGE, so that IMAGE reads exactly as before.
    With -u only the reference is rewritten.  Every format with differencing
    images can be rebased, onto a parent of any format: qcow2 (backing file
    and its format), VDI (parent UUID and modification UUID), VMDK
    (parentFileNameHint and parentCID), VHD (parent locators, unique ID and
    time stamp).  Data is written and flushed before the reference changes,
    so an interrupted rebase leaves IMAGE reading as before.

    The image is locked as QEMU locks images (OFD locks on its lock
    bytes): an image that a running VM, qemu-img or another vdtool holds
    is refused ("in use"), and QEMU refuses it while this runs."""
    from vdtool.core.ops import rebase

    with long_operation("Rebasing", quiet=quiet, show_progress=show_progress) as progress:
        rebase(image, parent or None, parent_format=parent_format, unsafe=unsafe, fmt=fmt,
               parent_search=parent_search, force=force, untrusted=untrusted, progress=progress)
    if parent:
        say(quiet, f"Rebased '{image}' onto '{parent}'" + (" (unsafe: reference only)" if unsafe else ""))
    else:
        say(quiet, f"'{image}' now stands alone (no parent)")

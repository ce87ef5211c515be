"""vdtool create"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, warn, FORMAT, SIZE, UUID, create_options, image_options,
                                     long_operation, print_format_options, progress_options,
                                     say, wants_option_help)

EPILOG = """\b
Examples:
  vdtool create disk.qcow2 10G              # sparse qcow2 (format from the name)
  vdtool create -f raw disk.img 512M
  vdtool create --variant full disk.img 1G  # preallocated raw
  vdtool create -b base.qcow2 overlay.qcow2 # overlay, size of the parent
  vdtool create -u -b base.qcow2 -F qcow2 overlay.qcow2 10G  # base need not exist yet
  vdtool create -f qcow2 -o compat=0.10 old.qcow2 1G
  vdtool create -f qcow2 -o help            # list the qcow2 options"""


@click.command("create", context_settings=CONTEXT_SETTINGS, epilog=EPILOG, short_help="Create a new image.")
@click.option("-f", "--format", "fmt", type=FORMAT, default=None,
              help="Format of the new image (default: from the file's extension: .img/.raw raw, .qcow2, "
                   ".qcow, .qed, .vdi, .vmdk, .vhd, .vhdx, .hdd/.hds parallels).")
@create_options
@click.option("--uuid", type=UUID, default=None, help="UUID of the new image, where the format records one "
                                                      "(default: a random one).")
@click.option("--comment", metavar="TEXT", default=None,
              help="A comment (description) stored in the image, where the format has a place for it.")
@click.option("-u", "--unsafe", is_flag=True,
              help="With -b: record the parent as given without opening it, so it need not exist yet (as "
                   "qemu-img create -u); needs -F and SIZE.  qcow2 only: the other formats record their "
                   "parent's UUID or CID, read from the parent.")
@progress_options
@image_options
@click.argument("file", required=False, metavar="FILE", type=click.Path(dir_okay=True))
@click.argument("size", required=False, metavar="[SIZE]", type=SIZE)
def command(file, size, fmt, variant, block_size, parent, parent_format, options, force, uuid, comment, unsafe,
            show_progress, quiet, parent_search, untrusted):
    """Create a new image FILE of SIZE bytes.

    The new image reads as zeros.  With --parent it is an overlay that starts
    out reading exactly as its parent does; SIZE may then be left out (the
    parent's size).  An existing FILE is refused unless --force is given.
    The image is written beside its final name and renamed into place only
    when complete."""
    if wants_option_help(options):
        from vdtool.core.ops.common import output_format

        if file is None and fmt is None:
            raise click.UsageError("-o help needs the format: name it with -f (or give FILE)")
        print_format_options(fmt or output_format(file, None))
        return
    if file is None:
        raise click.UsageError("Missing argument 'FILE'.")
    from vdtool.core.ops.common import parse_option_pairs
    from vdtool.core.ops import create

    opts = parse_option_pairs(options)
    with long_operation("Creating", quiet=quiet, show_progress=show_progress) as progress:
        result = create(file, size, fmt=fmt, variant=variant, block_size=block_size, parent=parent,
                        parent_format=parent_format, uuid=uuid, comment=comment, options=opts, force=force,
                        parent_search=parent_search, untrusted=untrusted, unsafe=unsafe, progress=progress)
    line = f"Formatting '{file}', fmt={result['format']}"
    if variant:
        line += f" variant={variant}"
    line += f" size={result['virtual-size']}"
    if parent:
        line += f" backing_file={parent}"
        if parent_format:
            line += f" backing_fmt={parent_format}"
    say(quiet, line)
    if result.get("message"):
        warn(quiet, result["message"])

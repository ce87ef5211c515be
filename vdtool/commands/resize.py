"""vdtool resize"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, RELATIVE_SIZE, NegativeSizeCommand, format_option,
                                     image_options, long_operation, progress_options, say,
                                     warn)

EPILOG = """\b
Examples:
  vdtool resize disk.qcow2 20G              # set the size
  vdtool resize disk.qcow2 +5G              # grow by 5 GiB
  vdtool resize --shrink disk.img -1G       # cut 1 GiB off the end
  vdtool resize disk.img 512M --shrink"""


@click.command("resize", cls=NegativeSizeCommand, context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Grow or shrink an image's virtual size.")
@format_option()
@click.option("--shrink", is_flag=True,
              help="Allow making the disk smaller; data past the new end is lost (the command says how "
                   "much of it was allocated). Shrink the file systems and partitions inside first.")
@progress_options
@force_open_option
@image_options
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
@click.argument("size", metavar="SIZE", type=RELATIVE_SIZE)
def command(file, size, fmt, shrink, show_progress, quiet, parent_search, untrusted, force):
    """Change the virtual size of the image FILE to SIZE.

    SIZE is absolute, or +SIZE / -SIZE relative to the current size
    ('-1G' is taken as a size, not an option).  Growing keeps all data and
    the new part reads as zeros.  Shrinking needs --shrink.

    The image is locked as QEMU locks images (OFD locks on its lock
    bytes): an image that a running VM, qemu-img or another vdtool holds
    is refused ("in use"), and QEMU refuses it while this runs."""
    from vdtool.core.ops import resize
    from vdtool.core.sizes import format_size

    with long_operation("Resizing", quiet=quiet, show_progress=show_progress) as progress:
        result = resize(file, size, fmt, shrink=shrink, parent_search=parent_search, force=force, untrusted=untrusted,
                        progress=progress)
    old, new = result["old-size"], result["new-size"]
    if result.get("lost-allocated-bytes"):
        warn(quiet, f"{file}: " + result.get("message", f"{result['lost-allocated-bytes']} bytes of allocated "
                                                         f"data past the new end were discarded"))
    if old == new:
        say(quiet, f"'{file}' already has size {new} ({format_size(new)}); nothing changed")
    else:
        say(quiet, f"Resized '{file}': {old} -> {new} bytes ({format_size(old)} -> {format_size(new)})")

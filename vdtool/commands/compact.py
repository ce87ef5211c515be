"""vdtool compact"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, format_option, image_options, long_operation,
                                     progress_options, say)

EPILOG = """\b
Examples:
  vdtool compact disk.qcow2
  vdtool discard --zeroes disk.vdi && vdtool compact disk.vdi
  vdtool compact -p big.img                 # with a progress bar"""


@click.command("compact", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Release unused and zero blocks, shrink the file.")
@format_option()
@progress_options
@force_open_option
@image_options
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
def command(file, fmt, show_progress, quiet, parent_search, untrusted, force):
    """Compact the image FILE in place.

    Blocks that read as zeros and blocks the format marks unused are
    released, the remaining blocks are moved to close the holes, and the
    file is truncated.  In a differencing image a zero block that hides
    non-zero parent data keeps reading as zeros.  The virtual content is
    unchanged; 'vdtool info' afterwards shows the smaller size on disk.

    The image is locked as QEMU locks images (OFD locks on its lock
    bytes): an image that a running VM, qemu-img or another vdtool holds
    is refused ("in use"), and QEMU refuses it while this runs."""
    from vdtool.core.ops import compact
    from vdtool.core.sizes import format_size

    with long_operation("Compacting", quiet=quiet, show_progress=show_progress) as progress:
        result = compact(file, fmt, parent_search=parent_search, force=force, untrusted=untrusted, progress=progress)
    before, after = result["before"], result["after"]
    say(quiet, f"Compacted '{file}': {format_size(before)} -> {format_size(after)} on disk "
               f"({format_size(max(before - after, 0))} released)")

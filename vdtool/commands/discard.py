"""vdtool discard"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, RANGE, format_option, image_options, long_operation,
                                     progress_options, say)

EPILOG = """\b
Examples:
  vdtool discard disk.qcow2 0:1M            # the first MiB reads as zeros
  vdtool discard disk.img 1G:512M 4G:64K    # several ranges
  vdtool discard --zeroes disk.qcow2        # release every all-zero block
  vdtool discard --zeroes disk.vdi && vdtool compact disk.vdi"""


@click.command("discard", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Make ranges read as zeros and release their blocks.")
@format_option()
@click.option("--zeroes", is_flag=True,
              help="Find every block that reads as zeros and release it (the data does not change).")
@progress_options
@force_open_option
@image_options
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
@click.argument("ranges", nargs=-1, metavar="[RANGE]...", type=RANGE)
def command(file, ranges, fmt, zeroes, show_progress, quiet, parent_search, untrusted, force):
    """Discard ranges of the image FILE.

    RANGE is OFFSET:LENGTH, both sizes (1M:64K).  Afterwards the ranges read
    as zeros; whole blocks are released where the format can, partial blocks
    are zero-filled.  Give RANGEs, --zeroes, or both.  In a differencing image
    a discarded range still reads as zeros, not as the parent's data.

    The image is locked as QEMU locks images (OFD locks on its lock
    bytes): an image that a running VM, qemu-img or another vdtool holds
    is refused ("in use"), and QEMU refuses it while this runs."""
    if not ranges and not zeroes:
        raise click.UsageError("name at least one RANGE (OFFSET:LENGTH) or --zeroes")
    from vdtool.core.ops import discard
    from vdtool.core.sizes import format_size

    with long_operation("Discarding", quiet=quiet, show_progress=show_progress) as progress:
        result = discard(file, list(ranges), zeroes=zeroes, fmt=fmt, parent_search=parent_search, force=force,
                         untrusted=untrusted, progress=progress)
    n = result.get("discarded-bytes", 0)
    say(quiet, f"Discarded {n} bytes ({format_size(n)}) of '{file}'")

"""vdtool compare"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, FORMAT, force_open_option, force_share_option, format_option,
                                     image_options, long_operation, print_json, progress_options)

EXIT_ERROR = 2

EPILOG = """\b
Examples:
  vdtool compare disk.qcow2 disk.vmdk
  vdtool compare -s -f raw -F qcow2 disk.img disk.qcow2
  vdtool compare -q overlay.qcow2 flat.img && echo same
  vdtool compare --output json a.vdi b.vhd | jq '."first-difference"'

\b
Exit status (as qemu-img compare):
  0   the images show the same disk
  1   they differ ("Content mismatch at offset N!" names the first sector)
  2   an error (an image that cannot be opened or read; usage errors too)"""


@click.command("compare", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Compare what two images show (qemu-img compare).")
@format_option("Format of image A (default: probed from its content).")
@click.option("-F", "--format-b", "fmt_b", type=FORMAT, default=None,
              help="Format of image B (default: probed from its content).")
@click.option("-s", "--strict", is_flag=True,
              help="Strict mode: images of different sizes, or a range allocated or zero in one and not in "
                   "the other, differ even when the content is the same.")
@click.option("--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: qemu-img compare's messages; json: one document with identical, first-difference, "
                   "size-a, size-b, strict, reason (content, block-status or size).")
@progress_options
@force_share_option
@force_open_option
@image_options
@click.argument("image_a", metavar="A", type=click.Path(dir_okay=True))
@click.argument("image_b", metavar="B", type=click.Path(dir_okay=True))
def command(image_a, image_b, fmt, fmt_b, strict, output, show_progress, quiet, force_share, parent_search,
            untrusted, force):
    """Compare the disks that images A and B show (each with its chain of
    parents), in any formats.

    Ranges that read as zeros in both are equal without reading; zeros
    against data reads the data and looks for a non-zero byte; only data
    against data reads both.  Without -s, an image longer than the other
    is the same when its tail reads as zeros ("Warning: Image size
    mismatch!" says the sizes differ).  Messages, offsets and exit status
    are qemu-img compare's.

    A or B may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    from vdtool.core.errors import VdError
    from vdtool.core.ops import compare

    try:
        with long_operation("Comparing", quiet=quiet, show_progress=show_progress) as progress:
            result = compare(image_a, image_b, fmt, fmt_b, strict=strict, parent_search=parent_search,
                             force=force, untrusted=untrusted, force_share=force_share, progress=progress)
    except VdError as e:
        if getattr(e, "exit_code", 1) in (0, 1):
            e.exit_code = EXIT_ERROR  # 1 means "different" here
        raise
    except OSError as e:
        what = e.strerror or str(e)
        err = VdError(f"{e.filename}: {what}" if e.filename else what)
        err.exit_code = EXIT_ERROR
        raise err from None
    if output == "json":
        print_json(result.to_json(image_a, image_b))
    elif not quiet:
        for line in result.messages:
            click.echo(line)
    click.get_current_context().exit(result.exit_code)

"""vdtool map"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, SIZE, force_open_option, force_share_option, format_option,
                                     image_options)

EPILOG = """\b
Examples:
  vdtool map disk.qcow2
  vdtool map --output json overlay.qcow2 | jq '.[] | select(.depth > 0)'
  vdtool map --output json --start-offset 1G --max-length 64M disk.vmdk

\b
JSON (one object per line, as qemu-img map --output=json prints it):
  start, length   the guest range
  depth           the image that decides, counted from the top (0); for
                  ranges no image holds, the base's depth
  present         some image in the chain holds the range
  zero, data      it reads as zeros / has data in a file
  compressed      its data is compressed (vdtool's and newer qemu-img's)
  offset          where the data lies in the image's file (left out for
                  compressed, zero and unallocated ranges, as qemu-img)"""


@click.command("map", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Show where every range of an image's data lives (qemu-img map).")
@format_option()
@click.option("--output", "output", type=click.Choice(["human", "text", "json"]), default="human",
              show_default=True,
              help="human: qemu-img map's table of the ranges with data (offsets in hexadecimal); "
                   "json: every range with qemu-img's keys (text is another name for human).")
@click.option("--start-offset", "start", type=SIZE, default=0, show_default=True,
              help="First guest offset to report.")
@click.option("--max-length", "max_length", type=SIZE, default=None,
              help="Report at most this many bytes from the start offset (default: to the end).")
@force_share_option
@force_open_option
@image_options
@click.argument("file", metavar="IMAGE", type=click.Path(dir_okay=True))
def command(file, fmt, output, start, max_length, force_share, parent_search, untrusted, force):
    """Show how the guest data of IMAGE is laid out: for every range, which
    image of the chain holds it, whether it reads as zeros, and where it
    lies in the file.

    The answers and the JSON keys are qemu-img map's (start, length, depth,
    present, zero, data, offset), for every format and for chains that mix
    them, plus 'compressed'.  Adjacent ranges are merged as qemu-img merges
    them.  The human table lists only the ranges with data; an image with
    compressed clusters can only be shown as JSON (as in qemu-img).

    IMAGE may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    from vdtool.core.ops import map as map_image
    from vdtool.core.ops import map_human_lines

    entries = map_image(file, fmt, start=start, max_length=max_length, parent_search=parent_search, force=force,
                        untrusted=untrusted, force_share=force_share)
    if output == "json":
        click.echo(json_text(entries))
        return
    for line in map_human_lines(entries, file):
        click.echo(line)


def json_text(entries) -> str:
    """qemu-img's layout: a list with one object per line."""
    import json

    def one(e) -> str:
        return "{ " + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in e.to_json().items()) + "}"

    return "[" + ",\n".join(one(e) for e in entries) + "]"

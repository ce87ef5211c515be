"""vdtool info"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, force_share_option, format_option, image_options,
                                     output_option, print_json)

EPILOG = """\b
Examples:
  vdtool info disk.qcow2
  vdtool info --backing-chain overlay.qcow2 # the overlay and every parent
  vdtool info --output json disk.vmdk | jq '.["virtual-size"]'"""


@click.command("info", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Show what an image is: format, sizes, parent, ...")
@format_option()
@click.option("--backing-chain", "--chain", "chain", is_flag=True,
              help="Report every image from FILE down to its base image (JSON: a list, top first, as "
                   "qemu-img info --backing-chain).")
@output_option
@force_share_option
@force_open_option
@image_options
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=True))
def command(file, fmt, chain, output, force_share, parent_search, untrusted, force):
    """Show facts about the image FILE.

    Format, variant, virtual size, size on disk, cluster (block) size, UUID,
    parent (name, format, UUID) and whether it was found, dirty flag and
    format-specific fields.  A missing parent is reported, not an error.
    JSON output is qemu-img's: every key qemu-img info --output=json reports
    (filename, format, virtual-size, actual-size, cluster-size, dirty-flag,
    backing-filename, full-backing-filename, snapshots, format-specific ...)
    has the same name, type and value, so scripts written for qemu-img keep
    working; vdtool's own keys (variant, uuid, parent-uuid, parent-found,
    external-references ...) come beside them.  "format" is qemu-img's
    driver name, which -f takes too: vpc for VHD images.

    Images are locked as QEMU locks them (OFD locks on their lock bytes):
    one that a running VM or qemu-img holds for writing is refused ("in
    use") unless -U/--force-share is given.  Every
    file the image references (backing and data files, extents, parents) is
    listed under external references; a probed image that references a file
    outside its folder, and an image read as raw whose content looks like
    another format, are reported with a warning on stderr.

    FILE may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    from vdtool.core.ops import human_lines, info

    result = info(file, fmt, chain=chain, parent_search=parent_search, force=force, untrusted=untrusted,
                  force_share=force_share)
    if output == "json":
        print_json(result)
        return
    images = result if chain else [result]
    if chain and len(images) > 1:
        _chain_table(images)
    blocks = ["\n".join(human_lines(d)) for d in images]
    click.echo("\n\n".join(blocks))


def _chain_table(images: list) -> None:
    """On a terminal, the chain at a glance before each image's details."""
    from vdtool.core.sizes import format_size
    from vdtool.terminal import table

    rows = [(d["filename"], d["format"], format_size(d["virtual-size"]),
             format_size(d["actual-size"]) if "actual-size" in d else "unavailable",
             "NOT FOUND" if d.get("parent-found") is False else d.get("backing-filename", "")) for d in images]
    if table(["image", "format", "virtual size", "disk size", "backing file"], rows, title="Backing chain"):
        click.echo()

"""vdtool measure"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, SIZE, force_open_option, force_share_option, format_option,
                                     image_options, long_operation, print_format_options, print_json,
                                     progress_options, wants_option_help)

EPILOG = """\b
Examples:
  vdtool measure -O qcow2 --size 10G            # an empty 10 GiB qcow2
  vdtool measure -O qcow2 disk.img              # what 'convert -O qcow2 disk.img' would take
  vdtool measure -O qcow2 -o cluster_size=2M,preallocation=metadata disk.vmdk
  vdtool measure -O vmdk --variant streamOptimized --output json disk.qcow2
  vdtool measure -O vdi -o help                 # list the vdi options

\b
Output (as qemu-img measure prints it):
  required size: 1376256
  fully allocated size: 105185280
  bitmaps size: 0            (qcow2 compat 1.1 from an image that can hold bitmaps)"""


@click.command("measure", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="How big a new image would be (qemu-img measure).")
@click.option("--size", "size", type=SIZE, default=None,
              help="Measure an empty disk of this size instead of an image.")
@format_option("Format of IMAGE (default: probed from its content, never from its name).")
@click.option("-O", "--output-format", "out_fmt", metavar="FMT", default="raw", show_default=True,
              help="Format of the new image: raw, qcow2, vdi, vmdk or vhd (vpc).")
@click.option("--variant", metavar="VARIANT",
              help="Variant of the new image, as for create and convert (qcow2 sparse, metadata, full; vdi and "
                   "vhd dynamic, fixed; vmdk monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, "
                   "twoGbMaxExtentFlat, streamOptimized, vmfs; raw sparse, full).")
@click.option("--block-size", "block_size", type=SIZE, default=None,
              help="Block (cluster, grain) size of the new image (default: the format's own).")
@click.option("-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A format option of the new image, as for create (repeatable or comma-separated); qcow2 "
                   "also takes qemu-img's preallocation=off|metadata|falloc|full.  '-o help' lists them.")
@click.option("--output", "output", type=click.Choice(["text", "human", "json"]), default="text", show_default=True,
              help="Report format: qemu-img's text lines ('human' is qemu-img's name for them), or its JSON "
                   "document.")
@progress_options
@force_share_option
@force_open_option
@image_options
@click.argument("image", required=False, metavar="IMAGE", type=click.Path(dir_okay=True))
def command(image, size, fmt, out_fmt, variant, block_size, options, output, show_progress, quiet, force_share,
            force, parent_search, untrusted):
    """Print how big a new image would be: for an empty disk of --size
    bytes, or for 'vdtool convert' of IMAGE (its chain flattened).

    'required' is the size of the file (all files, for multi-file VMDK
    variants) that create or convert would make with these options;
    'fully allocated' the size with every block allocated.  Only blocks
    that hold non-zero data count: zero and unallocated runs are skipped
    without reading them, and data runs are read and judged per block of
    the new image, as convert does (qemu-img measure counts every allocated
    block, zeros or not, so its 'required' can be larger).  Otherwise qcow2
    values are qemu-img measure's (every L2 table of the disk is counted); a streamOptimized VMDK is an
    upper bound (each grain at zlib's worst case), and a VMDK descriptor
    file is counted with 250-character file names.  With compat 1.1 and
    an image that can hold persistent bitmaps (qcow2 v3), qcow2 adds
    'bitmaps': the space its bitmaps would take.

    Errors as qemu-img measure: both or neither of --size and IMAGE, and
    an unknown output format, exit with status 1.

    IMAGE may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    if wants_option_help(options):
        from vdtool.core.errors import UsageError, VdError
        from vdtool.core.registry import canonical_name

        try:
            name = canonical_name(out_fmt)
        except UsageError as e:
            raise VdError(str(e)) from None
        print_format_options(name)
        return
    from vdtool.core.ops import measure
    from vdtool.core.ops.common import parse_option_pairs

    opts = parse_option_pairs(options)
    with long_operation("Measuring", quiet=quiet, show_progress=show_progress) as progress:
        result = measure(image, size=size, fmt=out_fmt, src_format=fmt, variant=variant, block_size=block_size,
                         options=opts, parent_search=parent_search, force=force, force_share=force_share,
                         untrusted=untrusted, progress=progress)
    if output == "json":
        print_json(result)
        return
    lines = [f"required size: {result['required']}", f"fully allocated size: {result['fully-allocated']}"]
    if "bitmaps" in result:
        lines.append(f"bitmaps size: {result['bitmaps']}")
    click.echo("\n".join(lines))

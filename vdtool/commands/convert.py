"""vdtool convert"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, FORMAT, create_options, force_share_option,
                                     format_option, image_options, long_operation, print_format_options,
                                     progress_options, say, wants_option_help)

EPILOG = """\b
Examples:
  vdtool convert disk.img disk.qcow2            # raw to qcow2 (format from the name)
  vdtool convert -O raw disk.qcow2 disk.bin
  vdtool convert -c -p disk.img small.qcow2     # compressed, with a progress bar
  vdtool convert --verify disk.vmdk disk.qcow2  # read back and compare digests
  vdtool convert -b base.qcow2 top.qcow2 delta.qcow2  # only what differs from base
  vdtool convert -O qcow2 -o help               # list the qcow2 options"""


@click.command("convert", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Copy an image into a new image, in any format.")
@format_option("Format of SRC (default: probed from its content).")
@click.option("-O", "--output-format", "out_fmt", type=FORMAT, default=None,
              help="Format of DST (default: from DST's extension: .img/.raw raw, .qcow2, .qcow, .qed, .vdi, "
                   ".vmdk, .vhd, .vhdx, .hdd/.hds parallels).")
@create_options
@click.option("-c", "--compress", is_flag=True,
              help="Compress the data where the format can (qcow2 compressed clusters).")
@click.option("--verify", is_flag=True,
              help="Read DST back after writing and compare its content digest with SRC's; both digests "
                   "are printed, a mismatch is an error.  The digest is the one 'vdtool checksum' prints "
                   "(xxh3-128), so SRC's can be compared with a later checksum of DST or of a copy.")
@click.option("--sync/--no-sync", "sync", default=None,
              help="Flush DST to the disk before returning, so it survives a power cut (default: only when "
                   "DST replaces an existing file; otherwise the kernel writes it back in its own time, as "
                   "after qemu-img convert or cp).")
@progress_options
@force_share_option
@image_options
@click.argument("src", required=False, metavar="SRC", type=click.Path(dir_okay=True))
@click.argument("dst", required=False, metavar="DST", type=click.Path(dir_okay=True))
def command(src, dst, fmt, out_fmt, variant, block_size, parent, parent_format, options, force, compress,
            verify, sync, show_progress, quiet, force_share, parent_search, untrusted):
    """Convert SRC into a new image DST.

    DST gets what SRC shows, its whole chain of parents flattened; with
    --parent only what differs from that parent is written and DST records
    it as its parent.  Blocks that read as zeros are not allocated in DST
    unless the variant is a preallocated one.  DST is written beside its
    final name and renamed into place only on success; an existing DST is
    refused unless --force is given.  A new DST is not flushed to the disk
    unless --sync is given (the page cache holds it until the kernel writes
    it back, as with qemu-img convert or cp); one that replaces an existing
    file is, unless --no-sync is given.

    Images are locked as QEMU locks them (OFD locks on their lock bytes):
    one that a running VM or qemu-img holds for writing is refused ("in
    use") unless -U/--force-share is given.  DST is locked while
    it is written."""
    if wants_option_help(options):
        from vdtool.core.ops.common import output_format

        if dst is None and out_fmt is None:
            raise click.UsageError("-o help needs the output format: name it with -O (or give DST)")
        print_format_options(out_fmt or output_format(dst, None))
        return
    if src is None:
        raise click.UsageError("Missing argument 'SRC'.")
    if dst is None:
        raise click.UsageError("Missing argument 'DST'.")
    from vdtool.core.ops.common import parse_option_pairs
    from vdtool.core.ops import convert
    from vdtool.core.sizes import format_size

    opts = parse_option_pairs(options)
    with long_operation("Converting", quiet=quiet, show_progress=show_progress) as progress:
        result = convert(src, dst, src_format=fmt, fmt=out_fmt, variant=variant, block_size=block_size,
                         compress=compress, parent=parent, parent_format=parent_format, options=opts,
                         verify=verify, force=force, parent_search=parent_search, force_share=force_share,
                         untrusted=untrusted, sync=sync, progress=progress)
    if verify:
        say(quiet, f"source xxh3-128: {result.source_digest}")
        say(quiet, f"output xxh3-128: {result.output_digest}")
    say(quiet, f"Converted '{src}' to '{dst}': fmt={result.format} size={result.virtual_size} "
               f"({format_size(result.virtual_size)}), {format_size(result.written_bytes)} of data written")

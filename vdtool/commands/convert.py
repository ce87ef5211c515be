"""vdtool convert"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, FORMAT, SIZE, create_options, force_share_option,
                                     format_option, image_options, long_operation, print_format_options,
                                     progress_options, say, wants_option_help)

EPILOG = """\b
Examples:
  vdtool convert disk.img disk.qcow2            # raw to qcow2 (format from the name)
  vdtool convert -O raw disk.qcow2 disk.bin
  vdtool convert -c -p disk.img small.qcow2     # compressed, with a progress bar
  vdtool convert --verify disk.vmdk disk.qcow2  # read back and compare digests
  vdtool convert -b base.qcow2 top.qcow2 delta.qcow2  # only what differs from base
  vdtool convert -O qcow2 -o help               # list the qcow2 options
  vdtool convert -O vmdk --variant streamOptimized disk.qcow2 - | upload
  curl -s URL | vdtool convert -f raw --size 10G - -O vhd --variant fixed disk.vhd
  vdtool convert --force -O raw disk.qcow2 /dev/sdX   # into a device, in place
  vdtool convert -n disk.qcow2 existing.img      # into an existing image (qemu-img -n)

\b
SRC '-' is standard input and DST '-' standard output (see 'man vdtool-convert'
and docs/pipelines.md); a FIFO or device DST is written in place, never replaced."""


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
@click.option("-n", "--no-create", "no_create", is_flag=True,
              help="DST exists: write into it (as the format -O names, else the one its content shows) "
                   "instead of creating it, as qemu-img convert -n; it must be at least as big as SRC.  "
                   "Zeros are written too, unless --target-is-zero.")
@click.option("--target-is-zero", "target_is_zero", is_flag=True,
              help="DST (with -n, or a device) already reads as zeros: skip writing zeros.")
@click.option("--size", "size", type=SIZE, default=None,
              help="The disk size of raw input from standard input (SRC '-'), named ahead so it streams "
                   "straight through (the input must hold exactly that many bytes); without it, raw input "
                   "for any output but raw on a stream is read into a temporary file first.")
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
            verify, no_create, target_is_zero, size, sync, show_progress, quiet, force_share, parent_search,
            untrusted):
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
    it is written.

    SRC '-' reads standard input: raw input streams through when --size
    names its size (or the output is raw on standard output); other formats
    are read into a temporary file in TMPDIR first (said on stderr).  DST
    '-' writes standard output: raw streams straight through; other formats
    are written into a temporary file first and then sent.  A DST that is a
    FIFO, a character device or (with --force) a block device is written in
    place; it is never replaced by a file.  Exit status: 0 done, 1 error,
    141 when the reader of standard output went away (SIGPIPE)."""
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
    if dst == "-":
        from vdtool.core.sinks import refuse_terminal_stdout

        refuse_terminal_stdout()  # before a progress bar starts
    with long_operation("Converting", quiet=quiet, show_progress=show_progress) as progress:
        result = convert(src, dst, src_format=fmt, fmt=out_fmt, variant=variant, block_size=block_size,
                         compress=compress, parent=parent, parent_format=parent_format, options=opts,
                         verify=verify, force=force, parent_search=parent_search, force_share=force_share,
                         untrusted=untrusted, sync=sync, no_create=no_create, target_is_zero=target_is_zero,
                         size=size, progress=progress)
    if dst == "-":
        return  # standard output is the image: nothing else goes there
    if verify:
        say(quiet, f"source xxh3-128: {result.source_digest}")
        say(quiet, f"output xxh3-128: {result.output_digest}")
    say(quiet, f"Converted '{src}' to '{dst}': fmt={result.format} size={result.virtual_size} "
               f"({format_size(result.virtual_size)}), {format_size(result.written_bytes)} of data written")

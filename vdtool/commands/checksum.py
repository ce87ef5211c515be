"""vdtool checksum"""

from __future__ import annotations

import click

from vdtool.commands._common import (CONTEXT_SETTINGS, force_open_option, force_share_option, format_option,
                                     image_options, long_operation, print_json, progress_options)

EPILOG = """\b
Examples:
  vdtool checksum disk.qcow2
  vdtool checksum disk.img disk.qcow2 disk.vmdk   # equal digests: equal disks
  vdtool checksum -a sha256 --output json overlay.qcow2
  vdtool convert --verify disk.vmdk disk.qcow2    # prints the same xxh3-128 digest

\b
Construction:
  H is the algorithm (-a); a digest is H's raw bytes (xxh3-128's in its
  canonical big-endian form).
  1. The disk (L bytes) is cut into blocks of 64 KiB (65536 bytes); a
     short last block is padded with zero bytes to 64 KiB.
  2. Each block's digest is H(block).
  3. The block digests, in disk order, are taken in groups of 65536
     (4 GiB of disk; the last group may hold fewer); each group's digest
     is H(its block digests concatenated).
  4. The checksum is H(the group digests concatenated, then L as 8 bytes
     little-endian), printed in lower-case hex.
  The same in Python, for the disk's bytes in DATA and H = xxhash.xxh3_128
  or hashlib.sha256:
    B = G = 65536
    blocks = [H(DATA[i:i + B].ljust(B, b"\\0")).digest()
              for i in range(0, len(DATA), B)]
    groups = [H(b"".join(blocks[j:j + G])).digest()
              for j in range(0, len(blocks), G)]
    print(H(b"".join(groups) + len(DATA).to_bytes(8, "little")).hexdigest())
  Blocks that read as zeros all have one digest, and so do groups of them:
  vdtool takes those without reading (blocks the image records as zero or
  unallocated through its whole chain) or without hashing (data blocks that
  read as zeros).

\b
Output:
  text: one 'DIGEST  IMAGE' line per image, as sha256sum prints.
  json: one list, an object per image checksummed, in the order given:
    {"filename": ..., "algorithm": "xxh3-128", "checksum": "...",
     "virtual-size": L}

\b
Exit status:
  0  every image was checksummed
  1  an image could not be read (one error line each; the others are
     still checksummed and printed)
  2  usage error"""


@click.command("checksum", context_settings=CONTEXT_SETTINGS, epilog=EPILOG,
               short_help="Print a digest of each image's virtual disk content.")
@format_option("Format of the images (default: probed from each one's content, never from its name).")
@click.option("-a", "--algorithm", type=click.Choice(["xxh3-128", "sha256"]), default="xxh3-128",
              show_default=True, help="The hash used for blocks, groups and the whole.")
@click.option("--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Report format: 'DIGEST  IMAGE' lines (as sha256sum prints), or one JSON list on stdout "
                   "with an object per image: filename, algorithm, checksum, virtual-size.")
@progress_options
@force_share_option
@force_open_option
@image_options
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...", type=click.Path(dir_okay=True))
def command(images, fmt, algorithm, output, show_progress, quiet, force_share, force, parent_search, untrusted):
    """Print a digest of the virtual disk each IMAGE shows, its chain of
    parents included.

    The digest depends only on the disk's content and length: the same
    content gives the same digest in any format, variant and chain (raw,
    sparse or written out, qcow2, compressed or not, VDI, VMDK, VHD, an
    overlay over any of them), and one changed byte or another length gives
    another.  It is built as Nir Soffer's blkhash builds its digest: blocks
    that the image records as zero or unallocated are not read, data blocks
    that read as zeros are not hashed, and blocks are hashed in parallel, so
    a sparse image is checksummed much faster than its raw bytes can be
    hashed.  convert --verify prints the same digest (xxh3-128) for its
    source and its output.

    Images are locked as QEMU locks them: one that a running VM or qemu-img
    holds for writing is refused ("in use") unless -U/--force-share is
    given.

    An IMAGE may be '-' (standard input, read into a temporary file first) or an
    http:// or https:// URL (read with Range requests; its parents are looked up
    next to it and may never be local files)."""
    from vdtool.core.errors import OperationCancelled, VdError
    from vdtool.core.ops import checksum

    results = []
    failed = False
    for image in images:
        try:
            with long_operation("Checksum", quiet=quiet, show_progress=show_progress) as progress:
                r = checksum(image, fmt, algorithm=algorithm, parent_search=parent_search, force=force,
                             untrusted=untrusted, force_share=force_share, progress=progress)
        except OperationCancelled:
            raise
        except (VdError, OSError) as e:
            failed = True
            _error_line(e)
            continue
        results.append(r)
        if output == "text":
            click.echo(f"{r['checksum']}  {image}")
    if output == "json":
        print_json(results)
    if failed:
        click.get_current_context().exit(1)


def _error_line(e: Exception) -> None:
    if isinstance(e, OSError) and not hasattr(e, "exit_code"):
        what = e.strerror or str(e)
        if e.filename is not None:
            what = f"{e.filename}: {what}"
    else:
        what = str(e)
    what = " ".join(part.strip() for part in what.splitlines() if part.strip()) or "(no message)"
    click.echo(f"vdtool: error: {what}", err=True)

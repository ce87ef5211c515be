"""convert: what a source stack shows, flattened into a new image."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from vdtool.core.backend import Cap
from vdtool.core.copy import copy_stack
from vdtool.core.digest import ContentDigest, digest_stack
from vdtool.core.errors import NotSupported, VdError
from vdtool.core.fileio import deferred_sync
from vdtool.core.ops.common import (backend_for_new_image, open_parent, output_format, parent_spec,
                                    same_file, stack_over, staged_output)
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_image


@dataclass
class ConvertResult:
    filename: str
    format: str
    virtual_size: int
    source_digest: Optional[str] = None
    output_digest: Optional[str] = None
    written_bytes: int = 0


PREALLOCATED_VARIANTS = {"full", "fixed", "metadata", "monolithicFlat", "twoGbMaxExtentFlat", "vmfs"}


def convert(src: str, dst: str, *, src_format: Optional[str] = None, fmt: Optional[str] = None,
            variant: Optional[str] = None, block_size: Optional[int] = None, compress: bool = False,
            parent: Optional[str] = None, parent_format: Optional[str] = None, options: Optional[dict] = None,
            verify: bool = False, force: bool = False, parent_search=(), force_share: bool = False,
            untrusted: bool = False, sync: Optional[bool] = None,
            progress: Progress = NO_PROGRESS) -> ConvertResult:
    """``sync``: True fsyncs the new image (and its folder) before returning,
    so it survives a power cut; False leaves it to the kernel's writeback,
    as qemu-img convert and cp do; None (the default) syncs only when DST
    replaces an existing file, so a power cut can never cost the old file
    and the new one both.  Either way DST appears under its name only when
    complete."""
    name = output_format(dst, fmt)
    backend = backend_for_new_image(dst, name, variant)
    if compress and variant is None and getattr(backend, "compress_variant", None):
        # formats whose compression is a variant of its own (vmdk's streamOptimized)
        variant = backend.compress_variant
    if variant is not None and variant == getattr(backend, "compress_variant", None):
        # a variant that is always compressed (streamOptimized): let the copy
        # engine compress in its thread pool instead of the backend, serially
        compress = True
    opts = backend.parse_options(dict(options or {}))
    if compress and not backend.capabilities & Cap.COMPRESS:
        raise NotSupported("compression (-c)", name, dst)
    if same_file(src, dst):
        raise VdError("source and destination are the same file", dst)
    source = open_image(src, src_format, parent_search=parent_search, untrusted=untrusted,
                        force_share=force_share)
    pstack = None
    try:
        spec = None
        if parent:
            if not backend.capabilities & Cap.DIFF:
                raise NotSupported("a parent image", name, dst)
            pstack = open_parent(parent, parent_format, parent_search, untrusted=untrusted,
                                 force_share=force_share)
            spec = parent_spec(dst, pstack)
        size = source.virtual_size
        digest = ContentDigest() if verify else None
        copy_part = progress.sub(0, 80 if verify else 100)
        durable = sync if sync is not None else os.path.lexists(dst)
        with staged_output(dst, force, durable=durable) as tmp:
            # The staged file is renamed into place only on success, so the
            # fsyncs between data and metadata inside the copy protect
            # nothing: deferred_sync() keeps the write order and fsyncs each
            # new file once when it is closed (before the rename), or never.
            with deferred_sync(durable=durable):
                img = backend.create(tmp, size, variant=variant, block_size=block_size, parent=spec,
                                     options=opts)
                try:
                    out = stack_over(pstack, img)
                    stats = copy_stack(source, out, base=pstack, compress=compress,
                                       write_zeros=False, digest=digest, progress=copy_part)
                    img.flush()
                finally:
                    img.close()
            result = ConvertResult(dst, name, size, written_bytes=stats.written_bytes)
            if verify:
                result.source_digest = digest.hexdigest()
                check_img = backend.open(tmp)
                try:
                    written = stack_over(pstack, check_img)
                    # A format may round the size up (qcow2 keeps whole
                    # sectors, as qemu-img does): digest the source's size and
                    # require the padding to read as zeros, else --verify of an
                    # odd-sized raw source could never succeed.
                    result.output_digest = digest_stack(written, progress.sub(80, 20), size=size)
                    extra = written.virtual_size - size
                    if extra > 0 and written.read(size, min(extra, 1 << 20)) != bytes(min(extra, 1 << 20)):
                        result.output_digest += " (non-zero data past the source's end)"
                    elif extra < 0:
                        result.output_digest += f" (output is {-extra} bytes shorter than the source)"
                finally:
                    check_img.close()
                if result.output_digest != result.source_digest:
                    raise VdError(f"verification failed: source digest {result.source_digest}, "
                                  f"written image digest {result.output_digest}", dst)
        progress.finish(size)
        return result
    finally:
        source.close()
        if pstack is not None:
            pstack.close()

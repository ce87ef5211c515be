"""amend: change in place what a format lets change (qemu-img amend)."""

from __future__ import annotations

from vdtool.core.errors import NotSupported, VdError
from vdtool.core.progress import NO_PROGRESS, Progress
from vdtool.core.stack import open_backend


def parse_pairs(items) -> dict:
    """``-o`` values (``KEY=VALUE[,KEY=VALUE...]``, repeatable) as one dict;
    a key given twice keeps the last value, as qemu-img does.  A ``,,`` is
    a comma inside a value (qemu's escape)."""
    out: dict = {}
    for item in items or ():
        parts, cur, i, text = [], "", 0, str(item)
        while i < len(text):
            if text[i] == ",":
                if text[i + 1:i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                parts.append(cur)
                cur = ""
            else:
                cur += text[i]
            i += 1
        parts.append(cur)
        for part in parts:
            if not part.strip():
                continue
            if "=" not in part:
                raise VdError(f"invalid option {part.strip()!r}: expected KEY=VALUE")
            key, value = part.split("=", 1)
            out[key.strip()] = value
    return out


def amend(path: str, options, fmt: str | None = None, *, force: bool = False, untrusted: bool = False,
          progress: Progress = NO_PROGRESS) -> dict:
    """Apply ``options`` ({key: value}, or ``-o`` strings) to the image
    ``path`` in place.  Returns ``{"filename", "format", "changes":
    [{"option", "old", "new"}...]}``.  Bad keys and values are errors with
    exit status 1, as in qemu-img amend; nothing is changed then."""
    pairs = dict(options) if isinstance(options, dict) else parse_pairs(options)
    if not pairs:
        raise VdError("must specify options (-o)")
    img = open_backend(path, fmt, writable=True, untrusted=untrusted, options={"force": force})
    try:
        if not type(img).amend_options:
            raise NotSupported("option amendment", img.name, path)
        typed = type(img).parse_amend_options(pairs, path)
        changes = img.amend(typed, progress.sub(0, 95))
        img.flush()
    finally:
        img.close()
    progress.finish()
    return {"filename": path, "format": img.name,
            "changes": [{"option": k, "old": old, "new": new} for k, old, new in changes]}

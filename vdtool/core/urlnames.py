"""What the names inside a remote image mean: a parent (backing file) or a
VMDK extent named by an image read from an http(s) URL is taken relative to
that URL (``urljoin``, as QEMU's curl driver resolves backing files), or is
itself an http(s) URL.  A remote image never makes vdtool open a local
file: an absolute path, a Windows drive path or another scheme (``file:``,
``nbd:``, ``json:``...) is refused, with or without ``--untrusted``.  A
``..`` stays on the server (urljoin cannot climb above its root)."""

from __future__ import annotations

import re

from vdtool.core.errors import VdError
from vdtool.core.fileio import is_url

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")


class LocalReference(VdError):
    """A remote image names a local file."""


def why_local(name: str) -> str | None:
    """Why ``name``, found in a remote image, would be a local file (or
    another scheme than http/https); None when it is relative or a URL."""
    if is_url(name):
        return None
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute local path"
    m = _SCHEME.match(name)
    if m:
        return f"a {m.group(0)} reference"
    return None


def join(base_url: str, name: str, what: str = "parent") -> str:
    """The URL ``name`` (as recorded in the image at ``base_url``) stands
    for; LocalReference when it would be a local file."""
    why = why_local(name)
    if why:
        raise LocalReference(f"the remote image names {why} as its {what} ({name!r}); an image read from a URL "
                             f"may name other files only relative to its URL or as http(s) URLs", base_url)
    if is_url(name):
        return name
    from urllib.parse import quote, urljoin

    # a recorded name is a file name, not URL text: '#', '?', '%' and spaces are literal
    return urljoin(base_url, quote(name.replace("\\", "/"), safe="/"))


def parent_url(child_url: str, names: list) -> str | None:
    """The URL of a remote image's parent from its recorded names, best
    first (VHD records an absolute and a relative one): the first that can
    be resolved against ``child_url``.  None without names; LocalReference
    when every name is a local file."""
    names = [n for n in names if n]
    for name in names:
        if why_local(name) is None:
            return join(child_url, name)
    if names:
        join(child_url, names[0])  # raises, naming the first
    return None

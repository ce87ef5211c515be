"""Parent locators: where a differencing VHD says its parent is.

Each locator names the parent for one platform: ``W2ru``/``W2ku`` (a
relative/absolute Windows path in UTF-16LE), ``Wi2r``/``Wi2k`` (the same in
single bytes, deprecated), ``MacX`` (a file URL) and ``Mac `` (a Mac OS
alias record).  This module turns their data into paths and paths into
data; reading and writing the file is the loader's and ``parent``'s."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from vdtool.core.errors import UsageError
from vdtool.formats.vhd.layout import (MAX_LOCATOR_DATA, PARENT_LOCATOR, PLAT_MAC, PLAT_MACX, PLAT_W2KU, PLAT_W2RU,
                                       PLAT_WI2K, PLAT_WI2R)

# the order in which locators are tried as the parent's name
PREFERENCE = (PLAT_W2RU, PLAT_WI2R, PLAT_W2KU, PLAT_WI2K, PLAT_MACX, PLAT_MAC)


class Locator:
    """One parent locator in use: its entry's fields (``space`` in bytes)
    and the path its data decodes to (None when it names no path).  A plain
    class: a dataclass costs about a millisecond of start-up to build."""

    __hash__ = None  # mutable, compared by value

    def __init__(self, code: bytes, space: int, length: int, offset: int, path: str | None):
        self.code = code
        self.space = space
        self.length = length
        self.offset = offset
        self.path = path

    def _key(self) -> tuple:
        return self.code, self.space, self.length, self.offset, self.path

    def __eq__(self, other):
        return self._key() == other._key() if other.__class__ is self.__class__ else NotImplemented

    def __repr__(self) -> str:
        return "Locator(code={!r}, space={!r}, length={!r}, offset={!r}, path={!r})".format(*self._key())

    def entry(self) -> bytes:
        """The locator's entry in the dynamic disk header."""
        return PARENT_LOCATOR.pack(platform_code=self.code, platform_data_space=self.space,
                                   platform_data_length=self.length, platform_data_offset=self.offset)

    @property
    def name(self) -> str:
        return self.code.decode("latin-1")


def decode_utf16(raw: bytes, encoding: str) -> str:
    """A UTF-16 name; names end at the first NUL character."""
    n = len(raw) - len(raw) % 2
    for i in range(0, n, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            n = i
            break
    return raw[:n].decode(encoding, errors="replace")


def native_path(name: str) -> str:
    """A Windows-style locator path as this system spells it."""
    if os.sep == "/":
        name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def decode_path(code: bytes, data: bytes) -> str | None:
    """The path a locator's data names, None for an unknown platform or no
    name."""
    if code in (PLAT_W2RU, PLAT_W2KU):
        name = decode_utf16(data, "utf-16-le")
    elif code in (PLAT_WI2R, PLAT_WI2K):
        name = data.split(b"\0", 1)[0].decode("latin-1")
    elif code == PLAT_MACX:
        text = data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        url = urlparse(text)
        name = unquote(url.path) if url.scheme == "file" else text
        return name or None
    elif code == PLAT_MAC:
        # a Mac OS alias record; its target's name is a Pascal string at byte 50
        if len(data) > 51 and 0 < data[50] <= 63 and 51 + data[50] <= len(data):
            return data[51:51 + data[50]].decode("mac-roman", errors="replace").replace("/", ":") or None
        return None
    else:
        return None
    name = name.strip()
    return native_path(name) if name else None


def encode_paths(recorded_name: str, abs_path: str) -> list:
    """(platform code, data) of the locators a new child records: W2ru with
    the name relative to the child (when it is relative), W2ku with the
    absolute path."""
    datas = []
    if recorded_name and not os.path.isabs(recorded_name):
        win = recorded_name.replace("/", "\\")
        if not win.startswith(".\\") and not win.startswith("..\\"):
            win = ".\\" + win
        datas.append((PLAT_W2RU, win.encode("utf-16-le")))
    datas.append((PLAT_W2KU, abs_path.encode("utf-16-le")))
    for _, data in datas:
        if len(data) > MAX_LOCATOR_DATA:
            raise UsageError(f"parent path {abs_path!r} is too long for a VHD parent locator")
    return datas


def parent_names(locators: list, parent_unicode_name: str) -> list:
    """The parent's names, best first and each once: the locators' paths
    by platform preference, then the header's Parent Unicode Name (and its
    base name, where it has folders)."""
    by_code: dict = {}
    for loc in locators:
        if loc.path:
            by_code.setdefault(loc.code, loc.path)
    names = [by_code[code] for code in PREFERENCE if code in by_code]
    if parent_unicode_name:
        pn = native_path(parent_unicode_name)
        names += [pn, os.path.basename(pn)] if os.sep == "/" and "/" in pn else [pn]
    seen, uniq = set(), []
    for n in names:
        if n and n not in seen:
            seen.add(n)
            uniq.append(n)
    return uniq

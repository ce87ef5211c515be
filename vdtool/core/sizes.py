"""Size strings: ``512``, ``64K``, ``10G``, ``1.5T``, ``4MiB``."""

from __future__ import annotations

from vdtool.core.errors import UsageError

_UNITS = "KMGTPE"
_SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtpe]?)(i?b)?\s*$"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def parse_size(text: str | int) -> int:
    """Parse a size; a binary suffix multiplies by 1024**n.  A bare 'B' is bytes."""
    if isinstance(text, int):
        return text
    import re  # here, not at the top: `vdtool info` parses no size, and re costs start-up

    m = re.match(_SIZE_PATTERN, str(text), re.IGNORECASE)
    if not m or (m.group(3) and m.group(3).lower() == "ib" and not m.group(2)):
        raise UsageError(f"invalid size {text!r}: expected a number of bytes or a number with K, M, G, T, P or E")
    number, unit = m.group(1), m.group(2).upper()
    if unit and m.group(3) and m.group(3).lower() == "b":
        # "10GB" reads as 10^10 bytes to some and 10 GiB to others: say which
        binary = f"{number}{unit}"
        raise UsageError(f"invalid size {text!r}: {unit}B is ambiguous (decimal or binary); vdtool's sizes "
                         f"are binary: write {binary} or {binary}iB for {number} {unit}iB, or the number of "
                         f"bytes")
    mult = 1 << (10 * (_UNITS.index(unit) + 1)) if unit else 1
    if "." in number:
        from fractions import Fraction

        value = Fraction(number) * mult
        if value.denominator != 1:
            raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
        return int(value)
    return int(number) * mult


def parse_relative_size(text: str, current: int) -> int:
    """``SIZE``, ``+SIZE`` or ``-SIZE`` relative to ``current``."""
    text = text.strip()
    if text.startswith("+"):
        return current + parse_size(text[1:])
    if text.startswith("-"):
        new = current - parse_size(text[1:])
        if new < 0:
            raise UsageError(f"size {text} would make the image smaller than zero bytes (current size {current})")
        return new
    return parse_size(text)


def format_size(n: int) -> str:
    """Human size with binary units, qemu-img style ('1 GiB', '1.5 MiB')."""
    if n < 1024:
        return f"{n} B"
    for i, unit in enumerate(("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")):
        scale = 1 << (10 * (i + 1))
        if n < scale * 1024 or unit == "EiB":
            value = n / scale
            text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
            return f"{text} {unit}"
    return f"{n} B"


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int) -> int:
    return n // a * a


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def qemu_size(n: int) -> str:
    """A size as qemu-img prints one (three significant digits, the next
    unit from 1000 of the smaller one on: '0 B', '1.5 MiB', '0.977 MiB')."""
    import math

    _, e = math.frexp(n / (1000 / 1024))
    i = min(6, int((e - 1) / 10)) if e > 0 else 0
    return "%0.3g %sB" % (n / (1 << (10 * i)), ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[i])

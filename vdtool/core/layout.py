"""Declared on-disk structures: named fields over one ``struct.Struct``.

Each format's layout module (``vdtool/formats/<fmt>/layout.py``) declares
its headers with this helper, field names spelled as the specification
spells them, so the code reads against the spec::

    HEADER = Layout("qcow2 header", ">", (
        ("magic", "4s"), ("version", "I"), ("backing_file_offset", "Q"), ...))
    hdr = HEADER.unpack(head)          # a Record: hdr.version, hdr.magic ...
    hdr.version = 3
    raw = HEADER.pack(hdr)             # bytes, HEADER.size long
    HEADER.offset_of("version")        # 4: for tests that poke one field

A field named ``None`` is padding (``"12x"``) or bytes that are not read.
The ``struct.Struct`` is made once per layout, not per call."""

from __future__ import annotations

import struct
from collections.abc import Iterable


class Record:
    """The fields of one structure as attributes (mutable, compared by
    value).  Subclassed per layout with ``__slots__`` of its field names."""

    __slots__ = ()
    _fields: tuple = ()
    _layout: "Layout"

    def __init__(self, *values, **named):
        if len(values) > len(self._fields):
            raise TypeError(f"{self._layout.name}: {len(values)} values for {len(self._fields)} fields")
        for name, value in zip(self._fields, values):
            object.__setattr__(self, name, value)
        for name in self._fields[len(values):]:
            object.__setattr__(self, name, self._layout.defaults[name])
        for name, value in named.items():
            if name not in self._layout.offsets:
                raise TypeError(f"{self._layout.name} has no field {name!r}")
            object.__setattr__(self, name, value)

    def values(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fields)

    def asdict(self) -> dict:
        return {n: getattr(self, n) for n in self._fields}

    def replace(self, **changes) -> "Record":
        out = type(self)(*self.values())
        for name, value in changes.items():
            if name not in self._layout.offsets:
                raise TypeError(f"{self._layout.name} has no field {name!r}")
            setattr(out, name, value)
        return out

    def pack(self) -> bytes:
        return self._layout.pack(self)

    def __eq__(self, other):
        return type(other) is type(self) and other.values() == self.values()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"<{self._layout.name}: {inner}>"


class Layout:
    """One fixed-size structure.  ``byte_order`` is a ``struct`` prefix
    (``">"`` or ``"<"``); ``fields`` are (name or None, struct code)."""

    def __init__(self, name: str, byte_order: str, fields: Iterable[tuple]):
        self.name = name
        fields = tuple(fields)
        self.fields = tuple(n for n, _ in fields if n is not None)
        self.offsets: dict = {}
        self.sizes: dict = {}
        self.defaults: dict = {}
        pos = 0
        for fname, code in fields:
            if fname is None and not code.endswith("x"):
                raise ValueError(f"{name}: an unnamed field must be pad bytes ('Nx'), not {code!r}")
            size = struct.calcsize(byte_order + code)
            if fname is not None:
                if fname in self.offsets:
                    raise ValueError(f"{name}: field {fname!r} declared twice")
                self.offsets[fname] = pos
                self.sizes[fname] = size
                self.defaults[fname] = b"" if code.endswith("s") else 0
            pos += size
        self.struct = struct.Struct(byte_order + "".join(code for _, code in fields))
        self.size = self.struct.size
        if pos != self.size:  # alignment never applies with an explicit byte order
            raise ValueError(f"{name}: fields add up to {pos} bytes, struct says {self.size}")
        self.record = type(f"{name.title().replace(' ', '')}Record", (Record,),
                           {"__slots__": self.fields, "_fields": self.fields, "_layout": self})

    def unpack(self, buf, offset: int = 0) -> Record:
        """The structure at ``offset`` of ``buf`` (which must hold it:
        callers check lengths, so a short buffer is their bug)."""
        return self.record(*self.struct.unpack_from(buf, offset))

    def new(self, **values) -> Record:
        """A record with every field zero (or empty bytes) but those given."""
        return self.record(**values)

    def pack(self, rec: Record | None = None, **values) -> bytes:
        if rec is None:
            rec = self.record(**values)
        elif values:
            rec = rec.replace(**values)
        return self.struct.pack(*rec.values())

    def pack_into(self, buf, offset: int, rec: Record) -> None:
        self.struct.pack_into(buf, offset, *rec.values())

    def offset_of(self, field: str) -> int:
        """Where ``field`` starts, from the start of the structure."""
        return self.offsets[field]

    def span(self, field: str) -> tuple:
        """(offset, size) of ``field``."""
        return self.offsets[field], self.sizes[field]

    def __repr__(self) -> str:
        return f"<Layout {self.name}: {self.size} bytes>"

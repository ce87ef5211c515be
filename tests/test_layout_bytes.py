"""Unit tests of the core pieces the formats share: declared layouts
(core/layout.py), the byte helpers (core/bytesutil.py), and CheckResult's
report helpers with the check template method (core/backend.py)."""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from types import SimpleNamespace

import pytest

from vdtool.core import bytesutil as bu
from vdtool.core.backend import Cap, CheckResult, ImageBackend
from vdtool.core.errors import CorruptImageError, NotSupported, ReadOnlyError, UsageError
from vdtool.core.layout import Layout, Record

M = 1 << 20

# a header with every kind of field: bytes, integers of each size, padding
HDR = Layout("test header", ">", (
    ("magic", "4s"),
    ("version", "I"),
    (None, "4x"),
    ("size", "Q"),
    ("flags", "H"),
    ("shift", "B"),
    (None, "x"),
    ("name", "8s"),
))
LE = Layout("little one", "<", (("a", "I"), ("b", "H")))


def sample():
    return HDR.new(magic=b"TEST", version=3, size=10 * M, flags=0x8001, shift=16, name=b"diskname")


# -- Layout ------------------------------------------------------------------------------------

def test_size_fields_offsets_and_spans():
    assert HDR.size == 4 + 4 + 4 + 8 + 2 + 1 + 1 + 8 == HDR.struct.size
    assert HDR.fields == ("magic", "version", "size", "flags", "shift", "name")  # padding has no name
    assert [HDR.offset_of(f) for f in HDR.fields] == [0, 4, 12, 20, 22, 24]
    assert HDR.span("size") == (12, 8) and HDR.span("name") == (24, 8) and HDR.span("shift") == (22, 1)
    assert LE.size == 6 and LE.offset_of("b") == 4
    assert "test header" in repr(HDR) and str(HDR.size) in repr(HDR)


def test_offset_of_unknown_field():
    with pytest.raises(KeyError):
        HDR.offset_of("nope")
    with pytest.raises(KeyError):
        HDR.span("nope")


def test_pack_unpack_round_trip():
    rec = sample()
    raw = HDR.pack(rec)
    assert len(raw) == HDR.size
    assert raw == struct.pack(">4sI4xQHBx8s", b"TEST", 3, 10 * M, 0x8001, 16, b"diskname")
    back = HDR.unpack(raw)
    assert back == rec
    assert back.asdict() == {"magic": b"TEST", "version": 3, "size": 10 * M, "flags": 0x8001, "shift": 16,
                             "name": b"diskname"}
    assert back.values() == (b"TEST", 3, 10 * M, 0x8001, 16, b"diskname")
    assert rec.pack() == raw  # the record packs itself through its layout
    # keyword form and a record with changes give the same bytes
    assert HDR.pack(magic=b"TEST", version=3, size=10 * M, flags=0x8001, shift=16, name=b"diskname") == raw
    assert HDR.pack(rec, version=4) == raw[:4] + struct.pack(">I", 4) + raw[8:]
    assert rec.version == 3  # pack with changes leaves the record alone
    # short bytes are padded with zeros, as struct does
    assert HDR.unpack(HDR.pack(name=b"ab")).name == b"ab" + bytes(6)


def test_byte_order():
    assert LE.pack(a=1, b=2) == b"\x01\0\0\0\x02\0"
    assert HDR.pack(version=1)[4:8] == b"\0\0\0\x01"
    assert LE.unpack(b"\x01\x02\x03\x04\x05\x06").asdict() == {"a": 0x04030201, "b": 0x0605}


def test_unpack_at_an_offset_and_short_buffers():
    raw = HDR.pack(sample())
    buf = b"\xaa" * 100 + raw + b"\xbb" * 7
    assert HDR.unpack(buf, 100) == sample()
    with pytest.raises(struct.error):
        HDR.unpack(raw[:-1])
    with pytest.raises(struct.error):
        HDR.unpack(buf, len(buf) - HDR.size + 1)


def test_padding_is_written_as_zeros_and_ignored_when_read():
    raw = bytearray(HDR.pack(sample()))
    assert raw[8:12] == bytes(4) and raw[23] == 0
    raw[8:12] = b"\xff" * 4
    raw[23] = 0xFF
    assert HDR.unpack(raw) == sample()
    assert HDR.pack(HDR.unpack(raw)) == HDR.pack(sample())  # a round trip clears the padding


def test_defaults_are_zero_and_empty_bytes():
    rec = HDR.new()
    assert rec.asdict() == {"magic": b"", "version": 0, "size": 0, "flags": 0, "shift": 0, "name": b""}
    assert HDR.pack(rec) == bytes(HDR.size)
    assert HDR.new(version=2).asdict() == dict(rec.asdict(), version=2)
    # positional values fill the first fields, the rest default
    part = HDR.record(b"ABCD", 7)
    assert (part.magic, part.version, part.size, part.name) == (b"ABCD", 7, 0, b"")


def test_records_are_mutable_and_slotted():
    rec = sample()
    rec.version = 9
    rec.size += 512
    assert HDR.unpack(HDR.pack(rec)).version == 9 and HDR.unpack(HDR.pack(rec)).size == 10 * M + 512
    with pytest.raises(AttributeError):
        rec.not_a_field = 1
    assert isinstance(rec, Record) and not hasattr(rec, "__dict__")


def test_replace_copies():
    rec = sample()
    new = rec.replace(version=5, name=b"other")
    assert (new.version, new.name, new.magic) == (5, b"other", b"TEST")
    assert rec.version == 3 and rec.name == b"diskname"
    assert rec.replace() == rec and rec.replace() is not rec


def test_equality_is_by_value_and_layout():
    assert sample() == sample()
    assert sample() != sample().replace(flags=0)
    twin = Layout("test header", ">", ((n, c) for n, c in (
        ("magic", "4s"), ("version", "I"), (None, "4x"), ("size", "Q"), ("flags", "H"), ("shift", "B"),
        (None, "x"), ("name", "8s"))))
    assert twin.new(**sample().asdict()).values() == sample().values()
    assert twin.new(**sample().asdict()) != sample()  # another layout's record is another type
    assert sample() != sample().values() and sample() != sample().asdict()
    assert "version=3" in repr(sample()) and "test header" in repr(sample())


def test_unknown_fields_are_refused():
    with pytest.raises(TypeError, match="no field 'versoin'"):
        HDR.new(versoin=1)
    with pytest.raises(TypeError, match="no field"):
        HDR.pack(versoin=1)
    with pytest.raises(TypeError, match="no field"):
        sample().replace(versoin=1)
    with pytest.raises(TypeError, match="no field"):
        HDR.pack(sample(), versoin=1)
    with pytest.raises(TypeError, match="7 values for 6 fields"):
        HDR.record(*range(7))


def test_bad_declarations():
    with pytest.raises(ValueError, match="declared twice"):
        Layout("dup", ">", (("a", "I"), ("a", "H")))
    # native alignment pads between fields: the declared sizes no longer add up
    with pytest.raises(ValueError, match="add up to 5 bytes"):
        Layout("aligned", "@", (("a", "B"), ("b", "I")))


def test_unnamed_fields_must_be_pad_bytes():
    with pytest.raises(ValueError):
        Layout("reserved", ">", (("a", "I"), (None, "4s")))


def test_pack_into():
    buf = bytearray(b"\xee" * (HDR.size + 10))
    HDR.pack_into(buf, 5, sample())
    assert buf[:5] == b"\xee" * 5 and buf[-5:] == b"\xee" * 5
    assert bytes(buf[5:5 + HDR.size]) == HDR.pack(sample())
    with pytest.raises(struct.error):
        HDR.pack_into(bytearray(HDR.size - 1), 0, sample())


def test_values_out_of_range_are_struct_errors():
    with pytest.raises(struct.error):
        HDR.pack(version=1 << 32)
    with pytest.raises(struct.error):
        HDR.pack(shift=-1)


# -- bytesutil ---------------------------------------------------------------------------------

BUF = len(bu.ZERO_BUFFER)


def test_zero_buffer():
    assert BUF == 2 * M and not any(bu.ZERO_BUFFER)
    assert isinstance(bu.ZERO_BUFFER, bytes)  # read-only: nobody can dirty it


@pytest.mark.parametrize("n", [0, 1, 512, BUF - 1, BUF, BUF + 1, 3 * BUF + 17])
def test_zeros(n):
    z = bu.zeros(n)
    assert len(z) == n and bytes(z) == bytes(n)
    if n <= BUF:
        assert isinstance(z, memoryview) and z.readonly  # a view of the shared buffer, no allocation
    else:
        assert isinstance(z, bytes)


def test_is_zero_small():
    assert bu.is_zero(b"")
    assert bu.is_zero(bytes(10))
    assert not bu.is_zero(b"\0\0\1")
    assert bu.is_zero(b"\1\0\0\1", 1, 2)
    assert not bu.is_zero(b"\1\0\0\1", 1, 3)
    assert bu.is_zero(b"\1\0\0", 1)  # n defaults to the rest
    assert bu.is_zero(b"\1\1", 1, 0)  # nothing to look at


@pytest.mark.parametrize("at", [0, BUF - 1, BUF, BUF + 1, 2 * BUF - 1, 2 * BUF, 2 * BUF + 99])
def test_is_zero_across_the_buffer_boundary(at):
    n = 2 * BUF + 100  # more than one piece of the shared buffer, and a partial last one
    buf = bytearray(n)
    assert bu.is_zero(buf) and bu.is_zero(bytes(buf))
    buf[at] = 1
    assert not bu.is_zero(buf)
    assert not bu.is_zero(bytes(buf))
    # windows that end just before the byte, or start just after it, are zero
    assert bu.is_zero(buf, 0, at)
    assert bu.is_zero(buf, at + 1)
    assert not bu.is_zero(buf, max(0, at - BUF), min(BUF + 1, n - max(0, at - BUF)))


def test_is_zero_with_an_offset_past_a_piece():
    buf = bytearray(3 * BUF)
    buf[5] = 7  # before the window: ignored
    assert bu.is_zero(buf, 6, 3 * BUF - 6)
    buf[3 * BUF - 1] = 7
    assert not bu.is_zero(buf, 6, 3 * BUF - 6)
    assert bu.is_zero(buf, 6, 3 * BUF - 7)


@pytest.mark.parametrize("a,b,want", [(0, 512, 0), (1, 512, 1), (512, 512, 1), (513, 512, 2), (10, 3, 4),
                                      ((1 << 64) + 1, 1 << 32, (1 << 32) + 1)])
def test_ceil_div(a, b, want):
    assert bu.ceil_div(a, b) == want


@pytest.mark.parametrize("n,a,up,down", [(0, 4096, 0, 0), (1, 4096, 4096, 0), (4096, 4096, 4096, 4096),
                                         (4097, 4096, 8192, 4096), (10, 3, 12, 9), (7, 1, 7, 7),
                                         ((1 << 60) + 5, 1 << 20, (1 << 60) + (1 << 20), 1 << 60)])
def test_align(n, a, up, down):
    assert bu.align_up(n, a) == up
    assert bu.align_down(n, a) == down
    assert bu.align_down(n, a) <= n <= bu.align_up(n, a)


def test_typecode_sizes():
    assert [array(t).itemsize for t in (bu.U8, bu.U16, bu.U32, bu.U64)] == [1, 2, 4, 8]


@pytest.mark.parametrize("typecode,char", [(bu.U8, "B"), (bu.U16, "H"), (bu.U32, "I"), (bu.U64, "Q")])
def test_be_and_le_arrays_round_trip(typecode, char):
    size = struct.calcsize(char)
    values = [0, 1, 2, (1 << (8 * size)) - 1, 0x0102030405060708 & ((1 << (8 * size)) - 1), 7]
    be_raw = struct.pack(f">{len(values)}{char}", *values)
    le_raw = struct.pack(f"<{len(values)}{char}", *values)
    be = bu.be_array(be_raw, typecode)
    le = bu.le_array(le_raw, typecode)
    assert be.typecode == le.typecode == typecode
    assert list(be) == list(le) == values
    assert bu.be_bytes(be) == be_raw and bu.le_bytes(le) == le_raw
    assert bu.be_bytes(bu.be_array(be_raw, typecode)) == be_raw  # round trip
    # the arrays are left in host order: converting does not swap them
    before = list(be)
    bu.be_bytes(be)
    bu.le_bytes(be)
    assert list(be) == before


def test_array_defaults_and_empty_input():
    raw = struct.pack(">2Q", 1, 1 << 40)
    assert list(bu.be_array(raw)) == [1, 1 << 40]  # U64 by default (qcow2 tables)
    assert list(bu.le_array(struct.pack("<2I", 5, 0xFFFFFFFF))) == [5, 0xFFFFFFFF]  # U32 (VDI block map)
    assert len(bu.be_array(b"")) == 0 and bu.be_bytes(array(bu.U64)) == b""
    with pytest.raises(ValueError):
        bu.be_array(b"\0" * 7)  # not a whole number of items


def test_array_host_order():
    a = bu.be_array(b"\0\0\0\1", bu.U32)
    assert a.tobytes() == (1).to_bytes(4, sys.byteorder)


# -- CheckResult's helpers ---------------------------------------------------------------------

def test_corrupt_leak_error_say():
    r = CheckResult()
    r.corrupt("cluster 5 refcount=0 reference=1")
    r.corrupt("L2 table at 0x50000 unaligned", count=3)
    r.corrupt("block 7 doubly used", repairing=True)
    r.leak("cluster 9 refcount=1 reference=0")
    r.leak("blocks 10-19 unused", count=10)
    r.error("cannot read the block map: short read")
    r.say("Warning: the header's free count is stale")
    assert (r.corruptions, r.leaks, r.check_errors) == (5, 11, 1)
    assert (r.corruptions_fixed, r.leaks_fixed) == (0, 0)  # counting fixes is the format's part
    assert r.messages == [
        "ERROR: cluster 5 refcount=0 reference=1",
        "ERROR: L2 table at 0x50000 unaligned",
        "Repairing: block 7 doubly used",
        "Leaked: cluster 9 refcount=1 reference=0",
        "Leaked: blocks 10-19 unused",
        "ERROR: cannot read the block map: short read",
        "Warning: the header's free count is stale",
    ]
    assert r.exit_code == 1  # a check error wins


def test_say_changes_no_count():
    r = CheckResult()
    r.say("note")
    assert (r.corruptions, r.leaks, r.check_errors, r.exit_code) == (0, 0, 0, 0)
    assert r.messages == ["note"]


def test_exit_codes_from_the_helpers():
    r = CheckResult()
    r.leak("x")
    assert r.exit_code == 3
    r.corrupt("y")
    assert r.exit_code == 2
    r.corruptions_fixed = 1
    r.leaks_fixed = 1
    assert r.exit_code == 0


def test_messages_are_capped_and_counts_go_on():
    r = CheckResult()
    cap = CheckResult.MAX_MESSAGES
    assert cap == 200
    for i in range(cap + 50):
        r.corrupt(f"entry {i}")
    for i in range(30):
        r.leak(f"cluster {i}", count=2)
    r.error("late")
    r.say("late note")
    assert (r.corruptions, r.leaks, r.check_errors) == (cap + 50, 60, 1)
    assert len(r.messages) == cap + 1
    assert r.messages[:2] == ["ERROR: entry 0", "ERROR: entry 1"]
    assert r.messages[cap - 1] == f"ERROR: entry {cap - 1}"
    assert r.messages[-1] == "(further messages left out)"
    assert r.messages.count("(further messages left out)") == 1


def test_cap_counts_notes_too():
    r = CheckResult()
    for i in range(CheckResult.MAX_MESSAGES):
        r.say(f"note {i}")
    r.corrupt("after the cap")
    assert r.corruptions == 1 and r.messages[-1] == "(further messages left out)"
    assert "ERROR: after the cap" not in r.messages


# -- the check template method -----------------------------------------------------------------

class _Fake(ImageBackend):
    """A backend whose ``_check`` does what the test says; never registered."""

    name = "fake"
    capabilities = Cap.CHECK | Cap.REPAIR

    def __init__(self, action, writable=True):
        super().__init__(SimpleNamespace(path="/nowhere/fake.img", writable=writable))
        self.action = action
        self.calls = []

    def _check(self, res, repair, progress):
        self.calls.append(repair)
        self.action(res)


def _raise(exc):
    def action(res):
        res.leak("found before the failure")
        raise exc
    return action


def test_check_fills_a_fresh_result():
    b = _Fake(lambda res: res.corrupt("bad"))
    r1, r2 = b.check(), b.check("leaks")
    assert r1 is not r2 and (r1.corruptions, r2.corruptions) == (1, 1)
    assert b.calls == [None, "leaks"]


@pytest.mark.parametrize("exc,text", [
    (CorruptImageError("the table is gone", "/x"), "the table is gone"),
    (struct.error("unpack requires a buffer of 8 bytes"), "internal check failure: error: unpack requires"),
    (ValueError("bad value"), "internal check failure: ValueError: bad value"),
    (OverflowError("too big"), "internal check failure: OverflowError: too big"),
    (IndexError("list index out of range"), "internal check failure: IndexError"),
    (KeyError(5), "internal check failure: KeyError: 5"),
    (zlib.error("invalid stored block lengths"), "internal check failure: error: invalid stored"),
    (MemoryError(), "internal check failure: MemoryError"),
])
def test_check_turns_failures_into_check_errors(exc, text):
    r = _Fake(_raise(exc)).check()
    assert (r.check_errors, r.leaks) == (1, 1)  # what was found before the failure stays
    assert r.messages[0] == "Leaked: found before the failure"
    assert r.messages[1].startswith("ERROR: ") and text in r.messages[1], r.messages
    assert r.exit_code == 1


def test_check_lets_other_exceptions_through():
    with pytest.raises(RuntimeError):
        _Fake(_raise(RuntimeError("a bug"))).check()
    with pytest.raises(KeyboardInterrupt):
        _Fake(_raise(KeyboardInterrupt())).check()


def test_check_validates_mode_capabilities_and_writability():
    b = _Fake(lambda res: None)
    with pytest.raises(UsageError):
        b.check("everything")
    with pytest.raises(ReadOnlyError):
        _Fake(lambda res: None, writable=False).check("leaks")
    assert _Fake(lambda res: None, writable=False).check().exit_code == 0  # checking needs no writing
    b.capabilities = Cap.CHECK
    with pytest.raises(NotSupported):
        b.check("all")
    b.capabilities = Cap.NONE
    with pytest.raises(NotSupported):
        b.check()
    assert b.calls == []  # refused before the format's check ran

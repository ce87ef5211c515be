"""The VHDX metadata log: finding the active sequence of a pending log,
replaying it (writable open), reading through it (read-only open, the file
untouched), and writing metadata updates through it.

A pending log is one whose header LogGuid is not zero.  Its entries are
valid when their checksum, LogGuid, descriptors and data sectors agree;
the active sequence is the run of entries with consecutive sequence numbers
from the Tail of the entry with the highest sequence number up to it.

Writing (``write_through_log``), as qemu and MS-VHDX order it: the data the
metadata points to is flushed first; the header gets a new LogGuid; one
entry per batch of 4 KiB sectors is written at the start of the log and
flushed; the sectors are written in place and flushed; the header's LogGuid
is cleared again.  A crash before the entry is whole leaves the old
metadata (the torn entry fails its checksum); a crash after it leaves a
log that replays to the new metadata."""

from __future__ import annotations

from vdtool.core.bytesutil import align_up
from vdtool.formats.vhdx.crc import with_zeroed_field
from vdtool.formats.vhdx.headers import begin_modification, update_header
from vdtool.formats.vhdx.layout import (CHECKSUM_OFFSET, DATA_SIGNATURE, DESC_SIGNATURE, LOG_DATA_DESCRIPTOR,
                                        LOG_DATA_SECTOR, LOG_ENTRY_HEADER, LOG_SECTOR, LOG_SIGNATURE,
                                        LOG_ZERO_DESCRIPTOR, MAX_LOG_READ, MiB, NULL_GUID, REGION_TABLE_OFFSETS,
                                        ZERO_SIGNATURE, random_guid)
from vdtool.formats.vhdx.state import VhdxState

MAX_OVERLAY_SECTORS = 1 << 16  # zero descriptors a read-only open keeps in memory (256 MiB)


class LogEntry:
    """One valid log entry: its header record and what it writes, as
    (file offset, 4 KiB bytes) for data and (file offset, length) for zeros."""

    __slots__ = ("hdr", "pos", "data", "zeros")

    def __init__(self, hdr, pos: int):
        self.hdr = hdr
        self.pos = pos
        self.data: list = []
        self.zeros: list = []


def _circular(log: bytes, pos: int, length: int) -> bytes:
    end = pos + length
    if end <= len(log):
        return log[pos:end]
    return log[pos:] + log[:end - len(log)]


def _parse_entry(log: bytes, pos: int, guid: bytes) -> LogEntry | None:
    """The entry at ``pos`` of the log, or None where there is no valid one."""
    hdr = LOG_ENTRY_HEADER.unpack(log, pos)
    n = hdr.EntryLength
    if (hdr.Signature != LOG_SIGNATURE or hdr.LogGuid != guid or not hdr.SequenceNumber or not n
            or n % LOG_SECTOR or n > len(log) or hdr.Tail % LOG_SECTOR or hdr.Tail >= len(log)):
        return None
    desc_sectors = -(-(hdr.DescriptorCount + 2) // 128)
    raw = _circular(log, pos, n)
    if with_zeroed_field(raw, CHECKSUM_OFFSET) != hdr.Checksum:
        return None
    entry = LogEntry(hdr, pos)
    data_at = desc_sectors * LOG_SECTOR
    for i in range(hdr.DescriptorCount):
        at = LOG_ENTRY_HEADER.size + i * LOG_DATA_DESCRIPTOR.size
        if at + LOG_DATA_DESCRIPTOR.size > n:
            return None
        sig = raw[at:at + 4]
        if sig == ZERO_SIGNATURE:
            z = LOG_ZERO_DESCRIPTOR.unpack(raw, at)
            if z.SequenceNumber != hdr.SequenceNumber or z.FileOffset % LOG_SECTOR or z.ZeroLength % LOG_SECTOR:
                return None
            entry.zeros.append((z.FileOffset, z.ZeroLength))
        elif sig == DESC_SIGNATURE:
            d = LOG_DATA_DESCRIPTOR.unpack(raw, at)
            if d.SequenceNumber != hdr.SequenceNumber or d.FileOffset % LOG_SECTOR or data_at + LOG_SECTOR > n:
                return None
            sec = LOG_DATA_SECTOR.unpack(raw, data_at)
            data_at += LOG_SECTOR
            if (sec.DataSignature != DATA_SIGNATURE
                    or (sec.SequenceHigh << 32 | sec.SequenceLow) != hdr.SequenceNumber):
                return None
            entry.data.append((d.FileOffset, d.LeadingBytes + sec.Data + d.TrailingBytes))
        else:
            return None
    return entry


def active_sequence(st: VhdxState) -> list:
    """The entries of the pending log's active sequence, oldest first
    (empty: nothing to replay)."""
    hdr = st.hdr
    if hdr.LogGuid == NULL_GUID or not hdr.LogLength:
        return []
    if hdr.LogLength > MAX_LOG_READ:
        raise st.corrupt(f"log of {hdr.LogLength} bytes is larger than vdtool replays ({MAX_LOG_READ})")
    log = st.file.pread_exact(hdr.LogOffset, hdr.LogLength, "log")
    entries = {}
    # Each header claims a length to checksum: a hostile log of overlapping
    # headers would make that quadratic, so the bytes checked are capped.
    budget = 4 * len(log) + (64 << 20)
    for pos in range(0, len(log), LOG_SECTOR):
        if log[pos:pos + 4] == LOG_SIGNATURE:
            budget -= min(LOG_ENTRY_HEADER.unpack(log, pos).EntryLength, len(log))
            if budget < 0:
                raise st.corrupt("the log has more overlapping entries than a log can hold; it cannot be replayed")
            e = _parse_entry(log, pos, hdr.LogGuid)
            if e is not None:
                entries[pos] = e
    best: list = []
    for head in sorted(entries.values(), key=lambda e: -e.hdr.SequenceNumber):
        chain = _chain(entries, head, len(log))
        if chain:
            best = chain
            break
    for e in best:
        _check_targets(st, e)
    return best


def _chain(entries: dict, head: LogEntry, log_len: int) -> list:
    """The entries from ``head``'s Tail up to ``head`` when they follow one
    another with consecutive sequence numbers; [] when they do not."""
    out = []
    pos = head.hdr.Tail
    seq = None
    for _ in range(len(entries)):
        e = entries.get(pos)
        if e is None or (seq is not None and e.hdr.SequenceNumber != seq + 1):
            return []
        out.append(e)
        if e is head:
            return out
        seq = e.hdr.SequenceNumber
        pos = (pos + e.hdr.EntryLength) % log_len
    return []


def _check_targets(st: VhdxState, e: LogEntry) -> None:
    """A log may not write the file identifier, the headers or itself, nor
    past the size its entry says the file has."""
    hdr = st.hdr
    limit = max(e.hdr.LastFileOffset, e.hdr.FlushedFileOffset)
    if e.hdr.FlushedFileOffset > st.fsize:
        raise st.corrupt(f"log entry {e.hdr.SequenceNumber} says the file was {e.hdr.FlushedFileOffset} bytes, it "
                         f"is {st.fsize}: the file was truncated; the log cannot be replayed")
    if limit > st.fsize + (1 << 40):
        raise st.corrupt(f"log entry {e.hdr.SequenceNumber}: last file offset {e.hdr.LastFileOffset} is far "
                         f"past the end of the file ({st.fsize})")
    for off, length in [(o, LOG_SECTOR) for o, _ in e.data] + e.zeros:
        end = off + length
        if (off < REGION_TABLE_OFFSETS[0] or end > limit
                or (off < hdr.LogOffset + hdr.LogLength and end > hdr.LogOffset)):
            raise st.corrupt(f"log entry {e.hdr.SequenceNumber} writes {length} bytes at offset {off}, outside "
                             f"what a log may write (file size {limit}, log at {hdr.LogOffset})")


def replay(st: VhdxState, entries: list) -> None:
    """Apply the active sequence to the file, flush, and mark the log empty."""
    begin_modification(st, visible=False)
    last = 0
    for e in entries:
        for off, data in e.data:
            st.file.pwrite(off, data)
        for off, length in e.zeros:
            st.file.write_zeroes(off, length)
        last = max(last, e.hdr.LastFileOffset)
    if last > st.file.size():
        st.file.truncate(align_up(last, MiB))
    st.file.flush()
    st.fsize = st.file.size()
    update_header(st, LogGuid=NULL_GUID)
    st.log_replayed = True


def overlay(st: VhdxState, entries: list) -> dict:
    """The sectors a replay would write, for a read-only open to read through."""
    out: dict = {}
    count = 0
    for e in entries:
        for off, data in e.data:
            out[off] = data
        for off, length in e.zeros:
            count += length // LOG_SECTOR
            if count > MAX_OVERLAY_SECTORS:
                raise st.corrupt("the pending log zeroes more than vdtool reads through without replaying; "
                                 "open the image for writing to replay it")
            for sec in range(off, off + length, LOG_SECTOR):
                out[sec] = bytes(LOG_SECTOR)
    return out


# -- writing -------------------------------------------------------------------------------------

def encode_entry(seq: int, guid: bytes, tail: int, sectors: list, file_size: int) -> bytes:
    """One log entry writing ``sectors`` ((offset, 4 KiB bytes)), checksummed."""
    n = len(sectors)
    desc_sectors = -(-(n + 2) // 128)
    buf = bytearray((desc_sectors + n) * LOG_SECTOR)
    LOG_ENTRY_HEADER.pack_into(buf, 0, LOG_ENTRY_HEADER.new(
        Signature=LOG_SIGNATURE, EntryLength=len(buf), Tail=tail, SequenceNumber=seq, DescriptorCount=n,
        LogGuid=guid, FlushedFileOffset=file_size, LastFileOffset=file_size))
    for i, (off, data) in enumerate(sectors):
        desc = LOG_DATA_DESCRIPTOR.new(DataSignature=DESC_SIGNATURE, TrailingBytes=data[4092:],
                                       LeadingBytes=data[:8], FileOffset=off, SequenceNumber=seq)
        LOG_DATA_DESCRIPTOR.pack_into(buf, LOG_ENTRY_HEADER.size + i * LOG_DATA_DESCRIPTOR.size, desc)
        LOG_DATA_SECTOR.pack_into(buf, (desc_sectors + i) * LOG_SECTOR, LOG_DATA_SECTOR.new(
            DataSignature=DATA_SIGNATURE, SequenceHigh=seq >> 32, Data=data[8:4092], SequenceLow=seq & 0xFFFFFFFF))
    crc = with_zeroed_field(buf, CHECKSUM_OFFSET)
    buf[CHECKSUM_OFFSET:CHECKSUM_OFFSET + 4] = crc.to_bytes(4, "little")
    return bytes(buf)


def batches(sectors: list, log_length: int) -> list:
    """``sectors`` cut into runs whose entries fit the log."""
    room = log_length // LOG_SECTOR
    per = room
    while per > 1 and -(-(per + 2) // 128) + per > room:
        per -= 1
    return [sectors[i:i + per] for i in range(0, len(sectors), per)] if sectors else []


def write_through_log(st: VhdxState, sectors: dict, crash_hook=None) -> None:
    """Write ``sectors`` (file offset -> 4 KiB) in place through the log."""
    if not sectors:
        return
    hdr = st.hdr
    if not hdr.LogLength or hdr.LogLength < 2 * LOG_SECTOR:
        raise st.corrupt(f"the image has no room for a log (log length {hdr.LogLength}); cannot write metadata")
    st.file.flush()  # the data the new metadata points to first
    begin_modification(st, visible=True)
    update_header(st, LogGuid=random_guid())
    for batch in batches(sorted(sectors.items()), hdr.LogLength):
        entry = encode_entry(st.log_seq, st.hdr.LogGuid, 0, batch, st.fsize)
        st.log_seq += 1
        st.file.pwrite(st.hdr.LogOffset, entry)
        st.file.flush()
        if crash_hook is not None:
            crash_hook()
        for off, data in batch:
            st.file.pwrite(off, data)
        st.file.flush()
    update_header(st, LogGuid=NULL_GUID)

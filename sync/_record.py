"""Audit records and their hash chain: pure logic, no I/O.

A record's hash is the sha256 (hex) of its *canonical encoding*: the JSON object
`{"body","device","kind","prev","seq","ts"}` with keys sorted and no whitespace, where `body` is
the body's own canonical JSON (keys sorted, no whitespace) inserted byte for byte. The first
record of a device (seq 1) has `prev` = 64 zeros (`GENESIS`); every later record's `prev` is the
previous record's hash. A `gap` record (body `{from_seq, to_seq, reason, after_hash, last_hash}`)
names a range of records that were deleted before they could be synced, and the two hashes the
range sat between: `after_hash` is the hash of the record before `from_seq` (the `prev` of the
first record deleted), `last_hash` the hash of `to_seq` (the `prev` of the record after the range).
A verifier therefore still checks the chain *across* the gap: the kept record before the range
must have `after_hash`, the kept record after it must name `last_hash` as its `prev`. A gap that
does not name both, or names hashes the kept records do not have, explains nothing.

On the wire (the stream, `edge audit export`) a record is the JSON object
`{"device","seq","ts","kind","body","prev","hash"}`; decoders ignore fields they do not know.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import msgspec

from ._errors import ChainBroken, SyncError

GENESIS = "0" * 64
"""The `prev` of a device's first record."""

GAP_KIND = "gap"
"""The kind of the record that names a range of records deleted before they were synced."""

DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class AuditRecord(msgspec.Struct, frozen=True):
    """One link of a device's audit chain; `body` is the canonical JSON of the body."""

    device: str
    seq: int
    ts: int
    kind: str
    body: msgspec.Raw
    prev: str
    hash: str


class GapBody(msgspec.Struct, frozen=True):
    """The body of a `gap` record: records `from_seq..to_seq` (inclusive) were deleted unsynced.

    `after_hash` is the hash of record `from_seq - 1` (GENESIS when from_seq is 1), `last_hash`
    the hash of record `to_seq`: the chain continues across the gap through them.
    """

    from_seq: int
    to_seq: int
    reason: str
    after_hash: str = ""
    last_hash: str = ""


class _Canonical(msgspec.Struct, frozen=True):
    # Encoded with order="sorted", so the field order here does not matter.
    body: msgspec.Raw
    device: str
    kind: str
    prev: str
    seq: int
    ts: int


_canonical_encoder = msgspec.json.Encoder(order="sorted")
_wire_encoder = msgspec.json.Encoder()
_wire_decoder = msgspec.json.Decoder(AuditRecord)
_gap_decoder = msgspec.json.Decoder(GapBody)
_string = _wire_encoder.encode


def check_device(device: str) -> str:
    """Return `device` if it is a valid device id (`[A-Za-z0-9_-]{1,64}`, not `all`/`group`)."""
    if not DEVICE_ID.fullmatch(device) or device in ("all", "group"):
        raise ValueError(f"invalid device id {device!r}: expected [A-Za-z0-9_-]{{1,64}}, not 'all' or 'group'")
    return device


def encode_body(body: object) -> bytes:
    """The canonical JSON of a body; a `msgspec.Raw` is taken as already canonical."""
    if isinstance(body, msgspec.Raw):
        return bytes(body)
    return _canonical_encoder.encode(body)


def canonical_bytes(device: str, seq: int, ts: int, kind: str, body: bytes, prev: str) -> bytes:
    """The bytes a record's hash is computed over."""
    # Byte-for-byte what `_canonical_encoder.encode(_Canonical(...))` gives (a test holds the two
    # together), built by formatting because it runs once per append on the event loop.
    return b'{"body":%b,"device":%b,"kind":%b,"prev":%b,"seq":%d,"ts":%d}' % (
        body,
        _string(device),
        _string(kind),
        _string(prev),
        seq,
        ts,
    )


def record_hash(device: str, seq: int, ts: int, kind: str, body: bytes, prev: str) -> str:
    """sha256 hex of the canonical encoding."""
    return hashlib.sha256(canonical_bytes(device, seq, ts, kind, body, prev)).hexdigest()


def hash_ok(record: AuditRecord) -> bool:
    """True if the record's `hash` matches its other fields."""
    expected = record_hash(record.device, record.seq, record.ts, record.kind, bytes(record.body), record.prev)
    return expected == record.hash


def encode_record(record: AuditRecord) -> bytes:
    """The record's wire JSON."""
    return _wire_encoder.encode(record)


def decode_record(data: bytes | bytearray | memoryview) -> AuditRecord:
    """Parse a record's wire JSON (unknown fields ignored); raises SyncError if it is not a record."""
    try:
        return _wire_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SyncError(f"not an audit record: {exc}") from exc


def gap_body(record: AuditRecord) -> GapBody | None:
    """The body of a well-formed gap record (a range before itself), or None."""
    if record.kind != GAP_KIND:
        return None
    try:
        gap = _gap_decoder.decode(bytes(record.body))
    except msgspec.DecodeError:
        return None
    if gap.from_seq < 1 or gap.to_seq < gap.from_seq or gap.to_seq >= record.seq:
        return None
    return gap


def gap_range(record: AuditRecord) -> tuple[int, int] | None:
    """The `(from_seq, to_seq)` a gap record names, or None if it is not a well-formed gap record."""
    gap = gap_body(record)
    return None if gap is None else (gap.from_seq, gap.to_seq)


def gap_hashes_ok(gap: GapBody) -> bool:
    """Whether a gap names both hashes it sits between (64 hex digits each)."""
    return bool(_HEX64.fullmatch(gap.after_hash) and _HEX64.fullmatch(gap.last_hash))


_HEX64 = re.compile(r"[0-9a-f]{64}")


class Chain:
    """The head of one device's chain: makes the next record, or checks that a given one follows.

    `make` is what the log uses to extend the chain; `accept` is what verification uses to walk one.
    """

    __slots__ = ("device", "next_seq", "last_hash")

    def __init__(self, device: str, next_seq: int = 1, last_hash: str = GENESIS) -> None:
        self.device = check_device(device)
        self.next_seq = next_seq
        self.last_hash = last_hash

    def make(self, kind: str, body: object | Callable[[int], object], ts: int) -> AuditRecord:
        """Build the next record and advance; `body(seq)` is called first when body is callable.

        If building the body fails, the chain does not advance.
        """
        seq = self.next_seq
        value = body(seq) if callable(body) else body
        body_json = encode_body(value)
        digest = record_hash(self.device, seq, ts, kind, body_json, self.last_hash)
        record = AuditRecord(
            device=self.device,
            seq=seq,
            ts=ts,
            kind=kind,
            body=msgspec.Raw(body_json),
            prev=self.last_hash,
            hash=digest,
        )
        self.next_seq = seq + 1
        self.last_hash = digest
        return record

    def accept(self, record: AuditRecord, *, allow_gap: bool = False) -> None:
        """Check that `record` is the next link and advance to it; raise ChainBroken if not.

        With `allow_gap`, a record further ahead is accepted without checking its `prev` (the
        caller has established that the skipped range is explained by a gap record).
        """
        if record.device != self.device:
            raise ChainBroken(record.seq, f"device is {record.device!r}, expected {self.device!r}")
        if not hash_ok(record):
            raise ChainBroken(record.seq, "hash does not match the record's contents")
        if record.seq != self.next_seq:
            if not (allow_gap and record.seq > self.next_seq):
                raise ChainBroken(record.seq, f"seq {record.seq} where {self.next_seq} was expected")
        elif record.prev != self.last_hash:
            raise ChainBroken(record.seq, "prev does not match the previous record's hash")
        self.next_seq = record.seq + 1
        self.last_hash = record.hash

    def rewind(self, next_seq: int, last_hash: str) -> None:
        """Move the head back (records after `next_seq - 1` were never committed)."""
        self.next_seq = next_seq
        self.last_hash = last_hash

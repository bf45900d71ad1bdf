"""How a record is stored in the SQLite file: pure functions, no I/O.

The chain is defined over canonical JSON (`_record`); what the file keeps is smaller, and turns
back into exactly those bytes:

- `hash` and `prev` are 32-byte blobs, not 64 hex characters (files written before this kept
  text; a column holds either, and both read back as hex);
- a body is kept as its canonical JSON when that is short, else compressed: one byte
  `_DEFLATE_V1`, then raw DEFLATE primed with a preset dictionary (`_DICTIONARY_V1`) of what every
  record says again: field names, kinds, tiers, reasons. A JSON body begins with `{`, never with
  that byte, so old and new rows sit side by side without a migration.

A decision body of ~390 bytes is kept in ~95: per record, only what is new (ids, times, hashes,
scores) costs space. The dictionary is part of the file format: it never changes; a better one
would be a new codec byte. Compressing costs ~9 µs a body, holding the GIL: the log compresses
what it commits while it keeps up, and stores a large commit's bodies as they are (`_log`).
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec

from ._errors import SyncError
from ._record import AuditRecord

_DEFLATE_V1 = 1
_PREFIX_V1 = bytes([_DEFLATE_V1])
_COMPRESS_FROM = 96  # bytes of JSON below which compressing saves too little to be worth a call
# A small window and little memory: a body is a few hundred bytes, and setting up a large
# compressor for each would cost more than compressing.
_WBITS = -11
_MEM_LEVEL = 2
_LEVEL = 6

# Common strings last (DEFLATE finds the nearest match first, and nearer is cheaper). Never edit:
# stored bodies depend on these exact bytes.
_DICTIONARY_V1 = (
    b'{"event":"in_use","name":"","sha256":"","version":"1"}'
    b'{"from":"online","to":"offline","reason":"probe_failed","breaker":"open"}'
    b'{"version":"","groups":[],"pipelines":[]}{"uptime_s":'
    b'{"count":1,"reasons":{"schema":1},"subjects":[]}'
    b'{"decision_id":"","requested_action":"shutdown","status":"approved","by":"","by_name":"'
    b'"reason":"breaker_open","tier":"cloud"},{"reason":"timeout","tier":"cloud"},'
    b'{"reason":"low_confidence","tier":"model"},{"reason":"out_of_range","tier":"model"}'
    b'"tier":"rules"}"tier":"guard"}"tier":"cloud"}"label":"critical","label":"anomaly",'
    b'"action":"inspect","action":"shutdown","action":"hold",'
    b'"governance":{"requested_action":"inspect","status":"rate_limited"},'
    b'"governance":{"reason":"paused","requested_action":"shutdown","status":"paused"},'
    b'"shadow":{"confidence":0.9,"label":"normal","version":"2"},'
    b'{"action":"none","confidence":0.9,"decided_at":17,"fallbacks":[{"reason":"unreachable","tier":"cloud"}],'
    b'"governance":{"requested_action":"none","status":"auto"},"id":"18","input_sha256":"",'
    b'"label":"normal","model":1,"pipeline":"pump","received_at":17,"subject":"sensors.","tier":"model"}'
)


def pack_body(body: bytes) -> bytes:
    """The bytes the file keeps for a canonical JSON body."""
    if len(body) < _COMPRESS_FROM:
        return body
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zdict=_DICTIONARY_V1)
    packed = _PREFIX_V1 + compressor.compress(body) + compressor.flush()
    return packed if len(packed) < len(body) else body


def unpack_body(stored: bytes) -> bytes:
    """The canonical JSON a stored body stands for."""
    if not stored or stored[0] != _DEFLATE_V1:
        return stored
    try:
        decompressor = zlib.decompressobj(_WBITS, zdict=_DICTIONARY_V1)
        body = decompressor.decompress(stored[1:]) + decompressor.flush()
    except zlib.error as exc:
        raise SyncError(f"a stored audit body does not decompress: {exc}") from exc
    if not decompressor.eof:
        raise SyncError("a stored audit body is truncated")
    return body


def pack_digest(digest: str) -> bytes:
    """A 64-hex hash as the 32 bytes the file keeps."""
    return bytes.fromhex(digest)


def unpack_digest(stored: str | bytes) -> str:
    """A stored hash (32 bytes, or hex text in files written before) as 64 hex characters."""
    return stored.hex() if isinstance(stored, bytes) else stored


def pack_row(record: AuditRecord, *, compress: bool = True) -> tuple[int, int, str, bytes, bytes, bytes]:
    """(seq, ts, kind, body, prev, hash) as the `records` table keeps them; `compress=False` keeps
    the body as its JSON (always readable: the codec is per row)."""
    body = bytes(record.body)
    return (record.seq, record.ts, record.kind, pack_body(body) if compress else body, pack_digest(record.prev),
            pack_digest(record.hash))


def unpack_row(device: str, row: tuple[Any, ...]) -> AuditRecord:
    """A record from a (seq, ts, kind, body, prev, hash) row of the `records` table."""
    seq, ts, kind, body, prev, digest = row
    return AuditRecord(device=device, seq=seq, ts=ts, kind=kind, body=msgspec.Raw(unpack_body(bytes(body))),
                       prev=unpack_digest(prev), hash=unpack_digest(digest))

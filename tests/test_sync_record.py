"""The audit record and its hash chain, without I/O."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

import sync
from sync import GENESIS, AuditRecord, Chain, ChainBroken, canonical_bytes, decode_record, encode_record, hash_ok
from sync._record import _Canonical, _canonical_encoder, gap_range


class Reading(msgspec.Struct):
    zeta: float
    alpha: str
    audit_seq: int = 0


def test_public_names_are_sorted() -> None:
    assert sync.__all__ == sorted(sync.__all__)


def test_canonical_encoding_is_sorted_compact_and_stable() -> None:
    chain = Chain("gw-1")
    record = chain.make("decision", {"b": [1, 2.5], "a": {"z": None, "y": "é"}}, ts=1_700_000_000_000_000_000)
    assert bytes(record.body) == '{"a":{"y":"é","z":null},"b":[1,2.5]}'.encode()
    expected = (
        b'{"body":{"a":{"y":"\xc3\xa9","z":null},"b":[1,2.5]},"device":"gw-1","kind":"decision",'
        b'"prev":"' + GENESIS.encode() + b'","seq":1,"ts":1700000000000000000}'
    )
    assert canonical_bytes("gw-1", 1, record.ts, "decision", bytes(record.body), GENESIS) == expected
    assert record.hash == hashlib.sha256(expected).hexdigest()
    # Same inputs, same bytes: a dict in another key order, or a Struct, encode the same way.
    other = Chain("gw-1").make("decision", {"a": {"y": "é", "z": None}, "b": [1, 2.5]}, ts=record.ts)
    assert other.hash == record.hash


@pytest.mark.parametrize(
    ("kind", "prev", "ts"),
    [("decision", GENESIS, 5), ('we"ird\\kind\n\u2028', "x" * 64, -1), ("", "", 2**62)],
)
def test_fast_canonical_bytes_match_msgspec_sorted_encoding(kind: str, prev: str, ts: int) -> None:
    body = b'{"k":"\\u0000"}'
    reference = _canonical_encoder.encode(
        _Canonical(body=msgspec.Raw(body), device="d", kind=kind, prev=prev, seq=7, ts=ts)
    )
    assert canonical_bytes("d", 7, ts, kind, body, prev) == reference


def test_chain_links_each_record_to_the_previous_hash() -> None:
    chain = Chain("gw-1")
    records = [chain.make("k", {"i": i}, ts=i) for i in range(5)]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after.prev == before.hash
    assert chain.next_seq == 6 and chain.last_hash == records[-1].hash
    checker = Chain("gw-1")
    for record in records:
        checker.accept(record)
    assert checker.last_hash == records[-1].hash


def test_callable_body_gets_its_seq_and_a_failing_body_does_not_advance() -> None:
    chain = Chain("gw-1")
    chain.make("k", {}, ts=0)
    record = chain.make("decision", lambda seq: Reading(zeta=1.0, alpha="x", audit_seq=seq), ts=1)
    assert msgspec.json.decode(bytes(record.body)) == {"alpha": "x", "audit_seq": 2, "zeta": 1.0}

    def boom(seq: int) -> object:
        raise RuntimeError("no body")

    with pytest.raises(RuntimeError):
        chain.make("decision", boom, ts=2)
    assert chain.next_seq == 3 and chain.last_hash == record.hash


@pytest.mark.parametrize("field", ["device", "seq", "ts", "kind", "body", "prev", "hash"])
def test_tampering_with_any_field_is_detected(field: str) -> None:
    chain = Chain("gw-1")
    first = chain.make("k", {"v": 1}, ts=10)
    record = chain.make("k", {"v": 2}, ts=11)
    assert hash_ok(record)
    changes: dict[str, object] = {
        "device": "gw-2",
        "seq": 3,
        "ts": 12,
        "kind": "x",
        "body": msgspec.Raw(b'{"v":3}'),
        "prev": "f" * 64,
        "hash": "0" * 64,
    }
    forged = msgspec.structs.replace(record, **{field: changes[field]})
    assert not hash_ok(forged)
    checker = Chain("gw-1")
    checker.accept(first)
    with pytest.raises(ChainBroken) as err:
        checker.accept(forged)
    assert err.value.seq == forged.seq


def test_rewritten_record_with_recomputed_hash_breaks_the_next_link() -> None:
    chain = Chain("gw-1")
    a, b, c = (chain.make("k", {"v": i}, ts=i) for i in range(3))
    forger = Chain("gw-1", next_seq=2, last_hash=a.hash)
    b_forged = forger.make("k", {"v": 99}, ts=1)
    checker = Chain("gw-1")
    checker.accept(a)
    checker.accept(b_forged)  # self-consistent on its own
    with pytest.raises(ChainBroken) as err:
        checker.accept(c)
    assert err.value.seq == 3 and "prev" in err.value.problem
    assert b.hash != b_forged.hash


def test_wire_round_trip_keeps_body_bytes_and_ignores_unknown_fields() -> None:
    record = Chain("gw-1").make("decision", {"x": 1}, ts=5)
    wire = encode_record(record)
    assert list(msgspec.json.decode(wire)) == ["device", "seq", "ts", "kind", "body", "prev", "hash"]
    back = decode_record(wire)
    assert back == record and hash_ok(back)
    extended = wire[:-1] + b',"schema":2}'
    assert decode_record(extended) == record
    with pytest.raises(sync.SyncError):
        decode_record(b'{"seq":"nope"}')


def test_gap_record_range_and_chain_skip() -> None:
    chain = Chain("gw-1")
    for i in range(3):
        chain.make("k", {"i": i}, ts=i)
    chain.make("k", {}, ts=3)
    gap = chain.make("gap", sync.GapBody(from_seq=1, to_seq=3, reason="store_full"), ts=4)
    assert gap_range(gap) == (1, 3)
    assert gap_range(msgspec.structs.replace(gap, kind="decision")) is None
    bogus = Chain("gw-1", next_seq=9).make("gap", {"from_seq": 5, "to_seq": 20, "reason": "x"}, ts=0)
    assert gap_range(bogus) is None  # names seqs after itself


def test_device_ids_are_validated() -> None:
    for bad in ("", "all", "group", "a.b", "x" * 65, "sp ace"):
        with pytest.raises(ValueError):
            Chain(bad)
    assert isinstance(Chain("Gw_1-x").make("k", None, ts=0), AuditRecord)

"""verify_upstream on streams built by hand: duplicates, missing, out of order, tampering, explained gaps,
records bound to their subject, signatures by the device key and the first bad seq named."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest

from edge import NatsServer
from edge.fleet import new_seed
from sync import (
    H_SIGNATURE,
    H_SIGNER,
    AuditLog,
    AuditRecord,
    AuditSigner,
    Chain,
    GapBody,
    SyncError,
    UpstreamReport,
    encode_record,
    iter_records,
    verify_chain,
    verify_upstream,
)

DEVICE_KEY = AuditSigner(new_seed())
OTHER_KEY = AuditSigner(new_seed())


def chain_of(device: str, n: int) -> list[AuditRecord]:
    chain = Chain(device)
    return [chain.make("decision", {"i": i}, ts=1_000 + i) for i in range(1, n + 1)]


def signed(record: AuditRecord, signer: AuditSigner = DEVICE_KEY) -> dict[str, str]:
    """The headers the uploader puts on a record it signs."""
    return {H_SIGNER: signer.public_key, H_SIGNATURE: signer.sign(record.device, record.seq, record.hash)}


async def verified(
    server: NatsServer, records: list[AuditRecord], raw: Sequence[tuple[str, bytes]] = (), *,
    key: str | None = None, signed_seqs: Sequence[int] = (), subject: str | None = None,
) -> dict[str, UpstreamReport]:
    """Publish `records` (and raw messages) into a fresh EDGE_AUDIT in this order, then verify it.

    Records whose seq is in `signed_seqs` carry the device key's signature; `subject` puts every
    record on that subject instead of its own device's."""
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream("EDGE_AUDIT")  # fresh for each call
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"])
        for record in records:
            headers = signed(record) if record.seq in signed_seqs else None
            await js.publish(subject or f"audit.{record.device}", encode_record(record), headers=headers)
        for subj, data in raw:
            await js.publish(subj, data)
        return await verify_upstream(js, key=key)
    finally:
        await nc.close()


def gap_over(records: list[AuditRecord], lo: int, hi: int) -> GapBody:
    """The gap record drop_oldest writes for seqs lo..hi of `records` (seq n at index n - 1)."""
    return GapBody(from_seq=lo, to_seq=hi, reason="store_full", after_hash=records[lo - 1].prev,
                   last_hash=records[hi - 1].hash)


async def test_a_clean_stream_is_ok(nats_server: NatsServer) -> None:
    reports = await verified(nats_server, chain_of("gw-1", 50))
    report = reports["gw-1"]
    assert report.ok and (report.records, report.first_seq, report.last_seq) == (50, 1, 50)
    assert "OK" in report.summary() and "0 missing" in report.summary()


async def test_duplicates_missing_and_out_of_order_are_found(nats_server: NatsServer) -> None:
    r = chain_of("gw-1", 10)
    # 1 2 3 3 5 6 8 7 9 10: 3 twice, 4 missing, 7 after 8.
    order = [r[0], r[1], r[2], r[2], r[4], r[5], r[7], r[6], r[8], r[9]]
    report = (await verified(nats_server, order))["gw-1"]
    assert not report.ok
    assert report.duplicates == 1
    assert report.missing == [(4, 4)] and report.missing_count == 1
    assert report.out_of_order == 1
    assert report.chain_breaks == []  # every present link between neighbours holds
    assert "1 duplicate" in report.summary() and "1 missing" in report.summary()


async def test_tampered_and_forged_records_are_found(nats_server: NatsServer) -> None:
    r = chain_of("gw-1", 6)
    tampered = msgspec.structs.replace(r[2], body=msgspec.Raw(b'{"i":99}'))  # hash no longer matches
    forger = Chain("gw-1", next_seq=5, last_hash="ab" * 32)
    forged = forger.make("decision", {"i": 5}, ts=0)  # self-consistent, but not linked to 4
    records = [r[0], r[1], tampered, r[3], forged, r[5]]
    report = (await verified(nats_server, records))["gw-1"]
    assert not report.ok
    assert report.bad_hash == [3]
    assert 5 in report.chain_breaks and 6 in report.chain_breaks


async def test_a_gap_named_by_a_gap_record_is_explained(nats_server: NatsServer) -> None:
    chain = Chain("gw-2")
    records = [chain.make("decision", {"i": i}, ts=i) for i in range(1, 7)]
    records.append(chain.make("gap", gap_over(records, 4, 6), ts=7))
    records.append(chain.make("decision", {}, ts=8))
    upstream = records[:3] + records[6:]  # 4..6 were dropped before they were synced
    bad = chain_of("gw-3", 5)
    reports = await verified(nats_server, upstream + [bad[0], bad[4]], raw=[("audit.gw-4", b"not json")])
    assert reports["gw-2"].ok, reports["gw-2"].summary()
    assert reports["gw-2"].explained == [(4, 6)] and reports["gw-2"].missing == []
    assert reports["gw-3"].missing == [(2, 4)] and not reports["gw-3"].ok
    assert reports["gw-4"].undecodable == 1 and not reports["gw-4"].ok


async def test_device_filter_and_missing_stream(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        with pytest.raises(SyncError, match="does not exist"):
            await verify_upstream(js)
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"])
        assert await verify_upstream(js) == {}
        for record in chain_of("gw-1", 3) + chain_of("gw-2", 4):
            await js.publish(f"audit.{record.device}", encode_record(record))
        only = await verify_upstream(js, device="gw-2")
        assert list(only) == ["gw-2"] and only["gw-2"].records == 4
    finally:
        await nc.close()


async def test_verify_chain_of_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1"):
        pass
    report = verify_chain(path)
    assert report.ok and report.records == 0 and "no records" in report.summary()


async def test_records_are_checked_per_subject(nats_server: NatsServer) -> None:
    """A record of gw-2 on audit.gw-1 never counts as gw-1's (nor as gw-2's): it is foreign."""
    mine = chain_of("gw-1", 3)
    theirs = chain_of("gw-2", 4)
    reports = await verified(nats_server, mine, raw=[("audit.gw-1", encode_record(theirs[3]))])
    assert list(reports) == ["gw-1"]
    report = reports["gw-1"]
    assert not report.ok and report.records == 3 and report.foreign == [4]
    assert "stream seq 4" in report.summary() and "not its records" in report.summary()


async def test_signatures_by_the_device_key_and_a_signed_tail_pass(nats_server: NatsServer) -> None:
    records = chain_of("gw-1", 10)
    report = (await verified(nats_server, records, key=DEVICE_KEY.public_key, signed_seqs=[4, 8, 10]))["gw-1"]
    assert report.ok, report.summary()
    assert (report.signed, report.key, report.signers) == (3, DEVICE_KEY.public_key, [DEVICE_KEY.public_key])


async def test_an_unsigned_tail_fails_at_its_first_seq(nats_server: NatsServer) -> None:
    """Records after the last signed one could be anyone's: 5..10 fail, named from 5."""
    records = chain_of("gw-1", 10)
    report = (await verified(nats_server, records, key=DEVICE_KEY.public_key, signed_seqs=[2, 4]))["gw-1"]
    assert not report.ok and report.unsigned_tail == (5, 10)
    assert report.first_bad_seq == 5 and "first bad seq 5: unsigned tail" in report.summary()
    # Without the key the same stream says only what it can: each signature verifies with its signer.
    report = (await verified(nats_server, records, signed_seqs=[2, 4]))["gw-1"]
    assert report.ok and "use --key" in report.summary()


async def test_verify_names_the_first_bad_seq(nats_server: NatsServer) -> None:
    """Several problems: the summary names the earliest seq, not only counts."""
    records = chain_of("gw-1", 12)
    tampered = msgspec.structs.replace(records[6], body=msgspec.Raw(b'{"i":777}'))  # seq 7: hash broken
    stream = records[:6] + [tampered] + records[7:9] + records[10:]  # and seq 10 missing
    report = (await verified(nats_server, stream))["gw-1"]
    assert report.first_bad_seq == 7 and report.bad_hash == [7] and report.missing == [(7, 7), (10, 10)]
    assert "first bad seq 7: hash does not match" in report.summary()


async def test_a_record_signed_by_another_key_is_a_bad_signature(nats_server: NatsServer) -> None:
    """A forger who rewrites a record and signs it with a key of their own is named at that seq."""
    records = chain_of("gw-1", 6)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"])
        for record in records:
            headers = signed(record, OTHER_KEY if record.seq == 3 else DEVICE_KEY) if record.seq in (3, 6) else None
            await js.publish("audit.gw-1", encode_record(record), headers=headers)
        report = (await verify_upstream(js, key=DEVICE_KEY.public_key))["gw-1"]
        assert report.bad_signatures == [3] and report.first_bad_seq == 3 and report.signed == 1
        # Without a key, two signers on one subject is itself a problem.
        report = (await verify_upstream(js))["gw-1"]
        assert not report.ok and "2 different keys" in report.problem
    finally:
        await nc.close()


async def test_a_forged_gap_hiding_records_is_found_upstream(nats_server: NatsServer) -> None:
    """Upstream: a gap that does not link to the record before it, or names records the stream
    holds, explains nothing; the first bad seq is where it claims to start."""
    chain = Chain("gw-1")
    records = [chain.make("decision", {"i": i}, ts=i) for i in range(1, 9)]
    forged = GapBody(from_seq=4, to_seq=6, reason="store_full", after_hash="ab" * 32, last_hash=records[5].hash)
    records.append(chain.make("gap", forged, ts=9))
    records.append(chain.make("decision", {}, ts=10))
    report = (await verified(nats_server, records[:3] + records[6:]))["gw-1"]
    assert not report.ok and report.first_bad_seq == 4 and "forged or altered gap" in report.problem
    assert report.missing == [(4, 6)] and report.explained == []

    # A well-linked gap that names records the stream holds did not come from drop_oldest.
    chain = Chain("gw-1")
    records = [chain.make("decision", {"i": i}, ts=i) for i in range(1, 9)]
    records.append(chain.make("gap", gap_over(records, 4, 6), ts=9))
    report = (await verified(nats_server, records))["gw-1"]
    assert not report.ok and report.gap_problems == [9] and "the stream holds seq 4" in report.problem


async def test_a_forged_gap_is_found_by_the_local_verify(tmp_path: Path) -> None:
    """Locally: records 5..7 deleted and a gap record appended to explain them. Without the hashes
    it names, or with hashes that do not link, the chain breaks across it at seq 5."""
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:
        for i in range(1, 11):
            await log.append("decision", {"i": i})
    records = {r.seq: r for r in iter_records(path)}
    for gap, first_bad in (
        (GapBody(from_seq=5, to_seq=7, reason="store_full"), 5),  # the old format: no hashes to link
        (GapBody(from_seq=5, to_seq=7, reason="store_full", after_hash=records[4].hash,
                 last_hash="cd" * 32), 8),  # seq 8 does not follow the hash it names
    ):
        forged = Chain("gw-1", 11, records[10].hash).make("gap", gap, ts=11)
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM records WHERE seq BETWEEN 5 AND 7 OR seq = 11")
            conn.execute("INSERT INTO records (seq, ts, kind, body, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
                         (11, forged.ts, forged.kind, bytes(forged.body), forged.prev, forged.hash))
        report = verify_chain(path)
        assert not report.ok and report.first_bad_seq == first_bad, report.summary()

    # The same range explained by a gap that links on both sides passes: the limit of a keyless
    # file, which is why what was never synced nor signed is the README's stated exposure.
    linked = GapBody(from_seq=5, to_seq=7, reason="store_full", after_hash=records[4].hash,
                     last_hash=records[7].hash)
    forged = Chain("gw-1", 11, records[10].hash).make("gap", linked, ts=11)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM records WHERE seq = 11")
        conn.execute("INSERT INTO records (seq, ts, kind, body, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
                     (11, forged.ts, forged.kind, bytes(forged.body), forged.prev, forged.hash))
    assert verify_chain(path).ok

"""verify_upstream on streams built by hand: duplicates, missing, out of order, tampering, explained gaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import nats
import pytest

from edge import NatsServer
from sync import (
    AuditLog,
    AuditRecord,
    Chain,
    GapBody,
    SyncError,
    UpstreamReport,
    encode_record,
    verify_chain,
    verify_upstream,
)


def chain_of(device: str, n: int) -> list[AuditRecord]:
    chain = Chain(device)
    return [chain.make("decision", {"i": i}, ts=1_000 + i) for i in range(1, n + 1)]


async def verified(
    server: NatsServer, records: list[AuditRecord], raw: Sequence[tuple[str, bytes]] = ()
) -> dict[str, UpstreamReport]:
    """Publish `records` (and raw messages) into a fresh EDGE_AUDIT in this order, then verify it."""
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    try:
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"])
        for record in records:
            await js.publish(f"audit.{record.device}", encode_record(record))
        for subject, data in raw:
            await js.publish(subject, data)
        return await verify_upstream(js)
    finally:
        await nc.close()


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
    records.append(chain.make("gap", GapBody(from_seq=4, to_seq=6, reason="store_full"), ts=7))
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

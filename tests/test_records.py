"""Compact decision records: the log keeps what is specific to a decision, and reads back the whole Decision."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import msgspec

from edge import Decision, Fallback, Governance, ModelRef, Runtime, ShadowResult
from edge._records import DecisionReader, decision_record, model_in_use
from sync import Chain, decode_record, iter_records, verify_chain
from sync._storage import pack_body, unpack_body
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import ANOMALY, NORMAL, connect, encode, make_config

MODEL = ModelRef(name="pump-anomaly", version="1", sha256="ab" * 32)


def _decision(i: int, model: ModelRef | None = MODEL) -> Decision:
    return Decision(
        id=f"{1_764_604_074_123_456_789 + i:016x}{i:08x}", device="gw-1", pipeline="pump",
        subject="sensors.p1.pump", received_at=1_764_604_074_000_000_000 + i, decided_at=1_764_604_074_100_000_000 + i,
        action="inspect", label="anomaly", confidence=0.91 if model else None, tier="model" if model else "rules",
        fallbacks=[Fallback(tier="cloud", reason="unreachable")], model=model,
        shadow=ShadowResult(label="normal", confidence=0.6, version="2") if i % 2 else None,
        governance=Governance(status="auto", requested_action="inspect"), audit_seq=None,
        input_sha256=f"{i:064x}", tier_name=model.name if model else "rules",
    )


def test_a_decision_record_reads_back_as_the_whole_decision() -> None:
    chain = Chain("gw-1")
    records = [chain.make("start", {"version": "x"}, ts=1)]
    announced = chain.make("model", model_in_use("pump", MODEL), ts=2)
    records.append(announced)
    decisions = [_decision(i, MODEL if i % 3 else None) for i in range(6)]
    for decision in decisions:
        records.append(chain.make("decision", decision_record(decision, announced.seq), ts=3))
    body = msgspec.json.decode(records[3].body)
    assert "device" not in body and "audit_seq" not in body and body["model"] == announced.seq
    read = [r.decision for r in DecisionReader().decisions(records)]
    expected = [msgspec.structs.replace(d, audit_seq=r.seq) for d, r in zip(decisions, records[2:], strict=True)]
    assert read == expected


def test_a_decision_whose_model_record_is_missing_says_so() -> None:
    chain = Chain("gw-1", next_seq=10)
    record = chain.make("decision", decision_record(_decision(1), model_seq=3), ts=1)
    reader = DecisionReader()
    recorded = reader.read(record)
    assert recorded is not None and recorded.decision.model is None and reader.unresolved == [10]


def test_stored_bodies_are_compressed_and_read_back_exactly() -> None:
    chain = Chain("gw-1")
    for i in range(50):
        body = msgspec.json.encode(decision_record(_decision(i), 7))
        stored = pack_body(body)
        assert unpack_body(stored) == body and len(stored) < len(body) / 3
    tiny = b'{"a":1}'
    assert pack_body(tiny) == tiny  # short bodies are kept as they are
    noise = msgspec.json.encode({"r": random.Random(3).randbytes(300).decode("latin-1")})
    assert unpack_body(pack_body(noise)) == noise
    assert chain.next_seq == 1


async def test_the_runtime_writes_compact_records_and_names_its_model_once(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url)
    async with Runtime(config) as runtime:
        nc = await connect(server.url)
        published = []
        for i in range(400):
            reply = await nc.request("sensors.p1.pump", encode(ANOMALY if i % 5 == 0 else NORMAL), timeout=5)
            published.append(msgspec.json.decode(reply.data))
        await nc.close()
    db = runtime.data_dir / "audit.db"
    records = list(iter_records(db))
    in_use = [r for r in records if r.kind == "model" and b'"in_use"' in bytes(r.body)]
    assert len(in_use) == 1  # one model, named once, before the first decision it made
    decisions = [r for r in records if r.kind == "decision"]
    assert len(decisions) == 400 and in_use[0].seq < decisions[0].seq
    assert all(msgspec.json.decode(r.body)["model"] == in_use[0].seq for r in decisions)
    read = {r.decision.audit_seq: r for r in DecisionReader().decisions(records)}
    # The record holds the input itself (audit.inputs = "full") instead of the message's digest.
    assert [msgspec.to_builtins(read[p["audit_seq"]].decision) for p in published] == [
        {**p, "input_sha256": ""} for p in published]
    assert [read[p["audit_seq"]].input for p in published] == [
        dict(ANOMALY if i % 5 == 0 else NORMAL) for i in range(400)]
    assert published[0]["model"]["sha256"] == runtime.registry.slot("pump-anomaly").model.sha256  # type: ignore[union-attr]
    # On disk: the records' own bytes (cells of the b-tree), per decision record.
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT SUM(length(body) + length(prev) + length(hash) + length(kind) + 16) "
                              "FROM records WHERE kind = 'decision'").fetchone()[0]
    assert stored / len(decisions) <= 250, stored / len(decisions)
    assert verify_chain(db).ok


async def test_a_model_record_deleted_by_retention_is_written_again(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url, audit={"create_stream": True, "keep_synced": "1ms"})
    async with Runtime(config) as runtime:
        audit = runtime.audit
        assert audit is not None
        nc = await connect(server.url)
        await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        first_model = next(iter_records(runtime.data_dir / "audit.db", kinds=["model"]))

        async def swept() -> bool:  # synced, then swept after each commit: the model record too
            await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
            return audit.oldest_seq > first_model.seq

        await wait_until(swept, within=20, what="the first model record swept")
        second = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
        uploader = runtime.uploader
        assert uploader is not None and await uploader.sync_now(10) == 0
        js = nc.jetstream()
        last = (await js.stream_info("EDGE_AUDIT")).state.last_seq
        # The stream holds every record (the file keeps only the newest): read the log back from it.
        upstream = [decode_record((await js.get_msg("EDGE_AUDIT", seq)).data or b"") for seq in range(1, last + 1)]
        await nc.close()
    refers_to = msgspec.json.decode(next(r.body for r in upstream if r.seq == second["audit_seq"]))["model"]
    assert refers_to > first_model.seq  # written again, not a reference to a record the file no longer has
    recorded = {r.decision.audit_seq: r.decision for r in DecisionReader().decisions(upstream)}
    assert recorded[second["audit_seq"]].model == ModelRef(**second["model"])


async def test_with_inputs_hashed_a_record_keeps_the_digest_and_reads_back_whole(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    async with Runtime(make_config(tmp_path, server.url, audit={"create_stream": True, "inputs": "hash"})) as runtime:
        nc = await connect(server.url)
        published = [msgspec.json.decode((await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
                     for _ in range(3)]
        await nc.close()
    records = list(iter_records(runtime.data_dir / "audit.db"))
    bodies = [msgspec.json.decode(r.body) for r in records if r.kind == "decision"]
    assert all("input" not in b and len(b["input_sha256"]) == 64 for b in bodies)
    reader = DecisionReader()
    read = {r.decision.audit_seq: (msgspec.to_builtins(r.decision), r.input) for r in reader.decisions(records)}
    assert [read[p["audit_seq"]] for p in published] == [(p, None) for p in published]

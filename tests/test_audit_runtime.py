"""The runtime's audit guarantees end to end: write-ahead, kill -9, outages, a full store."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import msgspec
import nats

from edge import Runtime, server_barrier
from sync import iter_records, verify_chain, verify_upstream
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import (
    CRITICAL,
    NORMAL,
    Collector,
    config_data,
    connect,
    encode,
    make_config,
    start_runtime_process,
    wait_until_answering,
    write_config,
)

DECISIONS = "edge.gw-test.decision.pump"


async def test_kill_9_of_the_runtime_during_sync_loses_and_duplicates_nothing(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    """Seeded rounds: decisions flow, upstream comes and goes, the device is killed with SIGKILL."""
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    admin = await connect(cloud.url)
    # A duplicate window far shorter than a restart: only the resume-from-the-stream logic can
    # prevent a duplicate, not JetStream's de-duplication.
    await admin.jetstream().add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True, duplicate_window=0.1)
    await admin.close()  # reconnected below, once the cloud has stopped coming and going
    path = write_config(tmp_path, config_data(tmp_path, local.url, upstream_url=cloud.url,
                                              audit={"create_stream": False}))
    sensors = await connect(local.url)
    decisions = await Collector().start(sensors, DECISIONS)
    rng = random.Random(1729)
    sent = 0
    for round_ in range(4):
        process = start_runtime_process(path)
        try:
            await wait_until_answering(sensors, "sensors.p0.pump", encode(NORMAL))
            sent += 1
            if round_ % 2 == 0:
                await cloud.stop()  # build a backlog while the cloud is gone
            for _ in range(rng.choice([300, 800, 1500])):
                await sensors.publish(f"sensors.p{sent % 3}.pump", encode(NORMAL if sent % 7 else CRITICAL))
                sent += 1
            await server_barrier(sensors)
            if round_ % 2 == 0:
                await cloud.start()  # the backlog starts to drain...
            await asyncio.sleep(rng.uniform(0.05, 1.0))  # pace: ...and at a seeded moment in it, the kill
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)
    # A last, clean life: everything published so far must reach the stream.
    admin = await connect(cloud.url)
    process = start_runtime_process(path)
    try:
        await wait_until_answering(sensors, "sensors.p0.pump", encode(NORMAL))
        sent += 1
        db = tmp_path / "var-gw-test" / "audit.db"
        js = admin.jetstream()

        async def stream_last() -> int:
            try:
                return int((await js.get_last_msg("EDGE_AUDIT", "audit.gw-test")).headers["Nats-Msg-Id"].split(":")[1])
            except nats.js.errors.NotFoundError:
                return 0

        async def stream_holds_the_log() -> bool:
            last_local = max(r.seq for r in iter_records(db))
            return await stream_last() >= last_local - 1

        await wait_until(stream_holds_the_log, within=30, what="the stream to hold what the log holds", interval=0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    published = await decisions.wait_for(len(decisions.messages))

    chain = verify_chain(db)
    assert chain.ok, chain.summary()
    records = {r.seq: r for r in iter_records(db)}
    # Write-ahead: every decision anyone heard of is on record, under its own seq.
    for decision in published:
        record = records[decision["audit_seq"]]
        assert record.kind == "decision"
        assert msgspec.json.decode(record.body)["id"] == decision["id"]
    # Every decision a sensor asked for was decided (the kills lost none that were accepted is
    # not promised: a message in flight to a killed process is gone; what was decided is kept).
    assert len({d["id"] for d in published}) == len(published)

    reports = await verify_upstream(admin.jetstream(), "EDGE_AUDIT", "gw-test")
    report = reports["gw-test"]
    assert report.ok, report.summary()
    assert report.duplicates == 0 if isinstance(report.duplicates, int) else not report.duplicates
    assert report.first_seq == 1 and report.last_seq == max(records)
    assert report.records == len(records)
    await sensors.close()
    await admin.close()


async def test_full_store_with_block_acts_instead_and_says_why(nats_servers: ServerFactory, tmp_path: Path) -> None:
    local = await nats_servers("local")
    # Upstream unreachable: nothing is ever synced, so nothing can be freed.
    config = make_config(
        tmp_path, local.url, upstream_url="nats://127.0.0.1:1",
        audit={"max_bytes": "64KiB", "on_full": "block"},
        pipeline={"ladder": ["rules"], "actions": {"shutdown": {"instead": "hold", "rate_limit": "1000/s"},
                                                  "hold": {}}},
    )
    async with Runtime(config) as runtime:
        nc = await connect(local.url)
        assert runtime.audit is not None
        statuses = []
        for i in range(3000):
            reply = await nc.request("sensors.p1.pump", encode({**CRITICAL, "asset": f"a{i}"}), timeout=5)
            decision = msgspec.json.decode(reply.data)
            statuses.append(decision["governance"]["status"])
            if decision["governance"]["status"] == "audit_full":
                assert decision["action"] == "hold" and decision["audit_seq"] is None
                break
        assert statuses[-1] == "audit_full", "the store never filled"
        assert runtime.audit.full
        status = runtime.status()
        assert status["audit"] is not None and status["audit"]["full"] is True
        await nc.close()


async def test_full_store_with_drop_oldest_records_the_gap(nats_servers: ServerFactory, tmp_path: Path) -> None:
    local = await nats_servers("local")
    config = make_config(tmp_path, local.url, upstream_url="nats://127.0.0.1:1",
                         audit={"max_bytes": "64KiB", "on_full": "drop_oldest"}, pipeline={"ladder": ["rules"]})
    async with Runtime(config) as runtime:
        nc = await connect(local.url)
        for i in range(1500):
            await nc.publish("sensors.p1.pump", encode({**NORMAL, "asset": f"a{i}"}))
        await server_barrier(nc)
        assert runtime.audit is not None
        await wait_until(lambda: runtime.pipelines["pump"].stats.decisions == 1500, within=20, what="1500 decisions")
        await wait_until(lambda: any(r.kind == "gap" for r in iter_records(runtime.audit.path)),  # type: ignore[union-attr]
                         within=20, what="a gap record")
        await nc.close()
    db = runtime.data_dir / "audit.db"
    gaps = [msgspec.json.decode(r.body) for r in iter_records(db) if r.kind == "gap"]
    assert gaps and all(g["from_seq"] <= g["to_seq"] for g in gaps)
    chain = verify_chain(db)
    assert chain.ok, chain.summary()

"""The foundation end to end: a real nats-server, the real bundled ONNX model, a real audit log."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import pytest

from edge import Runtime, server_barrier
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import (
    ANOMALY,
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
REJECTED = "edge.gw-test.rejected.pump"


async def test_valid_input_is_decided_by_the_model(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url)
    async with Runtime(config) as runtime:
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        for row in (NORMAL, ANOMALY, CRITICAL):
            await nc.publish("sensors.p1.pump", encode(row))
        got = {d["label"]: d for d in await decisions.wait_for(3)}
        assert set(got) == {"normal", "anomaly", "critical"}
        assert got["anomaly"]["action"] == "inspect"
        assert got["critical"]["action"] == "shutdown"
        for decision in got.values():
            assert decision["tier"] == "model"
            assert decision["model"]["name"] == "pump-anomaly"
            assert decision["confidence"] >= 0.8
            assert decision["fallbacks"] == []
            assert decision["governance"]["status"] == "auto"
            assert decision["audit_seq"] >= 1
            assert decision["subject"] == "sensors.p1.pump"
        assert runtime.status()["pipelines"]["pump"]["by_tier"]["model"] == 3
        await nc.close()


async def test_out_of_range_and_low_confidence_fall_to_rules(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    # min_confidence 1.0: no model answer is ever certain enough, so rules decide with the reason.
    config = make_config(tmp_path, server.url, pipeline={"min_confidence": 1.0})
    async with Runtime(config):
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        out_of_range = {**NORMAL, "rms": 500.0}
        await nc.publish("sensors.p1.pump", encode(out_of_range))
        (first,) = await decisions.wait_for(1)
        assert first["tier"] == "rules"
        assert first["fallbacks"] == [{"tier": "model", "reason": "out_of_range", "tier_name": "pump-anomaly"}]
        assert first["action"] == "shutdown" and first["label"] == "critical"
        await nc.close()


async def test_low_confidence_reason(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url, pipeline={"min_confidence": 1.0})
    async with Runtime(config):
        nc = await connect(server.url)
        # A borderline reading: the model is unsure, so it cannot reach a bar of 1.0.
        borderline = {"rms": 4.5, "kurtosis": 5.0, "temp_c": 70.0, "rpm": 1480.0}
        reply = await nc.request("sensors.p9.pump", encode(borderline), timeout=5)
        decision = msgspec.json.decode(reply.data)
        assert decision["tier"] == "rules"
        assert decision["fallbacks"] == [{"tier": "model", "reason": "low_confidence", "tier_name": "pump-anomaly"}]
        await nc.close()


async def test_request_reply_gets_the_decision(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    async with Runtime(make_config(tmp_path, server.url)):
        nc = await connect(server.url)
        reply = await nc.request("sensors.p7.pump", encode(ANOMALY), timeout=5)
        decision = msgspec.json.decode(reply.data)
        assert decision["label"] == "anomaly"
        assert decision["subject"] == "sensors.p7.pump"
        packed = await nc.request("sensors.p7.pump", msgspec.msgpack.encode(NORMAL), timeout=5,
                                  headers={"Content-Type": "application/msgpack"})
        assert msgspec.msgpack.decode(packed.data)["label"] == "normal"
        await nc.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "not_json"),
        (b'{"rms": "x", "kurtosis": 1, "temp_c": 1, "rpm": 1}', "schema"),
        (b'{"kurtosis": 1, "temp_c": 1, "rpm": 1}', "schema"),
        (b'{"rms": 1e400, "kurtosis": 1, "temp_c": 1, "rpm": 1}', "not_finite"),
        (b"{" + b'"a":' * 10 + b"1" + b"}" * 10, "not_json"),
        (b"[" * 5000 + b"]" * 5000, "schema"),
        (b'{"rms": 1, "kurtosis": 1, "temp_c": 1, "rpm": 1, "pad": "' + b"x" * 70000 + b'"}', "too_large"),
    ],
)
async def test_bad_input_gets_a_rejected_and_service_continues(
    nats_servers: ServerFactory, tmp_path: Path, payload: bytes, reason: str
) -> None:
    server = await nats_servers("local")
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        nc = await connect(server.url)
        rejected = await Collector().start(nc, REJECTED)
        reply = await nc.request("sensors.p1.pump", payload, timeout=5)
        answer = msgspec.json.decode(reply.data)
        assert answer["reason"] == reason, answer
        assert answer["size"] == len(payload)
        (published,) = await rejected.wait_for(1)
        assert published["reason"] == reason and published["detail"]
        # Still serving.
        ok = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
        assert ok["label"] == "normal"
        assert runtime.status()["pipelines"]["pump"]["rejected"] == {reason: 1}
        await nc.close()


async def test_garbage_flood_is_aggregated_and_memory_bounded(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        nc = await connect(server.url)
        for i in range(3000):
            await nc.publish("sensors.p1.pump", b"not json %d" % i)
        await server_barrier(nc)
        pipeline = runtime.pipelines["pump"]
        await wait_until(lambda: pipeline.stats.rejected["not_json"] == 3000, within=10, what="3000 rejections")
        await wait_until(lambda: runtime.audit is not None and runtime.audit.last_seq >= 2, within=5,
                         what="two audit records")
        assert pipeline.status()["inbox"]["messages"] == 0
        await nc.close()
    # One aggregated record (per second), not 3000.
    from sync import iter_records

    records = [r for r in iter_records(runtime.data_dir / "audit.db") if r.kind == "rejected"]
    assert 1 <= len(records) <= 5
    assert sum(msgspec.json.decode(r.body)["counts"]["not_json"] for r in records) == 3000


async def test_sigterm_drains_in_flight_decisions(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("local")
    path = write_config(tmp_path, config_data(tmp_path, server.url))
    process = start_runtime_process(path)
    try:
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        await wait_until_answering(nc, "sensors.p0.pump", encode(NORMAL))
        before = len(decisions.messages)
        burst = 2000
        for i in range(burst):
            await nc.publish(f"sensors.p{i % 5}.pump", encode(NORMAL))
        await server_barrier(nc)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        assert code == 0, path.with_suffix(".log").read_text()
        got = await decisions.wait_for(before + burst, within=10)
        assert len(got) == before + burst
        seqs = [d["audit_seq"] for d in got]
        assert len(set(seqs)) == len(seqs)
        await nc.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_corrupt_model_is_unavailable_and_rules_decide(nats_servers: ServerFactory, tmp_path: Path) -> None:
    """SPEC §9: a model file that fails its sha256 leaves the model unavailable; status says why."""
    import shutil

    from models import bundled_model_path

    folder = tmp_path / "pump-anomaly"
    shutil.copytree(bundled_model_path(), folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url, models=[{"name": "pump-anomaly", "path": str(folder)}])
    async with Runtime(config) as runtime:
        nc = await connect(server.url)
        decision = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(ANOMALY), timeout=5)).data)
        assert decision["tier"] == "rules" and decision["label"] == "anomaly"
        assert decision["fallbacks"] == [{"tier": "model", "reason": "unavailable", "tier_name": "pump-anomaly"}]
        (model,) = runtime.status()["models"]
        assert model["state"] == "unavailable" and "sha256" in model["why"].lower()
        await nc.close()

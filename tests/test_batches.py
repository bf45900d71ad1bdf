"""Deciding in batches (the hot path): each guarantee of the per-input path holds batch by batch.

Real nats-server, the real bundled ONNX model and a real audit log, except where a unit says so.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import numpy as np
import pytest
from nats.aio.msg import Msg

from edge import Runtime, server_barrier
from edge._ladder import Ladder
from edge._records import DecisionReader
from models import MicroBatcher, Model, ModelUnavailable, load_model
from models._batcher import INLINE_BUDGET_S, RunCost
from sync import AuditLog, iter_records
from tests.model_builders import matmul_model, write_model
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, Collector, connect, encode, make_config

DECISIONS = "edge.gw-test.decision.pump"
BURST = 2000


def inputs(n: int, start: int = 0) -> list[bytes]:
    """n distinct valid inputs (each decided as normal by the bundled model)."""
    return [encode({**NORMAL, "rms": round(1.0 + (start + i) * 1e-4, 6)}) for i in range(n)]


def index_by_digest(payloads: list[bytes]) -> dict[str, int]:
    return {hashlib.sha256(p).hexdigest(): i for i, p in enumerate(payloads)}


# ---------------------------------------------------------------------------------------------
# The runtime


async def test_a_burst_is_decided_in_batches_each_input_once_in_the_order_received(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    payloads = inputs(BURST)
    index = index_by_digest(payloads)
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        for payload in payloads:
            await nc.publish("sensors.p1.pump", payload)
        await server_barrier(nc)
        await decisions.wait_for(BURST, within=30)
        status = runtime.status()["pipelines"]["pump"]
        await nc.close()
    got = decisions.messages
    bodies = [msgspec.json.decode(m.data) for m in got]
    order = [index[d["input_sha256"]] for d in bodies]
    assert order == list(range(BURST))  # each once, published in the order received
    seqs = [d["audit_seq"] for d in bodies]
    assert seqs == sorted(seqs) and len(set(seqs)) == BURST
    assert all(d["tier"] == "model" for d in bodies)
    assert all(d["received_at"] <= d["decided_at"] for d in bodies)  # received: when it arrived, not its batch
    batches = status["batches"]
    # A burst arrives many messages per socket read: they are decided together, not one by one.
    assert batches["count"] < BURST / 4, batches
    assert batches["sizes"]["17-64"] > 0, batches
    assert sum(batches["sizes"].values()) == batches["count"]
    # The log keeps each decision compactly; read back, it is exactly the decision published.
    # (The record holds the input itself rather than the message's digest.)
    records = iter_records(runtime.data_dir / "audit.db")
    recorded = {r.decision.audit_seq: r for r in DecisionReader().decisions(records)}
    assert all(msgspec.to_builtins(recorded[d["audit_seq"]].decision) == {**d, "input_sha256": ""} for d in bodies)
    sent = {hashlib.sha256(payload).hexdigest(): msgspec.json.decode(payload) for payload in payloads}
    assert all(recorded[d["audit_seq"]].input == sent[d["input_sha256"]] for d in bodies)


async def test_at_low_load_a_batch_is_one_input_and_the_model_runs_without_a_thread_hop(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        nc = await connect(server.url)
        for payload in inputs(20):
            reply = msgspec.json.decode((await nc.request("sensors.p1.pump", payload, timeout=5)).data)
            assert reply["tier"] == "model" and reply["audit_seq"] >= 1
        status = runtime.status()
        await nc.close()
    batches = status["pipelines"]["pump"]["batches"]
    assert batches["count"] == 20 and batches["sizes"]["1"] == 20 and batches["mean"] == 1.0
    (model,) = [m for m in status["models"] if m["name"] == "pump-anomaly"]
    # The first run goes to the model's thread (to learn its cost); the bundled model is cheap,
    # so the rest run on the event loop (a run slowed by a busy machine may send one back).
    assert model["runs"] == 20 and model["inline_runs"] >= 10, model


async def test_a_config_applied_during_a_burst_loses_and_doubles_nothing(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("local")
    first, second = inputs(BURST), inputs(BURST, start=BURST)
    index = index_by_digest(first + second)
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        for payload in first:
            await nc.publish("sensors.p1.pump", payload)
        await decisions.wait_for(100, within=10)  # the burst is being decided: swap in the middle of it
        # From the swap on, the rules alone decide.
        summary = await runtime.apply_config(make_config(tmp_path, server.url, pipeline={"ladder": ["rules"]}))
        assert summary["pipelines"] == ["pump"]
        for payload in second:
            await nc.publish("sensors.p1.pump", payload)
        await server_barrier(nc)
        bodies = await decisions.wait_for(2 * BURST, within=30)
        await nc.close()
    order = [index[d["input_sha256"]] for d in bodies]
    assert sorted(order) == list(range(2 * BURST))  # each input exactly once
    assert order == list(range(2 * BURST))  # and in the order received, across the swap
    # One config decides a whole batch: once the new one decides, the old one never does again.
    tiers = [d["tier"] for d in bodies]
    switch = tiers.index("rules")
    assert set(tiers[:switch]) == {"model"} and set(tiers[switch:]) == {"rules"}
    assert 100 <= switch <= BURST  # every input sent after the apply returned is decided by the new config


async def test_a_bug_in_the_batch_path_costs_no_input_of_the_batch(
    nats_servers: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If deciding a batch as a batch fails (a bug), each input is decided on its own: all answered."""
    async def broken(self: Ladder, batch: Any) -> Any:
        raise RuntimeError("a bug in the batch path")

    monkeypatch.setattr(Ladder, "decide_many", broken)
    server = await nats_servers("local")
    payloads = inputs(200)
    async with Runtime(make_config(tmp_path, server.url)):
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        for payload in payloads:
            await nc.publish("sensors.p1.pump", payload)
        await server_barrier(nc)
        bodies = await decisions.wait_for(200, within=20)
        await nc.close()
    index = index_by_digest(payloads)
    assert [index[d["input_sha256"]] for d in bodies] == list(range(200))
    assert all(d["tier"] == "model" and d["audit_seq"] >= 1 for d in bodies)
    assert "deciding each on its own" in caplog.text


async def test_a_decision_the_bus_refuses_costs_only_itself(
    nats_servers: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish that fails (the local bus closed, its buffer full) loses that message only: the
    rest of its batch is published, every decision is on record, and status counts the failures."""
    server = await nats_servers("local")
    payloads = inputs(300)
    index = index_by_digest(payloads)
    async with Runtime(make_config(tmp_path, server.url)) as runtime:
        pipeline = runtime.pipelines["pump"]
        real_publish = pipeline.bus.publish

        async def flaky_publish(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
            if subject == DECISIONS and index[msgspec.json.decode(payload)["input_sha256"]] % 10 == 0:
                raise nats.errors.ConnectionClosedError
            await real_publish(subject, payload, **kwargs)

        monkeypatch.setattr(pipeline.bus, "publish", flaky_publish)
        nc = await connect(server.url)
        decisions = await Collector().start(nc, DECISIONS)
        for payload in payloads:
            await nc.publish("sensors.p1.pump", payload)
        await server_barrier(nc)
        await wait_until(lambda: pipeline.stats.decisions == 300, within=20, what="300 decisions made")
        bodies = await decisions.wait_for(270, within=10)
        status = pipeline.status()
        await nc.close()
    assert sorted(index[d["input_sha256"]] for d in bodies) == [i for i in range(300) if i % 10]
    assert status["unpublished"] == 30 and status["batches"]["count"] < 300  # failures inside batches
    audited = [r for r in iter_records(runtime.data_dir / "audit.db") if r.kind == "decision"]
    assert len(audited) == 300


# ---------------------------------------------------------------------------------------------
# The model tier: one inference per batch


@pytest.fixture
def weighted_sum(tmp_path: Path) -> Model:
    weights = np.array([1.0, 10.0, 100.0, 1000.0], dtype=np.float32)
    return load_model(write_model(tmp_path / "sum", matmul_model(weights), features=["a", "b", "c", "d"],
                                  task="regressor"))


async def test_predict_many_answers_each_row_with_one_inference_and_learns_to_skip_the_thread(
    weighted_sum: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What is learnt, not how fast this machine is under a loaded test run (RunCost's own test
    # checks the budget's arithmetic): any run measured at all fits this budget.
    monkeypatch.setattr("models._batcher.INLINE_BUDGET_S", 1.0)
    rows = [[float(i), 1.0, 2.0, 3.0] for i in range(50)]
    async with MicroBatcher(weighted_sum) as batcher:
        first = await batcher.predict_many(rows)
        assert [p.value for p in first] == [i + 10 + 200 + 3000 for i in range(50)]
        assert (batcher.batches, batcher.rows, batcher.inline_batches) == (1, 50, 0)  # unknown cost: the thread
        for _ in range(5):
            await batcher.predict_many(rows[:1])
        assert batcher.batches == 6 and batcher.inline_batches >= 4  # a small model, shown cheap: on the loop
        assert await batcher.predict_many([]) == []
        with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
            await batcher.predict_many([[1.0, 2.0]])


async def test_predict_many_keeps_to_the_models_max_batch(weighted_sum: Model) -> None:
    rows = [[float(i), 0.0, 0.0, 0.0] for i in range(20)]
    async with MicroBatcher(weighted_sum, max_batch=8) as batcher:
        predictions = await batcher.predict_many(rows)
        assert [p.value for p in predictions] == [float(i) for i in range(20)]  # in order, each once
        assert (batcher.batches, batcher.rows) == (3, 20)  # runs of 8, 8 and 4 rows, never more than max_batch


async def test_predict_many_on_a_model_that_fails_raises_model_unavailable(weighted_sum: Model) -> None:
    class Failing:
        manifest = weighted_sum.manifest
        path = weighted_sum.path

        def predict(self, rows: Any) -> Any:
            raise RuntimeError("the session broke")

    async with MicroBatcher(Failing()) as batcher:  # type: ignore[arg-type]
        with pytest.raises(ModelUnavailable, match="the session broke"):
            await batcher.predict_many([[1.0, 2.0, 3.0, 4.0]])
        assert batcher.errors == 1


def test_run_cost_keeps_an_expensive_model_off_the_loop() -> None:
    cost = RunCost()
    assert not cost.inline_ok(1)  # never trusted before it has run once
    cost.observe(1, INLINE_BUDGET_S / 10)
    assert cost.inline_ok(1)
    cost.observe(64, INLINE_BUDGET_S * 4)  # rows are what costs: 64 of them do not fit the budget
    assert cost.inline_ok(1) and not cost.inline_ok(64)
    slow = RunCost()
    slow.observe(1, 0.05)  # a large model: 50 ms a run
    assert not slow.inline_ok(1)


# ---------------------------------------------------------------------------------------------
# The audit log: one append for a batch


async def test_append_many_is_one_chain_pass_one_commit_and_atomic(tmp_path: Path) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-batch") as log:
        await log.append("boot", {"n": 0})
        commits = log.commits
        chained = log.append_many("decision", [lambda seq, i=i: {"seq": seq, "i": i} for i in range(100)])
        assert [record.seq for record, _ in chained] == list(range(2, 102))
        assert await chained[-1][1] == 101
        assert all(future.done() and future.result() == record.seq for record, future in chained)
        assert log.commits == commits + 1  # one transaction for the batch

        def broken(seq: int) -> object:
            raise ValueError("cannot build this body")

        with pytest.raises(ValueError, match="cannot build"):
            log.append_many("decision", [{"ok": 1}, broken])
        assert await log.append("after", {"n": 1}) == 102  # nothing of the failed batch, chain intact
    records = list(iter_records(tmp_path / "audit.db"))
    assert [r.seq for r in records] == list(range(1, 103))
    assert msgspec.json.decode(bytes(records[5].body)) == {"i": 4, "seq": 6}  # each body built with its seq


async def test_append_many_bodies_are_canonical_json_reused_as_committed(tmp_path: Path) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-batch") as log:
        chained = log.append_many("decision", [{"b": 2, "a": 1}])
        await asyncio.gather(*(future for _, future in chained))
        (record, _), = chained
        assert bytes(record.body) == b'{"a":1,"b":2}'
    (stored,) = list(iter_records(tmp_path / "audit.db"))
    assert bytes(stored.body) == bytes(record.body) and stored.hash == record.hash


async def test_an_approval_or_cloud_wait_leaves_the_batch_and_never_holds_it(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    """A cloud that never answers holds only the inputs that asked it: once the breaker opens,
    the next batch is decided at once by the model, while the first inputs still wait."""
    server = await nats_servers("local")
    nc = await connect(server.url)

    asked: list[Msg] = []

    async def answer_probes_only(msg: Msg) -> None:  # a cloud alive to probes that never decides
        if msg.headers and msg.headers.get("Edge-Probe"):
            await msg.respond(b"{}")
        else:
            asked.append(msg)

    await nc.subscribe("cloud.mute", cb=answer_probes_only)
    pipeline = {"ladder": ["cloud", "model", "rules"], "cloud": {"subject": "cloud.mute", "timeout_ms": 6000}}
    config = make_config(tmp_path, server.url, upstream_url=server.url, pipeline=pipeline,
                         link={"breaker_reset_ms": 60_000})
    async with Runtime(config) as runtime:
        await wait_until(lambda: runtime.link.skip_reason() is None, within=10, what="the cloud link up")
        pump = runtime.pipelines["pump"]
        decisions = await Collector().start(nc, DECISIONS)
        for payload in inputs(3):
            await nc.publish("sensors.p1.pump", payload)
        await nc.flush()
        # Asked, not only taken off the batch: a task not yet started would see the breaker below.
        await wait_until(lambda: len(asked) == 3, within=5, what="the cloud asked 3 times")
        assert pump.status()["waiting"]["cloud"] == 3
        for _ in range(3):  # as if three requests had failed: the breaker opens, the cloud is skipped
            runtime.link.request_failed("timeout")
        await wait_until(lambda: runtime.link.skip_reason() is not None, within=5, what="the cloud skipped")
        reply = msgspec.json.decode((await nc.request("sensors.p1.pump", inputs(1, start=9)[0], timeout=2)).data)
        assert reply["tier"] == "model" and reply["fallbacks"][0]["tier"] == "cloud"
        assert pump.status()["waiting"]["cloud"] == 3  # the first three still wait, off the batch
        got = await decisions.wait_for(4, within=15)  # and are answered once their requests time out
        assert [d["fallbacks"][0]["reason"] for d in got[1:]] == ["timeout"] * 3
    await nc.close()

"""Governance at runtime with real servers: human approval, timeouts, a dead link, pause, back-pressure."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from edge import ApprovalRequest, NatsServer, Runtime, server_barrier
from edge.tools.chaos import FaultProxy
from edge.tools.cloudsim import AutoApprover
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import APPROVER, APPROVER_SEED, CRITICAL, NORMAL, Collector, connect, encode, make_config

APPROVAL_TIMEOUT_MS = 1500
DECISIONS = "edge.gw-test.decision.pump"
SHUTDOWN_POLICY = {"approval": "required", "approval_timeout_ms": APPROVAL_TIMEOUT_MS, "instead": "hold"}


@dataclass
class Rig:
    local: NatsServer
    cloud: NatsServer
    proxy: FaultProxy
    runtime: Runtime
    sensors: NATS
    cloud_nc: NATS
    decisions: Collector


def _config(tmp_path: Path, local: str, upstream: str, **pipeline: Any) -> Any:
    return make_config(
        tmp_path, local, upstream_url=upstream,
        pipeline={"ladder": ["rules"], "actions": {"shutdown": SHUTDOWN_POLICY, "hold": {}}, **pipeline},
        link={"probe_interval_ms": 100, "probe_timeout_ms": 100, "breaker_failures": 2, "breaker_reset_ms": 500},
    )


@pytest.fixture
async def rig(nats_servers: ServerFactory, tmp_path: Path) -> AsyncIterator[Rig]:
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    async with FaultProxy("127.0.0.1", cloud.port) as proxy:
        sensors = await connect(local.url)
        cloud_nc = await connect(cloud.url)
        async with Runtime(_config(tmp_path, local.url, proxy.url)) as runtime:
            decisions = await Collector().start(sensors, DECISIONS)
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the cloud link online")
            yield Rig(local, cloud, proxy, runtime, sensors, cloud_nc, decisions)
        await sensors.close()
        await cloud_nc.close()


def by_asset(decisions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in decisions}


async def test_an_approver_approves_one_and_denies_another(rig: Rig) -> None:
    def policy(request: ApprovalRequest) -> bool:
        return request.input.get("asset") == "approve-me"

    async with AutoApprover(rig.cloud_nc, delay_s=(0.05, 0.1), policy=policy, name="alice",
                            key=APPROVER_SEED) as approver:
        approved = await rig.sensors.request("sensors.p1.pump", encode({**CRITICAL, "asset": "approve-me"}), timeout=5)
        denied = await rig.sensors.request("sensors.p2.pump", encode({**CRITICAL, "asset": "deny-me"}), timeout=5)
    import msgspec

    a, d = msgspec.json.decode(approved.data), msgspec.json.decode(denied.data)
    assert a["action"] == "shutdown"
    # `by` is the key that signed the answer (verified); `by_name` the name the approver gave.
    assert a["governance"] == {"status": "approved", "requested_action": "shutdown", "by": APPROVER,
                               "by_name": "alice", "reason": "looks right"}
    assert d["action"] == "hold"
    assert d["governance"]["status"] == "denied" and d["governance"]["by"] == APPROVER
    assert {r.requested_action for r in approver.requests} == {"shutdown"}
    assert {r.decision_id for r in approver.requests} == {a["id"], d["id"]}
    # Each request and outcome is on record with the decision id.
    from sync import iter_records

    await wait_until(lambda: rig.runtime.audit is not None and rig.runtime.audit.pending == 0, within=10,
                     what="the audit log written")
    assert rig.runtime.audit is not None
    records = list(iter_records(rig.runtime.audit.path))
    kinds = [(r.kind, msgspec.json.decode(r.body).get("decision_id")) for r in records]
    for decision in (a, d):
        assert ("approval_request", decision["id"]) in kinds
        assert ("approval", decision["id"]) in kinds


async def test_a_silent_approver_times_out_into_the_instead_action(rig: Rig) -> None:
    import msgspec

    # Someone is subscribed to approvals but never answers (a person away from the screen).
    silent = await rig.cloud_nc.subscribe("edge.*.approval.*")
    await server_barrier(rig.cloud_nc)
    started = time.monotonic()
    reply = await rig.sensors.request("sensors.p1.pump", encode(CRITICAL), timeout=10)
    waited = time.monotonic() - started
    await silent.unsubscribe()
    decision = msgspec.json.decode(reply.data)
    assert decision["action"] == "hold"
    assert decision["governance"]["status"] == "timeout"
    assert decision["governance"]["requested_action"] == "shutdown"
    assert waited >= APPROVAL_TIMEOUT_MS / 1000 * 0.9


async def test_nobody_listening_is_decided_at_once(rig: Rig) -> None:
    import msgspec

    started = time.monotonic()
    reply = await rig.sensors.request("sensors.p1.pump", encode(CRITICAL), timeout=10)
    decision = msgspec.json.decode(reply.data)
    assert decision["action"] == "hold"
    assert decision["governance"]["status"] == "unreachable"
    assert time.monotonic() - started < APPROVAL_TIMEOUT_MS / 1000 / 3


async def test_blackholed_upstream_is_decided_at_once_without_waiting(rig: Rig) -> None:
    import msgspec

    rig.proxy.blackhole()
    # The link must be known dead first: probes time out and open the breaker.
    await wait_until(lambda: rig.runtime.link.skip_reason() is not None, within=10, what="the link skipped")
    started = time.monotonic()
    reply = await rig.sensors.request("sensors.p1.pump", encode(CRITICAL), timeout=10)
    waited = time.monotonic() - started
    decision = msgspec.json.decode(reply.data)
    assert decision["action"] == "hold"
    assert decision["governance"]["status"] == "unreachable"
    assert waited < APPROVAL_TIMEOUT_MS / 1000 / 3


async def test_pause_turns_actions_into_instead_and_resume_restores(rig: Rig) -> None:
    import msgspec

    async with AutoApprover(rig.cloud_nc, delay_s=(0.01, 0.02), key=APPROVER_SEED):
        rig.runtime.pause(by="ops", reason="storm")
        paused = msgspec.json.decode((await rig.sensors.request("sensors.p1.pump", encode(CRITICAL), timeout=5)).data)
        normal = msgspec.json.decode((await rig.sensors.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
        rig.runtime.resume(by="ops")
        resumed = msgspec.json.decode((await rig.sensors.request("sensors.p1.pump", encode(CRITICAL), timeout=5)).data)
    assert paused["action"] == "hold" and paused["governance"]["status"] == "paused"
    assert paused["label"] == "critical"  # still computed, published and audited
    assert normal["action"] == "none"
    assert resumed["action"] == "shutdown" and resumed["governance"]["status"] == "approved"


async def test_pending_approvals_do_not_stall_other_inputs(rig: Rig) -> None:
    """1,000 inputs wait on one slow approver; unrelated inputs keep their steady-state latency."""
    import msgspec

    pipeline = rig.runtime.pipelines["pump"]
    bound = pipeline.config.max_pending_approvals
    async with AutoApprover(rig.cloud_nc, delay_s=(5.0, 5.0), key=APPROVER_SEED):
        for i in range(1000):
            await rig.sensors.publish("sensors.p1.pump", encode({**CRITICAL, "asset": f"c{i}"}))
        await server_barrier(rig.sensors)
        await wait_until(lambda: pipeline.pending_approvals == bound, within=10, what=f"{bound} approvals pending")
        latencies = []
        for _ in range(100):
            started = time.perf_counter()
            reply = await rig.sensors.request("sensors.p2.pump", encode(NORMAL), timeout=5)
            latencies.append(time.perf_counter() - started)
            assert msgspec.json.decode(reply.data)["action"] == "none"
    latencies.sort()
    # Steady state is a few milliseconds; a stalled pipeline would wait seconds for the approver.
    assert latencies[98] < 0.25, latencies[-5:]
    # Beyond the bound, approvals were not even asked for: decided at once as their `instead`.
    decided = await rig.decisions.wait_for(1000 - bound + 100, within=10)
    backlog = [d for d in decided if d["governance"]["status"] == "approval_backlog"]
    assert len(backlog) == 1000 - bound
    assert all(d["action"] == "hold" for d in backlog)

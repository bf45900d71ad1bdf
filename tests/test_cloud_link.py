"""The cloud tier under every kind of link failure (SPEC §6, §9), with real servers and the fault proxy.

Topology: sensors and the runtime share a local nats-server; the runtime reaches the "cloud"
(a second nats-server, where the cloud simulator answers) only through a FaultProxy. A driver
sends a steady stream of inputs, each with a unique id, while a fault is applied and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from edge import NatsServer, Runtime
from edge.tools.chaos import FaultProxy
from edge.tools.cloudsim import CloudSimulator
from sync import iter_records
from tests.nats_harness import ServerFactory, leaf_hub, leaf_upstream
from tests.polling import wait_until
from tests.runtime_harness import ANOMALY, NORMAL, Collector, connect, encode, make_config

TIMEOUT_MS = 200
BREAKER_FAILURES = 3
RATE_HZ = 100
DECISIONS = "edge.gw-test.decision.pump"


@dataclass
class Rig:
    local: NatsServer
    cloud: NatsServer
    proxy: FaultProxy
    runtime: Runtime
    sim: CloudSimulator
    decisions: Collector
    driver_nc: NATS
    sent: int = 0


@contextlib.asynccontextmanager
async def open_rig(nats_servers: ServerFactory, tmp_path: Path, mode: str = "client") -> AsyncIterator[Rig]:
    """client: the runtime connects to the cloud through the proxy. leaf: its embedded server is a
    leaf node of the cloud, the leaf link through the proxy (the sensors use the embedded server)."""
    local = await nats_servers("local")
    cloud = await (leaf_hub(nats_servers, "cloud") if mode == "leaf" else nats_servers("cloud"))
    async with FaultProxy("127.0.0.1", (cloud.leafnode_port if mode == "leaf" else cloud.port) or 0) as proxy:
        config = make_config(
            tmp_path, local.url, upstream_url=proxy.url,
            pipeline={"ladder": ["cloud", "model", "rules"],
                      "cloud": {"subject": "cloud.infer.pump", "timeout_ms": TIMEOUT_MS}},
            link={"probe_interval_ms": 100, "probe_timeout_ms": 150, "breaker_failures": BREAKER_FAILURES,
                  "breaker_reset_ms": 300},
            **({"nats": leaf_upstream(f"nats-leaf://127.0.0.1:{proxy.port}")} if mode == "leaf" else {}),
        )
        cloud_nc = await connect(cloud.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        async with CloudSimulator(cloud_nc) as sim, Runtime(config) as runtime:
            local_nc = await connect(runtime.local_url)
            decisions = await Collector().start(local_nc, DECISIONS)
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the cloud link online")
            yield Rig(local, cloud, proxy, runtime, sim, decisions, local_nc)
            await local_nc.close()
        await cloud_nc.close()


@pytest.fixture
async def rig(nats_servers: ServerFactory, tmp_path: Path) -> AsyncIterator[Rig]:
    async with open_rig(nats_servers, tmp_path) as rig:
        yield rig


async def drive(rig: Rig, stop: asyncio.Event) -> None:
    """Inputs at RATE_HZ on a schedule, each with a unique asset id, until `stop`."""
    nc = rig.driver_nc
    start = time.monotonic()
    while not stop.is_set():
        row = dict(NORMAL if rig.sent % 2 else ANOMALY, asset=f"a{rig.sent}")
        await nc.publish(f"sensors.p{rig.sent % 4}.pump", encode(row))
        rig.sent += 1
        next_at = start + rig.sent / RATE_HZ
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # pace: the offered load


def reasons(decision: dict[str, Any]) -> set[str]:
    return {f["reason"] for f in decision["fallbacks"] if f["tier"] == "cloud"}


def latency_ms(decision: dict[str, Any]) -> float:
    return float(decision["decided_at"] - decision["received_at"]) / 1e6


Action = Callable[[Rig], Awaitable[None]]


async def _stop(r: Rig) -> None:
    await r.cloud.stop()


async def _start(r: Rig) -> None:
    await r.cloud.start()


async def _kill(r: Rig) -> None:
    await r.cloud.kill()


async def _restart(r: Rig) -> None:
    await r.cloud.stop()
    await r.cloud.start()


async def _noop(r: Rig) -> None:
    return None


def _proxy(method: str, *args: Any) -> Action:
    async def act(r: Rig) -> None:
        getattr(r.proxy, method)(*args)

    return act


async def _flap(r: Rig) -> None:
    r.proxy.flap(0.4, 0.4, "reset", cycles=3)
    await wait_until(lambda: not r.proxy.flapping, within=10, what="the flapping to end")


# fault name → (apply, restore, the cloud fallback reasons a decision may carry while it lasts)
FAULTS: dict[str, tuple[Action, Action, set[str]]] = {
    "server-stopped": (_stop, _start, {"unreachable", "breaker_open", "timeout"}),
    "server-killed": (_kill, _start, {"unreachable", "breaker_open", "timeout"}),
    "proxy-close": (_proxy("close"), _proxy("pass_through"), {"unreachable", "breaker_open", "timeout"}),
    "proxy-reset": (_proxy("reset"), _proxy("pass_through"), {"unreachable", "breaker_open", "timeout"}),
    "proxy-blackhole": (_proxy("blackhole"), _proxy("pass_through"), {"timeout", "breaker_open", "unreachable"}),
    # A slow link may also be declared stale by the client's own pings, and reconnect.
    "high-latency": (_proxy("latency", 2 * TIMEOUT_MS), _proxy("pass_through"),
                     {"timeout", "breaker_open", "unreachable"}),
    "flapping": (_flap, _noop, {"unreachable", "breaker_open", "timeout"}),
    "server-restarted": (_restart, _noop, {"unreachable", "breaker_open", "timeout"}),
}
# Faults during which the link is dead long enough that the breaker must open or the link go down.
SUSTAINED = {"server-stopped", "server-killed", "proxy-close", "proxy-reset", "proxy-blackhole", "high-latency"}


# Leaf mode (the cloud reached over a leaf link) under the faults that test its own detection:
# a dropped, a blackholed and a reset link, and the hub killed and restarted.
LEAF_FAULTS = ["server-killed", "proxy-reset", "proxy-blackhole", "server-restarted"]


@pytest.mark.parametrize(("fault", "mode"), [(f, "client") for f in FAULTS] + [(f, "leaf") for f in LEAF_FAULTS])
async def test_decisions_keep_flowing_through_a_cloud_fault(
        nats_servers: ServerFactory, tmp_path: Path, fault: str, mode: str) -> None:
    async with open_rig(nats_servers, tmp_path, mode) as rig:
        await _flow_through(rig, fault)


async def _flow_through(rig: Rig, fault: str) -> None:
    apply, restore, allowed = FAULTS[fault]
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(rig, stop))
    try:
        # Steady state: the cloud decides.
        await wait_until(lambda: any(d["tier"] == "cloud" for d in rig.decisions.decoded()), within=10,
                         what="a decision by the cloud")
        fault_at = time.time_ns()
        await apply(rig)
        if fault in SUSTAINED:
            # Hold the fault until decisions stop waiting on the cloud at all, then a while longer.
            await wait_until(lambda: any(reasons(d) & {"breaker_open", "unreachable"} for d in rig.decisions.decoded()
                                         if d["received_at"] > fault_at), within=15,
                             what="decisions that skip the cloud")
            skipped_since = time.time_ns()
            await wait_until(lambda: sum(1 for d in rig.decisions.decoded() if d["received_at"] > skipped_since) >= 30,
                             within=10, what="30 more decisions while the fault lasts")
        restored_at = time.time_ns()
        await restore(rig)
        # Recovery without a restart: the cloud decides again.
        await wait_until(lambda: any(d["tier"] == "cloud" and d["received_at"] > restored_at
                                     for d in rig.decisions.decoded()), within=30,
                         what="the cloud deciding again after the restore")
    finally:
        stop.set()
        await driver
    got = await rig.decisions.wait_for(rig.sent, within=15)

    # Every input exactly one decision.
    per_input = Counter(d["id"] for d in got)
    assert len(got) == rig.sent and len(per_input) == rig.sent
    # Every decision made while the cloud was gone came from the model or rules, for a stated reason.
    during = [d for d in got if fault_at < d["received_at"] and d["tier"] != "cloud"]
    assert during, "no decision was made without the cloud"
    for d in during:
        assert d["tier"] in ("model", "rules")
        assert reasons(d) <= allowed and reasons(d), d["fallbacks"]
    if fault in SUSTAINED:
        # After the breaker opened (or the link was known down) no decision waited on the cloud:
        # none timed out, and each took less than the cloud's own timeout.
        first_skip = min(d["received_at"] for d in got if reasons(d) & {"breaker_open", "unreachable"})
        after = [d for d in got if first_skip < d["received_at"] < restored_at]
        assert after
        assert not [d for d in after if "timeout" in reasons(d)]
        assert max(latency_ms(d) for d in after) < TIMEOUT_MS
        # Only inputs in flight when the cloud died waited on it: at most the offered load over one
        # timeout, plus the failures it takes to open the breaker.
        waited = [d for d in got if "timeout" in reasons(d)]
        assert len(waited) <= RATE_HZ * TIMEOUT_MS / 1000 + BREAKER_FAILURES + 5
    # Every change of link state is on record: it went offline and came back.
    audit = rig.runtime.audit
    assert audit is not None
    await wait_until(lambda: audit.pending == 0, within=10, what="the audit log written")
    links = [msgspec.json.decode(r.body) for r in iter_records(audit.path) if r.kind == "link"]
    assert "offline" in {link["to"] for link in links}
    assert links[-1]["to"] in ("online", "degraded")


async def test_cloud_misbehaviour_falls_through_with_the_reason(rig: Rig) -> None:
    """Wrong answers, slow answers, silence and doubt each fall to the model with their own reason."""
    import msgspec

    nc = rig.driver_nc

    async def decide() -> dict[str, Any]:
        reply = await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        decision: dict[str, Any] = msgspec.json.decode(reply.data)
        return decision

    assert (await decide())["tier"] == "cloud"
    rig.sim.wrong()
    wrong = await decide()
    assert wrong["tier"] == "model"
    assert wrong["fallbacks"] == [{"tier": "cloud", "reason": "invalid_reply", "tier_name": "cloud"}]
    rig.sim.slow(2 * TIMEOUT_MS)
    slow = await decide()
    assert slow["tier"] == "model"
    assert slow["fallbacks"] == [{"tier": "cloud", "reason": "timeout", "tier_name": "cloud"}]
    assert latency_ms(slow) >= TIMEOUT_MS * 0.9
    rig.sim.normal()
    await wait_until(lambda: rig.runtime.link.skip_reason() is None, within=10,
                     what="the link usable again")  # one timeout: breaker still closed
    rig.sim.confidence_floor = 0.0
    # A bar above any possible answer: the cloud's answer is always too doubtful.
    rig.runtime.pipelines["pump"].logic.ladder.tiers[0].min_confidence = 1.01  # type: ignore[attr-defined]
    doubtful = await decide()
    assert doubtful["tier"] == "model"
    assert doubtful["fallbacks"] == [{"tier": "cloud", "reason": "low_confidence", "tier_name": "cloud"}]
    rig.sim.silent()
    # Silence is caught by live requests and by the probe (which asks the cloud subject itself):
    # at most `breaker_failures` decisions wait, then the breaker is open and nobody waits.
    reasons_seen = []
    for _ in range(2 * BREAKER_FAILURES):
        reasons_seen.append((await decide())["fallbacks"][0]["reason"])
        if reasons_seen[-1] == "breaker_open":
            break
    assert reasons_seen[-1] == "breaker_open", reasons_seen
    assert 1 <= reasons_seen.count("timeout") <= BREAKER_FAILURES
    after = await decide()
    assert after["fallbacks"][0]["reason"] == "breaker_open" and latency_ms(after) < TIMEOUT_MS / 2

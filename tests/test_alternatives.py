"""Alternative models and providers in the ladder (named tiers, races), and cross-checks: real
nats-servers, real ONNX models, a simulated cloud per provider."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import ConfigError, Runtime, decode_config
from edge.tools.cloudsim import CloudSimulator
from models import bundled_model_path
from sync import iter_records
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, config_data, connect, encode

A, B = "cloud.a.pump", "cloud.b.pump"
LINK = {"probe_interval_ms": 100, "probe_timeout_ms": 500, "breaker_failures": 3, "breaker_reset_ms": 300}
ANOMALY = {"rms": 7.0, "kurtosis": 6.0, "temp_c": 80.0, "rpm": 1500.0}  # the model: anomaly -> inspect


@dataclass
class Rig:
    runtime: Runtime
    sensors: NATS
    a: CloudSimulator
    b: CloudSimulator

    async def decide(self, values: dict[str, Any] = NORMAL) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        reply = await self.sensors.request("sensors.p1.pump", encode(values), timeout=5)
        return msgspec.json.decode(reply.data), time.perf_counter() - started


@contextlib.asynccontextmanager
async def open_rig(nats_servers: ServerFactory, tmp_path: Path, **pipeline: Any) -> AsyncIterator[Rig]:
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    data = config_data(tmp_path, local.url, upstream_url=cloud.url, link=LINK, pipeline={
        "clouds": {"a": {"subject": A, "timeout_ms": 200}, "b": {"subject": B, "timeout_ms": 200}}, **pipeline})
    data["models"].append({"name": "small", "path": str(bundled_model_path())})
    config = decode_config(data, base_dir=tmp_path, env={})
    cloud_nc = await connect(cloud.url)
    async with (CloudSimulator(cloud_nc, subject=A) as a, CloudSimulator(cloud_nc, subject=B) as b,
                Runtime(config) as runtime):
        sensors = await connect(local.url)
        providers = len([t for t in pipeline["ladder"] if t.startswith("cloud:")])
        await wait_until(lambda: len(runtime.status()["clouds"]) == providers
                         and all(c["state"] == "online" for c in runtime.status()["clouds"].values()),
                         within=10, what="every provider online")
        yield Rig(runtime, sensors, a, b)
        await sensors.close()
    await cloud_nc.close()


def clouds(rig: Rig) -> dict[str, dict[str, Any]]:
    status: dict[str, dict[str, Any]] = rig.runtime.status()["clouds"]
    return status


async def test_a_provider_slower_than_its_timeout_opens_its_breaker_once_and_keeps_it_open(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    async with open_rig(nats_servers, tmp_path, ladder=["cloud:a", "model", "rules"]) as rig:
        assert (await rig.decide())[0]["tier_name"] == "a"
        rig.a.slow(300)  # past the tier's 200 ms: every request would time out
        waited = 0
        deadline = time.monotonic() + 3.0  # ten breaker resets (300 ms): ten half-open trials
        while time.monotonic() < deadline:
            decision, _ = await rig.decide()
            assert decision["tier"] == "model"
            waited += any(f["reason"] == "timeout" for f in decision["fallbacks"])
        # Three live timeouts open it; every trial since is a probe that waits the tier's own 200 ms,
        # which a 300 ms provider fails: no decision waited again, the breaker never closed.
        assert 1 <= waited <= 3
        assert clouds(rig)[A]["breaker"] in ("open", "half_open") and clouds(rig)[A]["state"] != "online"
        records = [msgspec.json.decode(r.body) for r in iter_records(rig.runtime.data_dir / "audit.db", kinds=["link"])]
        to_online = [r["reason"] for r in records if r.get("subject") == A and r["to"] == "online"]
        assert to_online == ["connected"]  # its start; never again while it was slow
        rig.a.normal()
        await wait_until(lambda: clouds(rig)[A]["state"] == "online", within=10, what="provider a back")
        assert (await rig.decide())[0]["tier_name"] == "a"


async def test_a_blackholed_provider_falls_to_the_next_and_its_breaker_is_its_own(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    async with open_rig(nats_servers, tmp_path, ladder=["cloud:a", "cloud:b", "model", "rules"]) as rig:
        assert (await rig.decide())[0]["tier_name"] == "a"
        rig.a.silent()  # blackholed: requests to a are never answered
        await wait_until(lambda: clouds(rig)[A]["breaker"] != "closed", within=10, what="a's breaker open")
        for _ in range(20):
            decision, took = await rig.decide()
            assert (decision["tier"], decision["tier_name"]) == ("cloud", "b")
            assert decision["fallbacks"] == [{"tier": "cloud", "reason": "breaker_open", "tier_name": "a"}]
            assert took < 0.2  # nothing waits on a once its breaker is open (its timeout is 200 ms)
        assert clouds(rig)[B] | {"rtt_ms": None} == {"state": "online", "breaker": "closed", "rtt_ms": None,
                                                     "last_failure": clouds(rig)[B]["last_failure"]}
        by_name = rig.runtime.status()["pipelines"]["pump"]["by_tier_name"]
        assert by_name["cloud:b"] >= 20 and by_name["cloud:a"] >= 1


async def test_a_big_model_that_fails_falls_to_the_small_model_not_to_the_rules(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "big"
    shutil.copytree(bundled_model_path(), broken)
    (broken / "model.onnx").unlink()  # the manifest is there, the model file is not
    local = await nats_servers("local")
    data = config_data(tmp_path, local.url, pipeline={"ladder": ["model:big", "model:small", "rules"]})
    data["models"] += [{"name": "big", "path": str(broken)}, {"name": "small", "path": str(bundled_model_path())}]
    async with Runtime(decode_config(data, base_dir=tmp_path, env={})) as runtime:
        nc = await connect(local.url)
        decision = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
        await nc.close()
        models = runtime.status()["models"]
    assert (decision["tier"], decision["tier_name"], decision["model"]["name"]) == ("model", "small", "pump-anomaly")
    assert decision["fallbacks"] == [{"tier": "model", "reason": "unavailable", "tier_name": "big"}]
    states = {m["name"]: m["state"] for m in models}
    assert (states["big"], states["small"]) == ("unavailable", "serving")


async def test_a_race_is_won_by_the_fast_provider_and_the_slow_ones_answer_is_recorded(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    pipeline = {"ladder": ["cloud:a", "cloud:b", "model", "rules"], "race": ["cloud:a", "cloud:b"],
                "clouds": {"a": {"subject": A, "timeout_ms": 1000}, "b": {"subject": B, "timeout_ms": 1000}}}
    async with open_rig(nats_servers, tmp_path, **pipeline) as rig:
        rig.a.slow(300)
        decisions = [await rig.decide() for _ in range(5)]
        for decision, took in decisions:
            assert (decision["tier"], decision["tier_name"], decision["fallbacks"]) == ("cloud", "b", [])
            assert took < 0.25  # b's time, not a's 300 ms
        ids = {d["id"] for d, _ in decisions}
        # a's answers, still on their way, are nobody's pending approval (max_pending_approvals).
        assert rig.runtime.status()["pipelines"]["pump"]["pending_approvals"] == 0

        def raced() -> list[dict[str, Any]]:
            records = iter_records(rig.runtime.data_dir / "audit.db", kinds=["race"])
            return [msgspec.json.decode(r.body) for r in records]

        # a's answers come 300 ms later, within its 1 s timeout: each is recorded beside its decision.
        await wait_until(lambda: {r["decision_id"] for r in raced()} >= ids, within=10, what="a's late answers")
        late = [r for r in raced() if r["decision_id"] in ids]
        assert all(r["tier_name"] == "a" and r["winner"] == "b" and r["label"] for r in late)
        assert rig.runtime.status()["pipelines"]["pump"]["race_late"]["a"] >= 5


@pytest.mark.parametrize("policy", ["instead", "approval"])
async def test_a_cross_check_that_disagrees_takes_the_instead_or_asks_a_human(
    nats_servers: ServerFactory, tmp_path: Path, policy: str
) -> None:
    # The rules see nothing wrong where the model sees an anomaly: a second opinion that disagrees.
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    pipeline = {"ladder": ["model", "rules"], "cross_check": "rules", "on_disagreement": policy,
                "rules": [{"when": "rms > 100", "action": "shutdown", "label": "critical"},
                          {"default": True, "action": "none", "label": "normal"}],
                "actions": {"inspect": {"instead": "hold", "approval_timeout_ms": 300}, "hold": {}}}
    config = decode_config(config_data(tmp_path, local.url, upstream_url=cloud.url, link=LINK, pipeline=pipeline),
                           base_dir=tmp_path, env={})
    asked: list[dict[str, Any]] = []
    approver = await connect(cloud.url)
    async def keep(msg: Msg) -> None:  # asked, never answered
        asked.append(msgspec.json.decode(msg.data))

    await approver.subscribe("edge.gw-test.approval.pump", cb=keep)
    async with Runtime(config) as runtime:
        await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
        nc = await connect(local.url)
        agreed = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)
        disagreed = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(ANOMALY), timeout=5)).data)
        await nc.close()
        pairs = runtime.status()["pipelines"]["pump"]["cross_checks"]
    await approver.close()
    assert agreed["cross_check"] == {"tier": "rules", "tier_name": "rules", "action": "none", "agreed": True}
    assert agreed["governance"]["status"] == "auto"
    # Recorded with both actions: the model's (requested) and the cross-check's.
    assert disagreed["cross_check"] == {"tier": "rules", "tier_name": "rules", "action": "none", "agreed": False}
    assert disagreed["governance"]["requested_action"] == "inspect" and disagreed["action"] == "hold"
    if policy == "instead":
        assert disagreed["governance"]["status"] == "disagreement" and asked == []
    else:
        assert disagreed["governance"]["status"] == "timeout"  # a human was asked and did not answer
        assert [a["decision_id"] for a in asked] == [disagreed["id"]]
    assert pairs["pump-anomaly/rules"] == {"agreed": 1, "disagreed": 1, "agreement": 0.5}


@pytest.mark.parametrize("pipeline, problem", [
    ({"ladder": ["model:nope", "rules"]}, "pipelines[0].ladder[0]: no model named 'nope'"),
    ({"ladder": ["cloud:gone", "rules"]}, "pipelines[0].ladder[0]: no cloud named 'gone'"),
    ({"ladder": ["model", "model:pump-anomaly", "rules"]},
     "pipelines[0].ladder[1]: 'model:pump-anomaly' appears twice"),
    ({"ladder": ["model:", "rules"]}, "pipelines[0].ladder[0]: unknown tier 'model:'"),
    ({"ladder": ["cloud:a", "model", "cloud:b", "rules"], "race": ["cloud:a", "cloud:b"],
      "clouds": {"a": {"subject": A}, "b": {"subject": B}}},
     "pipelines[0].race: raced tiers must stand next to each other"),
    ({"ladder": ["cloud:a", "model", "rules"], "race": ["cloud:a", "model"], "clouds": {"a": {"subject": A}}},
     "pipelines[0].race[1]: 'model' is not a cloud tier"),
    ({"cross_check": "model:nope"}, "pipelines[0].cross_check: no model named 'nope'"),
    ({"cross_check": "cloud:a", "clouds": {"a": {"subject": A}}}, "pipelines[0].cross_check: expected 'rules'"),
    ({"on_disagreement": "instead"}, "pipelines[0].on_disagreement: set without a cross_check"),
    ({"clouds": {"a": {"subject": "bad subject"}}}, "pipelines[0].clouds.a.subject: malformed subject"),
])
def test_named_tier_config_errors_name_the_key(tmp_path: Path, pipeline: dict[str, Any], problem: str) -> None:
    data = config_data(tmp_path, "nats://127.0.0.1:4222", pipeline=pipeline)
    with pytest.raises(ConfigError) as err:
        decode_config(data, base_dir=tmp_path, env={})
    assert any(str(p).startswith(problem) for p in err.value.problems), [str(p) for p in err.value.problems]


def test_existing_single_tier_configs_are_unchanged(tmp_path: Path) -> None:
    config = decode_config(config_data(tmp_path, "nats://127.0.0.1:4222", pipeline={
        "ladder": ["model", "cloud", "rules"], "cloud": {"subject": A}}), base_dir=tmp_path, env={})
    p = config.pipelines[0]
    assert (p.clouds, p.race, p.cross_check, p.on_disagreement) == ({}, [], "", "record")



def named_model(tmp_path: Path, name: str, version: str) -> Path:
    """The bundled model under another name and version (its sha256 is of model.onnx: still valid)."""
    folder = tmp_path / f"{name}-{version}"
    shutil.copytree(bundled_model_path(), folder)
    manifest = folder / "manifest.toml"
    text = manifest.read_text().replace('name = "pump-anomaly"', f'name = "{name}"')
    manifest.write_text(text.replace('version = "1"', f'version = "{version}"'))
    return folder


async def test_a_named_model_is_deployed_and_rolled_back_with_no_decision_lost(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    from edge.cli._operator import fleet_deploy_model, send_command
    from tests.fleet_helpers import Decisions, Inputs, every_decision_heard, fleet_of, ops
    from tests.runtime_harness import OPERATOR_SEED

    server = await nats_servers("hub")
    small = {"name": "small", "path": str(named_model(tmp_path, "small", "1"))}
    nc = await connect(server.url)
    decisions = await Decisions().start(nc)
    async with fleet_of(tmp_path, server.url, 1, pipeline={"ladder": ["model:small", "model", "rules"]},
                        models=[{"name": "pump-anomaly", "path": str(bundled_model_path())}, small]) as fleet:
        inputs = Inputs(nc)
        stop = asyncio.Event()
        sender = asyncio.create_task(inputs.run(stop, every=0.002))

        def small_at(version: str) -> Any:
            return lambda: any(d["tier_name"] == "small" and d["model"]["version"] == version
                               for d in decisions.all[-5:])

        await decisions.wait_for(small_at("1"))
        v2 = named_model(tmp_path, "small", "2")
        assert await fleet_deploy_model(ops(server.url, target="gw-000", folder=str(v2), name="small", version="2",
                                            shadow=False, bucket="models", expect=1, timeout=30)) == 0
        await decisions.wait_for(small_at("2"))
        got = await send_command(nc, "gw-000", "model.rollback", {"name": "small"}, expect=1, seed=OPERATOR_SEED)
        assert got.all_ok and got.replies[0].result["version"] == "1"
        await decisions.wait_for(small_at("1"))
        stop.set()
        await sender
        await decisions.wait_for(lambda: len(decisions.all) >= len(inputs.sent))
        await every_decision_heard(fleet, decisions)
        status = fleet[0][0].status()
    assert set(decisions.per_input["gw-000"]) == set(inputs.sent)  # every input decided ...
    assert set(decisions.per_input["gw-000"].values()) == {1}  # ... once
    assert {d["tier_name"] for d in decisions.all} == {"small"}  # the other model tier never had to answer
    versions = {m["name"]: m["version"] for m in status["models"]}
    assert versions == {"pump-anomaly": "1", "small": "1"}
    await nc.close()


async def test_config_apply_adds_and_removes_tiers_with_no_input_lost_or_doubled(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    from tests.fleet_helpers import Decisions, Inputs

    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    base = config_data(tmp_path, local.url, upstream_url=cloud.url, link=LINK, pipeline={"ladder": ["model", "rules"]})
    base["models"].append({"name": "small", "path": str(named_model(tmp_path, "small", "1"))})
    cloud_nc = await connect(cloud.url)
    async with CloudSimulator(cloud_nc, subject=A), Runtime(decode_config(base, base_dir=tmp_path, env={})) as runtime:
        nc = await connect(local.url)
        decisions = await Decisions().start(nc)
        inputs = Inputs(nc)
        stop = asyncio.Event()
        sender = asyncio.create_task(inputs.run(stop, every=0.002))
        await decisions.wait_for(lambda: len(decisions.all) >= 20)
        wider = config_data(tmp_path, local.url, upstream_url=cloud.url, link=LINK, pipeline={
            "ladder": ["cloud:a", "model:small", "model", "rules"], "clouds": {"a": {"subject": A}}})
        wider["models"] = base["models"]
        await runtime.apply_config(decode_config(wider, base_dir=tmp_path, env={}))
        await decisions.wait_for(lambda: any(d["tier_name"] == "a" for d in decisions.all[-5:]), within=10)
        await runtime.apply_config(decode_config(base, base_dir=tmp_path, env={}))  # and back
        mark = len(decisions.all)
        await decisions.wait_for(lambda: len(decisions.all) >= mark + 20)
        stop.set()
        await sender
        await decisions.wait_for(lambda: len(decisions.all) >= len(inputs.sent))
        await nc.close()
    await cloud_nc.close()
    counts = decisions.per_input["gw-test"]
    assert set(counts) == set(inputs.sent) and set(counts.values()) == {1}  # each input once
    assert {d["tier_name"] for d in decisions.all[mark + 5:]} <= {"pump-anomaly", "rules"}  # the a tier is gone

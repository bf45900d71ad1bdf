"""The fleet converges (desired state in KV, reported state, `edge fleet ls`), on a real nats-server:
intent reaches devices that were offline, the most specific key wins, forged values change
nothing, the shadow slot goes with promote and rollback, and status polls do not flood the audit log."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import Config, Runtime
from edge.cli._fleet_state import fleet_buckets
from edge.cli._operator import (
    fleet_cmd,
    fleet_config_push,
    fleet_deploy_model,
    fleet_desired_set,
    fleet_ls,
    publish_model,
    send_command,
)
from edge.fleet import Fleet, new_seed, sign_model
from edge.fleet._desired import ModelIntent, ModelVersion, PausedIntent, encode_value
from edge.tools.chaos import FaultProxy
from sync import iter_records
from tests.fleet_helpers import RULES_ONLY, StubDevice, model_version, ops
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import OPERATOR_SEED, PUMP_RULES, config_data, connect, make_config, write_config

HEARTBEAT_S = 0.4  # `missing` after three of them
INTRUDER_SEED = new_seed()


def device_config(tmp_path: Path, url: str, device: str, *, model: bool = False, **top: Any) -> Config:
    light: dict[str, Any] = {} if model else {"pipeline": RULES_ONLY, "models": []}
    return make_config(tmp_path, url, device=device, groups=["north"],
                       fleet={"heartbeat_s": HEARTBEAT_S}, **light, **top)


async def ls(url: str, capsys: pytest.CaptureFixture[str], **kwargs: Any) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = await fleet_ls(ops(url, timeout=1.0, **kwargs))
    return code, json.loads(capsys.readouterr().out)


def view(listing: dict[str, Any], device: str) -> dict[str, Any]:
    return next(v for v in listing["fleet"] if v["device"] == device)


async def wait_listed(url: str, capsys: pytest.CaptureFixture[str], ok: Callable[[int, dict[str, Any]], bool], *,
                      within: float, what: str, **kwargs: Any) -> dict[str, Any]:
    """`edge fleet ls --json` until `ok(code, listing)`."""
    seen: dict[str, Any] = {}

    async def listed() -> bool:
        code, listing = await ls(url, capsys, **kwargs)
        seen.update(listing)
        return ok(code, listing)

    await wait_until(listed, within=within, what=what, interval=0.1)
    return seen


def audited(runtime: Runtime, kind: str) -> list[dict[str, Any]]:
    assert runtime.audit is not None
    return [msgspec.json.decode(r.body) for r in iter_records(runtime.audit.path, kinds=[kind])]


@asynccontextmanager
async def stubs(tmp_path: Path, url: str, *devices: str) -> AsyncIterator[dict[str, Fleet]]:
    """Lightweight devices (a Fleet over a stub runtime, each on its own connection)."""
    async with AsyncExitStack() as stack:
        fleets = {}
        for device in devices:
            upstream = await connect(url)
            stack.push_async_callback(upstream.close)
            stub = StubDevice(device_config(tmp_path, url, device), upstream)
            fleets[device] = await stack.enter_async_context(Fleet(stub))
        yield fleets


def stub(fleet: Fleet) -> StubDevice:
    assert isinstance(fleet.host, StubDevice)
    return fleet.host


# ---------------------------------------------------------------------------------------------


async def test_a_group_pause_reaches_a_device_that_was_offline(nats_servers: ServerFactory, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    url = (await nats_servers("hub")).url
    async with Runtime(device_config(tmp_path, url, "gw-a")) as gw_a:
        async with Runtime(device_config(tmp_path, url, "gw-b")):
            # `fleet ls` makes the buckets; within a heartbeat both devices report there.
            await wait_listed(url, capsys, lambda code, listing: code == 0 and {v["device"] for v in listing["fleet"]}
                              == {"gw-a", "gw-b"} and all(v["last_seen"] for v in listing["fleet"]),
                              within=10, what="both devices reporting", expect=2)
        # gw-b is down: the group pause reaches gw-a now and is kept for gw-b.
        capsys.readouterr()
        assert await fleet_cmd(ops(url, target="group:north", verb="pause", data='{"reason": "storm"}',
                                   expect=1)) == 0
        sent = json.loads(capsys.readouterr().out)
        assert sent["desired"]["key"] == "group.north.paused" and [r["device"] for r in sent["replies"]] == ["gw-a"]
        assert gw_a.paused

        # Meanwhile `fleet ls` names gw-b missing (not seen for three heartbeats) and exits 1.
        listing = await wait_listed(url, capsys, lambda code, listing: listing["missing"] == ["gw-b"],
                                    within=10, what="gw-b named missing", expect=1)
        code, listing = await ls(url, capsys, expect=1)
        assert code == 1 and listing["missing"] == ["gw-b"] and listing["diverged"] == ["gw-b"]
        assert view(listing, "gw-b")["divergence"] == ["paused: group.north.paused not applied yet"]
        assert view(listing, "gw-a")["state"] == "online" and view(listing, "gw-a")["paused"] is True
        capsys.readouterr()
        assert await fleet_ls(ops(url, timeout=1.0, expect=1, json=False)) == 1
        text = capsys.readouterr().out
        assert "missing (not seen for 3 heartbeats): gw-b" in text
        assert "gw-b diverges: paused: group.north.paused not applied yet" in text

        # gw-b comes back: paused within 5 s of connecting, and its audit log says why.
        async with Runtime(device_config(tmp_path, url, "gw-b")) as gw_b:
            connected = time.monotonic()
            await wait_until(lambda: gw_b.paused, within=5, what="gw-b paused by the desired state")
            took = time.monotonic() - connected
            await wait_until(lambda: audited(gw_b, "desired"), within=5, what="the convergence audited")
            [record] = [r for r in audited(gw_b, "desired") if r["ok"]]
            assert record["key"] == "group.north.paused" and record["steps"][0]["verb"] == "pause"
            assert audited(gw_b, "pause")[-1]["reason"] == "storm"
            await wait_listed(url, capsys, lambda code, listing: code == 0 and not listing["diverged"], within=5,
                              what="a fleet that converged", expect=2)
    assert took < 5


async def test_a_config_push_and_a_model_deploy_reach_a_device_that_was_offline(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (await nats_servers("hub")).url
    v2 = model_version(tmp_path, "2")
    nominal = [*PUMP_RULES[:-1], {"default": True, "action": "none", "label": "nominal"}]
    pump = config_data(tmp_path, url)
    push = write_config(tmp_path, {"pipelines": [{**pump["pipelines"][0], "rules": nominal}],
                                   "models": pump["models"]}, "push.toml")
    async with Runtime(device_config(tmp_path, url, "gw-a", model=True)) as gw_a:
        # gw-b has never run: both intents wait for it in the bucket.
        assert await fleet_config_push(ops(url, target="group:north", file=str(push), expect=1, timeout=10)) == 0
        assert await fleet_deploy_model(ops(url, target="group:north", folder=str(v2), name=None, version=None,
                                            shadow=False, bucket="models", expect=1, timeout=30)) == 0
        assert gw_a.config.pipelines[0].rules[-1].label == "nominal"
        assert gw_a.deployments.serving("pump-anomaly") == ("2", None)

        async with Runtime(device_config(tmp_path, url, "gw-b", model=True)) as gw_b:
            await wait_until(lambda: gw_b.deployments.serving("pump-anomaly") == ("2", None), within=10,
                             what="gw-b serving version 2")
            assert gw_b.config.pipelines[0].rules[-1].label == "nominal"
            await wait_until(lambda: {r["what"] for r in audited(gw_b, "desired") if r["ok"]}
                             == {"config", "model.pump-anomaly"}, within=5, what="both convergences audited")
            listing = await wait_listed(url, capsys, lambda code, listing: code == 0, within=5,
                                        what="a fleet that converged", expect=2)
            assert view(listing, "gw-b")["models"] == {"pump-anomaly": {"active": "2"}}

            # A desired model this device cannot fetch: reported as divergence, version 2 kept.
            missing = ModelVersion(version="9", bucket="models", object="pump-anomaly-9.tar.gz", sha256="e" * 64,
                                   signature=sign_model(OPERATOR_SEED, "e" * 64))
            intent = msgspec.json.encode(ModelIntent(active=missing)).decode()
            assert await fleet_desired_set(ops(url, target="gw-b", what="model.pump-anomaly", value=intent)) == 0
            listing = await wait_listed(url, capsys, lambda code, listing: listing["diverged"] == ["gw-b"],
                                        within=5, what="gw-b diverging", expect=2)
            [line] = view(listing, "gw-b")["divergence"]
            assert line.startswith("model.pump-anomaly: not_found") and listing["missing"] == []
            assert gw_b.deployments.serving("pump-anomaly") == ("2", None)
            await wait_until(lambda: [r["code"] for r in audited(gw_b, "desired") if not r["ok"]] == ["not_found"],
                             within=5, what="the divergence audited once")


async def test_a_device_level_value_overrides_its_group(nats_servers: ServerFactory, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = (await nats_servers("hub")).url
    async with stubs(tmp_path, url, "gw-a", "gw-b") as fleets:
        a, b = stub(fleets["gw-a"]), stub(fleets["gw-b"])
        assert await fleet_desired_set(ops(url, target="gw-b", what="paused", value='{"paused": false}')) == 0
        capsys.readouterr()
        assert await fleet_cmd(ops(url, target="group:north", verb="pause", data=None, expect=2)) == 0
        assert "device.gw-b.paused (more specific) still win(s) over group.north.paused" in capsys.readouterr().err
        # The command paused both; the desired state puts gw-b back, as its own key says.
        await wait_until(lambda: a.paused and not b.paused, within=5, what="gw-a paused, gw-b not")
        assert [r for k, r in b.records if k == "desired"][-1]["key"] == "device.gw-b.paused"

        # Cleared, gw-b follows its group again.
        assert await fleet_desired_set(ops(url, target="gw-b", what="paused", value=""), clear=True) == 0
        await wait_until(lambda: b.paused, within=5, what="gw-b paused by its group")
        assert a.paused


async def test_a_device_reconnecting_reads_what_changed_while_its_link_was_down(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    hub = await nats_servers("hub")
    async with FaultProxy("127.0.0.1", hub.port) as proxy, AsyncExitStack() as stack:
        operator = await connect(hub.url)
        stack.push_async_callback(operator.close)
        await fleet_buckets(operator)  # what any `edge fleet` command does first
        upstream = await connect(proxy.url, allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        stack.push_async_callback(upstream.close)
        fleet = await stack.enter_async_context(Fleet(StubDevice(device_config(tmp_path, hub.url, "gw-a"), upstream)))
        await wait_until(lambda: fleet.convergence.watches == 1, within=5, what="the first watch")
        proxy.close()
        await wait_until(lambda: not upstream.is_connected, within=5, what="the link down")
        assert await fleet_desired_set(ops(hub.url, target="group:north", what="paused",
                                           value='{"paused": true, "reason": "while you were out"}')) == 0
        proxy.pass_through()
        restored = time.monotonic()
        await wait_until(lambda: stub(fleet).paused, within=5, what="the pause written while the link was down")
        assert time.monotonic() - restored < 5
        # Whether or not the hub kept the old watch going, a reconnect reads the desired state afresh.
        await wait_until(lambda: fleet.convergence.watches == 2, within=5, what="a fresh watch after the reconnect")


async def test_forged_values_are_ignored_counted_and_reported(nats_servers: ServerFactory, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = (await nats_servers("hub")).url
    nc = await connect(url)
    desired_kv, _ = await fleet_buckets(nc)
    key = "group.north.paused"
    good = encode_value(OPERATOR_SEED, key, PausedIntent(paused=False), timestamp_ns=time.time_ns())
    older = encode_value(OPERATOR_SEED, key, PausedIntent(paused=True), timestamp_ns=time.time_ns() - 10**9)
    forgeries = [
        b'{"value": {"paused": true}}',  # unsigned
        encode_value(INTRUDER_SEED, key, PausedIntent(paused=True)),  # an untrusted signer
        encode_value(OPERATOR_SEED, "group.south.paused", PausedIntent(paused=True)),  # moved from another key
        older,  # an older value written back
        b"\x00garbage",
    ]
    await desired_kv.put(key, good)
    async with stubs(tmp_path, url, "gw-a") as fleets:
        fleet = fleets["gw-a"]
        device = stub(fleet)
        await wait_until(lambda: fleet.convergence.applied.get("paused") is not None, within=5,
                         what="the good value applied")
        for forged in forgeries:
            await desired_kv.put(key, forged)
        await desired_kv.delete(key)  # a deletion carries no signature either
        await wait_until(lambda: fleet.convergence.ignored == len(forgeries) + 1, within=5,
                         what="every forgery counted")
        assert not device.paused
        assert fleet.status()["desired"]["ignored"] == len(forgeries) + 1
        await wait_until(lambda: any(k == "desired_refused" for k, _ in device.records), within=3,
                         what="the refusals recorded")
        refused = [body for kind, body in device.records if kind == "desired_refused"]
        assert len(refused) <= 2  # aggregated per second, not one record each
        counts: dict[str, int] = {}
        for body in refused:
            for code, n in body["counts"].items():
                counts[code] = counts.get(code, 0) + n
        assert counts == {"unsigned": 2, "unauthorized": 1, "bad_signature": 1, "stale": 1, "bad_value": 1}
        assert not [r for k, r in device.records if k == "desired" and r["key"] == key and r["timestamp"] != 0
                    and r.get("ok") and r["steps"]]  # nothing applied
        listing = await wait_listed(url, capsys, lambda code, listing: view(listing, "gw-a")["ignored"] == 6,
                                    within=5, what="the count reported", expect=1)
        assert view(listing, "gw-a")["paused"] is False
    await nc.close()


async def test_the_shadow_slot_is_gone_after_promote_and_after_rollback(nats_servers: ServerFactory,
                                                                        tmp_path: Path) -> None:
    url = (await nats_servers("hub")).url
    nc = await connect(url)

    async def deploy(version: str) -> None:
        obj, sha = await publish_model(nc, model_version(tmp_path, version), bucket="models", name="pump-anomaly",
                                       version=version)
        body = {"name": "pump-anomaly", "version": version, "bucket": "models", "object": obj, "sha256": sha,
                "signature": sign_model(OPERATOR_SEED, sha), "mode": "shadow"}
        got = await send_command(nc, "gw-a", "model.deploy", body, seed=OPERATOR_SEED, timeout=30)
        assert got.all_ok, got

    def slots(runtime: Runtime) -> dict[str, str]:
        return {s["name"]: s["version"] for s in runtime.status()["models"]}

    async with Runtime(device_config(tmp_path, url, "gw-a", model=True)) as runtime:
        for verb, serving in (("model.promote", "2"), ("model.rollback", "2")):  # rollback drops the shadow
            await deploy("2" if verb == "model.promote" else "3")
            assert "pump-anomaly.shadow" in slots(runtime)
            got = await send_command(nc, "gw-a", verb, {"name": "pump-anomaly"}, seed=OPERATOR_SEED)
            assert got.all_ok, got
            assert slots(runtime) == {"pump-anomaly": serving}, verb
            assert runtime.deployments.serving("pump-anomaly") == (serving, None)
            assert runtime.status()["pipelines"]["pump"]["shadow"]["compared"] == 0  # no stale agreement either
            report = runtime.fleet.convergence.report() if runtime.fleet else None
            assert report is not None and report.models["pump-anomaly"].shadow is None
    await nc.close()


async def test_a_thousand_status_polls_leave_a_few_audit_records(nats_servers: ServerFactory,
                                                                 tmp_path: Path) -> None:
    url = (await nats_servers("hub")).url
    nc = await connect(url)
    async with Runtime(device_config(tmp_path, url, "gw-a")) as runtime:
        assert runtime.audit is not None
        before = runtime.audit.last_seq
        for _ in range(1000):
            reply = await nc.request("edge.gw-a.cmd.status", b"", timeout=5)
            assert b'"ok":true' in reply.data
        polled = runtime.audit.last_seq - before
        path = runtime.audit.path
    await nc.close()
    assert polled <= 3  # link, convergence, ... never one a poll
    commands = [r for r in iter_records(path) if r.kind in ("command", "command_reads")]
    assert [r.kind for r in commands] == ["command_reads"]  # flushed when the device stopped
    body = msgspec.json.decode(commands[0].body)
    assert body["counts"] == {"status": 1000} and body["examples"]["status"] == "by anyone (unsigned)"

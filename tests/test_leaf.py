"""Leaf mode (`nats.upstream = "nats-leaf://..."`) end to end, with real nats-server processes.

Topology: sensors ─► the device's embedded nats-server ═ leaf link ═► FaultProxy ─► hub (JetStream
domain "hub", a leafnode listener). The runtime talks only to its embedded server; decisions, audit
sync, approvals and signed commands cross the one leaf link. The hub of the end-to-end test logs
users in from the fragment `edge fleet provision` wrote, so the device works with exactly the
permissions it was provisioned with.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StorageType

from edge import NatsServer, Runtime, server_barrier
from edge._nats_server import LeafRemote, free_ports
from edge.cli._operator import send_command
from edge.fleet import load_seed
from edge.fleet._provision import FRAGMENT, Identity, parse_device, provision
from edge.tools.chaos import FaultProxy
from edge.tools.cloudsim import AutoApprover
from sync import verify_upstream
from tests.nats_harness import HUB_DOMAIN, ServerFactory, leaf_hub, leaf_upstream
from tests.polling import wait_until
from tests.runtime_harness import (
    APPROVER_SEED,
    CRITICAL,
    NORMAL,
    OPERATOR_SEED,
    Collector,
    connect,
    encode,
    make_config,
)

DEVICE = "gw-test"
STREAM = "EDGE_AUDIT"
DECISIONS = f"edge.{DEVICE}.decision.pump"
APPROVAL = {"approval": "required", "approval_timeout_ms": 3000, "instead": "hold"}
LINK = {"probe_interval_ms": 100, "probe_timeout_ms": 150, "breaker_failures": 3, "breaker_reset_ms": 300}


def leaf_url(proxy: FaultProxy) -> str:
    return f"nats-leaf://127.0.0.1:{proxy.port}"


async def quiet(exc: Exception) -> None:
    """nats-py prints tracebacks for a hub that is down on purpose."""


def provision_hub(out: Path) -> Path:
    """Seeds and the fragment for the device, the test-wide operator and approver, and a hub config."""
    out.mkdir(mode=0o700)
    for name, seed in (("ops", OPERATOR_SEED), ("alice", APPROVER_SEED)):
        (out / f"{name}.nk").write_bytes(seed + b"\n")
        (out / f"{name}.nk").chmod(0o600)
    provision(out, [parse_device(f"{DEVICE}:g1"), parse_device("gw-other"), Identity("operator", "ops"),
                    Identity("approver", "alice")], force=True, hub_domain=HUB_DOMAIN)
    config = out / "hub.conf"
    config.write_text(f'include "{FRAGMENT}"\n')
    return config


async def as_identity(hub: NatsServer, out: Path, name: str) -> NATS:
    # Operators use the default inbox prefix (their command line does); the others their own.
    prefix = "_INBOX" if name == "ops" else f"_INBOX_{name}"
    return await nats.connect(hub.url, nkeys_seed=str(out / f"{name}.nk"), inbox_prefix=prefix,
                              max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=quiet)


async def create_audit_stream(nc: NATS) -> None:
    # An operator's job on a provisioned hub (a device may not create streams).
    await nc.jetstream().add_stream(name=STREAM, subjects=["audit.>"], storage=StorageType.FILE, duplicate_window=120,
                                    allow_direct=True, deny_delete=True, deny_purge=True)


async def upstream_exact(nc: NATS, runtime: Runtime, within: float = 30.0) -> int:
    """Once the device's log is all synced: the hub's stream holds seqs 1..last once each, in order."""
    audit = runtime.audit
    assert audit is not None
    await wait_until(lambda: audit.pending == 0 and audit.backlog == 0, within=within, what="the audit log synced")
    last = audit.last_seq
    report = (await verify_upstream(nc.jetstream(), STREAM, DEVICE, idle_timeout=5.0))[DEVICE]
    assert report.ok, report.summary()
    assert (report.records, report.first_seq, report.last_seq) == (last, 1, last), report.summary()
    assert report.duplicates == 0 and report.out_of_order == 0 and report.missing == []
    return last


def link_records(runtime: Runtime) -> list[dict[str, Any]]:
    from sync import iter_records

    assert runtime.audit is not None
    return [msgspec.json.decode(r.body) for r in iter_records(runtime.audit.path) if r.kind == "link"]


@dataclass
class Rig:
    hub: NatsServer
    proxy: FaultProxy
    runtime: Runtime
    sensors: NATS
    decisions: Collector
    sent: int = 0

    async def decide(self, count: int) -> None:
        """`count` inputs, each answered (a request: the decision came back before the next goes)."""
        for _ in range(count):
            row = dict(NORMAL, asset=f"a{self.sent}")
            self.sent += 1
            await self.sensors.request("sensors.p1.pump", encode(row), timeout=5)


async def test_leaf_mode_end_to_end_with_blackhole_hub_restart_command_and_approval(
        nats_servers: ServerFactory, tmp_path: Path) -> None:
    out = tmp_path / "auth"
    hub = await leaf_hub(nats_servers, config_file=provision_hub(out))
    operator = await as_identity(hub, out, "ops")
    approver_nc = await as_identity(hub, out, "alice")
    await create_audit_stream(operator)
    async with FaultProxy("127.0.0.1", hub.leafnode_port or 0) as proxy:
        config = make_config(
            tmp_path, "embedded", device=DEVICE,
            nats=leaf_upstream(leaf_url(proxy), upstream_auth={"nkey_seed": str(out / f"{DEVICE}.nk")}),
            audit={"create_stream": False}, link=LINK, groups=["g1"],
            pipeline={"ladder": ["rules"], "actions": {"shutdown": APPROVAL, "hold": {}}},
        )
        async with Runtime(config) as runtime:
            sensors = await connect(runtime.local_url)
            rig = Rig(hub, proxy, runtime, sensors, await Collector().start(sensors, DECISIONS))
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the leaf link online")
            # The generated server config holds the device's seed: the device's alone.
            generated = runtime.data_dir / "nats" / "nats-server.conf"
            assert generated.stat().st_mode & 0o077 == 0
            await rig.decide(50)

            # A signed command from the operator on the hub reaches the device over the leaf.
            assert runtime.fleet is not None
            await runtime.fleet.wait_attached()
            got = await send_command(operator, DEVICE, "pause", {"reason": "drill"}, timeout=5, seed=OPERATOR_SEED)
            assert got.all_ok and runtime.paused
            got = await send_command(operator, DEVICE, "resume", timeout=5, seed=OPERATOR_SEED)
            assert got.all_ok and not runtime.paused

            # An approval: the request crosses the leaf, the approver's signed answer comes back.
            async with AutoApprover(approver_nc, delay_s=(0.01, 0.02), name="alice", key=APPROVER_SEED):
                await wait_until(lambda: interest_reached(sensors, f"edge.{DEVICE}.approval.check"), within=5,
                                 what="the approver's interest across the leaf")
                answer = await sensors.request("sensors.p1.pump", encode({**CRITICAL, "asset": "crit"}), timeout=5)
            decided = msgspec.json.decode(answer.data)
            assert decided["action"] == "shutdown", decided["governance"]
            assert decided["governance"]["status"] == "approved"

            # Blackhole the leaf link: the link goes offline as in client mode, decisions go on.
            proxy.blackhole()
            cut = time.monotonic()
            await wait_until(lambda: runtime.link.state.value == "offline", within=5, what="the link offline")
            detected_s = time.monotonic() - cut
            print(f"\nblackholed leaf link judged offline in {detected_s:.2f}s")
            await rig.decide(50)
            # The leaf node declares the silent link stale and drops it: "unreachable", not just failing probes.
            await wait_until(lambda: not runtime.link.connected, within=8, what="the blackholed leaf link dropped")
            print(f"blackholed leaf link dropped (unreachable) after {time.monotonic() - cut:.2f}s")
            proxy.pass_through()
            await wait_until(lambda: runtime.link.state.value == "online", within=15, what="the link back")

            # The hub restarts (a clean stop): the leaf reconnects by itself.
            await hub.stop()
            await wait_until(lambda: runtime.link.state.value == "offline", within=5, what="the link offline")
            await rig.decide(50)
            await hub.start()
            await wait_until(lambda: runtime.link.state.value == "online", within=15, what="the link back")
            await rig.decide(20)
            await wait_until(lambda: operator.is_connected, within=10, what="the operator reconnected")
            await upstream_exact(operator, runtime)
            await sensors.close()
    await operator.close()
    await approver_nc.close()
    assert len(rig.decisions.messages) >= rig.sent
    assert detected_s < 2.0, f"a blackholed leaf link took {detected_s:.2f}s to be judged offline"
    reasons = [r["reason"] for r in link_records(runtime) if r["to"] == "offline"]
    assert any(r.startswith("probe_failed") for r in reasons) and "disconnected" in reasons, reasons


async def test_a_leaf_device_cannot_publish_another_devices_audit(nats_servers: ServerFactory, tmp_path: Path) -> None:
    """Permissions from `edge fleet provision` hold on the leaf link: the legitimate path beside the attack."""
    out = tmp_path / "auth"
    hub = await leaf_hub(nats_servers, config_file=provision_hub(out))
    operator = await as_identity(hub, out, "ops")
    await create_audit_stream(operator)
    seed = out / f"{DEVICE}.nk"
    leaf = await nats_servers("leaf", jetstream_domain=f"edge-{DEVICE}", leaf_remote=_remote(hub, seed))
    nc = await nats.connect(leaf.url, inbox_prefix=f"_INBOX_{DEVICE}", error_cb=quiet)
    try:
        js = nc.jetstream(domain=HUB_DOMAIN, timeout=1)
        await wait_until(lambda: _answers(nc), within=10, what="the hub's JetStream through the leaf")
        ack = await js.publish(f"audit.{DEVICE}", b'{"mine": 1}')
        assert (ack.stream, ack.seq, ack.domain) == (STREAM, 1, HUB_DOMAIN)
        assert (await js.get_last_msg(STREAM, f"audit.{DEVICE}", direct=True)).data == b'{"mine": 1}'
        with pytest.raises(nats.errors.Error):  # the hub drops it: no stream ever acks it
            await js.publish("audit.gw-other", b'{"forged": 1}')
        with pytest.raises(nats.errors.Error):  # ... nor a stream-wide read of everyone's audit
            await nc.request(f"$JS.{HUB_DOMAIN}.API.STREAM.MSG.GET.{STREAM}", b'{"seq": 1}', timeout=1)
        info = await operator.jetstream().stream_info(STREAM, subjects_filter=">")
        assert info.state.subjects == {f"audit.{DEVICE}": 1}
        # A leaf node without credentials is refused.
        stranger = await nats_servers("stranger", jetstream_domain="edge-x",
                                      leaf_remote=_remote(hub, None))
        await wait_until(lambda: b"Authorization Violation" in _log(stranger), within=10, what="the refusal")
    finally:
        await nc.close()
        await operator.close()


async def interest_reached(nc: NATS, subject: str) -> bool:
    """Whether a hub subscriber's interest reached the leaf (a subscription propagates asynchronously):
    "no responders" comes at once while it has not; anything else means it has."""
    try:
        await nc.request(subject, b"", timeout=0.2)
    except nats.errors.NoRespondersError:
        return False
    except (nats.errors.Error, TimeoutError):
        pass
    return True


async def _answers(nc: NATS) -> bool:
    try:
        await nc.request(f"$JS.{HUB_DOMAIN}.API.INFO", b"", timeout=0.5)
    except (nats.errors.Error, TimeoutError):
        return False
    return True


def _remote(hub: NatsServer, seed: Path | None) -> LeafRemote:
    return LeafRemote(urls=(hub.leaf_url,), nkey_seed=load_seed(seed).decode() if seed is not None else "")


def _log(server: NatsServer) -> bytes:
    return b"".join(p.read_bytes() for p in server.store_dir.glob("nats-server-*.log"))


async def test_a_leaf_device_with_the_hub_down_at_start_decides_then_syncs_when_it_appears(
        nats_servers: ServerFactory, tmp_path: Path) -> None:
    client_port, leaf_port = free_ports(2)
    hub = NatsServer(name="hub", store_dir=tmp_path / "hub", port=client_port, jetstream_domain=HUB_DOMAIN,
                     leafnode_port=leaf_port)
    config = make_config(tmp_path, "embedded", device=DEVICE, nats=leaf_upstream(f"nats-leaf://127.0.0.1:{leaf_port}"),
                         link=LINK, pipeline={"ladder": ["rules"]})
    async with Runtime(config) as runtime:
        sensors = await connect(runtime.local_url)
        for i in range(30):
            reply = await sensors.request("sensors.p1.pump", encode(dict(NORMAL, asset=f"a{i}")), timeout=5)
            assert msgspec.json.decode(reply.data)["action"] == "none"
        assert runtime.link.state.value == "offline" and runtime.audit is not None
        assert runtime.audit.backlog > 30  # every decision kept, waiting for the hub
        async with hub:
            await wait_until(lambda: runtime.link.state.value == "online", within=15, what="the leaf link up")
            nc = await nats.connect(hub.url)
            try:
                await upstream_exact(nc, runtime)
            finally:
                await nc.close()
        await sensors.close()


@pytest.mark.parametrize("mode", ["client", "leaf"])
async def test_upstream_bytes_per_decision(nats_servers: ServerFactory, tmp_path: Path, mode: str) -> None:
    """Every byte between the device and the hub (both directions, all traffic: audit records and
    their acks, probes, heartbeats, protocol), after warm-up, divided by the decisions made."""
    hub = await leaf_hub(nats_servers)
    decisions = 400
    async with FaultProxy("127.0.0.1", (hub.leafnode_port if mode == "leaf" else hub.port) or 0) as proxy:
        if mode == "leaf":
            nats_table = leaf_upstream(leaf_url(proxy))
        else:
            nats_table = {"local": "embedded", "embedded_port": -1, "upstream": proxy.url}
        config = make_config(tmp_path, "embedded", device=DEVICE, nats=nats_table,
                             pipeline={"ladder": ["model", "rules"]})
        async with Runtime(config) as runtime:
            sensors = await connect(runtime.local_url)
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
            for i in range(50):  # warm-up: stream checked, first records synced
                await sensors.request("sensors.p1.pump", encode(dict(NORMAL, asset=f"w{i}")), timeout=5)
            audit = runtime.audit
            assert audit is not None
            await wait_until(lambda: audit.backlog == 0, within=10, what="the warm-up synced")
            before = proxy.bytes_to_target + proxy.bytes_to_client
            before_sent = proxy.bytes_to_target
            for i in range(decisions):
                await sensors.publish("sensors.p1.pump", encode(dict(NORMAL, asset=f"a{i}")))
                if i % 50 == 49:
                    await server_barrier(sensors)
                    await asyncio.sleep(0.05)  # pace: a steady 1,000 inputs/s rather than one burst
            await wait_until(lambda: audit.pending == 0 and audit.backlog == 0, within=20, what="all synced")
            per_decision = (proxy.bytes_to_target + proxy.bytes_to_client - before) / decisions
            await sensors.close()
    to_hub = (proxy.bytes_to_target - before_sent) / decisions
    print(f"\nupstream bytes per decision, {mode} mode: {per_decision:.0f} (to the hub {to_hub:.0f})")
    # Compact records (~180 B of new information each: hashes, ids, times, the input) and S2 on both
    # sides of the leaf link: the target is 200 B a decision, all traffic included. Client mode is
    # the same exchange uncompressed.
    assert per_decision <= (1000 if mode == "client" else 200), per_decision


async def test_records_lost_in_a_blackholed_leaf_link_are_resent_in_order(
        nats_servers: ServerFactory, tmp_path: Path) -> None:
    """Records in flight when a blackholed leaf link is dropped are lost while the runtime's own
    connection stays up; the link is back (~4 s) before their ack times out (5 s). Records made
    after it must not land ahead of them: the uploader waits for a burst's acks before the next."""
    hub = await leaf_hub(nats_servers)
    async with FaultProxy("127.0.0.1", hub.leafnode_port or 0) as proxy:
        config = make_config(tmp_path, "embedded", device=DEVICE, nats=leaf_upstream(leaf_url(proxy)), link=LINK,
                             pipeline={"ladder": ["rules"]})
        async with Runtime(config) as runtime:
            sensors = await connect(runtime.local_url)
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the leaf link online")
            stop = asyncio.Event()

            async def drive() -> None:  # a steady 200 inputs/s: the uploader is mid-burst at any moment
                sent = 0
                while not stop.is_set():
                    await sensors.publish("sensors.p1.pump", encode(dict(NORMAL, asset=f"a{sent}")))
                    sent += 1
                    await asyncio.sleep(0.005)  # pace: the offered load

            driver = asyncio.create_task(drive())
            try:
                proxy.latency(100)  # acks take 200 ms: records are always in flight
                await asyncio.sleep(0.5)  # pace: a pipeline of in-flight records builds up
                proxy.blackhole()
                await wait_until(lambda: not runtime.link.connected, within=8, what="the blackholed leaf link dropped")
                proxy.pass_through()
                await wait_until(lambda: runtime.link.state.value == "online", within=8, what="the link back")
                await asyncio.sleep(0.3)  # pace: records made after the link came back
            finally:
                stop.set()
                await driver
            nc = await nats.connect(hub.url)
            try:
                await upstream_exact(nc, runtime, within=30)
            finally:
                await nc.close()
            await sensors.close()


# -- config and provisioning: pure -----------------------------------------------------------------


def leaf_problems(tmp_path: Path, **nats_table: Any) -> list[str]:
    from edge import ConfigError, decode_config
    from tests.runtime_harness import config_data

    data = config_data(tmp_path, "embedded", device=DEVICE)
    data["nats"] = nats_table
    try:
        decode_config(data, base_dir=tmp_path, env={})
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_leaf_config_is_checked_with_the_key_and_what_was_expected(tmp_path: Path) -> None:
    ok = {"local": "embedded", "upstream": "nats-leaf://hub:7422", "upstream_domain": "hub"}
    assert leaf_problems(tmp_path, **ok) == []
    [local] = leaf_problems(tmp_path, **{**ok, "local": "nats://127.0.0.1:4222"})
    assert local.startswith("nats.local: expected \"embedded\" with a nats-leaf:// upstream")
    [domain] = leaf_problems(tmp_path, **{**ok, "upstream_domain": ""})
    assert domain.startswith("nats.upstream_domain: required with a nats-leaf:// upstream")
    [token] = leaf_problems(tmp_path, **{**ok, "upstream_domain": "a.b"})
    assert token.startswith("nats.upstream_domain: expected a JetStream domain")
    [own] = leaf_problems(tmp_path, **{**ok, "upstream_domain": f"edge-{DEVICE}"})
    assert "this device's own JetStream domain" in own
    auth = leaf_problems(tmp_path, **{**ok, "upstream_auth": {"token": "s3cret"}})[0]
    assert auth.startswith("nats.upstream_auth.token: a leaf node cannot log in with a token")
    [url] = leaf_problems(tmp_path, **{**ok, "upstream": "nats-leaf://hub:7422/x"})
    assert url.startswith("nats.upstream: expected nats-leaf://HOST:PORT")


def test_a_leaf_remotes_seed_stays_out_of_reprs_and_other_users_reach() -> None:
    from edge._nats_server import render_server_config

    remote = LeafRemote(urls=("nats-leaf://u:pw@hub:7422",), nkey_seed="SUAEXAMPLESEED")
    assert "SUAEXAMPLESEED" not in repr(remote) and "pw" not in repr(remote)
    text = render_server_config(name="edge-gw", jetstream_domain="edge-gw", leaf_remote=remote)
    assert 'nkey: "SUAEXAMPLESEED"' in text and 'compression: "s2_fast"' in text
    assert 'domain: "edge-gw"' in text and "ping_max: 2" in text


def test_provisioned_devices_may_use_the_hubs_domain_and_nothing_more() -> None:
    from edge.fleet._provision import device_permissions

    plain = device_permissions(DEVICE, ["g1"])
    leaf = device_permissions(DEVICE, ["g1"], hub_domain=HUB_DOMAIN)
    added = set(leaf.publish) - set(plain.publish)
    api = {s for s in plain.publish if s.startswith("$JS.API.")}
    assert added == {s.replace("$JS.API.", f"$JS.{HUB_DOMAIN}.API.") for s in api} | {
        f"$JS.{HUB_DOMAIN}.API.INFO", "_INBOX.>"}
    assert leaf.subscribe == plain.subscribe


async def test_kill_9_of_a_leaf_device_loses_and_duplicates_nothing_and_its_orphaned_server_is_stopped(
        nats_servers: ServerFactory, tmp_path: Path) -> None:
    """SIGKILL of `edge run` mid-sync leaves its embedded nats-server running (nothing stopped the
    child). On restart that orphan is stopped before a new server takes the same store, the device
    decides on, and the hub's stream holds every record once, in order."""
    import signal

    from sync import read_summary
    from tests.runtime_harness import config_data, start_runtime_process, wait_until_answering, write_config

    hub = await leaf_hub(nats_servers)
    admin = await nats.connect(hub.url)
    await create_audit_stream(admin)
    data = config_data(tmp_path, "embedded", device=DEVICE, nats=leaf_upstream(hub.leaf_url), link=LINK,
                       pipeline={"ladder": ["model", "rules"]})
    data["audit"] = {"create_stream": False}
    config_path = write_config(tmp_path, data)
    data_dir = Path(data["data_dir"])
    pid_file = data_dir / "nats" / "nats-server.pid"
    sent = 0

    async def decide_some(count: int) -> None:
        nonlocal sent
        url = await asyncio.to_thread((data_dir / "local.url").read_text)
        sensors = await connect(url)
        try:
            await wait_until_answering(sensors, "sensors.p1.pump", encode(dict(NORMAL, asset="probe")))
            for _ in range(count):
                await sensors.publish("sensors.p1.pump", encode(dict(NORMAL, asset=f"a{sent}")))
                sent += 1
                await asyncio.sleep(0.002)  # pace: a steady stream, so the kill lands mid-sync
            await server_barrier(sensors)
        finally:
            await sensors.close()

    first = start_runtime_process(config_path)
    try:
        await wait_until(lambda: (data_dir / "local.url").exists(), within=20, what="the device up")
        await decide_some(300)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait)
        orphan = int(pid_file.read_text())
        assert running(orphan)  # the embedded server outlived the runtime that started it
        (data_dir / "local.url").unlink()
        second = start_runtime_process(config_path)
        try:
            await wait_until(lambda: (data_dir / "local.url").exists(), within=20, what="the device back")
            await decide_some(100)
            assert not running(orphan)  # stopped before the new server took the store
            assert int(pid_file.read_text()) != orphan
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    last = (await asyncio.to_thread(read_summary, data_dir / "audit.db")).last_seq
    report = (await verify_upstream(admin.jetstream(), STREAM, DEVICE, idle_timeout=5.0))[DEVICE]
    await admin.close()
    assert report.ok, report.summary()
    assert (report.records, report.first_seq, report.last_seq) == (last, 1, last), report.summary()
    assert report.duplicates == 0 and report.missing == []


def running(pid: int) -> bool:
    """Whether `pid` is a live process (an exited one nobody reaped, a zombie, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


async def test_a_blackholed_leaf_link_stays_down_until_the_network_returns(
        nats_servers: ServerFactory, tmp_path: Path) -> None:
    """Once the leaf node declares the blackholed link stale it reconnects: only to the hub URL of
    the config (here, the proxy), never to the address the hub advertised, which would bypass the
    path the operator chose (and, here, the cut)."""
    hub = await leaf_hub(nats_servers)
    async with FaultProxy("127.0.0.1", hub.leafnode_port or 0) as proxy:
        config = make_config(tmp_path, "embedded", device=DEVICE, nats=leaf_upstream(leaf_url(proxy)), link=LINK,
                             pipeline={"ladder": ["rules"]})
        async with Runtime(config) as runtime:
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the leaf link online")
            proxy.blackhole()
            await wait_until(lambda: not runtime.link.connected, within=8, what="the stale leaf link dropped")
            deadline = time.monotonic() + 4.0  # several reconnect attempts (one a second)
            while time.monotonic() < deadline:
                assert runtime.link.state.value == "offline"
                await asyncio.sleep(0.05)  # poll: the link must not come back by another way
            proxy.pass_through()
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link back")

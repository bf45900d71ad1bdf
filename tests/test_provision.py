"""Hub permissions (`edge fleet provision`): the keys and the fragment, then every identity on a
real hub started from a config that includes the fragment — doing its job, refused everything
else, and a whole runtime working as its device identity."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StorageType

from edge import ConfigError, LinkState, NatsServer, Runtime, nats_server_binary, server_barrier
from edge.cli import main
from edge.cli._fleet_state import fleet_buckets, read_fleet, write_intent
from edge.cli._operator import send_command
from edge.cli._rollout import rollout_bucket
from edge.fleet import Fleet, load_seed, public_key_of, sign_approval
from edge.fleet._provision import (
    FRAGMENT,
    Identity,
    Provisioning,
    check,
    device_permissions,
    operator_permissions,
    parse_device,
    provision,
)
from sync import AuditLog, Uploader, connect_for_upload, verify_upstream
from tests.fleet_helpers import StubDevice
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, Collector, make_config
from tests.test_layers import RUNTIME_PROPER, closure

STREAM = "EDGE_AUDIT"
IDENTITIES = [parse_device("gw-a:g1"), parse_device("gw-b:g2"), Identity(role="operator", name="ops"),
              Identity(role="approver", name="alice"), Identity(role="cloud", name="infer")]
OPERATORS = {"ops"}


def inbox_prefix(name: str) -> str:
    """Devices, approvers and cloud services have inboxes of their own; operators' tools use the default."""
    return "_INBOX" if name in OPERATORS else f"_INBOX_{name}"

# ---------------------------------------------------------------------------------------------
# Unit: names, files, the fragment, the command line (no network)


def test_device_specs_and_names_are_checked() -> None:
    assert parse_device("gw-1") == Identity(role="device", name="gw-1")
    assert parse_device("gw-1:plant-a,pumps,plant-a").groups == ("plant-a", "pumps")
    bad = [parse_device("all"), parse_device("group"), parse_device("gw 1"), parse_device("gw-2:"),
           parse_device("x" * 65), Identity(role="operator", name="gw-3"), parse_device("gw-3"),
           Identity(role="cloud", name="a.b")]
    problems = [str(p) for p in check(bad, stream="EDGE AUDIT", buckets=["models", "models-eu", "firmware"])]
    assert problems == [
        "--device 'all': 'all' is not a device id (it names a command target)",
        "--device 'group': 'group' is not a device id (it names a command target)",
        "--device 'gw 1': expected a name of 1 to 64 characters from A-Z a-z 0-9 _ -",
        "--device 'gw-2': group '': expected 1 to 64 characters from A-Z a-z 0-9 _ -",
        f"--device {'x' * 65!r}: expected a name of 1 to 64 characters from A-Z a-z 0-9 _ -",
        "--device 'gw-3': the name is taken by the operator 'gw-3': each identity has a seed file of its own, gw-3.nk",
        "--cloud 'a.b': expected a name of 1 to 64 characters from A-Z a-z 0-9 _ -",
        "--audit-stream: 'EDGE AUDIT': expected a stream name from A-Z a-z 0-9 _ -",
        "--bucket: 'firmware': model buckets are named 'models' or 'models-<name>' (A-Z a-z 0-9 _ -)",
    ]
    assert [str(p) for p in check([])] == [
        "nothing to provision: give at least one --device, --operator, --approver or --cloud"]


def test_a_device_may_read_only_its_own_audit_record_and_never_write_a_model_bucket() -> None:
    perms = device_permissions("gw-1", ["g1"], stream=STREAM, buckets=["models"])
    assert "$JS.API.DIRECT.GET.EDGE_AUDIT.audit.gw-1" in perms.publish
    assert not [s for s in perms.publish if s.startswith(("$JS.API.STREAM.MSG.GET.EDGE_AUDIT", "$O.", "audit.*"))]
    assert not [s for s in perms.publish if any(v in s for v in ("DELETE.EDGE", "PURGE", "UPDATE", "CREATE.EDGE"))]
    assert not [s for s in perms.subscribe if s.startswith("_INBOX.") or "*" in s.split(".")[0]]


def test_a_device_reads_the_desired_state_and_writes_only_its_own_report() -> None:
    perms = device_permissions("gw-1", ["g1"], stream=STREAM, buckets=["models"])
    assert [s for s in perms.publish if s.startswith("$KV.")] == ["$KV.EDGE_FLEET_STATUS.device.gw-1"]
    kv_api = [s for s in perms.publish if "KV_EDGE_FLEET" in s]
    assert kv_api == ["$JS.API.CONSUMER.CREATE.KV_EDGE_FLEET", "$JS.API.CONSUMER.INFO.KV_EDGE_FLEET.*",
                      "$JS.FC.KV_EDGE_FLEET.>"]
    operator = operator_permissions(stream=STREAM, buckets=["models"])
    assert [s for s in operator.publish if s.startswith("$KV.")] == ["$KV.EDGE_FLEET.>", "$KV.EDGE_ROLLOUTS.>"]
    assert not [s for s in perms.publish if "EDGE_ROLLOUTS" in s]  # rollouts are the operators' alone
    assert not [s for s in operator.publish if "KV_EDGE_FLEET" in s and any(v in s for v in ("PURGE", "UPDATE",
                                                                                              "STREAM.DELETE"))]


def test_provision_writes_private_seeds_and_keeps_them_when_forced(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    first = provision(out, IDENTITIES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for identity in first.identities:
        seed_file = Path(identity.seed_file)
        assert seed_file == out / f"{identity.name}.nk" and identity.seed == "new"
        assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
        assert public_key_of(load_seed(seed_file)) == identity.public_key
        assert f'nkey = "{identity.public_key}"' in (out / FRAGMENT).read_text()
    assert len({i.public_key for i in first.identities}) == len(IDENTITIES)

    with pytest.raises(ConfigError) as refused:
        provision(out, [*IDENTITIES, parse_device("gw-c")])
    assert [p.path for p in refused.value.problems] == [str(out / f"{i.name}.nk") for i in IDENTITIES]
    assert not (out / "gw-c.nk").exists()

    # Adding a device: the others keep their keys; one left out is no longer in the fragment.
    second = provision(out, [*IDENTITIES[1:], parse_device("gw-c")], force=True)
    kept = {i.name: i.public_key for i in first.identities}
    assert {i.name: i.seed for i in second.identities} == {"gw-b": "kept", "ops": "kept", "alice": "kept",
                                                           "infer": "kept", "gw-c": "new"}
    assert all(kept[i.name] == i.public_key for i in second.identities if i.seed == "kept")
    assert second.unlisted == ("gw-a",)
    assert kept["gw-a"] not in (out / FRAGMENT).read_text()


def test_the_fragment_is_a_config_nats_server_accepts(tmp_path: Path) -> None:
    provision(tmp_path / "auth", IDENTITIES, buckets=["models", "models-eu"])
    hub_conf = hub_config(tmp_path / "auth")
    checked = subprocess.run([nats_server_binary(), "-t", "-c", str(hub_conf)], capture_output=True, text=True,
                             timeout=20)
    assert checked.returncode == 0, checked.stderr
    assert "is valid" in checked.stdout + checked.stderr


def test_the_command_line_prints_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "auth"
    argv = ["fleet", "provision", "--out", str(out), "--device", "gw-1:plant-a,pumps", "--operator", "ops",
            "--approver", "alice", "--cloud", "infer"]
    assert main([*argv, "--json"]) == 0
    written = msgspec.json.decode(capsys.readouterr().out, type=Provisioning)
    assert [(i.role, i.name, i.groups, i.seed) for i in written.identities] == [
        ("device", "gw-1", ("plant-a", "pumps"), "new"), ("operator", "ops", (), "new"),
        ("approver", "alice", (), "new"), ("cloud", "infer", (), "new")]
    assert written.fragment == str(out / FRAGMENT) and written.buckets == ("models",)

    assert main(argv) == 2  # the seeds are there: refused, nothing changed
    assert "gw-1.nk: exists; --force keeps it" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out / FRAGMENT}" in text and "gw-1.nk (kept)" in text and "groups plant-a,pumps" in text
    assert "nats.upstream_auth.nkey_seed" in text

    assert main(["fleet", "provision", "--out", str(tmp_path / "other"), "--device", "all"]) == 2
    assert "'all' is not a device id" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_provisioning_loads_neither_the_runtime_nor_nats() -> None:
    loaded = closure("edge.fleet._provision")
    assert not loaded & RUNTIME_PROPER and "nats" not in loaded and "onnxruntime" not in loaded


# ---------------------------------------------------------------------------------------------
# A hub started from a config that includes the fragment


def hub_config(out: Path) -> Path:
    config = out / "hub.conf"
    config.write_text(f'# the hub: JetStream is turned on by the harness\ninclude "{FRAGMENT}"\n')
    return config


class Heard:
    """Messages a subscription received."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def on_message(self, msg: Msg) -> None:
        self.messages.append(msg)


class As:
    """A connection as one provisioned identity; keeps the permission violations the server reports."""

    def __init__(self, name: str, nc: NATS, violations: list[str]) -> None:
        self.name, self.nc, self.violations = name, nc, violations

    def was_refused(self, what: str, subject: str) -> bool:
        # nats-py: 'nats: permissions violation for publish to "<subject>"' (the server's words, lowercased)
        expected = f'permissions violation for {what} "{subject}"'.lower()
        return any(expected in violation.lower() for violation in self.violations)

    async def publish_refused(self, *subjects: str) -> None:
        for subject in subjects:
            await self.nc.publish(subject, b"{}", reply=f"{inbox_prefix(self.name)}.refused")
        await server_barrier(self.nc)  # the server has handled them, and said so before answering this
        missing = [s for s in subjects if not self.was_refused("publish to", s)]
        assert not missing, f"{self.name} was not refused publishing to {missing}"

    async def subscribe_refused(self, *subjects: str) -> Heard:
        heard = Heard()
        for subject in subjects:
            await self.nc.subscribe(subject, cb=heard.on_message)
        await server_barrier(self.nc)
        missing = [s for s in subjects if not self.was_refused("subscription to", s)]
        assert not missing, f"{self.name} was not refused subscribing to {missing}"
        return heard

    async def listen(self, *subjects: str, queue: str = "") -> Heard:
        heard = Heard()
        for subject in subjects:
            await self.nc.subscribe(subject, queue=queue, cb=heard.on_message)
        await server_barrier(self.nc)
        assert not self.violations, self.violations
        return heard


class Hub:
    def __init__(self, server: NatsServer, out: Path, stack: AsyncExitStack) -> None:
        self.server, self.out, self._stack = server, out, stack

    def seed_file(self, name: str) -> Path:
        return self.out / f"{name}.nk"

    def public_key(self, name: str) -> str:
        return public_key_of(load_seed(self.seed_file(name)))

    async def connect(self, name: str) -> As:
        violations: list[str] = []

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))

        nc = await nats.connect(self.server.url, nkeys_seed=str(self.seed_file(name)), inbox_prefix=inbox_prefix(name),
                                error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=1,
                                connect_timeout=2)
        self._stack.push_async_callback(nc.close)
        return As(name, nc, violations)


@pytest.fixture
async def hub(tmp_path: Path, nats_servers: ServerFactory) -> AsyncIterator[Hub]:
    out = tmp_path / "auth"
    provision(out, IDENTITIES)
    server = await nats_servers("hub", config_file=hub_config(out))
    async with AsyncExitStack() as stack:
        yield Hub(server, out, stack)


async def create_audit_stream(operator: As) -> None:
    """The audit stream as the uploader creates it (an operator's job on a provisioned hub)."""
    await operator.nc.jetstream().add_stream(name=STREAM, subjects=["audit.>"], storage=StorageType.FILE,
                                             duplicate_window=120, allow_direct=True, deny_delete=True,
                                             deny_purge=True)


async def answer_with(who: As, subject: str, body: bytes, queue: str = "") -> Heard:
    heard = Heard()

    async def answer(msg: Msg) -> None:
        heard.messages.append(msg)
        await msg.respond(body)

    await who.nc.subscribe(subject, queue=queue, cb=answer)
    await server_barrier(who.nc)
    return heard


async def test_each_identity_does_its_job(hub: Hub) -> None:
    operator, device = await hub.connect("ops"), await hub.connect("gw-a")
    approver, cloud = await hub.connect("alice"), await hub.connect("infer")

    # The operator configures the audit stream and writes a model bucket.
    await create_audit_stream(operator)
    store = await operator.nc.jetstream().create_object_store("models")
    model = bytes(range(256)) * 2048  # several chunks: the reader's consumer streams them
    await store.put("pump-anomaly-2.tar.gz", model)

    # The device publishes its audit (JetStream ack to its inbox) and reads back its last record.
    js = device.nc.jetstream(timeout=2)
    ack = await js.publish("audit.gw-a", b'{"seq": 1}', headers={"Nats-Msg-Id": "gw-a:1"})
    assert (ack.stream, ack.seq) == (STREAM, 1)
    last = await js.get_last_msg(STREAM, "audit.gw-a", direct=True)
    assert last.data == b'{"seq": 1}' and last.seq == 1
    # ... and reads the model as model.deploy does.
    device_store = await js.object_store("models")
    assert (await device_store.get_info("pump-anomaly-2.tar.gz")).size == len(model)
    assert (await device_store.get("pump-anomaly-2.tar.gz")).data == model

    # The operator commands it (directly, by group, everyone) and reads the audit stream.
    commands = await answer_with(device, "edge.gw-a.cmd.>", b'{"ok": true}')
    await answer_with(device, "edge.group.g1.cmd.>", b'{"ok": true}')
    await answer_with(device, "edge.all.cmd.>", b'{"ok": true}')
    for subject in ("edge.gw-a.cmd.status", "edge.group.g1.cmd.status", "edge.all.cmd.status"):
        assert (await operator.nc.request(subject, b"{}", timeout=2)).data == b'{"ok": true}'
    assert [m.subject for m in commands.messages] == ["edge.gw-a.cmd.status"]
    assert (await operator.nc.jetstream().get_last_msg(STREAM, "audit.gw-a")).data == b'{"seq": 1}'

    # Approver and cloud answer the device's requests (the cloud as a queue group).
    await answer_with(approver, "edge.*.approval.>", b'{"approved": true, "by": "alice", "reason": ""}')
    await answer_with(cloud, "cloud.infer.>", b'{"label": "normal", "confidence": 0.9}', queue="cloud")
    approval = await device.nc.request("edge.gw-a.approval.pump", b"{}", timeout=2)
    assert msgspec.json.decode(approval.data)["approved"] is True
    answer = await device.nc.request("cloud.infer.pump", b"{}", timeout=2)
    assert msgspec.json.decode(answer.data)["label"] == "normal"

    for who in (operator, device, approver, cloud):
        assert not who.violations, (who.name, who.violations)


async def test_a_device_cannot_act_for_another_answer_others_or_touch_streams(hub: Hub) -> None:
    operator, device, other = await hub.connect("ops"), await hub.connect("gw-a"), await hub.connect("gw-b")
    await create_audit_stream(operator)
    await operator.nc.jetstream().create_object_store("models")
    await device.nc.jetstream().publish("audit.gw-a", b"{}")
    heartbeats = await operator.listen("edge.*.heartbeat")
    other_commands = await other.listen("edge.gw-b.cmd.>")
    other_inbox = await other.listen("_INBOX_gw-b.x")  # not `.>`: it would swallow its own barrier's answer

    await device.publish_refused(
        "audit.gw-b", "edge.gw-b.heartbeat", "edge.gw-b.cmd.pause", "edge.group.g2.cmd.pause", "_INBOX_gw-b.x",
        "_edge.probe.gw-b",
        # Deleting, purging, reconfiguring any stream; deleting a record; reading the stream as a whole.
        *(f"$JS.API.STREAM.{verb}.{stream}" for verb in ("DELETE", "PURGE", "UPDATE", "CREATE")
          for stream in (STREAM, "OBJ_models")),
        "$JS.API.STREAM.CREATE.ANOTHER", f"$JS.API.STREAM.MSG.DELETE.{STREAM}", "$JS.API.STREAM.MSG.DELETE.OBJ_models",
        f"$JS.API.STREAM.MSG.GET.{STREAM}", f"$JS.API.DIRECT.GET.{STREAM}", f"$JS.API.DIRECT.GET.{STREAM}.audit.gw-b",
        f"$JS.API.DIRECT.GET.{STREAM}.audit.>", f"$JS.API.CONSUMER.CREATE.{STREAM}",
        # Writing a model bucket.
        "$O.models.C.chunk", "$O.models.M.meta",
    )
    refused = await device.subscribe_refused(
        "edge.gw-b.cmd.>", "edge.group.g2.cmd.>", "edge.*.cmd.>", "_INBOX_gw-b.>", "_INBOX.>", "cloud.infer.>",
        "edge.*.approval.>", "edge.gw-a.approval.>", "audit.>", "edge.*.heartbeat")
    # A JetStream client sees a refused API call as a timeout.
    with pytest.raises(nats.errors.TimeoutError):
        await device.nc.jetstream(timeout=0.5).purge_stream(STREAM)

    # Nobody received anything, and nothing answers where the device tried to listen.
    await operator.nc.publish("edge.gw-b.cmd.status", b"{}")
    await server_barrier(operator.nc)
    await server_barrier(other.nc)
    assert [m.subject for m in other_commands.messages] == ["edge.gw-b.cmd.status"]
    assert heartbeats.messages == [] and other_inbox.messages == [] and refused.messages == []
    with pytest.raises(nats.errors.NoRespondersError):
        await other.nc.request("cloud.infer.pump", b"{}", timeout=2)
    # The stream is whole, still protected, and holds nothing under the other device's name.
    info = await operator.nc.jetstream().stream_info(STREAM)
    assert info.state.messages == 1 and info.config.deny_delete and info.config.deny_purge
    with pytest.raises(nats.js.errors.NotFoundError):
        await operator.nc.jetstream().get_last_msg(STREAM, "audit.gw-b")


async def test_an_operator_cannot_forge_records_purge_them_or_listen_as_a_device(hub: Hub) -> None:
    operator, device = await hub.connect("ops"), await hub.connect("gw-a")
    await create_audit_stream(operator)
    inbox = await device.listen("_INBOX_gw-a.x")

    await operator.publish_refused(
        "audit.gw-a", f"$JS.API.STREAM.PURGE.{STREAM}", f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
        "edge.gw-a.heartbeat", "edge.gw-a.approval.pump", "cloud.infer.pump", "_INBOX_gw-a.x",
        "$JS.API.STREAM.CREATE.ANOTHER", "$O.firmware.C.chunk")
    refused = await operator.subscribe_refused(
        "_INBOX_gw-a.>", "edge.gw-a.cmd.>", "edge.all.cmd.>", "edge.*.approval.>", "cloud.infer.>", "audit.>")
    await server_barrier(device.nc)
    assert inbox.messages == [] and refused.messages == []
    assert (await operator.nc.jetstream().stream_info(STREAM)).state.messages == 0


@pytest.mark.parametrize(("name", "job", "not_theirs"), [
    ("alice", "edge.*.approval.>", "cloud.infer.>"),
    ("infer", "cloud.infer.>", "edge.*.approval.>"),
])
async def test_approvers_and_cloud_services_only_answer(hub: Hub, name: str, job: str, not_theirs: str) -> None:
    operator, device, who = await hub.connect("ops"), await hub.connect("gw-a"), await hub.connect(name)
    await create_audit_stream(operator)
    commands = await device.listen("edge.gw-a.cmd.>", "edge.group.g1.cmd.>", "edge.all.cmd.>")
    inbox = await device.listen("_INBOX_gw-a.x")

    await who.listen(job)  # its job
    await who.publish_refused(
        "edge.gw-a.cmd.pause", "edge.group.g1.cmd.pause", "edge.all.cmd.pause", "audit.gw-a", "_INBOX_gw-a.x",
        "$SRV.PING.edge", f"$JS.API.STREAM.INFO.{STREAM}", f"$JS.API.STREAM.DELETE.{STREAM}",
        f"$JS.API.STREAM.PURGE.{STREAM}", "$JS.API.STREAM.CREATE.ANOTHER", "$JS.API.STREAM.CREATE.OBJ_models",
        "$O.models.C.chunk")
    refused = await who.subscribe_refused(not_theirs, "edge.gw-a.cmd.>", "edge.*.heartbeat", "_INBOX.>",
                                          "_INBOX_gw-a.>", "audit.>")
    await server_barrier(device.nc)
    assert commands.messages == [] and inbox.messages == [] and refused.messages == []


async def test_connections_without_a_provisioned_key_are_refused(hub: Hub, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    provision(stranger, [parse_device("gw-a")])  # the right name, a key the hub never saw
    for credentials in ({}, {"user": "gw-a", "password": "x"}, {"nkeys_seed": str(stranger / "gw-a.nk")}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(hub.server.url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2,
                               **credentials)


async def test_a_device_added_with_force_logs_in_after_a_reload(hub: Hub) -> None:
    operator = await hub.connect("ops")
    provision(hub.out, [*IDENTITIES, parse_device("gw-c:g1")], force=True)
    await hub.server.reload()
    added = await hub.connect("gw-c")
    commands = await answer_with(added, "edge.group.g1.cmd.>", b'{"ok": true}')
    assert (await operator.nc.request("edge.group.g1.cmd.status", b"{}", timeout=2)).data == b'{"ok": true}'
    assert len(commands.messages) == 1 and not added.violations and not operator.violations


async def test_the_uploader_makes_the_stream_it_needs_and_names_one_without_direct_gets(
        tmp_path: Path, nats_servers: ServerFactory) -> None:
    plain = await nats_servers("plain")  # no permissions: the uploader may create the stream
    admin = await nats.connect(plain.url)
    try:
        js = admin.jetstream()
        async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
            await log.append("decision", {"n": 1})
            async with Uploader(log, lambda: connect_for_upload(plain.url), create_stream=True) as uploader:
                assert await uploader.sync_now(10) == 0
            config = (await js.stream_info(STREAM)).config
            assert config.allow_direct and config.deny_delete and config.deny_purge
            with pytest.raises(nats.js.errors.APIError):
                await js.purge_stream(STREAM)

            # A stream made without direct gets (by hand, or by an older version): said, not worked around.
            await js.delete_stream(STREAM)
            await js.add_stream(name=STREAM, subjects=["audit.>"])
            await log.append("decision", {"n": 2})
            async with Uploader(log, lambda: connect_for_upload(plain.url), create_stream=True) as uploader:
                # The first attempt fails at once; sync_now waits (bounded) and leaves the record unsynced.
                assert await uploader.sync_now(1.0) == 1
                assert "does not allow direct gets" in str(uploader.last_error)
                assert "nats stream edit EDGE_AUDIT --allow-direct" in str(uploader.last_error)
                assert (await js.stream_info(STREAM)).state.messages == 0 and log.backlog == 1
    finally:
        await admin.close()


async def test_desired_state_is_written_by_operators_and_read_by_devices(hub: Hub, tmp_path: Path) -> None:
    operator, device, other = await hub.connect("ops"), await hub.connect("gw-a"), await hub.connect("gw-b")
    await fleet_buckets(operator.nc)  # an operator makes both buckets
    seed = load_seed(hub.seed_file("ops"))
    intended = await write_intent(operator.nc, "group:g1", "pause", {"reason": "storm"}, seed)
    assert intended is not None and intended.key == "group.g1.paused"
    config = make_config(tmp_path, hub.server.url, device="gw-a", groups=["g1"], pipeline={"ladder": ["rules"],
                         "model": ""}, models=[], fleet={"trusted_keys": [hub.public_key("ops")], "heartbeat_s": 0.3})
    stub = StubDevice(config, device.nc)
    async with Fleet(stub) as fleet:
        # The device watches its keys (read only), applies them and reports under its own key.
        await wait_until(lambda: stub.paused and fleet.convergence.reports > 0, within=5,
                         what="the device paused and reporting")
        state = await read_fleet(operator.nc)
        assert state.reports["gw-a"][0].applied["paused"].key == "group.g1.paused"
    await device.publish_refused(
        "$KV.EDGE_FLEET.group.g1.paused", "$KV.EDGE_FLEET.device.gw-a.paused", "$KV.EDGE_FLEET_STATUS.device.gw-b",
        *(f"$JS.API.STREAM.{verb}.KV_{bucket}" for verb in ("CREATE", "UPDATE", "DELETE", "PURGE")
          for bucket in ("EDGE_FLEET", "EDGE_FLEET_STATUS")),
        "$JS.API.STREAM.MSG.DELETE.KV_EDGE_FLEET", "$JS.API.CONSUMER.CREATE.KV_EDGE_FLEET_STATUS")
    await other.publish_refused("$KV.EDGE_FLEET_STATUS.device.gw-a")  # no device speaks for another
    kv = await rollout_bucket(operator.nc)  # an operator keeps rollouts; devices cannot even read them
    await kv.put("r1", b"{}")
    await device.publish_refused("$KV.EDGE_ROLLOUTS.r1", "$JS.API.STREAM.INFO.KV_EDGE_ROLLOUTS",
                                 "$JS.API.DIRECT.GET.KV_EDGE_ROLLOUTS.$KV.EDGE_ROLLOUTS.r1")
    await operator.publish_refused(  # operators read reports, never write them; nobody purges intent
        "$KV.EDGE_FLEET_STATUS.device.gw-a", "$JS.API.STREAM.PURGE.KV_EDGE_FLEET",
        "$JS.API.STREAM.DELETE.KV_EDGE_FLEET", "$JS.API.STREAM.MSG.DELETE.KV_EDGE_FLEET")


# ---------------------------------------------------------------------------------------------
# The runtime, end to end, as its device identity


async def test_the_runtime_works_as_its_device_identity(hub: Hub, tmp_path: Path, nats_servers: ServerFactory,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the runtime's connections log what the server reports at debug
    local = await nats_servers("local", jetstream=False)
    operator, cloud, approver = await hub.connect("ops"), await hub.connect("infer"), await hub.connect("alice")
    await create_audit_stream(operator)
    await answer_with(cloud, "cloud.infer.>", b'{"label": "normal", "confidence": 0.97}', queue="cloud")
    approver_seed = load_seed(hub.seed_file("alice"))

    async def approve_signed(msg: Msg) -> None:
        # The approver answers as a person would, signing with its key (edge-approval-v1).
        body = b'{"approved": true, "by": "alice", "reason": "checked on site"}'
        decision_id = json.loads(msg.data)["decision_id"]
        await approver.nc.publish(msg.reply, body, headers=sign_approval(approver_seed, decision_id, body))

    await approver.nc.subscribe("edge.*.approval.>", cb=approve_signed)
    await server_barrier(approver.nc)
    heartbeats = await operator.listen("edge.*.heartbeat")
    config = make_config(
        tmp_path, local.url, upstream_url=hub.server.url, device="gw-a", groups=["g1"],
        nats={"upstream_auth": {"nkey_seed": str(hub.seed_file("gw-a"))}},
        fleet={"trusted_keys": [hub.public_key("ops")], "approver_keys": [hub.public_key("alice")]},
        pipeline={"ladder": ["cloud", "model", "rules"], "cloud": {"subject": "cloud.infer.pump", "timeout_ms": 1000},
                  "guards": [{"when": "temp_c > 119", "action": "shutdown", "label": "interlock"}],
                  "actions": {"shutdown": {"approval": "required", "approval_timeout_ms": 5000, "instead": "hold"},
                              "hold": {}}},
    )
    sensors = await nats.connect(local.url)
    try:
        decisions = await Collector().start(sensors, "edge.gw-a.decision.pump")
        async with Runtime(config) as runtime:
            assert runtime.fleet is not None and runtime.uploader is not None and runtime.audit is not None
            await runtime.fleet.wait_attached()  # upstream connected: the link is online from then on
            for _ in range(20):
                await sensors.publish("sensors.p1.pump", json.dumps(NORMAL).encode())
            decided = await decisions.wait_for(20)
            assert Counter(d["tier"] for d in decided) == {"cloud": 20}
            # ... and the link probe (a request on the cloud subject, every 100 ms) never failed.
            assert runtime.link.state is LinkState.ONLINE and runtime.link.last_failure is None

            # A signed approval over the hub: the interlock asks, the provisioned approver answers.
            await sensors.publish("sensors.p1.pump", json.dumps({**NORMAL, "temp_c": 120.0}).encode())
            shutdown = (await decisions.wait_for(21))[-1]
            assert shutdown["tier"] == "guard" and shutdown["action"] == "shutdown"
            assert shutdown["governance"]["status"] == "approved"
            assert shutdown["governance"]["by"] == hub.public_key("alice")

            # Commands: signed to the device, by group (devices found by $SRV discovery and heartbeats).
            seed = load_seed(hub.seed_file("ops"))
            paused = await send_command(operator.nc, "gw-a", "pause", {"reason": "test"}, seed=seed, timeout=5)
            assert [r.ok for r in paused.replies] == [True] and runtime.paused
            status = await send_command(operator.nc, "group:g1", "status", seed=seed, timeout=1)
            assert [(r.device, r.ok) for r in status.replies] == [("gw-a", True)] and status.did_not_answer == []
            assert (await operator.nc.request("edge.gw-a.svc.status", b"", timeout=2)).data
            assert heartbeats.messages and heartbeats.messages[0].subject == "edge.gw-a.heartbeat"

            # The audit reaches the stream, in order, whole.
            assert await runtime.uploader.sync_now(timeout=10) == 0, runtime.uploader.status()
            synced = runtime.audit.synced_seq
            assert runtime.uploader.status()["last_error"] is None
        reports = await verify_upstream(operator.nc.jetstream(), STREAM, "gw-a")
        assert reports["gw-a"].ok and reports["gw-a"].first_seq == 1 and reports["gw-a"].last_seq >= synced
    finally:
        await sensors.close()
    violations = [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage().lower()]
    assert violations == [] and not operator.violations and not cloud.violations and not approver.violations

"""Fleet management (SPEC §8): commands, signatures, config push, model rollout — on real nats-servers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import CommandError, Runtime, decode_config, encode_config
from edge.cli import build_parser
from edge.cli._operator import (
    approvals_watch,
    command_subject,
    device_status,
    fleet_cmd,
    fleet_config_push,
    fleet_deploy_model,
    fleet_ls,
    fleet_status,
    gather,
    publish_model,
    send_command,
)
from edge.fleet import (
    H_NONCE,
    H_SIGNATURE,
    MAX_IN_FLIGHT,
    CommandVerifier,
    Fleet,
    ModelDeploy,
    Pause,
    decode_command,
    new_seed,
    pack_model_folder,
    public_key_of,
    pushed_config,
    sign_command,
    sign_model,
    unpack_model_archive,
    verify_artifact,
)
from tests.fleet_helpers import (
    RULES_ONLY,
    Decisions,
    Inputs,
    StubDevice,
    approver_seed_file,
    every_decision_heard,
    figure,
    fleet_of,
    model_version,
    ops,
    write_seed,
)
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import (
    APPROVER,
    CRITICAL,
    NORMAL,
    OPERATOR,
    OPERATOR_SEED,
    PUMP_RULES,
    config_data,
    connect,
    make_config,
    write_config,
)

SEED = OPERATOR_SEED  # the operator every test config trusts
INTRUDER_SEED = new_seed()
NOW = 1_700_000_000 * 10**9

# ---------------------------------------------------------------------------------------------
# Unit: decoding, signatures, pushed configs, archives (no network)


@pytest.mark.parametrize(
    ("verb", "body", "code", "words"),
    [
        ("audit.resend", b'{"from_seq": "7"}', "bad_command", ["'from_seq'", "expected `int`, got `str`"]),
        ("audit.resend", b"{}", "bad_command", ["'from_seq'", "required"]),
        ("audit.resend", b'{"from_seq": 0}', "bad_command", ["'from_seq'", ">= 1"]),
        ("pause", b'{"reasn": "typo"}', "bad_command", ["unknown field 'reasn'", "reason?"]),
        ("pause", b'{"reason": ', "bad_command", ["not valid JSON"]),
        ("pause", b"[1, 2]", "bad_command", ["must be an object"]),
        ("pause", b'{"verb": "resume"}', "bad_command", ["'verb' must be 'pause'"]),
        ("model.deploy", b'{"name": "m", "version": "../../etc", "bucket": "b", "object": "o", "sha256": "'
         + b"0" * 64 + b'"}', "bad_command", ["'version'", "matching regex"]),
        ("model.deploy", b'{"name": "m", "version": "2", "bucket": "b", "object": "o", "sha256": "XYZ"}',
         "bad_command", ["'sha256'"]),
        ("model.deploy", b'{"name": "m", "version": "2", "bucket": "b", "object": "o", "sha256": "'
         + b"0" * 64 + b'", "mode": "canary"}', "bad_command", ["'mode'", "'active'", "'shadow'"]),
        ("config.apply", b'{"config": "nope"}', "bad_command", ["'config'", "expected `object`"]),
        ("reboot", b"{}", "unknown_verb", ["'reboot'", "config.apply", "model.deploy"]),
    ],
)
def test_command_decoding_errors_name_the_field(verb: str, body: bytes, code: str, words: list[str]) -> None:
    with pytest.raises(CommandError) as caught:
        decode_command(verb, body)
    assert caught.value.code == code
    for word in words:
        assert word in caught.value.message, caught.value.message


def test_commands_decode_from_json_msgpack_and_empty_bodies() -> None:
    assert decode_command("pause", b"") == Pause()
    assert decode_command("pause", b'{"reason": "storm", "by": "ops"}') == Pause(reason="storm", by="ops")
    packed = msgspec.msgpack.encode({"reason": "storm"})
    assert decode_command("pause", packed, "application/msgpack") == Pause(reason="storm")
    deploy = ModelDeploy(name="m", version="2", bucket="models", object="m-2.tar.gz", sha256="a" * 64)
    # The operator encodes the Struct itself: the verb travels in the body and must match the subject.
    assert decode_command("model.deploy", msgspec.json.encode(deploy)) == deploy


def test_signature_verification() -> None:
    clock = [NOW]
    verifier = CommandVerifier(clock=lambda: clock[0])
    subject, body = "edge.gw-1.cmd.pause", b'{"reason": "x"}'
    headers = sign_command(SEED, subject, body, timestamp_ns=NOW, nonce="nonce-0001")
    assert verifier.verify_command(subject, body, headers, [OPERATOR]) == OPERATOR

    def refused(code: str, subject: str, body: bytes, headers: dict[str, str] | None) -> str:
        with pytest.raises(CommandError) as caught:
            verifier.verify_command(subject, body, headers, [OPERATOR])
        assert caught.value.code == code, caught.value
        return caught.value.message

    assert "already used" in refused("replayed", subject, body, headers)
    fresh = sign_command(SEED, subject, body, timestamp_ns=NOW, nonce="nonce-0002")
    assert "bad signature" in refused("unauthorized", subject, body + b" ", fresh)  # body changed
    assert "bad signature" in refused("unauthorized", "edge.all.cmd.pause", body, fresh)  # re-aimed at the fleet
    assert "unsigned" in refused("unauthorized", subject, body, None)
    assert "Edge-Nonce" in refused("unauthorized", subject, body, {k: v for k, v in fresh.items() if k != H_NONCE})
    intruder = sign_command(INTRUDER_SEED, subject, body, timestamp_ns=NOW, nonce="nonce-0003")
    assert "not one of this device's trusted keys" in refused("unauthorized", subject, body, intruder)
    # A trusted signer's name on someone else's signature.
    forged = {**intruder, "Edge-Signer": OPERATOR}
    assert "bad signature" in refused("unauthorized", subject, body, forged)
    assert "base64" in refused("unauthorized", subject, body, {**fresh, H_SIGNATURE: "%%%"})
    stale = sign_command(SEED, subject, body, timestamp_ns=NOW - 6 * 60 * 10**9, nonce="nonce-0004")
    assert "-360s" in refused("unauthorized", subject, body, stale)
    future = sign_command(SEED, subject, body, timestamp_ns=NOW + 6 * 60 * 10**9, nonce="nonce-0005")
    assert "+360s" in refused("unauthorized", subject, body, future)
    # The refused ones did not burn their nonces; the accepted one is remembered across a restart.
    assert verifier.verify_command(subject, body, fresh, [OPERATOR]) == OPERATOR
    restarted = CommandVerifier(clock=lambda: clock[0])
    restarted.load(verifier.export())
    with pytest.raises(CommandError, match="replayed"):
        restarted.verify_command(subject, body, headers, [OPERATOR])
    # Nonces are forgotten by the signer's high-water mark, never by the clock: only a newer
    # command (here 11 minutes later) moves the mark past them.
    clock[0] = NOW + 11 * 60 * 10**9
    restarted.load(verifier.export())
    assert len(restarted) == 2
    newer = sign_command(SEED, subject, body, timestamp_ns=clock[0], nonce="nonce-0006")
    assert restarted.verify_command(subject, body, newer, [OPERATOR]) == OPERATOR
    assert len(restarted) == 1


def test_model_artefact_signature() -> None:
    sha = hashlib.sha256(b"model").hexdigest()
    assert verify_artifact(sha, sign_model(SEED, sha), [public_key_of(INTRUDER_SEED), OPERATOR]) == OPERATOR
    for signature, code in [("", "unsigned"), (sign_model(INTRUDER_SEED, sha), "bad_signature"),
                            (sign_model(SEED, "0" * 64), "bad_signature"), ("not base64!", "bad_signature")]:
        with pytest.raises(CommandError) as caught:
            verify_artifact(sha, signature, [OPERATOR])
        assert caught.value.code == code


def test_pushed_config_is_completed_from_the_device(tmp_path: Path) -> None:
    running = make_config(tmp_path, "nats://127.0.0.1:4222", device="gw-7", groups=["pumps"],
                          fleet={"trusted_keys": [OPERATOR]})
    pushed = {"pipelines": [{**config_data(tmp_path, "x")["pipelines"][0], "min_confidence": 0.9}],
              "models": encode_config(running)["models"]}
    config = pushed_config(pushed, running)
    assert config.device_id == "gw-7" and config.groups == ["pumps"]
    assert config.data_dir == running.data_dir and config.nats == running.nats and config.audit == running.audit
    assert config.fleet.trusted_keys == [OPERATOR]  # a push that forgets [fleet] cannot switch signing off
    assert config.pipelines[0].min_confidence == 0.9
    assert pushed_config({**pushed, "groups": []}, running).groups == []

    with pytest.raises(CommandError, match="this config is for 'gw-8'") as caught:
        pushed_config({**pushed, "device_id": "gw-8"}, running)
    assert caught.value.code == "bad_config"
    bad = {"pipelines": [{**pushed["pipelines"][0], "ladder": ["rules", "model"],
                          "rules": [{"when": "nope > 1", "action": "x"}]}], "models": pushed["models"]}
    with pytest.raises(CommandError) as caught:
        pushed_config(bad, running)
    message = caught.value.message
    assert caught.value.code == "bad_config"
    assert "pipelines[0].ladder: expected 'rules' as the last tier" in message
    assert "pipelines[0].rules" in message and "nope" in message


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in entries:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("entries", "code", "words"),
    [
        ([(_entry("manifest.toml"), b"x"), (_entry("../evil"), b"x")], "bad_archive", "unsafe path"),
        ([(_entry("/etc/evil"), b"x")], "bad_archive", "unsafe path"),
        ([(_entry("manifest.toml"), b"x"), (_entry("model.onnx", tarfile.SYMTYPE, "/etc/passwd"), b"")],
         "bad_archive", "no links"),
        ([(_entry("model.onnx"), b"x")], "bad_archive", "no manifest.toml"),
        ([(_entry("manifest.toml"), b"x" * 2000)], "too_large", "more than 1000 bytes"),
        ([(_entry(f"f{i}"), b"") for i in range(10)], "bad_archive", "more than 5 entries"),
    ],
)
def test_unpack_refuses_unsafe_archives(tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]],
                                         code: str, words: str) -> None:
    target = tmp_path / "store" / "m" / "2"
    with pytest.raises(CommandError) as caught:
        unpack_model_archive(_tar(entries), target, max_bytes=1000, max_members=5)
    assert caught.value.code == code and words in caught.value.message
    assert not target.exists() and list((tmp_path / "store" / "m").iterdir()) == []  # nothing left behind
    with pytest.raises(CommandError, match="not a readable .tar.gz"):
        unpack_model_archive(b"\x1f\x8b garbage", target)


def test_pack_is_deterministic_and_unpacks_to_the_same_folder(tmp_path: Path) -> None:
    folder = model_version(tmp_path, "2")
    first = pack_model_folder(folder)
    (folder / "model.onnx").touch()  # a new mtime changes nothing
    assert pack_model_folder(folder) == first
    unpack_model_archive(first, tmp_path / "out")
    for name in ("manifest.toml", "model.onnx"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()


def test_targets_map_to_subjects() -> None:
    assert command_subject("gw-1", "config.apply") == "edge.gw-1.cmd.config.apply"
    assert command_subject("group:pumps", "pause") == "edge.group.pumps.cmd.pause"
    assert command_subject("all", "status") == "edge.all.cmd.status"
    for bad in ("group:a.b", "a.b", "group", ""):
        with pytest.raises(CommandError, match="bad_target"):
            command_subject(bad, "status")


# ---------------------------------------------------------------------------------------------
# Integration: a fleet of runtimes on one real server


async def test_fleet_of_twenty(nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               pytestconfig: pytest.Config) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    beats: set[str] = set()

    async def on_heartbeat(msg: Msg) -> None:
        beats.add(msgspec.json.decode(msg.data)["device"])

    await nc.subscribe("edge.*.heartbeat", cb=on_heartbeat)
    decisions = await Decisions().start(nc)

    def groups(i: int) -> list[str]:
        return ["pumps" if i < 10 else "fans", "odd" if i % 2 else "even"]

    async with fleet_of(tmp_path, server.url, 20, groups=groups, pipeline=RULES_ONLY, models=[]) as fleet:
        devices = {rt.device for rt, _ in fleet}
        odd = {rt.device for i, (rt, _) in enumerate(fleet) if i % 2}
        pumps = {rt.device for i, (rt, _) in enumerate(fleet) if i < 10}

        # fleet ls sees all twenty, with their groups and link.
        capsys.readouterr()
        assert await fleet_ls(ops(server.url, expect=20, timeout=10)) == 0
        listing = json.loads(capsys.readouterr().out)
        assert {d["device"] for d in listing["devices"]} == devices and listing["did_not_answer"] == []
        assert all(d["link"]["state"] == "online" for d in listing["devices"])
        figure(pytestconfig, capsys, f"fleet ls: 20 devices in {listing['elapsed_s']:.3f}s")
        await wait_until(lambda: beats == devices, within=5, what="a heartbeat from every device")

        # A group command reaches exactly the group's members.
        got = await send_command(nc, "group:odd", "pause", {"reason": "storm", "by": "ops"}, timeout=2.0, expect=10,
                                 seed=SEED)
        assert {r.device for r in got.replies} == odd and got.all_ok and got.did_not_answer == []
        assert {rt.device for rt, _ in fleet if rt.paused} == odd
        got = await send_command(nc, "all", "resume", timeout=1.0, expect=20, seed=SEED)
        assert {r.device for r in got.replies} == devices and not any(rt.paused for rt, _ in fleet)

        # Config push to a group while inputs flow: none lost, none doubled, the new rules in effect.
        new_rules = [*PUMP_RULES[:-1], {"default": True, "action": "none", "label": "nominal"}]
        push = write_config(tmp_path, {"pipelines": [{**config_data(tmp_path, "x")["pipelines"][0], **RULES_ONLY,
                                                      "rules": new_rules}]}, "push.toml")
        inputs = Inputs(nc)
        stop = asyncio.Event()
        sender = asyncio.create_task(inputs.run(stop, every=0.002))
        await decisions.wait_for(lambda: len(decisions.all) >= 20 * 50)
        capsys.readouterr()
        assert await fleet_config_push(ops(server.url, target="group:pumps", file=str(push), expect=10,
                                           timeout=10)) == 0
        pushed = json.loads(capsys.readouterr().out)
        assert {r["device"] for r in pushed["replies"]} == pumps
        after_push = len(inputs.sent)
        await decisions.wait_for(lambda: len(inputs.sent) >= after_push + 100)
        stop.set()
        await sender
        sent = set(inputs.sent)
        await decisions.wait_for(lambda: len(decisions.all) >= 20 * len(sent))
        await every_decision_heard(fleet, decisions)  # a doubled one too
        for device in devices:
            counts = decisions.per_input[device]
            assert set(counts) == sent and set(counts.values()) == {1}, device
        late = set(inputs.sent[after_push:])
        for d in decisions.all:
            if d["input_sha256"] in late:
                assert d["label"] == ("nominal" if d["device"] in pumps else "normal"), d
        figure(pytestconfig, capsys,
               f"config push to 10 of 20 devices: {len(sent)} inputs x 20 devices, 0 lost, 0 doubled")
        for rt, _ in fleet:
            applied = rt.data_dir / "config" / "applied.json"
            assert applied.exists() == (rt.device in pumps)
    await nc.close()


async def test_many_lightweight_devices_are_listed(nats_servers: ServerFactory, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   pytestconfig: pytest.Config) -> None:
    """100 Fleets over stub runtimes (each with its own connection) answer `fleet ls` on a real server."""
    server = await nats_servers("hub")
    async with AsyncExitStack() as stack:
        fleets = []
        for i in range(100):
            upstream = await connect(server.url)
            stack.push_async_callback(upstream.close)
            config = make_config(tmp_path, server.url, device=f"dev-{i:03d}", groups=[f"g{i % 4}"],
                                 pipeline=RULES_ONLY, models=[])
            fleets.append(await stack.enter_async_context(Fleet(StubDevice(config, upstream))))
        capsys.readouterr()
        started = time.perf_counter()
        assert await fleet_ls(ops(server.url, expect=100, timeout=10)) == 0
        elapsed = time.perf_counter() - started
        listing = json.loads(capsys.readouterr().out)
        assert len(listing["devices"]) == 100 and listing["did_not_answer"] == []
        figure(pytestconfig, capsys,
               f"fleet ls: 100 lightweight devices in {listing['elapsed_s']:.3f}s ({elapsed:.3f}s with connect)")
        nc = await connect(server.url)
        got = await send_command(nc, "group:g1", "pause", timeout=1.0, expect=25, seed=SEED)
        assert len(got.replies) == 25 and got.all_ok
        assert {int(r.device[-3:]) % 4 for r in got.replies} == {1}
        await nc.close()

        # A device that answers $SRV.PING but not its commands is reported, and the exit code says so.
        for sub in fleets[7]._subs.values():
            await sub.unsubscribe()
        assert await fleet_ls(ops(server.url, timeout=1.0, json=False)) == 1
        out = capsys.readouterr().out
        assert "did not answer: dev-007" in out and "99 device(s)" in out


# ---------------------------------------------------------------------------------------------
# Model rollout


async def test_shadow_deploy_promote_rollback_loses_no_decision(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str], pytestconfig: pytest.Config
) -> None:
    server = await nats_servers("hub")
    v2 = model_version(tmp_path, "2")
    nc = await connect(server.url)
    decisions = await Decisions().start(nc)
    async with fleet_of(tmp_path, server.url, 2, groups=lambda i: ["canary"]) as fleet:
        devices = {rt.device for rt, _ in fleet}
        inputs = Inputs(nc)
        stop = asyncio.Event()
        sender = asyncio.create_task(inputs.run(stop, every=0.001))

        def first(predicate: Any) -> Any:
            return lambda: {d["device"] for d in decisions.all if predicate(d)} == devices

        await decisions.wait_for(first(lambda d: d["tier"] == "model" and d["model"]["version"] == "1"))
        deployed_at = time.monotonic()
        assert await fleet_deploy_model(ops(server.url, target="group:canary", folder=str(v2), name="pump-anomaly",
                                            version="2", shadow=True, bucket="models", expect=2, timeout=30)) == 0
        await decisions.wait_for(first(lambda d: (d["shadow"] or {}).get("version") == "2"))
        shadow_s = time.monotonic() - deployed_at
        capsys.readouterr()
        assert await fleet_status(ops(server.url, device="gw-000")) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["pipelines"]["pump"]["shadow"]["agreement"] == 1.0  # the same graph: it always agrees
        assert status["deployments"]["pump-anomaly"]["shadow"].endswith("pump-anomaly/2")

        promoted_at = time.monotonic()
        got = await send_command(nc, "group:canary", "model.promote", {"name": "pump-anomaly"}, expect=2, seed=SEED)
        assert got.all_ok and {r.result["version"] for r in got.replies} == {"2"}
        mark = len(decisions.all)
        await decisions.wait_for(first(lambda d: d["model"] and d["model"]["version"] == "2"))
        promote_s = time.monotonic() - promoted_at
        got = await send_command(nc, "group:canary", "model.rollback", {"name": "pump-anomaly"}, expect=2, seed=SEED)
        assert got.all_ok and {r.result["version"] for r in got.replies} == {"1"}
        after_rollback = len(inputs.sent)
        await decisions.wait_for(lambda: len(inputs.sent) >= after_rollback + 30)
        assert {d["model"]["version"] for d in decisions.all if d["input_sha256"] in set(inputs.sent[after_rollback:])
                and d["model"]} == {"1"}

        # An active deploy of a new version, while inputs flow.
        v3 = model_version(tmp_path, "3")
        deployed_at = time.monotonic()
        assert await fleet_deploy_model(ops(server.url, target="group:canary", folder=str(v3), name=None,
                                            version=None, shadow=False, bucket="models", expect=2, timeout=30)) == 0
        await decisions.wait_for(first(lambda d: d["model"] and d["model"]["version"] == "3"))
        active_s = time.monotonic() - deployed_at
        after_deploy = len(inputs.sent)
        await decisions.wait_for(lambda: len(inputs.sent) >= after_deploy + 30)
        stop.set()
        await sender
        sent = set(inputs.sent)
        await decisions.wait_for(lambda: len(decisions.all) >= 2 * len(sent))
        await every_decision_heard(fleet, decisions)  # a doubled one too
        for device in devices:
            assert set(decisions.per_input[device]) == sent and set(decisions.per_input[device].values()) == {1}
        assert any(d["model"] and d["model"]["version"] == "2" for d in decisions.all[mark:])
        late = set(inputs.sent[after_deploy:])
        assert {d["model"]["version"] for d in decisions.all if d["input_sha256"] in late and d["model"]} == {"3"}
        figure(pytestconfig, capsys,
               f"model.deploy (shadow) -> first shadow decision {shadow_s * 1000:.0f} ms; promote -> first v2 "
               f"decision {promote_s * 1000:.0f} ms; deploy-model (active, pack+upload+fetch+load) -> first v3 "
               f"decision {active_s * 1000:.0f} ms; {len(sent)} inputs x 2 devices, 0 lost, 0 doubled")
    await nc.close()


async def test_bad_commands_and_deploys_are_refused_and_a_restart_keeps_what_was_applied(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    config = make_config(tmp_path, server.url, device="gw-s", fleet={"trusted_keys": [OPERATOR]})
    good = model_version(tmp_path, "2")
    corrupt = model_version(tmp_path, "3", corrupt=True)

    async def deploy(folder: Path, version: str, *, sha: str | None = None, signer: bytes | None = SEED,
                     seed: bytes = SEED) -> Any:
        obj, actual = await publish_model(nc, folder, bucket="models", name="pump-anomaly", version=version)
        sha = sha or actual
        body = msgspec.to_builtins(ModelDeploy(name="pump-anomaly", version=version, bucket="models", object=obj,
                                               sha256=sha, signature=sign_model(signer, sha) if signer else ""))
        return await send_command(nc, "gw-s", "model.deploy", body, seed=seed, timeout=30)

    def code(got: Any) -> str:
        assert len(got.replies) == 1, got
        reply = got.replies[0]
        assert not reply.ok, reply
        return str(reply.error.code)

    async with Runtime(config) as runtime:
        # Commands: unsigned, signed by a stranger, replayed.
        assert code(await send_command(nc, "gw-s", "pause")) == "unauthorized"
        assert code(await send_command(nc, "gw-s", "pause", seed=INTRUDER_SEED)) == "unauthorized"
        subject, body = "edge.gw-s.cmd.pause", b'{"reason": "drill"}'
        headers = sign_command(SEED, subject, body)
        first = msgspec.json.decode((await nc.request(subject, body, headers=headers, timeout=2)).data)
        again = msgspec.json.decode((await nc.request(subject, body, headers=headers, timeout=2)).data)
        assert first["ok"] and runtime.paused
        assert again["error"]["code"] == "replayed"
        assert (await send_command(nc, "gw-s", "resume", seed=SEED)).all_ok and not runtime.paused

        # Deploys: each refused with its precise code; v1 keeps serving.
        assert code(await deploy(corrupt, "3")) == "bad_model"
        assert code(await deploy(good, "2", sha="0" * 64)) == "checksum_mismatch"
        assert code(await deploy(good, "2", signer=INTRUDER_SEED)) == "bad_signature"
        assert code(await deploy(good, "2", signer=None)) == "unsigned"
        assert code(await deploy(good, "4")) == "manifest_mismatch"  # the archive says version 2
        missing = msgspec.to_builtins(ModelDeploy(name="pump-anomaly", version="9", bucket="models",
                                                  object="nope.tar.gz", sha256="a" * 64,
                                                  signature=sign_model(SEED, "a" * 64)))
        assert code(await send_command(nc, "gw-s", "model.deploy", missing, seed=SEED)) == "not_found"
        assert not (runtime.deployments.store_dir("pump-anomaly", "3")).exists()
        reply = await nc.request("sensors.p1.pump", msgspec.json.encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["model"]["version"] == "1"

        # Audited, every one with its outcome.
        await wait_until(lambda: runtime.audit is not None and runtime.audit.pending == 0, within=5,
                         what="the audit log written")
        from sync import iter_records

        records = [msgspec.json.decode(r.body) for r in iter_records(runtime.data_dir / "audit.db")
                   if r.kind == "command"]
        assert [r.get("code") for r in records if not r["ok"]] == [
            "bad_model", "checksum_mismatch", "bad_signature", "unsigned", "manifest_mismatch", "not_found"]
        # Refused before they were authenticated: counted, and recorded one record a second at most.
        def refused() -> Counter[str]:
            counts = Counter[str]()
            for r in iter_records(runtime.data_dir / "audit.db"):
                if r.kind == "command_refused":
                    counts.update(msgspec.json.decode(r.body)["counts"])
            return counts

        # Flushed once a second, then committed by the log's writer: read what is on disk until it is there.
        await wait_until(lambda: refused() == {"unauthorized": 2, "replayed": 1}, within=3,
                         what="the refusals recorded")
        assert all(r.get("signer") == OPERATOR for r in records if r["ok"])

        # Good, signed: a new active version and a new config.
        got = await deploy(good, "2")
        assert got.all_ok, got
        push = {"pipelines": [{**config_data(tmp_path, "x")["pipelines"][0], "min_confidence": 0.85}],
                "models": encode_config(config)["models"]}
        assert (await send_command(nc, "gw-s", "config.apply", {"config": push}, seed=SEED)).all_ok
        reply = await nc.request("sensors.p1.pump", msgspec.json.encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["model"]["version"] == "2"
        applied_sha = (await send_command(nc, "gw-s", "status", seed=SEED)).replies[0].result["config_sha256"]

    # The same device again, from the same file: it comes back as it was left.
    async with Runtime(config) as runtime:
        got = await send_command(nc, "gw-s", "status", seed=SEED)
        status = got.replies[0].result
        assert status["config_sha256"] == applied_sha
        assert runtime.config.pipelines[0].min_confidence == 0.85
        assert {m["name"]: m["version"] for m in status["models"]}["pump-anomaly"] == "2"
        reply = await nc.request("sensors.p1.pump", msgspec.json.encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["model"]["version"] == "2"
        # A command captured before the restart cannot be replayed after it.
        again = msgspec.json.decode((await nc.request(subject, body, headers=headers, timeout=2)).data)
        assert again["error"]["code"] == "replayed" and not runtime.paused
    await nc.close()


# ---------------------------------------------------------------------------------------------
# The operator's command line


async def test_operator_cli(nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = await nats_servers("hub")
    parser = build_parser()
    args = parser.parse_args(["fleet", "ls", "--server", server.url, "--expect", "1", "--json"])
    assert args.expect == 1 and args.json
    for argv in (["fleet", "status", "gw-c"], ["fleet", "cmd", "group:a", "pause", "--data", "{}"],
                 ["fleet", "deploy-model", "all", "folder", "--shadow", "--sign-with", "k.nk"],
                 ["fleet", "config", "push", "all", "f.toml"], ["status", "-c", "x.toml"],
                 ["approvals", "watch", "--auto", "deny"]):
        assert callable(parser.parse_args(argv).handler)

    # A device whose shutdown needs a human.
    data = config_data(tmp_path, server.url, device="gw-c", pipeline={
        **RULES_ONLY, "actions": {"shutdown": {"approval": "required", "instead": "hold",
                                               "approval_timeout_ms": 10000}, "hold": {}}}, models=[])
    path = write_config(tmp_path, data, "device.toml")
    nc = await connect(server.url)
    async with Runtime(decode_config(data, base_dir=tmp_path, env={})) as runtime:
        fleet = runtime.fleet
        assert fleet is not None
        # The synchronous handler, as `edge fleet ls` runs it (its own event loop, in a thread here).
        capsys.readouterr()
        assert await asyncio.to_thread(args.handler, args) == 0
        assert [d["device"] for d in json.loads(capsys.readouterr().out)["devices"]] == ["gw-c"]
        assert await device_status(ops(server.url, config=str(path))) == 0
        assert json.loads(capsys.readouterr().out)["device"] == "gw-c"
        assert await fleet_cmd(ops(server.url, target="gw-c", verb="config.get", data=None, json=False)) == 0
        assert "gw-c: ok" in capsys.readouterr().out
        assert await fleet_cmd(ops(server.url, target="gw-c", verb="audit.resend", data='{"from_seq": -1}')) == 1
        assert "from_seq" in json.loads(capsys.readouterr().out)["replies"][0]["error"]["message"]
        assert await fleet_cmd(ops(server.url, target="gw-c", verb="pause", data="{nope")) == 2
        assert await fleet_cmd(ops(server.url, target="gw-gone", verb="status", data=None, timeout=0.5)) == 1
        assert json.loads(capsys.readouterr().out)["no_responders"] is True

        # A bad file is refused before anything is sent, with every problem.
        bad = write_config(tmp_path, {"pipelines": [{**data["pipelines"][0], "ladder": ["rules", "cloud"],
                                                     "rules": [{"when": "x > 1", "action": "a"}]}]}, "bad.toml")
        capsys.readouterr()
        assert await fleet_config_push(ops(server.url, target="all", file=str(bad))) == 2
        errors = capsys.readouterr().err
        assert "pipelines[0].ladder" in errors and "pipelines[0].rules" in errors

        # Approvals: one denied by hand, one approved by --auto.
        requests: list[Msg] = []

        async def on_request(msg: Msg) -> None:
            requests.append(msg)

        await nc.subscribe("edge.*.approval.*", cb=on_request)
        printed: list[str] = []

        def said(text: str) -> bool:
            printed.append(capsys.readouterr().out)
            return text in "".join(printed)

        lines: asyncio.Queue[str | None] = asyncio.Queue()
        watch = asyncio.create_task(approvals_watch(ops(server.url, auto=None, by="alice", limit=1, duration=20,
                                                        sign_with=str(approver_seed_file())),
                                                    lines))
        await wait_until(lambda: said("watching edge.*.approval.*"), within=5,
                         what="the watcher subscribed")  # it says so once subscribed
        pending = asyncio.ensure_future(nc.request("sensors.p1.pump", msgspec.json.encode(CRITICAL), timeout=10))
        await wait_until(lambda: len(requests) == 1, within=5, what="one approval request")
        await wait_until(lambda: said("#1 gw-c/pump: shutdown"), within=5, what="the request shown")
        await lines.put("d 1 not now")
        denied = msgspec.json.decode((await pending).data)
        assert await watch == 0
        assert said("#1 gw-c/pump shutdown: denied")
        assert denied["action"] == "hold" and denied["governance"]["status"] == "denied"
        assert denied["governance"]["by"] == APPROVER and denied["governance"]["by_name"] == "alice"
        printed.clear()
        watch = asyncio.create_task(approvals_watch(ops(server.url, auto="approve", by="bot", limit=1, duration=20,
                                                        sign_with=str(approver_seed_file()))))
        await wait_until(lambda: said("watching edge.*.approval.*"), within=5, what="the watcher subscribed")
        approved = msgspec.json.decode((await nc.request("sensors.p1.pump", msgspec.json.encode(CRITICAL),
                                                         timeout=10)).data)
        assert await watch == 0
        assert approved["action"] == "shutdown" and approved["governance"]["by"] == APPROVER
        assert approved["governance"]["by_name"] == "bot"

        # Commands beyond what the device handles at once get `busy` at once, never a queue.
        answers: list[dict[str, Any]] = []

        async def on_answer(msg: Msg) -> None:
            answers.append(msgspec.json.decode(msg.data))

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_answer)
        async with fleet._mutating:  # a long change in progress: promotes wait for it
            for _ in range(MAX_IN_FLIGHT + 8):
                subject, body = "edge.gw-c.cmd.model.promote", b'{"name": "pump-anomaly"}'
                await nc.publish(subject, body, reply=inbox, headers=sign_command(SEED, subject, body))
            await wait_until(lambda: len(answers) == 8, within=5, what="8 answers")
            assert {a["error"]["code"] for a in answers} == {"busy"}
        await wait_until(lambda: len(answers) == MAX_IN_FLIGHT + 8, within=5, what="every answer")
        assert Counter(a["error"]["code"] for a in answers) == {"busy": 8, "no_shadow": MAX_IN_FLIGHT}

        # Signed from a seed file, against a device that trusts it; unsigned, refused.
        seed_file = write_seed(tmp_path, SEED)
        assert await fleet_cmd(ops(server.url, target="gw-c", verb="pause", data=None, sign_with=None)) == 1
        assert not runtime.paused
        assert await fleet_cmd(ops(server.url, target="gw-c", verb="pause", data=None, sign_with=str(seed_file))) == 0
        assert runtime.paused
    await nc.close()



# ---------------------------------------------------------------------------------------------
# A device with its own local bus and a separate upstream


async def test_separate_upstream_heartbeats_groups_and_local_status(nats_servers: ServerFactory,
                                                                     tmp_path: Path) -> None:
    local, hub = await nats_servers("local"), await nats_servers("hub")
    config = make_config(tmp_path, local.url, upstream_url=hub.url, device="gw-u", groups=["pumps"],
                         fleet={"heartbeat_s": 0.1, "trusted_keys": [OPERATOR]}, pipeline=RULES_ONLY, models=[])
    up = await connect(hub.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    down = await connect(local.url)
    beats: list[dict[str, Any]] = []

    async def on_heartbeat(msg: Msg) -> None:
        beats.append(msgspec.json.decode(msg.data))

    await up.subscribe("edge.gw-u.heartbeat", cb=on_heartbeat)
    async with Runtime(config) as runtime:
        fleet = runtime.fleet
        assert fleet is not None
        await asyncio.wait_for(fleet.wait_attached(), 10)  # upstream connects in the background
        await wait_until(lambda: len(beats) >= 3, within=5, what="three heartbeats")
        assert beats[-1]["groups"] == ["pumps"] and beats[-1]["link"] == "online"
        got = await send_command(up, "group:pumps", "status", seed=SEED, expect=1)
        assert got.all_ok and got.replies[0].result["device"] == "gw-u"
        # The local bus answers the read-only status probe, unsigned; nothing else is listened to there.
        reply = msgspec.json.decode((await down.request("edge.gw-u.cmd.status", b"", timeout=2)).data)
        assert reply["ok"] and reply["result"]["device"] == "gw-u"
        with pytest.raises(nats.errors.NoRespondersError):
            await down.request("edge.gw-u.cmd.pause", b"", timeout=2)
        # Replies come in the request's encoding.
        headers = {**sign_command(SEED, "edge.gw-u.cmd.config.get", b""), "Content-Type": "application/msgpack"}
        packed = await up.request("edge.gw-u.cmd.config.get", b"", headers=headers, timeout=2)
        assert msgspec.msgpack.decode(packed.data)["result"]["config"]["device_id"] == "gw-u"

        # A pushed config that moves the device to another group: subscriptions and $SRV metadata follow.
        push = {"groups": ["fans"], "pipelines": [{**config_data(tmp_path, "x")["pipelines"][0], **RULES_ONLY}],
                "fleet": {"heartbeat_s": 0.1}}
        assert (await send_command(up, "gw-u", "config.apply", {"config": push}, seed=SEED)).all_ok
        assert runtime.config.fleet.trusted_keys == [OPERATOR]
        assert (await send_command(up, "group:pumps", "status", seed=SEED, timeout=0.5)).no_responders
        assert (await send_command(up, "group:fans", "status", seed=SEED, expect=1)).all_ok
        pings = [msgspec.json.decode(m.data) for m in (await _ping(up))]
        assert [p["metadata"] for p in pings] == [{"device_id": "gw-u", "groups": "fans"}]
        summary = msgspec.json.decode((await up.request("edge.gw-u.svc.status", b"", timeout=2)).data)
        assert summary["device"] == "gw-u" and summary["groups"] == ["fans"]
        got = await send_command(up, "group:fans", "config.rollback", seed=SEED, expect=1)
        assert got.all_ok and runtime.config.groups == ["pumps"]
        assert (await send_command(up, "group:pumps", "status", seed=SEED, expect=1)).all_ok

        # The audit verbs.
        got = await send_command(up, "gw-u", "sync.now", {"timeout_s": 5}, seed=SEED)
        assert got.all_ok and got.replies[0].result["backlog"] == 0, got
        got = await send_command(up, "gw-u", "audit.resend", {"from_seq": 1}, seed=SEED)
        assert got.all_ok and got.replies[0].result["queued"] >= 1

        # Upstream gone: no heartbeat is sent (none buffered for later); back, and commands work again.
        await hub.stop()
        await wait_until(lambda: not runtime.upstream or not runtime.upstream.is_connected, within=5,
                         what="the upstream connection lost")
        during = fleet.heartbeats
        await asyncio.sleep(0.5)  # a window of five beats at the heartbeat rate (heartbeat_s=0.1): none may go out
        assert fleet.heartbeats == during
        await hub.start()
        await wait_until(lambda: fleet.heartbeats > during + 2, within=10, what="heartbeats again")
        got = await send_command(up, "gw-u", "status", seed=SEED, timeout=5)
        assert got.all_ok
    await up.close()
    await down.close()


async def _ping(nc: NATS) -> list[Msg]:
    msgs, _ = await gather(nc, "$SRV.PING.edge", b"", timeout=0.5)
    return msgs


async def test_two_deploys_of_one_version_at_once_both_succeed(nats_servers: ServerFactory, tmp_path: Path) -> None:
    """A group deploy writes the desired state and sends the command: a device may get both at once.
    The second preparation waits for the first and finds its folder, never a half-made one."""
    server = await nats_servers("hub")
    nc = await connect(server.url)
    config = make_config(tmp_path, server.url, device="gw-d", fleet={"trusted_keys": [OPERATOR]})
    folder = model_version(tmp_path, "2")
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        obj, sha = await publish_model(nc, folder, bucket="models", name="pump-anomaly", version="2")
        body = msgspec.to_builtins(ModelDeploy(name="pump-anomaly", version="2", bucket="models", object=obj,
                                               sha256=sha, signature=sign_model(SEED, sha)))
        first, second = await asyncio.gather(
            send_command(nc, "gw-d", "model.deploy", body, seed=SEED, timeout=30),
            send_command(nc, "gw-d", "model.deploy", body, seed=SEED, timeout=30))
        assert first.all_ok and second.all_ok, (first, second)
        reply = await nc.request("sensors.p1.pump", msgspec.json.encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["model"]["version"] == "2"
    await nc.close()

"""Trust on the wire: each attack performed against a real runtime on real nats-servers, and seen
to fail with a clear code, beside the legitimate path that keeps working.

Attacks: an unsigned command on a device with default settings; a signature made over the
un-prefixed bytes (what a rogue hub gets back by choosing the login nonce); forged, mis-keyed,
late and replayed approval answers; reply subjects pointed at the device's own output subjects;
a captured command replayed after a clock rollback across a restart; `.creds` as a signing key.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nkeys  # type: ignore[import-untyped]
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import CommandError, Runtime, server_barrier
from edge.cli._operator import send_command
from edge.fleet import (
    H_NONCE,
    H_SIGNATURE,
    H_SIGNER,
    H_TIMESTAMP,
    CommandVerifier,
    load_seed,
    new_seed,
    public_key_of,
    sign,
    sign_approval,
    sign_command,
    sign_model,
    verify_artifact,
)
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import CRITICAL, NORMAL, Collector, connect, encode, make_config

OPERATOR_SEED, INTRUDER_SEED, APPROVER_SEED = new_seed(), new_seed(), new_seed()
OPERATOR, INTRUDER, APPROVER = (public_key_of(s) for s in (OPERATOR_SEED, INTRUDER_SEED, APPROVER_SEED))
DEVICE = "gw-test"
DECISIONS = f"edge.{DEVICE}.decision.pump"
APPROVALS = f"edge.{DEVICE}.approval.pump"


def rules_only(**fleet: Any) -> dict[str, Any]:
    """A rules-only device trusting exactly the keys given (none by default: the default config)."""
    return {"pipeline": {"ladder": ["rules"], "model": ""}, "models": [],
            "fleet": {"trusted_keys": [], "approver_keys": [], **fleet}}


@pytest.fixture
async def bus(nats_servers: ServerFactory) -> AsyncIterator[NATS]:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    yield nc
    await nc.close()


def server_url(nc: NATS) -> str:
    assert nc.connected_url is not None
    return f"nats://127.0.0.1:{nc.connected_url.port}"


async def records(runtime: Runtime, kind: str) -> list[dict[str, Any]]:
    """The audit records of `kind`, once everything appended so far is committed."""
    audit = runtime.audit
    assert audit is not None
    await wait_until(lambda: audit.pending == 0, within=5, what="the audit log committed")
    return [msgspec.json.decode(r.body) for r in await audit.read(1, 100_000) if r.kind == kind]


# -- commands ------------------------------------------------------------------------------------


async def test_by_default_a_device_answers_status_and_refuses_every_other_unsigned_command(
        bus: NATS, tmp_path: Path) -> None:
    config = make_config(tmp_path, server_url(bus), **rules_only())
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        status = await send_command(bus, DEVICE, "status", timeout=2)
        assert status.all_ok and status.replies[0].result["device"] == DEVICE
        for verb, body in [("pause", {}), ("config.apply", {"config": {}}), ("audit.resend", {"from_seq": 1}),
                           ("model.rollback", {"name": "x"})]:
            got = await send_command(bus, DEVICE, verb, body, timeout=2)
            [reply] = got.replies
            assert not reply.ok and reply.error is not None and reply.error.code == "unauthorized", reply
            assert "trusts no operator key" in reply.error.message
        # Even a signed one: with no trusted keys there is no one to trust.
        got = await send_command(bus, DEVICE, "pause", timeout=2, seed=OPERATOR_SEED)
        assert got.replies[0].error is not None and got.replies[0].error.code == "unauthorized"
        assert not runtime.paused
        # Refusals are aggregated: one audit record a second at most, never one per message.
        await wait_until(lambda: runtime.fleet is not None and not runtime.fleet.refusals.pending, within=3,
                         what="the refusal window flushed")
        refused = await records(runtime, "command_refused")
        assert sum(r["counts"].get("unauthorized", 0) for r in refused) == 5
        assert len(refused) <= 2


async def test_a_trusted_operator_signs_and_the_device_obeys(bus: NATS, tmp_path: Path) -> None:
    config = make_config(tmp_path, server_url(bus), **rules_only(trusted_keys=[OPERATOR]))
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        got = await send_command(bus, DEVICE, "pause", {"reason": "drill"}, timeout=2, seed=OPERATOR_SEED)
        assert got.all_ok and runtime.paused
        unsigned = await send_command(bus, DEVICE, "resume", timeout=2)
        assert unsigned.replies[0].error is not None and unsigned.replies[0].error.code == "unauthorized"
        intruder = await send_command(bus, DEVICE, "resume", timeout=2, seed=INTRUDER_SEED)
        assert intruder.replies[0].error is not None and intruder.replies[0].error.code == "unauthorized"
        assert runtime.paused
        [command] = [r for r in await records(runtime, "command") if r["verb"] == "pause"]
        assert command["ok"] and command["signer"] == OPERATOR


def legacy_headers(seed: bytes, subject: str, body: bytes) -> dict[str, str]:
    """A signature over `subject\\nts\\nnonce\\nbody` without the domain prefix: exactly what a hub
    that picks the login nonce gets back from a client that logs in with the operator's nkey."""
    timestamp, nonce = str(time.time_ns()), "n" * 16
    data = b"\n".join((subject.encode(), timestamp.encode(), nonce.encode(), body))
    return {H_SIGNER: public_key_of(seed), H_TIMESTAMP: timestamp, H_NONCE: nonce, H_SIGNATURE: sign(seed, data)}


async def test_a_signature_over_the_unprefixed_bytes_is_refused(bus: NATS, tmp_path: Path) -> None:
    config = make_config(tmp_path, server_url(bus), **rules_only(trusted_keys=[OPERATOR]))
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        subject, body = f"edge.{DEVICE}.cmd.pause", b"{}"
        reply = await bus.request(subject, body, headers=legacy_headers(OPERATOR_SEED, subject, body), timeout=2)
        answer = msgspec.json.decode(reply.data)
        assert answer["ok"] is False and answer["error"]["code"] == "unauthorized"
        assert "bad signature" in answer["error"]["message"]
        assert not runtime.paused
        # The same command, domain-separated, is obeyed.
        reply = await bus.request(subject, body, headers=sign_command(OPERATOR_SEED, subject, body), timeout=2)
        assert msgspec.json.decode(reply.data)["ok"] is True and runtime.paused


def test_model_signatures_are_domain_separated_too() -> None:
    sha = "ab" * 32
    assert verify_artifact(sha, sign_model(OPERATOR_SEED, sha), [INTRUDER, OPERATOR]) == OPERATOR
    with pytest.raises(CommandError) as raw:
        verify_artifact(sha, sign(OPERATOR_SEED, sha.encode()), [OPERATOR])
    assert raw.value.code == "bad_signature"
    # A command signature is not a model signature, even over the same text.
    with pytest.raises(CommandError):
        verify_artifact(sha, sign_command(OPERATOR_SEED, sha, b"")[H_SIGNATURE], [OPERATOR])


def test_a_creds_file_is_refused_as_a_signing_key(tmp_path: Path) -> None:
    seed = OPERATOR_SEED.decode()
    creds = tmp_path / "operator.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOi.x.y\n------END NATS USER JWT------\n\n"
                     "-----BEGIN USER NKEY SEED-----\n" + seed + "\n------END USER NKEY SEED------\n")
    with pytest.raises(CommandError) as refused:
        load_seed(creds)
    assert refused.value.code == "bad_seed" and ".creds" in refused.value.message
    disguised = tmp_path / "operator.nk"
    disguised.write_text(creds.read_text())
    with pytest.raises(CommandError):
        load_seed(disguised)
    bare = tmp_path / "bare.nk"
    bare.write_text(seed + "\n")
    assert load_seed(bare) == OPERATOR_SEED


def test_a_command_replayed_after_a_clock_rollback_across_a_restart_is_refused(tmp_path: Path) -> None:
    window = 300 * 10**9
    now = [10_000 * 10**9]
    subject, body = f"edge.{DEVICE}.cmd.pause", b"{}"
    captured = sign_command(OPERATOR_SEED, subject, body, timestamp_ns=now[0])
    verifier = CommandVerifier(clock=lambda: now[0])
    assert verifier.verify_command(subject, body, captured, [OPERATOR]) == OPERATOR
    # Later commands raise the operator's high-water mark; the captured one's nonce is long forgotten.
    now[0] += 3 * window
    later = sign_command(OPERATOR_SEED, subject, body, timestamp_ns=now[0])
    verifier.verify_command(subject, body, later, [OPERATOR])
    state = tmp_path / "nonces.json"
    state.write_bytes(verifier.export())
    # Restart with the clock rolled back to when the command was captured.
    now[0] = int(captured[H_TIMESTAMP]) + 1
    restarted = CommandVerifier(clock=lambda: now[0])
    restarted.load(state.read_bytes())
    with pytest.raises(CommandError) as replay:
        restarted.verify_command(subject, body, captured, [OPERATOR])
    assert replay.value.code == "replayed" and "clock rollback" in replay.value.message
    # The legitimate path: a fresh command signed now (by the rolled-back clock) is refused too,
    # as it looks older than what was seen; one signed at the true time passes.
    fresh = sign_command(OPERATOR_SEED, subject, body, timestamp_ns=now[0] + 1)
    with pytest.raises(CommandError):
        restarted.verify_command(subject, body, fresh, [OPERATOR])
    now[0] = int(later[H_TIMESTAMP]) + 10**9
    on_time = sign_command(OPERATOR_SEED, subject, body, timestamp_ns=now[0])
    assert restarted.verify_command(subject, body, on_time, [OPERATOR]) == OPERATOR


async def test_a_captured_command_is_refused_after_a_real_restart(bus: NATS, tmp_path: Path) -> None:
    config = make_config(tmp_path, server_url(bus), **rules_only(trusted_keys=[OPERATOR]))
    subject, body = f"edge.{DEVICE}.cmd.pause", b"{}"
    captured = sign_command(OPERATOR_SEED, subject, body)
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        assert msgspec.json.decode((await bus.request(subject, body, headers=captured, timeout=2)).data)["ok"]
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        again = msgspec.json.decode((await bus.request(subject, body, headers=captured, timeout=2)).data)
        assert again["ok"] is False and again["error"]["code"] == "replayed"


# -- replies -------------------------------------------------------------------------------------


async def test_replies_go_only_to_inbox_subjects(bus: NATS, tmp_path: Path) -> None:
    config = make_config(tmp_path, server_url(bus), **rules_only(trusted_keys=[OPERATOR]))
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        decisions = await Collector().start(bus, DECISIONS)
        targets = [f"audit.{DEVICE}", f"edge.{DEVICE}.decision.other", "actuators.pump.stop", "_INBOXevil.x"]
        hijacked = Collector()
        for target in targets:
            await hijacked.start(bus, target)
        for target in targets:
            await bus.publish("sensors.p1.pump", encode(NORMAL), reply=target)
            await bus.publish(f"edge.{DEVICE}.cmd.status", b"{}", reply=target)
        await decisions.wait_for(len(targets))  # every input was still decided and published
        # The legitimate path: a reply to an inbox (and to `_INBOX_<suffix>`) arrives.
        reply = await bus.request("sensors.p1.pump", encode(NORMAL), timeout=2)
        assert msgspec.json.decode(reply.data)["action"] == "none"
        ops = await connect(server_url(bus), inbox_prefix="_INBOX_ops")
        status = await ops.request(f"edge.{DEVICE}.cmd.status", b"{}", timeout=2)
        assert msgspec.json.decode(status.data)["ok"] is True
        await server_barrier(bus)
        # (the audit subject does carry the uploader's own records, each with its Nats-Msg-Id)
        assert [m for m in hijacked.messages if not (m.headers and "Nats-Msg-Id" in m.headers)] == []
        assert runtime.replies.refused == len(targets)
        assert runtime.fleet.replies.refused == len(targets)
        await ops.close()


# -- approvals -----------------------------------------------------------------------------------

SHUTDOWN = {"approval": "required", "approval_timeout_ms": 2500, "instead": "hold"}


def approval_config(tmp_path: Path, url: str) -> Any:
    return make_config(tmp_path, url, pipeline={"ladder": ["rules"], "model": "", "actions": {
        "shutdown": SHUTDOWN, "hold": {}}}, models=[], fleet={"trusted_keys": [OPERATOR],
                                                             "approver_keys": [APPROVER]})


class Approvers:
    """Answers every approval request with whatever `answers` says, in order (forgers first)."""

    def __init__(self, nc: NATS, answers: list[tuple[bytes | None, dict[str, Any]]]) -> None:
        self.nc = nc
        self.answers = answers
        self.requests: list[Msg] = []

    async def start(self) -> Approvers:
        await self.nc.subscribe(APPROVALS, cb=self.on_request)
        await server_barrier(self.nc)
        return self

    async def on_request(self, msg: Msg) -> None:
        self.requests.append(msg)
        decision_id = msgspec.json.decode(msg.data)["decision_id"]
        assert msg.reply
        for seed, answer in self.answers:
            body = msgspec.json.encode(answer)
            headers = sign_approval(seed, decision_id, body) if seed is not None else None
            await self.nc.publish(msg.reply, body, headers=headers)


async def test_forged_and_miskeyed_approvals_change_nothing_and_a_signed_one_settles(
        bus: NATS, tmp_path: Path) -> None:
    forged = [(None, {"approved": True, "by": "shift-lead"}), (INTRUDER_SEED, {"approved": True, "by": "shift-lead"})]
    async with Runtime(approval_config(tmp_path, server_url(bus))) as runtime:
        decisions = await Collector().start(bus, DECISIONS)
        approvers = await Approvers(bus, [*forged, (APPROVER_SEED, {"approved": False, "by": "Ana", "reason": "no"})]
                                    ).start()
        await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
        await bus.publish("sensors.p1.pump", encode(CRITICAL))
        [decision] = await decisions.wait_for(1, within=5)
        # The forgers answered first; only the approver's signed "no" counted.
        assert decision["governance"]["status"] == "denied" and decision["action"] == "hold"
        assert decision["governance"]["by"] == APPROVER and decision["governance"]["by_name"] == "Ana"
        assert runtime.approvals.refusals.totals["unauthorized"] == 2
        assert len(approvers.requests) == 1


async def test_with_only_forged_answers_the_request_times_out(bus: NATS, tmp_path: Path) -> None:
    forged = [(None, {"approved": True, "by": "shift-lead"})] * 20 + [(INTRUDER_SEED, {"approved": True})] * 20
    async with Runtime(approval_config(tmp_path, server_url(bus))) as runtime:
        decisions = await Collector().start(bus, DECISIONS)
        await Approvers(bus, forged).start()
        await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
        started = time.monotonic()
        await bus.publish("sensors.p1.pump", encode(CRITICAL))
        [decision] = await decisions.wait_for(1, within=6)
        assert decision["governance"]["status"] == "timeout" and decision["action"] == "hold"
        assert time.monotonic() - started >= SHUTDOWN["approval_timeout_ms"] / 1000 * 0.9
        await wait_until(lambda: not runtime.approvals.refusals.pending, within=3, what="the refusals flushed")
        refused = await records(runtime, "approval_refused")
        assert sum(sum(r["counts"].values()) for r in refused) == 40
        assert len(refused) <= 4  # aggregated per second, never one record per forged answer


async def test_a_signed_answer_replayed_for_another_decision_is_refused(bus: NATS, tmp_path: Path) -> None:
    captured: list[tuple[dict[str, str], bytes]] = []

    async def approve_first_then_replay(msg: Msg) -> None:
        assert msg.reply
        decision_id = msgspec.json.decode(msg.data)["decision_id"]
        if not captured:
            body = msgspec.json.encode({"approved": True, "by": "Ana"})
            captured.append((sign_approval(APPROVER_SEED, decision_id, body), body))
        headers, body = captured[0]
        await bus.publish(msg.reply, body, headers=headers)

    async with Runtime(approval_config(tmp_path, server_url(bus))) as runtime:
        decisions = await Collector().start(bus, DECISIONS)
        await bus.subscribe(APPROVALS, cb=approve_first_then_replay)
        await server_barrier(bus)
        await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
        await bus.publish("sensors.p1.pump", encode({**CRITICAL, "asset": "first"}))
        await decisions.wait_for(1, within=5)
        await bus.publish("sensors.p1.pump", encode({**CRITICAL, "asset": "second"}))
        first, second = await decisions.wait_for(2, within=6)
        assert first["governance"]["status"] == "approved" and first["action"] == "shutdown"
        assert second["governance"]["status"] == "timeout" and second["action"] == "hold"
        assert runtime.approvals.refusals.totals["unauthorized"] == 1


async def test_the_lab_opt_in_accepts_unsigned_commands_and_answers_and_says_so(
        bus: NATS, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, server_url(bus), pipeline={"ladder": ["rules"], "model": "", "actions": {
        "shutdown": SHUTDOWN, "hold": {}}}, models=[],
        fleet={"allow_unsigned": True, "trusted_keys": [], "approver_keys": []})
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await runtime.fleet.wait_attached()
        assert "allow_unsigned = true" in caplog.text
        decisions = await Collector().start(bus, DECISIONS)
        await Approvers(bus, [(None, {"approved": True, "by": "lab-user"})]).start()
        await bus.publish("sensors.p1.pump", encode(CRITICAL))
        [decision] = await decisions.wait_for(1, within=5)
        assert decision["governance"]["status"] == "approved" and decision["governance"]["by"] == "lab-user"
        got = await send_command(bus, DEVICE, "pause", timeout=2)
        assert got.all_ok and runtime.paused
        [trust] = await records(runtime, "trust")
        assert trust["allow_unsigned"] is True


def test_signatures_are_not_nats_login_signatures() -> None:
    """The bytes we sign can never be a server nonce: they begin with 0xFF, which no text does."""
    from edge.fleet import command_bytes

    data = command_bytes("edge.x.cmd.pause", "1", "nonce", b"{}")
    assert data[0] == 0xFF
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    kp = nkeys.from_seed(OPERATOR_SEED)
    login = kp.sign(b"server-chosen-nonce")  # what nats-py sends at login
    headers = {H_SIGNER: OPERATOR, H_TIMESTAMP: str(time.time_ns()), H_NONCE: "server-chosen-nonce"[:16],
               H_SIGNATURE: base64.b64encode(login).decode()}
    with pytest.raises(CommandError):
        CommandVerifier().verify_command("edge.x.cmd.pause", b"{}", headers, [OPERATOR])


async def test_floods_of_unsigned_commands_and_forged_answers_leave_a_few_records(bus: NATS, tmp_path: Path) -> None:
    """10,000 unsigned commands and 10,000 forged approval answers: the device answers every command,
    settles the approval by its signed answer only, stays responsive, and writes fewer than 30 records."""
    config = approval_config(tmp_path, server_url(bus))
    flood = 10_000
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None and runtime.audit is not None
        await runtime.fleet.wait_attached()
        await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
        before = runtime.audit.last_seq
        inbox = bus.new_inbox()
        answers: list[Msg] = []
        done = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            answers.append(msg)
            if len(answers) >= flood:
                done.set()

        await bus.subscribe(inbox, cb=on_answer)

        async def forge_then_answer(msg: Msg) -> None:
            assert msg.reply
            decision_id = msgspec.json.decode(msg.data)["decision_id"]
            for i in range(flood):
                await bus.publish(msg.reply, msgspec.json.encode({"approved": True, "by": f"forger-{i}"}))
            body = msgspec.json.encode({"approved": False, "by": "Ana"})
            await bus.publish(msg.reply, body, headers=sign_approval(APPROVER_SEED, decision_id, body))

        await bus.subscribe(APPROVALS, cb=forge_then_answer)
        decisions = await Collector().start(bus, DECISIONS)
        await bus.publish("sensors.p1.pump", encode(CRITICAL))
        for _ in range(flood):
            await bus.publish(f"edge.{DEVICE}.cmd.pause", b"{}", reply=inbox)
        await asyncio.wait_for(done.wait(), 30)
        [decision] = await decisions.wait_for(1, within=10)
        assert decision["governance"]["status"] == "denied" and decision["governance"]["by"] == APPROVER
        codes = Counter(msgspec.json.decode(m.data)["error"]["code"] for m in answers)
        assert set(codes) <= {"unauthorized", "busy"} and codes["unauthorized"] > 0
        # Still responsive: a status round trip and an input's decision.
        assert (await send_command(bus, DEVICE, "status", timeout=2)).all_ok
        assert msgspec.json.decode((await bus.request("sensors.p1.pump", encode(NORMAL), timeout=2)).data)
        await wait_until(lambda: not runtime.fleet.refusals.pending and not runtime.approvals.refusals.pending,
                         within=3, what="the refusals flushed")
        refused = await records(runtime, "command_refused")
        forged = await records(runtime, "approval_refused")
        assert sum(sum(r["counts"].values()) for r in refused) == flood
        assert sum(sum(r["counts"].values()) for r in forged) == flood
        written = runtime.audit.last_seq - before
        assert written < 30, f"{written} audit records for {2 * flood} hostile messages"
        assert not runtime.paused

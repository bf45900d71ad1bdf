"""The device's side of the fleet (SPEC §8): command handlers, heartbeat and `$SRV` registration.

`Fleet` depends on a `Device` (a small protocol of what it needs of the runtime), never on the
runtime itself. The one exception to signed commands is `edge.<device>.cmd.status` on the *local*
bus (when it is not the upstream one): a read-only probe for `edge status` on the gateway itself.

`model.deploy` checks the sha256 of the fetched object's bytes against the command's before
anything is unpacked; with trusted keys, `signature` is checked before anything is fetched. The
object is read chunk by chunk and refused as soon as it exceeds the size its info declares (which
is checked against MAX_OBJECT_BYTES first). Fetching, unpacking, verifying and warming up happen
before the fleet's lock is taken, so a slow or hanging model holds up no other command; only the
swap itself is serialised. Any failure leaves the serving model untouched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import hashlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, assert_never

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from models import ModelError, load_manifest
from sync import Uploader

from .._codec import MSGPACK
from .._config import Config, config_sha256, encode_config
from .._errors import CommandError, quoted
from .._files import write_atomically
from .._messages import Heartbeat
from .._natsutil import client_of, server_barrier, stop_service_quietly
from .._replies import RefusalTally, ReplyPolicy
from .._version import version

if TYPE_CHECKING:
    from nats.js.api import ObjectInfo
    from nats.js.client import JetStreamContext
    from nats.micro.request import Request
    from nats.micro.service import Service

    from models import Model


from ._archive import MAX_ARCHIVE_BYTES, pushed_config, read_object_marker, unpack_model_archive, write_signature
from ._convergence import Convergence
from ._desired import ConfigIntent, Desired, ModelIntent, PausedIntent, model_steps
from ._protocol import (
    VERBS,
    WIRE_JSON,
    AuditResend,
    Command,
    ConfigApply,
    ConfigGet,
    ConfigRollback,
    ErrorInfo,
    ModelDeploy,
    ModelPromote,
    ModelRollback,
    Pause,
    Reply,
    Report,
    Resume,
    Status,
    SyncNow,
    decode_command,
    encode_reply,
    unknown_verb,
    verb_of,
)
from ._signing import CommandVerifier, is_signed, verify_artifact

log = logging.getLogger("edge.fleet")

MAX_IN_FLIGHT = 32  # commands being handled at once; more get `busy` (memory stays bounded)
READS_EVERY_S = 60  # read-only commands (status, config.get) are audited as one record a minute, counted
MAX_OBJECT_BYTES = MAX_ARCHIVE_BYTES  # a model object's declared size, checked before a byte is fetched
FETCH_PENDING_BYTES = 32 * 1024 * 1024  # chunks the client may buffer while we read them
FETCH_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0



class Deployer(Protocol):
    """The model lifecycle a Fleet drives (`model.deploy`, `model.promote`, `model.rollback`)."""

    def store_dir(self, name: str, version: str) -> Path: ...

    async def load(self, name: str, folder: Path) -> Model:
        """Verify, load and warm up (bounded) the model in `folder`; nothing is served yet."""
        ...

    async def deploy(self, name: str, folder: Path, mode: Literal["active", "shadow"] = "active", *,
                     by: str = "", model: Model | None = None) -> dict[str, Any]: ...

    async def promote(self, name: str, *, by: str = "") -> dict[str, Any]: ...

    async def rollback(self, name: str, *, by: str = "") -> dict[str, Any]: ...

    def serving(self, name: str) -> tuple[str | None, str | None]:
        """The versions of `name` serving as active and as shadow (None: none)."""
        ...


class Device(Protocol):
    """What a Fleet needs of the device it speaks for: everything else of the runtime stays out of reach."""

    device: str
    config: Config
    data_dir: Path
    paused: bool
    local: NATS | None  # for the read-only status probe on the local bus
    upstream: NATS | None
    uploader: Uploader | None
    link_epoch: int  # +1 each time the upstream link comes back without the connection reconnecting (leaf mode)

    @property
    def deployments(self) -> Deployer: ...

    async def wait_upstream(self) -> NATS:
        """The upstream connection, once there is one."""
        ...

    def heartbeat(self) -> Heartbeat: ...

    def status(self) -> dict[str, Any]: ...

    def record(self, kind: str, body: dict[str, Any]) -> None:
        """Audit an event (never raises)."""
        ...

    async def apply_config(self, new: Config, *, by: str = "") -> dict[str, Any]: ...

    async def rollback_config(self, *, by: str = "") -> dict[str, Any]: ...

    def pause(self, by: str = "", reason: str = "") -> None: ...

    def resume(self, by: str = "", reason: str = "") -> None: ...



class FleetState(enum.Enum):
    NEW = "new"
    WAITING = "waiting"  # for the upstream connection
    RUNNING = "running"
    STOPPED = "stopped"


class Fleet:
    """Command handlers, heartbeat and `$SRV` registration of one device; `async with Fleet(device)`."""

    def __init__(self, host: Device) -> None:
        self.host = host
        self.device = host.device
        self.state = FleetState.NEW
        self.verifier = CommandVerifier()
        self.counts: Counter[str] = Counter()  # "ok" or the error code
        # Refusals of unauthenticated commands: one audit record a second at most, whoever floods us.
        self.refusals = RefusalTally("command_refused", host.record)
        # Read-only commands: a dashboard polling `status` must not flood the audit log.
        self.reads = RefusalTally("command_reads", host.record)
        self.convergence = Convergence(host, self.apply_desired, self.status_result)
        self.replies = ReplyPolicy(host.config.nats.reply_prefixes)
        self.heartbeats = 0
        self._nc: NATS | None = None
        self._subs: dict[str, Subscription] = {}
        self._local_sub: Subscription | None = None
        self._service: Service | None = None
        self._service_groups: list[str] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._mutating = asyncio.Lock()  # one change of config or models at a time
        self._preparing: dict[tuple[str, str], asyncio.Lock] = {}  # (name, version) being fetched and loaded
        self._saving = asyncio.Lock()  # one write of the replay state at a time
        self._attached = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None  # waits for the upstream connection, then attaches
        self._converger: asyncio.Task[None] | None = None  # follows the desired state (edge.fleet._convergence)
        self._stop = asyncio.Event()

    @property
    def nonce_file(self) -> Path:
        """Where the replay state (per-signer high-water marks and recent nonces) is kept."""
        return self.host.data_dir / "fleet" / "nonces.json"

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        self.state = FleetState.WAITING
        self._announce_trust()
        with contextlib.suppress(FileNotFoundError):
            self.verifier.load(await asyncio.to_thread(self.nonce_file.read_bytes))
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        host = self.host
        try:
            if host.local is not None and host.config.nats.upstream and not host.config.nats.leaf:
                # The local bus is a separate connection (in leaf mode it is the upstream one):
                # answer only the read-only status probe there.
                self._local_sub = await host.local.subscribe(f"edge.{self.device}.cmd.status",
                                                             cb=self._on_local_status)
            if host.upstream is not None and host.upstream.is_connected:
                try:
                    await self._attach(host.upstream)  # ready as soon as `async with` returns
                except nats.errors.Error as exc:  # (nats' TimeoutError included) retried by _follow_upstream
                    log.warning("fleet: cannot subscribe upstream yet: %s", exc)
                    await self._detach()
        except BaseException:
            self._stop.set()
            await self._tasks.__aexit__(None, None, None)
            raise
        self._follower = self._tasks.create_task(self._follow_upstream(), name=f"fleet-upstream-{self.device}")
        self._tasks.create_task(self._heartbeat_forever(), name=f"fleet-heartbeat-{self.device}")
        self._tasks.create_task(self._flush_refusals_every_second(), name=f"fleet-refusals-{self.device}")
        self._converger = self._tasks.create_task(self.convergence.run(self._stop),
                                                  name=f"fleet-desired-{self.device}")
        return self

    def _announce_trust(self) -> None:
        fleet = self.host.config.fleet
        if fleet.allow_unsigned:
            log.warning("fleet.allow_unsigned = true: device %s obeys UNSIGNED commands from anyone on the bus "
                        "(labs and demos only)", self.device)
            self.host.record("trust", {"allow_unsigned": True, "trusted_keys": len(fleet.trusted_keys)})
        elif not fleet.trusted_keys:
            log.warning("fleet.trusted_keys is empty: device %s answers `status` and refuses every other command",
                        self.device)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.state is FleetState.STOPPED:
            return
        self.state = FleetState.STOPPED
        self._stop.set()
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()  # it may be waiting for an upstream that never came
        if self._converger is not None:
            self._converger.cancel()  # likewise; a change it was making is left as a cancelled command leaves it
        await self._detach()
        if self._local_sub is not None:
            await _unsubscribe(self._local_sub)
            self._local_sub = None
        # Commands in progress finish (bounded): a deploy half done is cancelled, which leaves the old model.
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
        if self._tasks is not None:
            await self._tasks.__aexit__(None, None, None)
            self._tasks = None

    async def wait_attached(self) -> None:
        """Until the command subscriptions are live on an upstream connection."""
        await self._attached.wait()

    async def _follow_upstream(self) -> None:
        # The device connects upstream in the background: wait for it, then attach (retrying with
        # backoff if the link fails while we subscribe). nats-py keeps our subscriptions across its
        # own reconnects, so one successful attach holds for the connection's life.
        upstream = await self.host.wait_upstream()
        delay = 0.25
        while self._nc is None and not self._stop.is_set():
            try:
                await self._attach(upstream)
            except nats.errors.Error as exc:
                log.warning("fleet: cannot subscribe upstream yet: %s", exc)
                await self._detach()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)  # pace: retry backoff
                delay = min(delay * 2, 5.0)

    async def _attach(self, nc: NATS) -> None:
        self._nc = nc
        for subject in self._wanted_subjects():
            self._subs[subject] = await nc.subscribe(subject, cb=self._on_command)
        await server_barrier(nc)  # the server has our SUBs: commands sent from now on reach us
        await self._register_service(nc)
        self.state = FleetState.RUNNING
        self._attached.set()
        log.info("fleet: device %s answering %s", self.device, ", ".join(self._subs))
        self._publish_heartbeat()

    async def _detach(self) -> None:
        self._attached.clear()
        for sub in self._subs.values():
            await _unsubscribe(sub)
        self._subs.clear()
        await self._stop_service()
        self._nc = None
        if self.state is FleetState.RUNNING:
            self.state = FleetState.WAITING

    def _wanted_subjects(self) -> list[str]:
        groups = self.host.config.groups
        return [f"edge.{self.device}.cmd.>", *(f"edge.group.{g}.cmd.>" for g in groups), "edge.all.cmd.>"]

    async def _sync_subscriptions(self) -> None:
        """After a config change: follow the device's groups (subscriptions and `$SRV` metadata)."""
        nc = self._nc
        if nc is None:
            return
        wanted = self._wanted_subjects()
        for subject in [s for s in self._subs if s not in wanted]:
            await _unsubscribe(self._subs.pop(subject))
        for subject in [s for s in wanted if s not in self._subs]:
            self._subs[subject] = await nc.subscribe(subject, cb=self._on_command)
        await server_barrier(nc)
        if self._service_groups != list(self.host.config.groups):
            await self._stop_service()
            await self._register_service(nc)

    async def _register_service(self, nc: NATS) -> None:
        from nats.micro import add_service

        groups = list(self.host.config.groups)
        # add_service() ends with a flush(); run it only right after a barrier has proven the link
        # answers, as a flush that times out breaks nats-py 2.16's connection (see _natsutil).
        service = await add_service(nc, name="edge", version=version(), description="edge orchestrator runtime",
                                    metadata={"device_id": self.device, "groups": ",".join(groups)})
        # A cheap summary (what heartbeats say) for `$SRV.INFO` discovery; commands stay on `.cmd.`.
        await service.add_endpoint(name="status", subject=f"edge.{self.device}.svc.status",
                                   handler=self._on_service_status)
        self._service, self._service_groups = service, groups

    async def _stop_service(self) -> None:
        # Not Service.stop(): it drains each of its nine subscriptions with a flush() — up to 10 s
        # apiece on a dead link, and a timed-out flush breaks the connection (see _natsutil).
        # Unsubscribing is all a stop needs from the server.
        service, self._service = self._service, None
        if service is None:
            return
        await stop_service_quietly(service)

    # -- heartbeat -------------------------------------------------------------------------------

    async def _flush_refusals_every_second(self) -> None:
        seconds = 0
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)  # pace: one record a second at most
                self.refusals.flush()
                self.convergence.refusals.flush()
                seconds += 1
                if seconds % READS_EVERY_S == 0:
                    self.reads.flush()
        finally:
            self.refusals.flush()
            self.convergence.refusals.flush()
            self.reads.flush()

    async def _heartbeat_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.host.config.fleet.heartbeat_s)
            if not self._stop.is_set():
                self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # never buffered: a heartbeat replayed after an outage would say the wrong thing
        payload = WIRE_JSON.encode(self.host.heartbeat())
        assert self._tasks is not None
        self._tasks.create_task(self._publish(nc, f"edge.{self.device}.heartbeat", payload))
        self.heartbeats += 1

    @staticmethod
    async def _publish(nc: NATS, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            await nc.publish(subject, payload, headers=headers)
        except nats.errors.Error as exc:
            log.debug("fleet: publish to %s failed: %s", subject, exc)

    # -- commands --------------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        # nats-py runs one subscription's callbacks one after another: hand each command to a task,
        # so a slow deploy does not hold up a status request.
        await self._start_handler(msg, local=False)

    async def _on_local_status(self, msg: Msg) -> None:
        await self._start_handler(msg, local=True)

    async def _start_handler(self, msg: Msg, *, local: bool) -> None:
        if self._tasks is None or self._stop.is_set():
            return
        if len(self._handlers) >= MAX_IN_FLIGHT:
            verb = verb_of(msg.subject)
            error = CommandError("busy", f"{len(self._handlers)} commands already in progress; try again")
            reply = self._failed(verb, msg.subject, error, by="", signer="", accepted=False)
            await self._answer(msg, reply)
            return
        task = self._tasks.create_task(self._serve(msg, local=local))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, msg: Msg, *, local: bool) -> None:
        reply = await self.execute(msg.subject, msg.data, msg.headers, unsigned_ok=local)
        await self._answer(msg, reply)

    async def _answer(self, msg: Msg, reply: Reply) -> None:
        if not msg.reply:
            return
        if not self.replies.allows(msg.reply):
            log.debug("fleet: reply to %.200s refused (not under nats.reply_prefixes)", msg.reply)
            return
        content_type = msg.headers.get("Content-Type", "") if msg.headers else ""
        headers = {"Content-Type": MSGPACK} if content_type == MSGPACK else None
        await self._publish(client_of(msg), msg.reply, encode_reply(reply, content_type), headers)

    async def execute(self, subject: str, body: bytes, headers: Mapping[str, str] | None = None, *,
                      unsigned_ok: bool = False) -> Reply:
        """Authenticate, decode, run and audit one command; never raises (the reply says what went wrong)."""
        verb = verb_of(subject)
        signer, by = "", ""
        accepted = False  # authenticated (or read-only): its outcome is audited one by one
        try:
            if verb not in VERBS:
                raise unknown_verb(verb)
            self._authenticate(subject, verb, body, headers, local=unsigned_ok)
            signer = headers.get("Edge-Signer", "") if headers and is_signed(headers) else ""
            if signer and self.host.config.fleet.trusted_keys:
                await self._save_replay_state()
            accepted = True
            content_type = headers.get("Content-Type", "") if headers else ""
            command = decode_command(verb, body, content_type)
            by = command.by or signer
            if unsigned_ok and not isinstance(command, Status):
                raise CommandError("unauthorized", "only `status` is answered on the local bus")
            result = await self._dispatch(command, by, signer)
            read_only = isinstance(command, Status | ConfigGet)
        except CommandError as error:
            return self._failed(verb, subject, error, by=by, signer=signer, accepted=accepted)
        except Exception as exc:  # a bug must cost one command, never the subscription: log it, say so
            log.exception("fleet: %s failed unexpectedly", verb)
            return self._failed(verb, subject, CommandError("internal", f"{type(exc).__name__}: {exc}"),
                                by=by, signer=signer, accepted=accepted)
        self.counts["ok"] += 1
        if read_only:  # counted, and recorded once a minute with who asked (never one record per poll)
            self.reads.add(verb, f"by {by or signer or 'anyone (unsigned)'}")
        else:
            self._audit(verb, subject, ok=True, by=by, signer=signer)
        return Reply(ok=True, device=self.device, verb=verb, result=result)

    def _authenticate(self, subject: str, verb: str, body: bytes, headers: Mapping[str, str] | None, *,
                      local: bool) -> None:
        """Default deny: only `status` is read without a signature; everything else needs one by a
        trusted key, unless `fleet.allow_unsigned` says otherwise. Raises CommandError."""
        if local or (verb == "status" and not is_signed(headers)):
            return
        fleet = self.host.config.fleet
        if fleet.trusted_keys and (is_signed(headers) or not fleet.allow_unsigned):
            self.verifier.verify_command(subject, body, headers, fleet.trusted_keys)
        elif not fleet.allow_unsigned:
            raise CommandError("unauthorized", "this device trusts no operator key (fleet.trusted_keys is empty): "
                                               "it answers `status` only")

    def _failed(self, verb: str, subject: str, error: CommandError, *, by: str, signer: str,
                accepted: bool = True) -> Reply:
        self.counts[error.code] += 1
        if accepted:
            self._audit(verb, subject, ok=False, by=by, signer=signer, code=error.code, message=error.message)
        else:
            self.refusals.add(error.code, f"{verb or subject[:100]}: {error.message}")
        log.info("fleet: %.100s refused: %.300s", verb or subject, error)
        return Reply(ok=False, device=self.device, verb=verb, error=ErrorInfo(error.code, error.message))

    def _audit(self, verb: str, subject: str, *, ok: bool, by: str, signer: str, code: str = "",
               message: str = "") -> None:
        body: dict[str, Any] = {"verb": verb, "subject": subject, "ok": ok}
        for key, value in (("by", by), ("signer", signer), ("code", code), ("message", message[:512])):
            if value:
                body[key] = value
        self.host.record("command", body)

    async def _save_replay_state(self) -> None:
        # Before the command runs, fsynced: a restart must not make a captured command replayable.
        async with self._saving:  # in order: a newer state is never overwritten by an older one
            await asyncio.to_thread(write_atomically, self.nonce_file, self.verifier.export())

    async def _dispatch(self, command: Command, by: str, signer: str) -> dict[str, Any]:
        host = self.host
        match command:
            case Status():
                return self.status_result()
            case ConfigGet():
                return {"config": encode_config(host.config, redact=True), "sha256": config_sha256(host.config)}
            case ModelDeploy():
                prepared = await self._prepare_deploy(command)  # fetched and warmed up without the lock
                async with self._mutating:
                    return await self._deploy(command, by, prepared)
            case ConfigApply() | ConfigRollback() | ModelPromote() | ModelRollback():
                async with self._mutating:
                    return await self._change(command, by)
            case Pause(reason=reason):
                host.pause(by=by, reason=reason)
                return {"paused": host.paused}
            case Resume(reason=reason):
                host.resume(by=by, reason=reason)
                return {"paused": host.paused}
            case SyncNow(timeout_s=timeout_s):
                uploader = self._uploader()
                backlog = await uploader.sync_now(timeout_s)
                return {"backlog": backlog, "synced_seq": uploader.log.synced_seq, "last_seq": uploader.log.last_seq}
            case AuditResend(from_seq=from_seq, to_seq=to_seq):
                queued = self._uploader().resend(from_seq, to_seq)
                return {"queued": queued}
            case Report(since=since):
                return await asyncio.to_thread(self._value_report, since)
            case _:
                assert_never(command)

    def _value_report(self, since: str) -> dict[str, Any]:
        """`edge report`'s JSON for the last `since`, read from the local log (a reader of its own)."""
        from sync import iter_records

        from .._config import parse_duration
        from .._report import value_report

        try:
            since_ns = time.time_ns() - int(parse_duration(since) * 1e9)
        except ValueError as exc:
            raise CommandError("bad_command", f"report: since: {exc}") from None
        value = self.host.config.value
        report = value_report(iter_records(self.host.data_dir / "audit.db"), since_ns=since_ns,
                              cloud_call_cost=value.cloud_call_cost, currency=value.currency)
        result: dict[str, Any] = msgspec.to_builtins(report)
        return result

    async def _change(self, command: ConfigApply | ConfigRollback | ModelDeploy | ModelPromote | ModelRollback,
                      by: str) -> dict[str, Any]:
        """A change of config or models; the caller holds `_mutating` (one change at a time)."""
        host = self.host
        match command:
            case ConfigApply(config=data):
                return await self._apply_config(pushed_config(data, host.config), by)
            case ConfigRollback():
                result = await host.rollback_config(by=by)
                await self._sync_subscriptions()
                return result
            case ModelDeploy():
                return await self._deploy(command, by)
            case ModelPromote(name=name):
                return await host.deployments.promote(name, by=by)
            case ModelRollback(name=name):
                return await host.deployments.rollback(name, by=by)
            case _:
                assert_never(command)

    async def _apply_config(self, new: Config, by: str) -> dict[str, Any]:
        result = await self.host.apply_config(new, by=by)
        await self._sync_subscriptions()
        return result

    # -- desired state -----------------------------------------------------------------------------

    async def apply_desired(self, desired: Desired) -> list[dict[str, Any]]:
        """Bring the device to one desired value through the commands' own code paths.

        Returns what ran, `[{"verb", "result"}, ...]`: empty when the device already runs it.
        Raises CommandError when it cannot; what the device runs is then as the failed command
        left it (for a config or a model: unchanged).
        """
        host, value, by, signer = self.host, desired.value, desired.by, desired.signer
        match value:
            case PausedIntent(paused=paused, reason=reason):
                if paused == host.paused:
                    return []
                command: Command = Pause(reason=reason, by=by) if paused else Resume(reason=reason, by=by)
                return [{"verb": "pause" if paused else "resume", "result": await self._dispatch(command, by, signer)}]
            case ConfigIntent(config=data):
                async with self._mutating:
                    new = pushed_config(data, host.config)
                    if config_sha256(new) == config_sha256(host.config):
                        return []
                    return [{"verb": "config.apply", "result": await self._apply_config(new, by)}]
            case ModelIntent():
                name = desired.what.removeprefix("model.")
                async with self._mutating:
                    active, shadow = host.deployments.serving(name)
                    done = []
                    for step in model_steps(name, value, active, shadow):
                        verb = str(step.__struct_config__.tag)  # model.deploy, model.promote, model.rollback
                        done.append({"verb": verb, "result": await self._change(step, by)})
                    return done
            case None:
                return []
            case _:
                assert_never(value)

    def _uploader(self) -> Uploader:
        uploader = self.host.uploader
        if uploader is None:
            raise CommandError("unavailable", "the audit uploader is not running")
        return uploader

    def status_result(self) -> dict[str, Any]:
        """The `status` verb's result: the runtime's status, model deployments and this fleet endpoint's."""
        return {**self.host.status(), "config_sha256": config_sha256(self.host.config), "fleet": self.status()}

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "subjects": sorted(self._subs), "commands": dict(self.counts),
                "in_progress": len(self._handlers), "heartbeats": self.heartbeats,
                "signed": bool(self.host.config.fleet.trusted_keys), "nonces": len(self.verifier),
                "allow_unsigned": self.host.config.fleet.allow_unsigned, "refused": dict(self.refusals.totals),
                "replies_refused": self.replies.refused, "reads": dict(self.reads.totals),
                "desired": self.convergence.status(),
                "service_id": self._service.id if self._service is not None else None}

    async def _on_service_status(self, request: Request) -> None:
        await request.respond(WIRE_JSON.encode(self.host.heartbeat()))

    # -- model.deploy ----------------------------------------------------------------------------

    async def _deploy(self, command: ModelDeploy, by: str, prepared: _Prepared | None = None) -> dict[str, Any]:
        """Serve the model `_prepare_deploy` made ready (prepared here if not yet); the caller holds
        `_mutating`."""
        if prepared is None:
            prepared = await self._prepare_deploy(command)
        try:
            return await self.host.deployments.deploy(command.name, prepared.folder, command.mode, by=by,
                                                      model=prepared.model)
        except CommandError:
            if prepared.created:
                await asyncio.to_thread(shutil.rmtree, prepared.folder, True)
            raise

    async def _prepare_deploy(self, command: ModelDeploy) -> _Prepared:
        """All a deploy does before it changes what is served: check the signature, fetch (bounded),
        check the sha256, unpack (bounded) with the deploy record, check the manifest, then verify,
        load and warm up (bounded by warmup_timeout_ms). Takes no lock."""
        host = self.host
        name = command.name
        known = {m.name for m in host.config.models} | {p.model for p in host.config.pipelines if p.model}
        if name not in known:
            raise CommandError("unknown_model", f"model.deploy: this device has no model {quoted(name)} "
                                                f"(known: {', '.join(sorted(known)) or 'none'})")
        trusted = host.config.fleet.trusted_keys
        if trusted:
            verify_artifact(command.sha256, command.signature, trusted)  # before fetching anything
        # One preparation of a version at a time: a command and the desired state that says the same
        # thing may arrive together; the second then finds the folder the first made, not a race.
        async with self._preparing.setdefault((name, command.version), asyncio.Lock()):
            return await self._prepare_version(command)

    async def _prepare_version(self, command: ModelDeploy) -> _Prepared:
        host, name = self.host, command.name
        trusted = host.config.fleet.trusted_keys
        folder = host.deployments.store_dir(name, command.version)
        created = False
        if folder.exists():
            kept = await asyncio.to_thread(read_object_marker, folder)
            if kept != command.sha256:
                raise CommandError("version_exists", f"model.deploy: {quoted(name)} version {quoted(command.version)} "
                                                     "is already on this device with other content; deploy it under "
                                                     "a new version")
            if trusted:  # this deploy's signature, verified above, is the one checked from now on
                await asyncio.to_thread(write_signature, folder, command.signature)
        else:
            data, actual = await self._fetch(command)
            if actual != command.sha256:
                raise CommandError("checksum_mismatch", f"model.deploy: {quoted(f'{command.bucket}/{command.object}')} "
                                                        f"has sha256 {actual}, the command says {command.sha256}")
            await asyncio.to_thread(unpack_model_archive, data, folder, sha256=actual, signature=command.signature)
            created = True
        try:
            await self._check_manifest(command, folder)
            model = await host.deployments.load(name, folder)
        except CommandError:
            if created:
                await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        return _Prepared(folder, created, model)

    async def _check_manifest(self, command: ModelDeploy, folder: Path) -> None:
        try:
            manifest = await asyncio.to_thread(load_manifest, folder)
        except ModelError as exc:
            raise CommandError("bad_model", f"model.deploy: {exc}") from None
        if (manifest.name, manifest.version) != (command.name, command.version):
            raise CommandError("manifest_mismatch", f"model.deploy: the archive holds {quoted(manifest.name)} "
                                                    f"version {quoted(manifest.version)}, the command says "
                                                    f"{quoted(command.name)} version {quoted(command.version)}")

    async def _fetch(self, command: ModelDeploy) -> tuple[memoryview, str]:
        """The object's bytes and their sha256 hex; CommandError when it cannot be had within the bounds."""
        nc = self._nc or self.host.upstream
        if nc is None or not nc.is_connected:
            raise CommandError("unreachable", "model.deploy: the upstream connection is down")
        where = quoted(f"{command.bucket}/{command.object}")
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                js = nc.jetstream(domain=self.host.config.nats.js_domain)
                store = await js.object_store(command.bucket)
                info = await store.get_info(command.object)
                return await _read_object(js, command.bucket, info, where)
        except nats.js.errors.BucketNotFoundError:
            raise CommandError("not_found", f"model.deploy: no object store bucket {quoted(command.bucket)}") from None
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            raise CommandError("not_found", f"model.deploy: no object {quoted(command.object)} in "
                                            f"{quoted(command.bucket)}") from None
        except TimeoutError:
            raise CommandError("fetch_failed", f"model.deploy: fetching {where} took over {FETCH_TIMEOUT_S}s"
                               ) from None
        except nats.errors.Error as exc:
            raise CommandError("fetch_failed", f"model.deploy: fetching {where}: {type(exc).__name__}: "
                                               f"{quoted(exc)}") from None


class _Prepared(NamedTuple):
    """A deploy ready to be swapped in: the folder in the store (`created` by this deploy) and the model."""

    folder: Path
    created: bool
    model: Model


async def _read_object(js: JetStreamContext, bucket: str, info: ObjectInfo, where: str) -> tuple[memoryview, str]:
    """An object's bytes, read chunk by chunk from its stream and refused as soon as they exceed the
    size or chunk count its info declares (nats-py's `ObjectStore.get` reads for as long as the
    stream has more, so a bucket writer could stream without end before any check).

    Links are not followed (a deploy names the object itself). Returns (bytes, sha256 hex).
    """
    options = info.options
    if options is not None and options.link is not None:
        raise CommandError("bad_archive", f"model.deploy: {where} is a link to another object; deploy that object")
    size, chunks = info.size or 0, info.chunks or 0
    if size > MAX_OBJECT_BYTES:
        raise CommandError("too_large", f"model.deploy: {where} is {size} bytes (at most {MAX_OBJECT_BYTES})")
    if not info.nuid or size == 0 or not 0 < chunks <= size:
        raise CommandError("bad_archive", f"model.deploy: {where} declares {size} bytes in {chunks} chunks")
    buffer = bytearray(size)
    digest = hashlib.sha256()
    got = count = 0
    sub = await js.subscribe(f"$O.{bucket}.C.{info.nuid}", ordered_consumer=True,
                             pending_bytes_limit=FETCH_PENDING_BYTES)
    try:
        async for msg in sub.messages:
            data = msg.data
            count += 1
            if got + len(data) > size or count > chunks:
                raise CommandError("too_large", f"model.deploy: {where} streams more than the {size} bytes in "
                                                f"{chunks} chunks its info declares")
            buffer[got:got + len(data)] = data
            got += len(data)
            digest.update(data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await _unsubscribe(sub)
    if got != size:
        raise CommandError("fetch_failed", f"model.deploy: {where} ended after {got} of its {size} bytes")
    declared = (info.digest or "").partition("=")[2]
    try:
        recorded = base64.urlsafe_b64decode(declared)
    except (binascii.Error, ValueError):
        recorded = b""
    if recorded != digest.digest():
        raise CommandError("checksum_mismatch", f"model.deploy: {where} does not match the digest the object "
                                                "store recorded (corrupted in storage)")
    return memoryview(buffer), digest.hexdigest()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except nats.errors.Error as exc:  # the connection is closing or gone: nothing left to undo
        log.debug("fleet: unsubscribe %s: %s", sub.subject, exc)

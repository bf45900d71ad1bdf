"""The runtime: a tree of async context managers under one TaskGroup.

    Runtime
    ├── NatsServer            when nats.local = "embedded": a supervised nats-server child
    ├── local connection      the bus sensors and actuators use
    ├── upstream connection   the cloud (the local one when nats.upstream is empty, or in leaf
    │                         mode, where the embedded server is a leaf node of the hub and
    │                         carries every upstream exchange; JetStream via nats.upstream_domain)
    ├── ModelRegistry         verified models behind micro-batchers
    ├── AuditLog + Uploader   the write-ahead, hash-chained log and its JetStream replication
    ├── CloudLink             the cloud's reachability, fed by connection events and a probe
    ├── LoopLagMonitor        how late the event loop runs (max and p99 per second, in `status`)
    ├── Pipelines             one per config pipeline
    └── Fleet                 command handlers, heartbeat, $SRV registration

Leaving the runtime (SIGTERM/SIGINT in `edge run`) drains in the reverse order: pipelines finish
their in-flight decisions, the audit log is flushed, connections drain.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import os
import random
import stat
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from models import Model, ModelRegistry
from sync import AuditLog, AuditSigner, LogState, SyncError, Uploader, connect_for_upload

from ._approvals import ApprovalDesk
from ._config import (
    FILE_ONLY,
    TRUST_ROOTS,
    Auth,
    Config,
    PipelineConfig,
    TierRef,
    check_pushed_models,
    config_sha256,
    connect_options,
    load_config,
    local_jetstream_domain,
    parse_duration,
    parse_size,
    parse_tier,
    read_persisted_config,
    redact_url,
    write_persisted_config,
)
from ._deployments import Deployments
from ._errors import CommandError, ConfigError, Problem
from ._files import write_atomically
from ._governance import Governor
from ._ladder import CloudRequestFailed, CloudTier, Ladder, ModelTier, RaceTier, RulesTier, Tier
from ._link import BreakerState, CircuitBreaker, CloudLink, LinkState
from ._looplag import LoopLagMonitor
from ._messages import Heartbeat
from ._nats_server import LeafRemote, NatsServer
from ._pipeline import AuditSink, Pipeline, PipelineLogic, Shadow
from ._replies import ReplyPolicy
from ._rules import compile_guards, compile_rules
from ._sdnotify import DecisionRate, ServiceNotifier, status_line
from ._version import version
from .fleet import Fleet, load_seed, new_seed

log = logging.getLogger("edge.runtime")

RETENTION_CHECK_S = 60.0
# While the upstream link is down, nats-py would buffer publishes and replay them on reconnect.
# Upstream, that buffer is disabled: a cloud request fails at once (and falls through the ladder),
# and the audit stream has its own uploader that resumes from what the stream holds.
UPSTREAM_PENDING_BYTES = 0
LOCAL_PENDING_BYTES = 8 * 1024 * 1024
SYNC_ON_STOP_S = 3.0


class RuntimeState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


CATCH_UP_SHARE = 0.25
# How long records gather before a burst goes upstream (when fewer than a window's worth wait). A
# leaf link compresses each burst on its own, so there a burst should carry many records: at 400
# decisions/s, a quarter second is ~100 records and a third of the bytes of 20 ms bursts.
CLIENT_LINGER_S = 0.02
LEAF_LINGER_S = 0.25
"""After an outage the uploader catches up using this share of the loop and the cores while the
backlog shrinks (more while it still grows: it must at least keep up); the decisions still being
made need the rest (decision p50 while a 4,300-record backlog uploads: 7-8 ms at full speed,
~1.7 ms at this share; the catch-up itself runs at ~6,000 records/s)."""


class Runtime:
    """The whole device runtime for one config; `async with Runtime(config) as rt` runs it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = config.device_id
        self.state = RuntimeState.NEW
        self.started_at = 0.0
        self.paused = False
        self.data_dir = config.resolve(config.data_dir)
        self.server: NatsServer | None = None
        self.local: NATS | None = None
        self.upstream: NATS | None = None
        self.registry = ModelRegistry()
        self.deployments = Deployments(self.registry, self.data_dir, config=lambda: self.config,
                                       rebuild=self._rebuild_pipelines, record=self.record)
        self.audit: AuditLog | None = None
        self.uploader: Uploader | None = None
        self.device_signer: AuditSigner | None = None  # the device key: signs audit records upstream
        self.link = CloudLink(
            CircuitBreaker(config.link.breaker_failures, config.link.breaker_reset_ms / 1000),
            on_change=self._on_link_change,
        )
        self.provider_links: dict[str, CloudLink] = {}  # other cloud providers, by subject (_provider_link)
        self._trial_inputs: dict[str, bytes] = {}  # the last input each cloud subject was asked
        self.pipelines: dict[str, Pipeline] = {}
        self.fleet: Fleet | None = None
        self._upstream_ready = asyncio.Event()
        self.approvals = ApprovalDesk(self.device, upstream=lambda: self.upstream, link=self.link,
                                      record=self.record, approver_keys=config.fleet.approver_keys,
                                      allow_unsigned=config.fleet.allow_unsigned)
        self.replies = ReplyPolicy(config.nats.reply_prefixes)  # shared by the pipelines
        self.loop_lag = LoopLagMonitor()
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.local_url = ""
        self.upstream_url = ""
        self._link_was_online = False
        self.link_epoch = 0  # leaf mode: +1 each time the leaf link comes back (the desired-state watch restarts)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        self.state = RuntimeState.STARTING
        self.started_at = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            self.state = RuntimeState.STOPPED
            raise
        self.state = RuntimeState.RUNNING
        return self

    async def _start(self) -> None:
        await asyncio.to_thread(self._prepare_data_dir)
        self.device_signer = await asyncio.to_thread(self._load_device_key)
        self.config = config = self._with_applied_config(self.config)
        self.paused = self._paused_file.exists()
        if self.paused:
            log.warning("starting paused (%s): actions become their `instead` until resumed", self._paused_file)
        stack = self._stack
        leaf = config.nats.leaf
        if config.nats.local == "embedded":
            self.server = NatsServer(
                name=f"edge-{self.device}", store_dir=self.data_dir / "nats", port=config.nats.embedded_port,
                # Leaf mode: a JetStream domain of its own, so `$JS.API` here is never mistaken for the hub's.
                jetstream_domain=local_jetstream_domain(self.device) if leaf else "",
                leaf_remote=await asyncio.to_thread(self._leaf_remote) if leaf else None,
                mqtt_port=config.nats.mqtt_port or None)
            await stack.enter_async_context(self.server)
            self.local_url = self.server.url
            if self.server.mqtt_port is not None:
                # Beside local.url, for sensors' setup scripts when the port was left to the server (-1).
                await asyncio.to_thread(write_atomically, self.data_dir / "mqtt.url", self.server.mqtt_url.encode())
                log.info("MQTT listener on %s: topic a/b/c is subject a.b.c", self.server.mqtt_url)
        else:
            self.local_url = config.nats.local
        # For `edge status` on this machine: where to connect, never with what (the CLI reads the
        # credentials from the config file, which it must be able to read anyway).
        await asyncio.to_thread(write_atomically, self.data_dir / "local.url", redact_url(self.local_url).encode())
        self.local = await self._connect(self.local_url, config.nats.local_auth, "local", LOCAL_PENDING_BYTES)
        stack.push_async_callback(self._close_connection, self.local)
        if leaf:
            # The hub is reached through the embedded server: one connection, always up; whether the
            # leaf link is up is the probe's to judge (see _probe_forever), so the link starts offline.
            self.upstream_url = self.local_url
            self.upstream = self.local
            self._upstream_ready.set()
        elif config.nats.upstream:
            self.upstream_url = config.nats.upstream
            # Upstream may be unreachable at boot: decide locally while a task keeps trying.
            stack.push_async_callback(self._close_upstream)
        else:
            self.upstream_url = self.local_url
            self.upstream = self.local
            self._upstream_ready.set()
            self._links_restored()

        await stack.enter_async_context(self.registry)
        await self.deployments.load_configured()  # each verified (in the store) and warmed up within its bound
        await self.deployments.restore()

        audit = config.audit
        self.audit = AuditLog(
            self.data_dir / "audit.db", self.device, fsync=audit.fsync,
            commit_interval_ms=audit.commit_interval_ms, max_bytes=parse_size(audit.max_bytes),
            on_full=audit.on_full, keep_synced_s=parse_duration(audit.keep_synced),
        )
        await stack.enter_async_context(self.audit)
        self.audit.append("start", {"version": version(), "groups": config.groups,
                                    "pipelines": [p.name for p in config.pipelines]})
        self.uploader = Uploader(self.audit, self._connect_uploader, stream=audit.stream,
                                 create_stream=audit.create_stream, window=audit.sync_window,
                                 signer=self.device_signer, sign_every=audit.sign_every,
                                 stream_max_msg_size=parse_size(audit.stream_max_msg_size),
                                 stream_max_bytes=parse_size(audit.stream_max_bytes),
                                 stream_replicas=audit.stream_replicas, catch_up_share=CATCH_UP_SHARE,
                                 domain=config.nats.js_domain, wait_for_burst=config.nats.leaf,
                                 linger_s=LEAF_LINGER_S if config.nats.leaf else CLIENT_LINGER_S)
        await stack.enter_async_context(self.uploader)

        self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
        # On the way out the background loops are cancelled (then the TaskGroup awaits them).
        stack.callback(self._cancel_background)
        self._spawn(self._probe_forever(), "link-probe")
        self._spawn(self._flush_refusals_forever(), "refusal-flusher")
        self._spawn(self._watch_retention_forever(), "retention-watch")
        if self.upstream is None:
            self._spawn(self._connect_upstream_until_up(), "upstream-connect")
        if self.server is not None:
            self._spawn(self._supervise_server(self.server), "embedded-supervisor")
        # From here on decisions may flow: a stall of the loop delays them (start-up's own is not counted).
        await stack.enter_async_context(self.loop_lag)
        # Pipelines last: by the time input flows, everything a decision needs is up.
        stack.push_async_callback(self._record_stop)
        for pipeline_config in config.pipelines:
            await self._start_pipeline(pipeline_config)
        # Unwound before each pipeline's own exit: every pipeline drains at once, not one by one.
        stack.push_async_callback(self._drain_pipelines)
        # The fleet last: a device answers commands once it can decide, and stops answering first.
        self.fleet = await stack.enter_async_context(Fleet(self))
        # Background tasks are cancelled first on the way out (callbacks run in reverse).
        stack.callback(self._stop.set)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.state in (RuntimeState.STOPPING, RuntimeState.STOPPED):
            return
        self.state = RuntimeState.STOPPING
        self._stop.set()
        try:
            await self._stack.aclose()
        finally:
            self.state = RuntimeState.STOPPED

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tasks is not None
        self._background.append(self._tasks.create_task(coro, name=name))

    def _cancel_background(self) -> None:
        for task in self._background:
            task.cancel()

    def request_stop(self) -> None:
        """Ask `wait()` to return (signal handlers call this)."""
        self._stop.set()

    async def wait(self) -> None:
        """Until `request_stop()`."""
        await self._stop.wait()

    async def _record_stop(self) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.append("stop", {"uptime_s": round(time.monotonic() - self.started_at, 3)})
        except SyncError as exc:
            log.warning("stop not audited: %s", exc)
            return
        # A clean stop with the cloud in reach leaves nothing behind (bounded: never hold a stop).
        if self.uploader is not None and self.uploader.connected:
            backlog = await self.uploader.sync_now(timeout=SYNC_ON_STOP_S)
            if backlog:
                log.info("stopping with %d audit records not yet synced; they go on the next start", backlog)

    def _prepare_data_dir(self) -> None:
        """data_dir is the device's alone (0700): the audit log, applied configs, keys, nonces.

        The files in it that may hold secrets are 0600 (write_atomically). SQLite would create the
        audit log with the process umask (and its -wal and -shm copy the log's mode), so the log is
        created 0600 here first, and an older one is tightened.
        """
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _restrict(self.data_dir, 0o700)
        db = self.data_dir / "audit.db"
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in (db, db.with_name(f"{db.name}-wal"), db.with_name(f"{db.name}-shm")):
            if path.exists():
                _restrict(path, 0o600)

    def _load_device_key(self) -> AuditSigner:
        """The device key: `fleet.device_key` (an nkey seed file), else `data_dir/device.nk`, made on
        first start (0600). It signs the audit records the uploader publishes; its public key is in
        `status` and every heartbeat."""
        configured = self.config.fleet.device_key
        path = self.config.resolve(configured) if configured else self.data_dir / "device.nk"
        if not configured:
            if path.exists():
                _restrict(path, 0o600)
            else:
                write_atomically(path, new_seed() + b"\n")
                log.info("made the device key %s", path)
        try:
            return AuditSigner(load_seed(path))
        except (CommandError, SyncError) as exc:
            raise ConfigError([Problem("fleet.device_key", str(exc))]) from None

    @property
    def device_key(self) -> str:
        """The device key's public key ("U...")."""
        return self.device_signer.public_key if self.device_signer is not None else ""

    def pause(self, by: str = "", reason: str = "") -> None:
        """Fleet kill switch: decisions go on, every action becomes its `instead` (audited).

        Kept in `data_dir/paused.json`: a device paused by an operator stays paused across a
        restart until someone resumes it.
        """
        if not self.paused:
            self.paused = True
            write_atomically(self._paused_file, json.dumps({"by": by, "reason": reason, "at": time.time_ns()}).encode())
            self.record("pause", {"by": by, "reason": reason})

    def resume(self, by: str = "", reason: str = "") -> None:
        if self.paused:
            self.paused = False
            self._paused_file.unlink(missing_ok=True)
            self.record("resume", {"by": by, "reason": reason})

    def _oldest_audit_seq(self) -> int:
        return self.audit.oldest_seq if self.audit is not None else 0

    @property
    def _paused_file(self) -> Path:
        return self.data_dir / "paused.json"

    # -- connections ---------------------------------------------------------------------------

    def _leaf_remote(self) -> LeafRemote:
        """The embedded server's leaf remote: the hub's URLs and upstream_auth (blocking file read).

        An nkey seed goes into the generated server config (0600 in data_dir/nats, never logged):
        nats-server reads a remote's nkey from its config only.
        """
        nats_config = self.config.nats
        auth = nats_config.upstream_auth
        base = Path(self.config.base_dir or ".")
        seed = ""
        if auth.nkey_seed:
            try:
                seed = load_seed(base / auth.nkey_seed).decode()
            except CommandError as exc:
                raise ConfigError([Problem("nats.upstream_auth.nkey_seed", str(exc))]) from None
        urls = [u.strip() for u in nats_config.upstream.split(",")]
        if auth.user:
            # nats-server takes a leaf's user and password from the URL's user info.
            quote = urllib.parse.quote
            urls = [u.replace("://", f"://{quote(auth.user, safe='')}:{quote(auth.password, safe='')}@", 1)
                    for u in urls]
        tls = auth.tls
        return LeafRemote(
            urls=tuple(urls), nkey_seed=seed, credentials=str(base / auth.creds) if auth.creds else "",
            tls_ca=str(base / tls.ca) if tls is not None and tls.ca else "",
            tls_cert=str(base / tls.cert) if tls is not None and tls.cert else "",
            tls_key=str(base / tls.key) if tls is not None and tls.key else "",
        )

    async def _connect_upstream_until_up(self) -> None:
        delay = 0.25
        while not self._stop.is_set():
            try:
                nc = await self._connect(self.upstream_url, self.config.nats.upstream_auth, "upstream",
                                         UPSTREAM_PENDING_BYTES)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                log.warning("upstream %s not reachable yet: %s", redact_url(self.upstream_url), exc)
                await asyncio.sleep(delay * (0.5 + random.random()))  # pace: jittered backoff
                delay = min(delay * 2, 5.0)
                continue
            self.upstream = nc
            self._upstream_ready.set()
            self._links_restored()
            return

    async def wait_upstream(self) -> NATS:
        """The upstream connection, once there is one (it may come up long after start)."""
        await self._upstream_ready.wait()
        assert self.upstream is not None
        return self.upstream

    def heartbeat(self) -> Heartbeat:
        """What this device says about itself every `fleet.heartbeat_s`."""
        return Heartbeat(
            device=self.device, groups=list(self.config.groups), version=version(), ts=time.time_ns(),
            uptime_s=round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            link=self.link.state.value, paused=self.paused,
            audit_backlog=self.audit.backlog if self.audit is not None else 0,
            device_key=self.device_key,
        )

    async def _watch_retention_forever(self) -> None:
        # Whether audit.max_bytes can keep audit.keep_synced at the rate decisions come: said at
        # start (from the log's own recent records), and again whenever that changes.
        warned = ""
        while not self._stop.is_set():
            assert self.audit is not None
            warning = self.audit.retention().warning
            if warning and not warned:
                log.warning("%s", warning)
            elif warned and not warning:
                log.info("audit.max_bytes holds audit.keep_synced again at the rate seen")
            warned = warning
            await asyncio.sleep(RETENTION_CHECK_S)  # pace: the rate is a five-minute one

    async def _flush_refusals_forever(self) -> None:
        # Forged and late approval answers: one audit record a second at most, however many come.
        try:
            while not self._stop.is_set():
                await asyncio.sleep(1.0)  # pace: the aggregation window
                self.approvals.refusals.flush()
        finally:
            self.approvals.refusals.flush()

    @property
    def inbox_prefix(self) -> str:
        """This device's reply subjects (`_INBOX_<device>.…`): hub permissions can confine each
        device to its own inboxes, so no device reads another's replies."""
        return f"_INBOX_{self.device}"

    async def _close_upstream(self) -> None:
        if self.upstream is not None and self.upstream is not self.local:
            await self._close_connection(self.upstream)

    async def _connect(self, url: str, auth: Auth, role: str, pending: int) -> NATS:
        base = Path(self.config.base_dir or ".")
        upstream_role = role == "upstream"

        async def disconnected() -> None:
            if self.state in (RuntimeState.STOPPING, RuntimeState.STOPPED):
                return  # our own drain closing it
            log.warning("%s connection lost", role)
            if upstream_role or self.upstream is self.local:
                self._links_lost()

        async def reconnected() -> None:
            log.info("%s connection restored", role)
            # In leaf mode the local server is back, the leaf link not yet: the probe says when.
            if upstream_role or (self.upstream is self.local and not self.config.nats.leaf):
                self._links_restored()

        async def error(exc: Exception) -> None:
            log.debug("%s connection: %s", role, exc)

        nc = NATS()
        options = dict(
            servers=[u.strip() for u in url.split(",")], name=f"edge-{self.device}-{role}",
            max_reconnect_attempts=-1, reconnect_time_wait=0.25 + random.random() * 0.5,
            allow_reconnect=True, pending_size=pending, ping_interval=2, max_outstanding_pings=2,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
            connect_timeout=2, inbox_prefix=self.inbox_prefix, **connect_options(auth, base),
        )
        await nc.connect(**options)
        return nc

    async def _connect_uploader(self) -> NATS:
        """The uploader's own upstream connection (sync.connect_for_upload says why it is special)."""
        nats_config = self.config.nats
        # In leaf mode the uploader, too, talks to the embedded server (the leaf link carries it on).
        auth = nats_config.upstream_auth if nats_config.upstream and not nats_config.leaf else nats_config.local_auth
        return await connect_for_upload([u.strip() for u in self.upstream_url.split(",")],
                                        name=f"edge-{self.device}-audit", inbox_prefix=self.inbox_prefix,
                                        **connect_options(auth, Path(self.config.base_dir or ".")))

    @staticmethod
    async def _close_connection(nc: NATS) -> None:
        if nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), 5)
        except (TimeoutError, nats.errors.Error):
            await nc.close()

    async def _supervise_server(self, server: NatsServer) -> None:
        # The local bus is ours to keep alive: if the child dies, bring it back on the same port.
        while not self._stop.is_set():
            code = await server.wait_exit()
            if code is None or self._stop.is_set():
                return
            log.error("embedded nats-server exited with %s; restarting", code)
            await asyncio.sleep(0.2)  # pace restarts of a crashing child
            await server.start()

    # -- the link --------------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        link_config = self.config.link
        interval = link_config.probe_interval_ms / 1000
        timeout = link_config.probe_timeout_ms / 1000
        while not self._stop.is_set():
            await asyncio.sleep(interval)  # pace: the probe interval
            upstream = self.upstream
            if upstream is None:
                continue
            leaf_rtt: float | None = None
            if self.config.nats.leaf:
                leaf_rtt = await self._check_leaf_link(upstream, wait_s=timeout)
                if leaf_rtt is None:
                    continue
            if not self.link.begin_probe():
                continue
            if not upstream.is_connected:
                self.link.probe_failed("disconnected")
                continue
            subject = self._probe_subject()
            if leaf_rtt is not None and not subject:
                # Leaf mode without a cloud subject: the hub's JetStream answering is the round trip.
                self.link.probe_succeeded(leaf_rtt)
                continue
            if subject:  # the cloud service itself: "no responders" is its absence, whatever the server says
                await self._probe_once(upstream, self.link, subject)
                continue
            started = time.perf_counter()
            try:
                # A request, not flush()/rtt(): in nats-py 2.16 a timed-out PING leaves a cancelled
                # future in the PONG queue and the next PONG kills the read loop.
                await upstream.request(f"_edge.probe.{self.device}", b"", timeout=timeout, headers={"Edge-Probe": "1"})
            except nats.errors.NoRespondersError:
                pass  # no cloud subject to ask: the server's own answer proves the round trip
            except (TimeoutError, nats.errors.Error) as exc:
                self.link.probe_failed(type(exc).__name__)
                continue
            self.link.probe_succeeded(time.perf_counter() - started)

    async def _check_leaf_link(self, nc: NATS, *, wait_s: float) -> float | None:
        """Leaf mode: whether the leaf link to the hub is up, as a client connection's state would say.

        The runtime's own connection is to the embedded server and stays up whatever the link does,
        so each probe asks the hub's JetStream (`$JS.<upstream_domain>.API.INFO`, a few hundred bytes)
        through it. "No responders" means the local server knows no route to the hub: the link is
        down (dropped, refused, or declared stale after a blackhole: LEAF_PING_INTERVAL x
        LEAF_PING_MAX), reported as a lost connection. A timeout is a blackholed link the server has
        not yet noticed: a failed probe, as in client mode. Returns the round trip when answered,
        None when this probe tick is settled (down, or failed).
        """
        subject = f"$JS.{self.config.nats.upstream_domain}.API.INFO"
        started = time.perf_counter()
        try:
            await nc.request(subject, b"", timeout=wait_s)
        except nats.errors.NoRespondersError:
            if self.link.connected:
                self._links_lost()
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            if self.link.connected and self.link.begin_probe():
                self.link.probe_failed(type(exc).__name__)
            return None
        rtt = time.perf_counter() - started
        if not self.link.connected:
            # What a client's reconnect means: JetStream consumers made over the old link (the
            # desired-state watch) are gone or stale, and are made again.
            self.link_epoch += 1
            self._links_restored()
        return rtt

    def _probe_subject(self) -> str:
        """What the probe asks: the configured subject, else a pipeline's cloud subject (any answer,
        even an error, proves the service lives; a silent service must not pass for a live one)."""
        if self.config.link.probe_subject:
            return self.config.link.probe_subject
        return next((p.cloud.subject for p in self.config.pipelines if p.cloud is not None and "cloud" in p.ladder), "")

    def _on_link_change(self, old: LinkState, new: LinkState, reason: str) -> None:
        # The link starts offline: reaching the cloud the first time is the start going well, not news.
        first_online = new is LinkState.ONLINE and not self._link_was_online
        self._link_was_online = self._link_was_online or new is LinkState.ONLINE
        log.log(logging.INFO if first_online else logging.WARNING, "link %s -> %s (%s)", old.value, new.value,
                reason)
        if self.state in (RuntimeState.STOPPING, RuntimeState.STOPPED):
            return  # our own connections closing, after the log's last record
        self.record("link", {"from": old.value, "to": new.value, "reason": reason,
                              "breaker": self.link.breaker.state.value})
        if new is LinkState.ONLINE and self.uploader is not None:
            self.uploader.retry_now()
        if new is LinkState.OFFLINE:
            # Answers to pending approvals cannot arrive over a dead link: settle them now.
            self.approvals.link_lost()

    # -- pipelines -------------------------------------------------------------------------------

    def _build_logic(self, p: PipelineConfig) -> PipelineLogic:
        tiers: list[Tier] = []
        raced: list[CloudTier] = []
        for entry in p.ladder:
            ref = parse_tier(entry, p.model)
            if ref is None or ref.kind == "rules":
                continue
            tier = self._tier(p, ref)
            if tier is None:
                continue
            if entry in p.race and isinstance(tier, CloudTier):
                raced.append(tier)  # config checks keep raced tiers next to each other
                if len(raced) == len(p.race):
                    tiers.append(RaceTier(raced))
                continue
            tiers.append(tier)
        cross: RulesTier | ModelTier | None = None
        if p.cross_check:
            cross_ref = parse_tier(p.cross_check, p.model)
            if cross_ref is not None and cross_ref.kind == "model":
                found = self._tier(p, cross_ref)
                cross = found if isinstance(found, ModelTier) else None
        rules = RulesTier(compile_rules(p.rules, p.input))
        if p.cross_check == "rules":
            cross = rules
        guards = compile_guards(p.guards, p.input)
        # A candidate deployed in shadow mode wins over the config's own `shadow`.
        shadow_slot_name = self.deployments.shadow_slot(p.model) if p.model else None
        if shadow_slot_name is None and p.shadow:
            shadow_slot_name = p.shadow
        shadow = Shadow(slot=self.registry.slot(shadow_slot_name)) if shadow_slot_name else None
        return PipelineLogic(p, device=self.device, ladder=Ladder(tiers, rules, guards, cross),
                             record_inputs=self.config.audit.inputs == "full",
                             governor=Governor(p.actions), shadow=shadow)

    def _tier(self, p: PipelineConfig, ref: TierRef) -> ModelTier | CloudTier | None:
        """One model or cloud tier of a pipeline's ladder, with its own confidence floor (and, for a
        cloud, the link of its own provider)."""
        if ref.kind == "model":
            model = self.config.model(ref.name)
            floor = model.min_confidence if model is not None and model.min_confidence is not None else None
            return ModelTier(self.registry.slot(ref.name), min_confidence=p.min_confidence if floor is None else floor,
                             labels=p.labels, tier_name=ref.name)
        cloud = p.cloud if ref.entry == "cloud" else p.clouds.get(ref.name)
        if cloud is None:
            return None
        floor = p.min_confidence if cloud.min_confidence is None else cloud.min_confidence
        return CloudTier(self._provider_link(cloud.subject), self._cloud_request, subject=cloud.subject,
                         timeout_ms=cloud.timeout_ms, min_confidence=floor, labels=p.labels, tier_name=ref.name)

    def _provider_link(self, subject: str) -> CloudLink:
        """The link of the cloud provider that answers on `subject`: the runtime's own link for the
        subject its probe asks, else one of its own (own breaker, own probe): one provider's outage
        never opens another's breaker."""
        if subject == self._probe_subject():
            return self.link
        link = self.provider_links.get(subject)
        if link is None:
            link = self.provider_links[subject] = CloudLink(
                CircuitBreaker(self.config.link.breaker_failures, self.config.link.breaker_reset_ms / 1000),
                on_change=functools.partial(self._on_provider_change, subject))
            if self.link.connected:
                link.connection_restored()
            if self._tasks is not None:
                self._spawn(self._probe_provider_forever(subject, link), f"probe-{subject}")
        return link

    def _links_lost(self) -> None:
        self.link.connection_lost()
        for link in self.provider_links.values():
            link.connection_lost()

    def _links_restored(self) -> None:
        self.link.connection_restored()
        for link in self.provider_links.values():
            link.connection_restored()

    def _probe_timeout(self, subject: str) -> float:
        """A probe waits no longer than a decision would: a provider slower than its tiers' timeout
        is down for them, so its probe must fail too, or the breaker would close on every trial
        and every decision would wait the timeout again."""
        limit = self.config.link.probe_timeout_ms
        for p in self.config.pipelines:
            for cloud in ([p.cloud] if p.cloud is not None else []) + list(p.clouds.values()):
                if cloud.subject == subject:
                    limit = min(limit, cloud.timeout_ms)
        return limit / 1000

    async def _probe_provider_forever(self, subject: str, link: CloudLink) -> None:
        interval = self.config.link.probe_interval_ms / 1000
        while not self._stop.is_set():
            await asyncio.sleep(interval)  # pace: the probe interval
            upstream = self.upstream
            if upstream is None or not link.connected or not link.begin_probe():
                continue
            await self._probe_once(upstream, link, subject)

    async def _probe_once(self, upstream: NATS, link: CloudLink, subject: str) -> None:
        """One probe of a cloud provider within its tiers' deadline. The half-open trial asks, when
        there is one, the last real input the provider was sent (its answer is dropped): a provider
        that answers health probes at once but real requests too slowly must fail its trial."""
        trial = link.breaker.state is BreakerState.HALF_OPEN and subject in self._trial_inputs
        payload, headers = (self._trial_inputs[subject], None) if trial else (b"", {"Edge-Probe": "1"})
        started = time.perf_counter()
        try:
            await upstream.request(subject, payload, timeout=self._probe_timeout(subject), headers=headers)
        except nats.errors.NoRespondersError:
            link.probe_failed("no_responders")
            return
        except (TimeoutError, nats.errors.Error) as exc:
            link.probe_failed(type(exc).__name__)
            return
        link.probe_succeeded(time.perf_counter() - started, as_a_request=trial)

    def _on_provider_change(self, subject: str, old: LinkState, new: LinkState, reason: str) -> None:
        log.warning("cloud %s: %s -> %s (%s)", subject, old.value, new.value, reason)
        if self.state in (RuntimeState.STOPPING, RuntimeState.STOPPED):
            return
        link = self.provider_links.get(subject)
        self.record("link", {"subject": subject, "from": old.value, "to": new.value, "reason": reason,
                              "breaker": link.breaker.state.value if link is not None else ""})

    async def _start_pipeline(self, p: PipelineConfig) -> Pipeline:
        assert self.audit is not None and self.local is not None
        pipeline = Pipeline(self._build_logic(p), device=self.device, bus=self.local,
                            audit=AuditSink(append=self.audit.append, append_many=self.audit.append_many,
                                            oldest_seq=self._oldest_audit_seq),
                            is_paused=lambda: self.paused,
                            approver=self.approvals.ask, replies=self.replies)
        await self._stack.enter_async_context(pipeline)
        self.pipelines[pipeline.name] = pipeline
        return pipeline

    async def _drain_pipelines(self) -> None:
        # Every pipeline at once: in-flight decisions finish and are audited before the log closes.
        pipelines = list(self.pipelines.values())
        results = await asyncio.gather(*(p.drain() for p in pipelines), return_exceptions=True)
        for pipeline, result in zip(pipelines, results, strict=True):
            if isinstance(result, BaseException):
                log.error("pipeline %s did not drain cleanly", pipeline.name, exc_info=result)

    async def _rebuild_pipelines(self, names: set[str] | None = None) -> None:
        """Swap in freshly built logic (after a model change) for the named pipelines, or all."""
        for pipeline in self.pipelines.values():
            if names is None or pipeline.name in names:
                await pipeline.swap(self._build_logic(pipeline.config))

    # -- config.apply / rollback -------------------------------------------------------------------

    def _with_applied_config(self, file_config: Config) -> Config:
        """The config last applied over NATS, if any; the file keeps what cannot change at runtime
        (the connections, the audit log, and the trust roots: a key removed from the file is gone)."""
        applied = self._config_dir / "applied.json"
        if not applied.exists():
            return file_config
        try:
            persisted = read_persisted_config(applied, file_config)
            # data_dir is not the config file: it may name the file's model folders or the store's, nothing else.
            outside = list(check_pushed_models(persisted, file_config))
            if outside:
                raise ConfigError(outside, str(applied))
        except ConfigError as exc:
            log.error("ignoring the applied config kept in %s: %s", applied, exc)
            return file_config
        log.info("using the config applied over NATS (%s)", applied)
        return msgspec.structs.replace(persisted, data_dir=str(self.data_dir))

    async def apply_config(self, new: Config, *, by: str = "") -> dict[str, Any]:
        """Apply a validated config atomically: all of it or, on any error, none of it."""
        old = self.config
        frozen = [key for key in FILE_ONLY
                  if msgspec.to_builtins(getattr(new, key)) != msgspec.to_builtins(getattr(old, key))]
        # Trust comes from the file only: no command can add an operator or switch signatures off.
        frozen += [f"fleet.{key}" for key in TRUST_ROOTS if getattr(new.fleet, key) != getattr(old.fleet, key)]
        if frozen:
            raise CommandError("restart_required", f"{', '.join(frozen)} can only change in the config file "
                                                   "(then restart), never on a running device")
        # Load every new or changed model before touching anything: a bad one fails the whole apply.
        loaded: dict[str, Model] = {}
        for m in new.models:
            before = old.model(m.name)
            if before is None or new.resolve(m.path) != old.resolve(before.path):
                try:
                    loaded[m.name] = await self.deployments.load(m.name, new.resolve(m.path),
                                                                 warmup_timeout_ms=m.warmup_timeout_ms)
                except CommandError as exc:  # verified if in the store, warmed up within its bound
                    raise CommandError(exc.code, f"models: {m.name}: {exc.message}") from None
        # Past this point nothing can fail: install, swap, persist.
        for m in new.models:
            if m.name in loaded:
                slot = self.registry.slot(m.name, max_batch=m.max_batch, max_wait_us=m.max_wait_us)
                await slot.install(loaded[m.name])
        self.config = new
        names = {p.name for p in new.pipelines}
        for p in new.pipelines:
            current = self.pipelines.get(p.name)
            if current is None:
                await self._start_pipeline(p)
            else:
                await current.swap(self._build_logic(p))
        for name in [n for n in self.pipelines if n not in names]:
            await self.pipelines.pop(name).drain()
        self._persist_config(new, old)
        summary = {"pipelines": sorted(names), "models": [m.name for m in new.models], "by": by,
                   "sha256": config_sha256(new)}
        self.record("config", summary)
        return summary

    async def rollback_config(self, *, by: str = "") -> dict[str, Any]:
        previous = self._config_dir / "previous.json"
        if not previous.exists():
            raise CommandError("nothing_to_roll_back", "no previous config is kept on this device")
        try:
            config = read_persisted_config(previous, self.config)
        except ConfigError as exc:
            raise CommandError("bad_config", "; ".join(str(p) for p in exc.problems)) from None
        return await self.apply_config(config, by=by)

    @property
    def _config_dir(self) -> Path:
        return self.data_dir / "config"

    def _persist_config(self, new: Config, old: Config) -> None:
        folder = self._config_dir
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_persisted_config(folder / "previous.json", old)
        write_persisted_config(folder / "applied.json", new)

    async def _cloud_request(self, subject: str, payload: bytes, deadline_s: float) -> bytes:
        self._trial_inputs[subject] = payload  # what a half-open trial of this provider will ask
        upstream = self.upstream
        if upstream is None:
            raise CloudRequestFailed("unreachable")
        try:
            msg = await upstream.request(subject, payload, timeout=deadline_s)
        except (TimeoutError, nats.errors.TimeoutError):
            raise CloudRequestFailed("timeout") from None
        except (nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
                nats.errors.OutboundBufferLimitError, nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError):
            # Nobody answers, or the connection is down right now: the cloud is unreachable.
            raise CloudRequestFailed("unreachable") from None
        except nats.errors.Error:
            raise CloudRequestFailed("error") from None
        return msg.data

    def record(self, kind: str, body: dict[str, Any]) -> None:
        """Audit a runtime event; a full or failing log is reported by the log's own status."""
        if self.audit is None:
            return
        try:
            self.audit.append(kind, body)
        except SyncError as exc:
            log.warning("%s not audited: %s", kind, exc)

    # -- SIGHUP: the config file again ----------------------------------------------------------

    async def reload_from_file(self, path: Path | None) -> dict[str, Any]:
        """Read the config file again (`path`; None: the bundled example) and apply it as `config.apply`
        would: all or nothing, the same keys refused (the connections, the audit log, data_dir,
        device_id and the trust roots change with a restart only: `restart_required`). A reload
        is the operator's own word, so it replaces a config applied over NATS (and is kept as the
        applied config, as a push is)."""
        new = await asyncio.to_thread(load_config, path)
        if new.resolve(new.data_dir).resolve() == self.data_dir.resolve():
            # The same folder, as the file says it: the running config holds it resolved.
            new = msgspec.structs.replace(new, data_dir=self.config.data_dir)
        return await self.apply_config(new, by="SIGHUP")

    # -- health ----------------------------------------------------------------------------------

    def decisions_total(self) -> int:
        """Decisions made by the running pipelines so far (for decisions/s)."""
        return sum(p.stats.decisions for p in self.pipelines.values())

    def audit_problem(self, *, failing_longer_than_s: float) -> str | None:
        """Why the audit log cannot keep records now, or None: its writer thread died (nothing will
        ever commit), or every commit has failed for longer than `failing_longer_than_s`."""
        audit = self.audit
        if audit is None or self.state is not RuntimeState.RUNNING:
            return None
        if not audit.writer_alive:
            return "the audit log's writer thread is not running"
        since = audit.failing_since
        if since is not None and time.monotonic() - since > failing_longer_than_s:
            return f"the audit log has failed to commit for {time.monotonic() - since:.0f}s: {audit.last_error}"
        return None

    def health(self) -> dict[str, Any]:
        """`healthy` or `degraded`, and why (for `edge status --exit-code`): running, the cloud link
        online (when there is an upstream), the audit log writing."""
        reasons: list[str] = []
        if self.state is not RuntimeState.RUNNING:
            reasons.append(f"the runtime is {self.state.value}")
        if self.config.nats.upstream and self.link.state is not LinkState.ONLINE:
            reasons.append(f"the cloud link is {self.link.state.value}")
        audit = self.audit
        if audit is not None:
            if not audit.writer_alive and self.state is RuntimeState.RUNNING:
                reasons.append("the audit log's writer thread is not running")
            elif audit.state is LogState.FAILING:
                reasons.append(f"the audit log is failing: {audit.last_error}")
            if audit.full:
                reasons.append("the audit log is full (on_full = block)")
        return {"verdict": "degraded" if reasons else "healthy", "reasons": reasons}

        # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        audit = self.audit.status() if self.audit is not None else None
        return {
            "device": self.device,
            "device_key": self.device_key,
            "groups": self.config.groups,
            "version": version(),
            "state": self.state.value,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "paused": self.paused,
            "link": _link_status(self.link),
            "clouds": {subject: _link_status(link) for subject, link in
                       [(self._probe_subject(), self.link), *self.provider_links.items()] if subject},
            "local": redact_url(self.local_url),
            "pipelines": {name: p.status() for name, p in self.pipelines.items()},
            "approvals": self.approvals.status(),
            "replies_refused": self.replies.refused,
            "models": self.registry.status(),
            "deployments": self.deployments.status(),
            "audit": audit,
            "sync": self.uploader.status() if self.uploader is not None else None,
            "loop_lag": self.loop_lag.snapshot(),
            "health": self.health(),
        }


def _link_status(link: CloudLink) -> dict[str, Any]:
    return {"state": link.state.value, "breaker": link.breaker.state.value,
            "rtt_ms": round(link.last_rtt_s * 1000, 3) if link.last_rtt_s else None, "last_failure": link.last_failure}


async def run(config: Config, *, config_path: Path | None = None,
              ready: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then drain (what `edge run` does); SIGHUP reloads `config_path`.

    Under systemd (`NOTIFY_SOCKET`), speaks the notify protocol (see edge/_sdnotify.py): READY=1
    once every pipeline is subscribed, STATUS, watchdog pings while healthy, RELOADING=1/READY=1
    around a reload, STOPPING=1 on SIGTERM.
    """
    import signal

    loop = asyncio.get_running_loop()
    service = ServiceNotifier()
    # Handled from before the start: pipelines answer before the start has finished, and a
    # SIGTERM in that window must still drain rather than kill the process. A SIGHUP then (its
    # default would end the process) waits for the start to finish.
    stop_early = asyncio.Event()
    reload_wanted = asyncio.Event()

    def stop_before_start() -> None:
        service.stopping()
        stop_early.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_before_start)
    loop.add_signal_handler(signal.SIGHUP, reload_wanted.set)
    async with service, Runtime(config) as runtime:

        def stop() -> None:
            service.stopping()
            runtime.request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        if stop_early.is_set():
            runtime.request_stop()
        log.info("edge %s running: device %s, local bus %s", version(), runtime.device,
                 redact_url(runtime.local_url))
        # A stalled audit log for a whole watchdog period is a failure a restart may cure.
        failing_limit_s = 2 * service.watchdog_s if service.watchdog_s is not None else 60.0
        rate = DecisionRate(runtime.decisions_total(), time.monotonic())

        def status_text() -> str:
            problem = runtime.audit_problem(failing_longer_than_s=failing_limit_s)
            return status_line(runtime.link.state.value, rate.update(runtime.decisions_total(), time.monotonic()),
                               problem)

        service.ready(health=lambda: runtime.audit_problem(failing_longer_than_s=failing_limit_s), status=status_text)
        if ready is not None:
            await ready(runtime)
        reloading = asyncio.Lock()  # held through a reload: a stop waits for it, never cuts an apply in two
        async with asyncio.TaskGroup() as tasks:
            reloader = tasks.create_task(_reload_on_sighup(runtime, service, config_path, reload_wanted, reloading),
                                         name="sighup-reload")
            await runtime.wait()
            async with reloading:
                reloader.cancel()
        log.info("stopping: draining in-flight decisions")
        stopping = time.monotonic()
    log.info("stopped: drain finished in %.2fs (decisions audited, log closed, connections drained)",
             time.monotonic() - stopping)


async def _reload_on_sighup(runtime: Runtime, service: ServiceNotifier, path: Path | None,
                            wanted: asyncio.Event, busy: asyncio.Lock) -> None:
    """Each SIGHUP: the config file again, applied whole, or the running config kept and why logged."""
    while True:
        await wanted.wait()
        async with busy:
            wanted.clear()
            await _reload_once(runtime, service, path)


async def _reload_once(runtime: Runtime, service: ServiceNotifier, path: Path | None) -> None:
    source = str(path) if path is not None else "the bundled example config"
    service.reloading()
    log.info("SIGHUP: reloading %s", source)
    try:
        summary = await runtime.reload_from_file(path)
    except ConfigError as exc:
        reason = "; ".join(str(p) for p in exc.problems)
        log.error("SIGHUP: %s is not valid, the running config is kept: %s", source, reason)
        service.reloaded(f"reload refused (invalid config): {reason}")
    except CommandError as exc:
        log.error("SIGHUP: %s cannot be applied, the running config is kept: %s: %s", source, exc.code,
                  exc.message)
        service.reloaded(f"reload refused ({exc.code}): {exc.message}")
    except Exception as exc:  # a reload must never take the running device down with it
        log.exception("SIGHUP: reloading %s failed, the running config is kept", source)
        service.reloaded(f"reload failed: {exc}")
    else:
        log.info("SIGHUP: %s applied (sha256 %s)", source, summary["sha256"])
        service.reloaded(f"config reloaded (sha256 {summary['sha256'][:12]})")


def _restrict(path: Path, mode: int) -> None:
    """Take away what `mode` does not grant (0700 for a folder, 0600 for a file), saying so."""
    current = stat.S_IMODE(path.stat().st_mode)
    if current & ~mode:
        try:
            os.chmod(path, current & mode)
        except OSError as exc:
            log.warning("%s is mode %o and cannot be restricted to %o: %s", path, current, mode, exc)
            return
        log.warning("%s was mode %o, open to other users: now %o", path, current, current & mode)

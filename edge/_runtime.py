"""The runtime: a tree of async context managers under one TaskGroup.

    Runtime
    ├── NatsServer            when nats.local = "embedded": a supervised nats-server child
    ├── local connection      the bus sensors and actuators use
    ├── upstream connection   the cloud (the local one when nats.upstream is empty)
    ├── ModelRegistry         verified models behind micro-batchers
    ├── AuditLog + Uploader   the write-ahead, hash-chained log and its JetStream replication
    ├── CloudLink             the cloud's reachability, fed by connection events and a probe
    ├── Pipelines             one per config pipeline
    └── Fleet                 command handlers, heartbeat, $SRV registration

Leaving the runtime (SIGTERM/SIGINT in `edge run`) drains in the reverse order: pipelines finish
their in-flight decisions, the audit log is flushed, connections drain.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS

from models import ModelRegistry, ModelSlot
from sync import AuditLog, SyncError, Uploader

from ._approvals import ApprovalDesk
from ._config import Auth, Config, PipelineConfig, parse_duration, parse_size
from ._governance import Governor
from ._ladder import CloudTier, Ladder, ModelTier, RulesTier, Tier
from ._link import CircuitBreaker, CloudLink, LinkState
from ._nats_server import NatsServer
from ._pipeline import AuditSink, Pipeline, Shadow
from ._rules import compile_rules

log = logging.getLogger("edge.runtime")

VERSION = "0.1.0"
# While the upstream link is down, nats-py would buffer publishes and replay them on reconnect.
# Upstream, that buffer is disabled: a cloud request fails at once (and falls through the ladder),
# and the audit stream has its own uploader that resumes from what the stream holds.
UPSTREAM_PENDING_BYTES = 0
LOCAL_PENDING_BYTES = 8 * 1024 * 1024


class RuntimeState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def connect_options(auth: Auth, base: Path) -> dict[str, Any]:
    """nats-py connect() keyword arguments for one connection's credentials."""
    options: dict[str, Any] = {}
    if auth.creds:
        options["user_credentials"] = str(base / auth.creds)
    if auth.nkey_seed:
        options["nkeys_seed"] = str(base / auth.nkey_seed)
    if auth.user:
        options["user"], options["password"] = auth.user, auth.password
    if auth.token:
        options["token"] = auth.token
    if auth.tls is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(base / auth.tls.ca) if auth.tls.ca else None)
        if auth.tls.cert:
            context.load_cert_chain(str(base / auth.tls.cert), str(base / auth.tls.key) if auth.tls.key else None)
        options["tls"] = context
    return options


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
        self.audit: AuditLog | None = None
        self.uploader: Uploader | None = None
        self.link = CloudLink(
            CircuitBreaker(config.link.breaker_failures, config.link.breaker_reset_ms / 1000),
            on_change=self._on_link_change,
        )
        self.pipelines: dict[str, Pipeline] = {}
        self.approvals = ApprovalDesk(self.device, upstream=lambda: self.upstream, link=self.link,
                                      record=self._record)
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self.local_url = ""
        self.upstream_url = ""

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
        config = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stack = self._stack
        if config.nats.local == "embedded":
            self.server = NatsServer(name=f"edge-{self.device}", store_dir=self.data_dir / "nats",
                                     port=config.nats.embedded_port)
            await stack.enter_async_context(self.server)
            self.local_url = self.server.url
        else:
            self.local_url = config.nats.local
        (self.data_dir / "local.url").write_text(self.local_url)
        self.local = await self._connect(self.local_url, config.nats.local_auth, "local", LOCAL_PENDING_BYTES)
        stack.push_async_callback(self._close_connection, self.local)
        if config.nats.upstream:
            self.upstream_url = config.nats.upstream
            # Upstream may be unreachable at boot: decide locally while a task keeps trying.
            stack.push_async_callback(self._close_upstream)
        else:
            self.upstream_url = self.local_url
            self.upstream = self.local
            self.link.connection_restored()

        await stack.enter_async_context(self.registry)
        for model in config.models:
            await self.registry.load(model.name, config.resolve(model.path),
                                     max_batch=model.max_batch, max_wait_us=model.max_wait_us)

        audit = config.audit
        self.audit = AuditLog(
            self.data_dir / "audit.db", self.device, fsync=audit.fsync,
            commit_interval_ms=audit.commit_interval_ms, max_bytes=parse_size(audit.max_bytes),
            on_full=audit.on_full, keep_synced_s=parse_duration(audit.keep_synced),
        )
        await stack.enter_async_context(self.audit)
        self.audit.append("start", {"version": VERSION, "groups": config.groups,
                                    "pipelines": [p.name for p in config.pipelines]})
        self.uploader = Uploader(self.audit, self._connect_uploader, stream=audit.stream,
                                 create_stream=audit.create_stream, window=audit.sync_window)
        await stack.enter_async_context(self.uploader)

        self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
        self._tasks.create_task(self._probe_forever(), name="link-probe")
        if self.upstream is None:
            self._tasks.create_task(self._connect_upstream_until_up(), name="upstream-connect")
        if self.server is not None:
            self._tasks.create_task(self._supervise_server(self.server), name="embedded-supervisor")
        # Pipelines last: by the time input flows, everything a decision needs is up.
        for pipeline_config in config.pipelines:
            pipeline = self._build_pipeline(pipeline_config)
            await stack.enter_async_context(pipeline)
            self.pipelines[pipeline.name] = pipeline
        stack.push_async_callback(self._record_stop)
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

    def pause(self, by: str = "", reason: str = "") -> None:
        """Fleet kill switch: decisions go on, every action becomes its `instead` (audited)."""
        if not self.paused:
            self.paused = True
            self._record("pause", {"by": by, "reason": reason})

    def resume(self, by: str = "", reason: str = "") -> None:
        if self.paused:
            self.paused = False
            self._record("resume", {"by": by, "reason": reason})

    # -- connections ---------------------------------------------------------------------------

    async def _connect_upstream_until_up(self) -> None:
        delay = 0.25
        while not self._stop.is_set():
            try:
                nc = await self._connect(self.upstream_url, self.config.nats.upstream_auth, "upstream",
                                         UPSTREAM_PENDING_BYTES)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                log.warning("upstream %s not reachable yet: %s", self.upstream_url, exc)
                await asyncio.sleep(delay * (0.5 + random.random()))  # pace: jittered backoff
                delay = min(delay * 2, 5.0)
                continue
            self.upstream = nc
            self.link.connection_restored()
            return

    async def _close_upstream(self) -> None:
        if self.upstream is not None and self.upstream is not self.local:
            await self._close_connection(self.upstream)

    async def _connect(self, url: str, auth: Auth, role: str, pending: int) -> NATS:
        base = Path(self.config.base_dir or ".")
        upstream_role = role == "upstream"

        async def disconnected() -> None:
            log.warning("%s connection lost", role)
            if upstream_role or self.upstream is self.local:
                self.link.connection_lost()

        async def reconnected() -> None:
            log.info("%s connection restored", role)
            if upstream_role or self.upstream is self.local:
                self.link.connection_restored()

        async def error(exc: Exception) -> None:
            log.debug("%s connection: %s", role, exc)

        nc = NATS()
        options = dict(
            servers=[u.strip() for u in url.split(",")], name=f"edge-{self.device}-{role}",
            max_reconnect_attempts=-1, reconnect_time_wait=0.25 + random.random() * 0.5,
            allow_reconnect=True, pending_size=pending, ping_interval=2, max_outstanding_pings=2,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
            connect_timeout=2, **connect_options(auth, base),
        )
        await nc.connect(**options)
        return nc

    async def _connect_uploader(self) -> NATS:
        """The uploader's own upstream connection: no reconnect, no buffering (see sync.Uploader)."""
        base = Path(self.config.base_dir or ".")
        return await nats.connect(
            servers=[u.strip() for u in self.upstream_url.split(",")], name=f"edge-{self.device}-audit",
            allow_reconnect=False, pending_size=0, connect_timeout=2, ping_interval=2, max_outstanding_pings=2,
            **connect_options(self.config.nats.upstream_auth if self.config.nats.upstream else
                              self.config.nats.local_auth, base),
        )

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
            if upstream is None or not self.link.begin_probe():
                continue
            if not upstream.is_connected:
                self.link.probe_failed("disconnected")
                continue
            started = time.perf_counter()
            try:
                if link_config.probe_subject:
                    await upstream.request(link_config.probe_subject, b"", timeout=timeout)
                else:
                    # rtt(), not flush(): flush() returns at once, unanswered, while nats-py reconnects.
                    await upstream.rtt(timeout=timeout)
            except (TimeoutError, nats.errors.Error) as exc:
                self.link.probe_failed(type(exc).__name__)
            else:
                self.link.probe_succeeded(time.perf_counter() - started)

    def _on_link_change(self, old: LinkState, new: LinkState, reason: str) -> None:
        log.warning("link %s -> %s (%s)", old.value, new.value, reason)
        self._record("link", {"from": old.value, "to": new.value, "reason": reason,
                              "breaker": self.link.breaker.state.value})
        if new is LinkState.ONLINE and self.uploader is not None:
            self.uploader.wake()

    # -- pipelines -------------------------------------------------------------------------------

    def _build_pipeline(self, p: PipelineConfig) -> Pipeline:
        tiers: list[Tier] = []
        features: Sequence[str] = ()
        for tier in p.ladder:
            if tier == "model":
                slot = self.registry.slot(p.model)
                tiers.append(ModelTier(slot, min_confidence=p.min_confidence, labels=p.labels))
                features = self._features(slot)
            elif tier == "cloud" and p.cloud is not None:
                tiers.append(CloudTier(self.link, self._cloud_request, subject=p.cloud.subject,
                                       timeout_ms=p.cloud.timeout_ms, min_confidence=p.min_confidence,
                                       labels=p.labels))
        rules = RulesTier(compile_rules(p.rules, p.input))
        shadow = None
        if p.shadow:
            shadow_slot = self.registry.slot(p.shadow)
            shadow = Shadow(predict=shadow_slot.predict,
                            version=lambda s=shadow_slot: s.model.manifest.version if s.model else "")
            features = features or self._features(shadow_slot)
        assert self.audit is not None and self.local is not None
        return Pipeline(
            p, device=self.device, bus=self.local, ladder=Ladder(tiers, rules), governor=Governor(p.actions),
            audit=AuditSink(append=self.audit.append), feature_names=features, shadow=shadow,
            is_paused=lambda: self.paused, approver=self.approvals.ask,
        )

    @staticmethod
    def _features(slot: ModelSlot) -> Sequence[str]:
        return tuple(slot.model.manifest.features) if slot.model is not None else ()

    async def _cloud_request(self, subject: str, payload: bytes, deadline_s: float) -> bytes:
        upstream = self.upstream
        if upstream is None:
            raise nats.errors.ConnectionClosedError
        msg = await upstream.request(subject, payload, timeout=deadline_s)
        return msg.data

    def _record(self, kind: str, body: dict[str, Any]) -> None:
        """Audit a runtime event; a full or failing log is reported by the log's own status."""
        if self.audit is None:
            return
        try:
            self.audit.append(kind, body)
        except SyncError as exc:
            log.warning("%s not audited: %s", kind, exc)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        audit = self.audit.status() if self.audit is not None else None
        return {
            "device": self.device,
            "groups": self.config.groups,
            "version": VERSION,
            "state": self.state.value,
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "paused": self.paused,
            "link": {"state": self.link.state.value, "breaker": self.link.breaker.state.value,
                     "rtt_ms": round(self.link.last_rtt_s * 1000, 3) if self.link.last_rtt_s else None,
                     "last_failure": self.link.last_failure},
            "local": self.local_url,
            "pipelines": {name: p.status() for name, p in self.pipelines.items()},
            "models": self.registry.status(),
            "audit": audit,
            "sync": self.uploader.status() if self.uploader is not None else None,
        }


async def run(config: Config, *, ready: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then drain (what `edge run` does)."""
    import signal

    loop = asyncio.get_running_loop()
    async with Runtime(config) as runtime:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.request_stop)
        log.info("edge %s running: device %s, local bus %s", VERSION, runtime.device, runtime.local_url)
        if ready is not None:
            await ready(runtime)
        await runtime.wait()
        log.info("stopping: draining in-flight decisions")

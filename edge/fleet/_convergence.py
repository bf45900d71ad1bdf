"""A device following its desired state: a watch on the keys of `EDGE_FLEET` that concern it,
convergence through the commands' own code paths, and a report of what it actually runs.

Why a device that was offline ends up where the fleet's intent says (`_desired` has the keys,
the trust rules and the resolution):

- On start and on every (re)connect the device watches afresh: a new ordered consumer on the
  bucket, filtered to `all.>`, `group.<g>.>` for each of its groups and `device.<id>.>`,
  delivering the last value of each key. Once it has delivered every one (a message with no
  more pending, or nothing pending at all) the device resolves the lot and converges every
  <what> at once, so a device-level value and its group's never both take effect in turn. A
  fresh consumer rather than the old one resumed: values written while the link was down went
  to nobody, and nats-py would only notice at the next message, which may never come.
- Afterwards each value is verified as it arrives; every <what> whose resolved value changed
  converges. When the device's groups change (a config applied) the filter is stale: it
  watches afresh.
- Converging compares the desired value with what the device runs, and runs only the commands
  that close the gap (`Fleet.apply_desired`); a value that cannot be applied (a config bad for
  this device, a model that cannot be fetched) is reported as divergence, the device keeps its
  last good state, and it is tried again on the next change, reconnect, or every
  RETRY_HEARTBEATS heartbeats.
- One task does all of this, so convergence never races itself; the Fleet's one-change-at-a-
  time lock orders it with commands arriving meanwhile.

Reported state: every `fleet.heartbeat_s`, and after each change, the device writes a
`DeviceReport` under `device.<id>` in `EDGE_FLEET_STATUS` (what it runs, what desired value it
applied or could not, how many values it ignored, when). That write is its last-seen mark:
`edge fleet ls` names it missing after three heartbeats without one.

nats-py gives a connection one reconnected callback, and the runtime owns it; so the link's
reconnect counter is looked at every WAKE_S instead (a local read, no traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from .._errors import CommandError
from .._files import write_atomically
from .._replies import RefusalTally
from .._version import version
from ._desired import (
    BUCKET,
    STATUS_BUCKET,
    Applied,
    Desired,
    DesiredVerifier,
    DeviceReport,
    Divergence,
    report_key,
    resolve,
    serving_of,
    shadow_agreement_of,
    watch_subjects,
)

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from ._service import Device

log = logging.getLogger("edge.fleet")

RETRY_HEARTBEATS = 6  # a desired value that could not be applied is tried again this often
WAKE_S = 0.5  # how often the reconnect counter is looked at
SNAPSHOT_TIMEOUT_S = 10.0  # for the current values to arrive after a watch starts
INACTIVE_S = 60.0  # the hub drops a consumer nobody listens to after this long
API_TIMEOUT_S = 5.0
MAX_QUEUED = 1024  # values received and not yet handled; the watch waits beyond that
_KV_PREFIX = f"$KV.{BUCKET}."
_KV_OPERATION = "KV-Operation"
_ENCODER = msgspec.json.Encoder()

Apply = Callable[[Desired], Awaitable[list[dict[str, Any]]]]


class ConvergenceState(enum.Enum):
    WAITING = "waiting"  # for the upstream connection or the bucket
    WATCHING = "watching"
    STOPPED = "stopped"


class Convergence:
    """Desired state for one device: watch, verify, converge, report. `run` is its one task."""

    def __init__(self, host: Device, apply: Apply, actual: Callable[[], dict[str, Any]]) -> None:
        self.host = host
        self.device = host.device
        self._apply = apply
        self._actual = actual
        self.state = ConvergenceState.WAITING
        self.verifier = DesiredVerifier()
        self.values: dict[str, Desired] = {}  # key -> the last good value seen
        self.applied: dict[str, Applied] = {}  # what -> the desired value the device runs
        self.diverged: dict[str, Divergence] = {}  # what -> why the desired value is not applied
        self.ignored = 0
        self.ignored_last = ""
        self.refusals = RefusalTally("desired_refused", host.record)  # flushed by the Fleet, once a second
        self.reports = 0
        self.report_failures = 0
        self.watches = 0
        self._queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._received = 0

    @property
    def marks_file(self) -> Path:
        """The per-key high-water marks of accepted values (see `_desired`)."""
        return self.host.data_dir / "fleet" / "desired.json"

    # -- the task ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: follow the desired state on the upstream connection, once there is one."""
        with contextlib.suppress(FileNotFoundError):
            self.verifier.load(await asyncio.to_thread(self.marks_file.read_bytes))
        nc = await self.host.wait_upstream()
        try:
            while not stop.is_set():
                try:
                    await self._follow(nc, stop)
                except (nats.errors.Error, TimeoutError) as exc:  # nats.js errors included: no bucket, no JetStream
                    self.state = ConvergenceState.WAITING
                    log.debug("fleet: desired state not followed yet: %s: %s", type(exc).__name__, exc)
                    await self._publish_report(nc)
                    await _wait(stop, self.host.config.fleet.heartbeat_s)  # pace: retry once a heartbeat
        finally:
            self.state = ConvergenceState.STOPPED

    async def _follow(self, nc: NATS, stop: asyncio.Event) -> None:
        """One watch, from its snapshot until a reconnect, a change of groups or `stop`."""
        while not nc.is_connected and not stop.is_set():
            await _wait(stop, WAKE_S)  # pace: nats-py is reconnecting
        if stop.is_set():
            return
        reconnects = nc.stats["reconnects"]
        # In leaf mode the connection never reconnects: the leaf link beyond it does (link_epoch).
        epoch = self.host.link_epoch
        groups = list(self.host.config.groups)
        sub = await self._watch(nc.jetstream(timeout=API_TIMEOUT_S, domain=self.host.config.nats.js_domain), groups)
        try:
            self.state = ConvergenceState.WATCHING
            self.watches += 1
            await self._snapshot(sub)
            await self._converge({d.what for d in self.values.values()} | set(self.applied) | set(self.diverged))
            await self._publish_report(nc)
            next_report = time.monotonic() + self.host.config.fleet.heartbeat_s
            beats = 0
            while not stop.is_set():
                timeout = max(0.0, min(WAKE_S, next_report - time.monotonic()))
                try:
                    msg: Msg | None = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    msg = None
                if msg is not None:
                    changed = self._take_changes(msg)
                    if changed:
                        await self._save_marks()
                        await self._converge(changed)
                        await self._publish_report(nc)
                if nc.stats["reconnects"] != reconnects or not nc.is_connected or self.host.link_epoch != epoch:
                    log.info("fleet: upstream reconnected: reading the desired state again")
                    return
                if list(self.host.config.groups) != groups:
                    return
                if time.monotonic() >= next_report:
                    beats += 1
                    if beats % RETRY_HEARTBEATS == 0 and self.diverged:
                        await self._converge(set(self.diverged))
                    await self._publish_report(nc)
                    next_report = time.monotonic() + self.host.config.fleet.heartbeat_s
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _watch(self, js: JetStreamContext, groups: list[str]) -> JetStreamContext.PushSubscription:
        while not self._queue.empty():
            self._queue.get_nowait()  # left from a watch that ended: the new one delivers them again
        self._received = 0
        subjects = watch_subjects(self.device, groups)

        async def on_value(msg: Msg) -> None:
            self._received += 1
            await self._queue.put(msg)  # bounded: beyond MAX_QUEUED the consumer waits for us

        config = ConsumerConfig(filter_subjects=subjects)
        return await js.subscribe(subjects[0], stream=f"KV_{BUCKET}", cb=on_value, config=config,
                                  ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                                  inactive_threshold=INACTIVE_S)

    async def _snapshot(self, sub: JetStreamContext.PushSubscription) -> None:
        """Take every current value the watch delivers (until none is pending)."""
        info = await sub.consumer_info()
        taken: list[Msg] = []
        if info.num_pending or self._received:
            async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
                while True:
                    msg = await self._queue.get()
                    taken.append(msg)
                    if msg.metadata.num_pending == 0:
                        break
        for msg in taken:
            self._take(msg)
        await self._save_marks()

    # -- values ------------------------------------------------------------------------------------

    def _take_changes(self, msg: Msg) -> set[str]:
        """Take one value; the <what>s whose resolved value it changed."""
        before = self._resolved()
        self._take(msg)
        after = self._resolved()
        return {w for w in before.keys() | after.keys() if _ident(before.get(w)) != _ident(after.get(w))}

    def _resolved(self) -> dict[str, Desired]:
        return resolve(self.values.values(), self.device, self.host.config.groups)

    def _take(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(_KV_PREFIX)
        operation = msg.headers.get(_KV_OPERATION, "") if msg.headers else ""
        try:
            if operation:  # DEL or PURGE: a marker, with nothing signed in it
                raise CommandError("unsigned", f"{key}: a deletion carries no signature; clear a key with a "
                                               "signed null value")
            desired = self.verifier.verify(key, msg.data, self.host.config.fleet.trusted_keys)
        except CommandError as error:
            self.ignored += 1
            self.ignored_last = f"{error.code}: {error.message[:200]}"
            self.refusals.add(error.code, error.message)
            log.info("fleet: desired value %.100s ignored: %.300s", key, error)
            return
        self.values[key] = desired

    async def _save_marks(self) -> None:
        await asyncio.to_thread(write_atomically, self.marks_file, self.verifier.export())

    # -- converging --------------------------------------------------------------------------------

    async def _converge(self, whats: Iterable[str]) -> None:
        resolved = self._resolved()
        for what in sorted(whats):
            desired = resolved.get(what)
            if desired is None:  # nothing desired any more: nothing to hold the device to
                self.applied.pop(what, None)
                self.diverged.pop(what, None)
                continue
            try:
                steps = await self._apply(desired)
            except CommandError as error:
                self._diverge(what, desired, error)
                continue
            except Exception as exc:  # a bug must cost one value, never the watch: log it, report it
                log.exception("fleet: applying desired %s failed unexpectedly", desired.key)
                self._diverge(what, desired, CommandError("internal", f"{type(exc).__name__}: {exc}"))
                continue
            self.diverged.pop(what, None)
            self.applied[what] = Applied(desired.key, desired.timestamp)
            if steps:
                log.info("fleet: converged %s to %s", what, desired.key)
                self.host.record("desired", {"what": what, "key": desired.key, "timestamp": desired.timestamp,
                                             "signer": desired.signer, "by": desired.by, "ok": True, "steps": steps})

    def _diverge(self, what: str, desired: Desired, error: CommandError) -> None:
        divergence = Divergence(desired.key, desired.timestamp, error.code, error.message[:512])
        if self.diverged.get(what) != divergence:  # audited once, not on every retry
            log.warning("fleet: desired %s not applied: %.300s", desired.key, error)
            self.host.record("desired", {"what": what, "key": desired.key, "timestamp": desired.timestamp,
                                         "signer": desired.signer, "by": desired.by, "ok": False,
                                         "code": error.code, "message": error.message[:512]})
        self.diverged[what] = divergence
        self.applied.pop(what, None)

    # -- reporting ---------------------------------------------------------------------------------

    def report(self) -> DeviceReport:
        """What the device runs now, and how that stands against its desired state."""
        status = self._actual()
        config = self.host.config
        return DeviceReport(
            device=self.device, groups=list(config.groups), version=version(), last_seen=time.time_ns(),
            heartbeat_s=config.fleet.heartbeat_s, paused=bool(status.get("paused", self.host.paused)),
            config_sha256=str(status.get("config_sha256", "")),
            models=serving_of(status.get("models") or []),
            shadow_agreement=shadow_agreement_of(status.get("pipelines") or {}),
            applied=dict(self.applied), divergence=dict(self.diverged),
            ignored=self.ignored, ignored_last=self.ignored_last,
        )

    async def _publish_report(self, nc: NATS) -> None:
        if not nc.is_connected:
            return  # never buffered: a report replayed after an outage would say the wrong thing
        payload = _ENCODER.encode(self.report())
        try:
            js = nc.jetstream(timeout=API_TIMEOUT_S, domain=self.host.config.nats.js_domain)
            await js.publish(f"$KV.{STATUS_BUCKET}.{report_key(self.device)}", payload)
        except (nats.errors.Error, TimeoutError) as exc:  # no bucket yet (an operator makes it), link down
            self.report_failures += 1
            log.debug("fleet: status report not written: %s: %s", type(exc).__name__, exc)
            return
        self.reports += 1

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "keys": len(self.values), "applied": sorted(self.applied),
                "diverged": {w: d.code for w, d in self.diverged.items()}, "ignored": self.ignored,
                "reports": self.reports, "watches": self.watches}


def _ident(desired: Desired | None) -> tuple[str, int] | None:
    return (desired.key, desired.timestamp) if desired is not None else None


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

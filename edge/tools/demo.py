"""`edge demo`: the whole story on one machine, with no set-up, ending in a verified summary (SPEC §3, §11).

    sensors (simulated) ─► the runtime's embedded nats-server ═ leaf link ═► FaultProxy ─► "cloud" nats-server
                           (decisions out; the runtime talks      (S2)     (the outage)  (JetStream domain "hub",
                           only to it)                                                   leafnode listener)
                                                                                          ▲ CloudSimulator,
                                                                                          │ AutoApprover,
                                                      verification ───────────────────────┘ EDGE_AUDIT stream
                                                      (directly, not through the proxy)

The device runs in leaf mode (`nats.upstream = "nats-leaf://..."`): its embedded server is a leaf
node of the cloud server and carries audit sync, cloud requests, approvals and commands over one
compressed link. Everything runs in this process except the two nats-servers (the runtime's
embedded one and the cloud), which are children it owns. The pipeline's ladder is two cloud
providers, "primary" and "backup" (two CloudSimulators on their own subjects, each with its own
link and breaker on the device), the bundled model, a "small" fallback model and the rules.
Simulated pumps publish on an open-loop schedule; at `outage_at_s` the outage begins, in three
stages over `outage_s` seconds, each failing differently: the primary is blackholed (its requests
are never answered; the backup decides), then the backup turns slow past its timeout (the models
decide), then the proxy blackholes the whole cloud link (the audit backlog grows); then all
recover together. While it runs, a live view shows decisions per second by tier, the providers,
the link, the audit backlog and approvals. At the end the driver stops, the audit backlog drains, the runtime
stops, and the upstream stream is verified against the local log: seqs 1..last exactly once, the
chain intact, and every published decision in the log. The summary goes to `summary.json`, a
timeline to `timeline.png` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import math
import random
import sqlite3
import sys
import tempfile
import textwrap
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import BUNDLED_CONFIG, Config, EdgeError, Fallback, Governance, LinkState, NatsServer, Runtime, decode_config
from edge.fleet import new_seed, public_key_of
from models import bundled_model_path
from sync import (
    AuditLog,
    SyncError,
    Uploader,
    UpstreamReport,
    connect_for_upload,
    decode_record,
    iter_records,
    verify_chain,
    verify_upstream,
)

from .chaos import FaultProxy
from .cloudsim import AutoApprover, CloudSimulator

T = TypeVar("T")

DEVICE = "demo-gw"
TIERS = ("model", "cloud", "rules")
PHASES = ("before", "during", "after")
# The outage's stages, each a fraction of `outage_s` from its start: the cloud fails a piece at a time.
STAGES = ("before", "primary_out", "backup_slow", "network_cut", "after")
STAGE_AT = {"primary_out": 0.0, "backup_slow": 0.25, "network_cut": 0.5}
STAGE_LABELS = {"before": "before", "primary_out": "primary out", "backup_slow": "backup slow",
                "network_cut": "network cut", "after": "after"}
PRIMARY, BACKUP = "primary", "backup"
PROVIDER_SUBJECTS = {PRIMARY: "cloud.infer.a", BACKUP: "cloud.infer.b"}
CLOUD_TIMEOUT_MS = 200  # the example's cloud timeout, for each provider
BACKUP_SLOW_MS = CLOUD_TIMEOUT_MS + 150  # slow past its timeout: answers that come, but too late
SMALL_MODEL = "small"
# A small model trusted a little lower than the main one: when the main model is unsure, its
# fairly sure answer still beats the rules' (the bundled model stands in for it: the repo has one).
SMALL_MIN_CONFIDENCE = 0.6
LADDER = [f"cloud:{PRIMARY}", f"cloud:{BACKUP}", "model", f"model:{SMALL_MODEL}", "rules"]
SAMPLE_S = 0.1  # how often the backlog and the link are sampled (the timeline's resolution)
DRAIN_LIMIT_S = 20.0  # how long the end waits for the last decisions, then for the audit backlog to reach 0
ONLINE_LIMIT_S = 15.0  # how long the start waits for the cloud link
EXIT_LIMIT_S = 30.0  # bound on each component's shutdown (the runtime's drain is the long one)
APPROVAL_DELAY_S = (0.3, 1.5)  # the simulated on-call engineer's reading time
APPROVAL_TIMEOUT_MS = 5000
APPROVAL_OUTCOMES = ("approved", "denied", "timeout", "unreachable", "approval_backlog")


class DemoOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How long, how fast and where: `edge demo --duration --outage --rate --out --seed`."""

    duration_s: float = 30.0
    outage_s: float = 10.0
    outage_at_s: float | None = None  # None: about a third of the way in
    rate_hz: float = 20.0
    pumps: int = 4
    seed: int = 7
    out_dir: Path = Path("demo-out")
    live: bool | None = None  # None: a live view when stdout is a terminal

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.outage_s <= 0 or self.rate_hz <= 0 or self.pumps < 1:
            raise ValueError("duration, outage and rate must be positive, and there must be at least one pump")
        if self.outage_start_s + self.outage_s >= self.duration_s:
            raise ValueError(f"the outage ({self.outage_start_s:g}s + {self.outage_s:g}s) must end before "
                             f"the demo does ({self.duration_s:g}s)")

    @property
    def outage_start_s(self) -> float:
        """When the link is cut, in seconds after the sensors start."""
        if self.outage_at_s is not None:
            return self.outage_at_s
        # About a third in, but leave a few seconds after the outage: the breaker's next trial and
        # the backlog's drain are the second half of the story.
        return max(min(self.duration_s / 3, self.duration_s - self.outage_s - 3.0), 0.25 * self.duration_s)


# ---------------------------------------------------------------------------------------------
# The simulated pumps: a seeded physical story, a pure function of (seed, send index)

ROLES = ("wearing", "vfd", "marginal", "steady")
HOT_BEARING_C = 101.0  # a temperature spike's peak: the lubricant breaks down above 95 °C


class PumpPlan(msgspec.Struct, frozen=True):
    """One pump's character for the whole run.

    Roles: `wearing` (a bearing degrades into an anomaly, then maintenance repairs it, in cycles);
    `vfd` (a variable-speed drive sweeping down below 880 rpm, where the model was never trained);
    `marginal` (a worn bearing right at the alarm limit, where the model is least sure); `steady`.
    """

    name: str
    role: str
    rpm: float
    temp_c: float
    rms_per_krpm: float  # healthy vibration grows with speed
    kurtosis: float
    cycle_s: float  # the period of its wear cycle or speed sweep
    phase: float  # where in that cycle it starts (0..1)
    spikes: tuple[tuple[float, float], ...] = ()  # (start_s, length_s) of hot-bearing spikes


def plan_story(pumps: int, duration_s: float, seed: int) -> list[PumpPlan]:
    """Every pump's plan; the same seed gives the same story."""
    rng = random.Random(seed)
    roles = [ROLES[i % len(ROLES)] for i in range(pumps)]
    rng.shuffle(roles)
    # Rarely a critical spike on one pump: one per 15 s of run (at least one), each somewhere in its
    # own slice of the run, so a long run shows approvals both with and without the cloud.
    count = max(1, round(duration_s / 15))
    spike_len = round(min(3.0, max(1.0, 0.06 * duration_s)), 2)
    spikes = tuple((round((i + rng.uniform(0.1, 0.8)) * duration_s / count, 2), spike_len) for i in range(count))
    hot = rng.randrange(pumps)
    plans = []
    for i, role in enumerate(roles):
        rpm = 1150.0 if role == "vfd" else rng.choice((1480.0, 1780.0, 2200.0, 2950.0))
        plans.append(PumpPlan(
            name=f"p{i + 1}", role=role, rpm=rpm, temp_c=round(40 + 0.008 * rpm + rng.uniform(-4, 4), 1),
            rms_per_krpm=round(rng.uniform(0.5, 0.8), 3), kurtosis=round(rng.uniform(2.9, 3.3), 2),
            cycle_s=max(4.0, duration_s / 2), phase=round(rng.random(), 3), spikes=spikes if i == hot else (),
        ))
    return plans


def reading(plan: PumpPlan, t: float, rng: random.Random) -> dict[str, Any]:
    """The pump's sensor values at `t` seconds, with sensor noise drawn from `rng`."""
    cycle = (t / plan.cycle_s + plan.phase) % 1.0
    rpm = plan.rpm
    if plan.role == "vfd":
        rpm = plan.rpm + 420.0 * math.sin(2 * math.pi * cycle)  # 730..1570 rpm
    rms = 0.2 + plan.rms_per_krpm * rpm / 1000
    kurtosis = plan.kurtosis
    temp_c = plan.temp_c + 0.008 * (rpm - plan.rpm)
    if plan.role == "wearing":
        # Rises for 60% of the cycle, stays worn until maintenance at 85%, then healthy again.
        severity = min(1.0, cycle / 0.6) if cycle < 0.85 else 0.0
        rms += severity * (6.0 - rms)
        kurtosis += severity * (7.5 - kurtosis)
        temp_c += 6.0 * severity
    elif plan.role == "marginal":
        rms = 4.6 + 0.2 * math.sin(2 * math.pi * t / 7.0)
        kurtosis = 5.1 + 0.3 * math.sin(2 * math.pi * t / 5.3)
    for start, length in plan.spikes:
        if start <= t < start + length:
            temp_c += (HOT_BEARING_C - temp_c) * math.sin(math.pi * (t - start) / length)
    return {
        "rms": round(max(0.1, rms * (1 + rng.gauss(0, 0.03))), 3),
        "kurtosis": round(max(1.0, kurtosis + rng.gauss(0, 0.15)), 3),
        "temp_c": round(temp_c + rng.gauss(0, 0.6), 2),
        "rpm": round(rpm + rng.gauss(0, 4.0), 1),
        "asset": plan.name,
    }


class SensorStory:
    """Input `k` of the open-loop schedule: which pump, at what time, with which values."""

    def __init__(self, options: DemoOptions) -> None:
        self.plans = plan_story(options.pumps, options.duration_s, options.seed)
        self.rate_hz = options.rate_hz
        self.seed = options.seed

    def at(self, k: int) -> tuple[float, str, dict[str, Any]]:
        """(seconds after the start, subject, values) of input `k`; pumps take turns."""
        t = k / self.rate_hz
        plan = self.plans[k % len(self.plans)]
        noise = random.Random(self.seed * 1_000_003 + k)  # per input, so any k can be replayed alone
        return t, f"sensors.{plan.name}.pump", reading(plan, t, noise)


# ---------------------------------------------------------------------------------------------
# The runtime's config: the bundled example, pointed at the demo's servers and sped up


CLOUD_DOMAIN = "hub"
"""The cloud server's JetStream domain: the device reaches the audit stream through it (leaf mode)."""


def demo_config(local_url: str, upstream_url: str, data_dir: Path, *, operator_key: str = "",
                approver_key: str = "", upstream_domain: str = "") -> Config:
    """The bundled example config with the demo's servers, a data dir, a link tuned to demo speed,
    and the keys the demo made for its operator and approver (the secure path, not allow_unsigned)."""
    data = tomllib.loads(BUNDLED_CONFIG.read_text(encoding="utf-8"))
    data["fleet"] = {**data.get("fleet", {}), "trusted_keys": [operator_key] if operator_key else [],
                     "approver_keys": [approver_key] if approver_key else []}
    data["device_id"] = DEVICE
    data["data_dir"] = str(data_dir)
    data["nats"] = {"local": local_url, "upstream": upstream_url, "upstream_domain": upstream_domain}
    if local_url == "embedded":
        data["nats"]["embedded_port"] = -1  # any free port: the demo must not need 4222
    # Probe every 200 ms, open after 3 failures, try again after 1 s: the breaker's story at demo speed.
    data["link"] = {"probe_interval_ms": 200, "probe_timeout_ms": 200, "breaker_failures": 3,
                    "breaker_reset_ms": 1000}
    data.setdefault("audit", {})["create_stream"] = True
    # The approval policy stays the example's, but a human who never answers (the answer was lost in
    # the outage) is given up on after 5 s rather than 30: the same story at demo speed.
    for pipeline in data.get("pipelines", []):
        for policy in pipeline.get("actions", {}).values():
            if policy.get("approval") == "required":
                policy["approval_timeout_ms"] = APPROVAL_TIMEOUT_MS
    for model in data.get("models", []):
        if model.get("name") == "pump-anomaly":
            model["path"] = str(bundled_model_path())
    data.setdefault("models", []).append({"name": SMALL_MODEL, "path": str(bundled_model_path()),
                                          "min_confidence": SMALL_MIN_CONFIDENCE})
    # Two cloud providers first, then the models, then the rules: the providers' story is the demo's.
    for pipeline in data.get("pipelines", []):
        timeout_ms = pipeline.pop("cloud", {}).get("timeout_ms", CLOUD_TIMEOUT_MS)
        pipeline["clouds"] = {name: {"subject": subject, "timeout_ms": timeout_ms}
                              for name, subject in PROVIDER_SUBJECTS.items()}
        pipeline["ladder"] = list(LADDER)
    # env={}: EDGE_DEVICE_ID in the caller's environment must not rename the demo's device.
    return decode_config(data, source=f"{BUNDLED_CONFIG} (demo)", base_dir=BUNDLED_CONFIG.parent, env={})


# ---------------------------------------------------------------------------------------------
# What the demo watches: decisions off the local bus, and samples of the runtime's state


class SeenDecision(msgspec.Struct):
    """The parts of a published Decision the demo uses (other fields are ignored)."""

    id: str
    received_at: int
    decided_at: int
    tier: str
    action: str
    fallbacks: list[Fallback]
    governance: Governance
    audit_seq: int | None = None
    tier_name: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.decided_at - self.received_at) / 1e6

    @property
    def named_tier(self) -> str:
        return named_tier(self.tier, self.tier_name)


def named_tier(tier: str, tier_name: str) -> str:
    """"cloud:backup", "model:small", "model:pump-anomaly"; "rules" and "guard" as they are."""
    return tier if tier_name in ("", tier) else f"{tier}:{tier_name}"


_DECISION = msgspec.json.Decoder(SeenDecision)


class Sample(msgspec.Struct, array_like=True):
    t: float
    backlog: int
    link: str
    breaker: str
    approvals_pending: int
    providers: dict[str, str] = msgspec.field(default_factory=dict)  # name -> link state (breaker if not closed)


class Clock:
    """The demo's time: seconds since the sensors started, and the outage's marks."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.t0_ns = time.time_ns()
        self.outage_start_ns: int | None = None
        self.outage_end_ns: int | None = None
        self.outage_start_s: float | None = None
        self.outage_end_s: float | None = None
        self.driver_done_s: float | None = None
        self.stage_starts: dict[str, tuple[int, float]] = {}  # stage -> (wall ns, seconds) it began

    def mark_stage(self, stage: str) -> None:
        self.stage_starts[stage] = (time.time_ns(), self.now())

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.t0_ns = time.time_ns()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def rel(self, wall_ns: int) -> float:
        return (wall_ns - self.t0_ns) / 1e9

    def phase_of(self, wall_ns: int) -> str:
        """The phase an input received at `wall_ns` belongs to."""
        if self.outage_start_ns is None or wall_ns < self.outage_start_ns:
            return "before"
        if self.outage_end_ns is None or wall_ns < self.outage_end_ns:
            return "during"
        return "after"

    def stage_of(self, wall_ns: int) -> str:
        """The outage stage (or "before"/"after") an input received at `wall_ns` belongs to."""
        phase = self.phase_of(wall_ns)
        if phase != "during":
            return phase
        begun = [stage for stage, (ns, _) in self.stage_starts.items() if ns <= wall_ns]
        return begun[-1] if begun else STAGES[1]

    def phase_now(self) -> str:
        if self.driver_done_s is not None:
            return "draining"
        return {"before": "before", "during": "OUTAGE", "after": "after"}[self.phase_of(time.time_ns())]


class Recorder:
    """Every Decision published on the local bus, and the runtime's state sampled every SAMPLE_S."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.decisions: list[SeenDecision] = []
        self.arrivals: list[float] = []  # monotonic, one per decision: what "per second" counts
        self.undecodable = 0
        self.samples: list[Sample] = []
        self.link_changes: list[tuple[float, str]] = []
        self.provider_changes: dict[str, list[tuple[float, str]]] = {name: [] for name in PROVIDER_SUBJECTS}

    async def on_decision(self, msg: Msg) -> None:
        try:
            self.add(_DECISION.decode(msg.data))
        except msgspec.DecodeError:
            self.undecodable += 1

    def add(self, decision: SeenDecision) -> None:
        self.decisions.append(decision)
        self.arrivals.append(time.monotonic())

    def sample(self, runtime: Runtime) -> Sample:
        audit = runtime.audit
        backlog = audit.last_seq - audit.synced_seq if audit is not None else 0
        link = runtime.link.state.value
        providers = {}
        for name, subject in PROVIDER_SUBJECTS.items():
            provider = runtime.provider_links.get(subject)
            if provider is not None:
                providers[name] = provider.state.value
        sample = Sample(t=round(self.clock.now(), 3), backlog=backlog, link=link,
                        breaker=runtime.link.breaker.state.value,
                        approvals_pending=sum(p.pending_approvals for p in runtime.pipelines.values()),
                        providers=providers)
        self.samples.append(sample)
        if not self.link_changes or self.link_changes[-1][1] != link:
            self.link_changes.append((sample.t, link))
        for name, state in providers.items():
            changes = self.provider_changes[name]
            if not changes or changes[-1][1] != state:
                changes.append((sample.t, state))
        return sample

    def recent(self, window_s: float = 1.0) -> list[SeenDecision]:
        """Decisions published in the last `window_s` seconds."""
        return self.decisions[bisect.bisect_left(self.arrivals, time.monotonic() - window_s):]


# ---------------------------------------------------------------------------------------------
# The live view


def _tiers(counts: Counter[str], total: int) -> str:
    return "   ".join(f"{tier} {counts.get(tier, 0):>4}" for tier in TIERS) + f"   total {total:>4}"


def render_view(options: DemoOptions, clock: Clock, recorder: Recorder, sample: Sample) -> list[str]:
    """The live view's lines (each under 100 columns)."""
    t = clock.now()
    phase = clock.phase_now()
    if phase == "OUTAGE" and clock.outage_start_s is not None:
        phase = f"OUTAGE ({t - clock.outage_start_s:.1f}s of {options.outage_s:g}s)"
    elif phase == "draining":
        phase = "draining (sensors stopped; waiting for decisions and the audit backlog)"
    if phase.startswith("OUTAGE"):
        phase += f": {STAGE_LABELS[clock.stage_of(time.time_ns())]}"
    recent = recorder.recent()
    reasons = Counter(f"{f.tier}:{f.reason}" for d in recent for f in d.fallbacks)
    lat = sorted(d.latency_ms for d in recent)
    statuses = Counter(d.governance.status for d in recorder.decisions if d.governance.status != "auto")
    fallbacks = ", ".join(f"{k} {v}" for k, v in reasons.most_common(3)) or "none"
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none yet"
    latency = f"p50 {lat[len(lat) // 2]:.1f} ms   max {lat[-1]:.1f} ms   (last second)" if lat else "-"
    breaker = "" if sample.breaker == "closed" else f"   (breaker {sample.breaker.replace('_', '-')})"
    lines = [
        f"edge demo  {DEVICE}   t {t:5.1f}s of {options.duration_s:g}s   {phase}",
        f"  decisions/s  {_tiers(Counter(d.tier for d in recent), len(recent))}",
        f"  so far       {_tiers(Counter(d.tier for d in recorder.decisions), len(recorder.decisions))}",
        f"  deciding/s   {_named(Counter(d.named_tier for d in recent))}",
        f"  fallbacks/s  {fallbacks}",
        f"  latency      {latency}",
        f"  cloud link   {sample.link}{breaker}   providers: {_providers(sample)}",
        f"  audit        backlog {sample.backlog} records (last_seq - synced_seq)",
        f"  approvals    pending {sample.approvals_pending}   governance: {outcomes}",
    ]
    return [line[:99] for line in lines]


def render_line(clock: Clock, recorder: Recorder, sample: Sample) -> str:
    """One compact line per second for a log or a pipe."""
    per_tier = Counter(d.tier for d in recorder.recent())
    rates = " + ".join(f"{per_tier.get(tier, 0)} {tier}" for tier in TIERS)
    breaker = "" if sample.breaker == "closed" else f" ({sample.breaker})"
    return (f"t={clock.now():5.1f}s {clock.phase_now():<8} {rates} /s   link {sample.link}{breaker}   "
            f"{_providers(sample)}   backlog {sample.backlog}   approvals pending {sample.approvals_pending}")


def _named(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.most_common(4)) or "-"


def _providers(sample: Sample) -> str:
    return " ".join(f"{name} {state}" for name, state in sample.providers.items()) or "-"


class LiveView:
    """Redraws the view in place on a terminal (plain ANSI), or prints a line a second."""

    def __init__(self, options: DemoOptions, clock: Clock, recorder: Recorder, *, tty: bool) -> None:
        self.options = options
        self.clock = clock
        self.recorder = recorder
        self.tty = tty
        self._drawn = 0
        self._last = -1.0

    def update(self, sample: Sample) -> None:
        now = self.clock.now()
        if now - self._last < (0.5 if self.tty else 1.0):
            return
        self._last = now
        if not self.tty:
            print(render_line(self.clock, self.recorder, sample), flush=True)
            return
        lines = render_view(self.options, self.clock, self.recorder, sample)
        # Back to the first line of the previous frame, then overwrite each line (ESC[2K clears it).
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        sys.stdout.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        sys.stdout.flush()
        self._drawn = len(lines)


# ---------------------------------------------------------------------------------------------
# The summary (SPEC §11)


class PhaseSummary(msgspec.Struct, kw_only=True):
    """Decisions on inputs received in one phase."""

    start_s: float
    end_s: float
    decisions: int
    by_tier: dict[str, int]
    by_tier_name: dict[str, int]  # "cloud:primary", "cloud:backup", "model:pump-anomaly", "model:small", "rules"
    fallbacks: dict[str, int]
    governance: dict[str, int]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None


class StageSummary(msgspec.Struct, kw_only=True):
    """Decisions on inputs received in one stage of the outage (or before or after it), by named tier."""

    start_s: float
    end_s: float
    what: str
    decisions: int
    by_tier_name: dict[str, int]


class ProviderSummary(msgspec.Struct, kw_only=True):
    """One cloud provider's link on the device: how it failed, when the device noticed, and its return."""

    name: str
    subject: str
    failure: str  # what the script did to it
    failed_at_s: float | None
    offline_after_s: float | None  # from its failure to its link no longer online
    online_after_s: float | None  # from the outage's end to its link online again
    final_state: str
    changes: list[tuple[float, str]]


class BacklogSummary(msgspec.Struct, kw_only=True):
    """The audit backlog (last_seq - synced_seq): its peak and how long it took to drain."""

    peak: int
    peak_at_s: float
    steady: int  # the largest backlog sampled before the outage: records merely in flight
    drained: bool  # back to `steady` after the outage, and 0 before the runtime stopped
    drain_s: float | None  # from the link coming back (proxy passing again) to back at `steady`
    final: int  # when the driver had stopped and the end stopped waiting


class LinkSummary(msgspec.Struct, kw_only=True):
    """When the runtime noticed the cut and the return (seconds after each)."""

    offline_after_s: float | None
    online_after_s: float | None
    changes: list[tuple[float, str]]


class Verification(msgspec.Struct, kw_only=True):
    """The upstream stream against the local log, and the published decisions against both."""

    ok: bool
    stream: str
    local_records: int
    local_last_seq: int
    local_chain_ok: bool
    upstream_records: int
    upstream_first_seq: int
    upstream_last_seq: int
    gaps: int  # seqs of 1..local_last_seq the stream does not hold
    gap_ranges: list[tuple[int, int]]
    duplicates: int
    out_of_order: int
    chain_ok: bool  # local chain, upstream chain, and the same newest hash on both sides
    inputs_sent: int
    decisions_published: int
    decisions_in_log: int
    synced_after_stop: int  # records the runtime had not synced when it stopped (sent by the demo)
    problems: list[str]


class Second(msgspec.Struct, array_like=True):
    """One second of the timeline: decisions by tier, latency, and the largest backlog sampled."""

    t: int
    model: int
    cloud: int
    rules: int
    latency_p50_ms: float | None
    latency_max_ms: float | None
    backlog: int


class DemoSummary(msgspec.Struct, kw_only=True):
    """What `edge demo` verified, written to summary.json."""

    ok: bool
    device: str
    seed: int
    duration_s: float
    rate_hz: float
    pumps: int
    outage_start_s: float
    outage_end_s: float
    phases: dict[str, PhaseSummary]
    outage_max_latency_ms: float | None
    outage_max_latency_after_breaker_ms: float | None  # once the cloud was skipped at once (SPEC §9)
    link: LinkSummary
    backlog: BacklogSummary
    approvals: dict[str, int]  # asked (as the approver saw them), then the outcomes
    governance: dict[str, int]  # every outcome other than `auto`, by status
    stages: dict[str, StageSummary]  # STAGES: before, the outage's three, after
    providers: list[ProviderSummary]
    by_tier_name: dict[str, int]  # the runtime's own count (status by_tier_name), all inputs
    verification: Verification
    timeline: list[Second]


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarize_phases(clock: Clock, decisions: Sequence[SeenDecision], end_s: float) -> dict[str, PhaseSummary]:
    start = end_s if clock.outage_start_s is None else clock.outage_start_s
    end = end_s if clock.outage_end_s is None else clock.outage_end_s
    bounds = {"before": (0.0, start), "during": (start, end), "after": (end, end_s)}
    grouped: dict[str, list[SeenDecision]] = {phase: [] for phase in PHASES}
    for d in decisions:
        grouped[clock.phase_of(d.received_at)].append(d)
    out = {}
    for phase, items in grouped.items():
        latencies = [d.latency_ms for d in items]
        by_tier = Counter(d.tier for d in items)
        by_tier_name = Counter(d.named_tier for d in items)
        out[phase] = PhaseSummary(
            start_s=round(bounds[phase][0], 3), end_s=round(bounds[phase][1], 3), decisions=len(items),
            by_tier={tier: by_tier.get(tier, 0) for tier in TIERS},
            by_tier_name=dict(by_tier_name.most_common()),
            fallbacks=dict(Counter(f"{f.tier}:{f.reason}" for d in items for f in d.fallbacks).most_common()),
            governance=dict(Counter(d.governance.status for d in items).most_common()),
            latency_p50_ms=_pct(latencies, 0.5), latency_p99_ms=_pct(latencies, 0.99),
            latency_max_ms=_pct(latencies, 1.0),
        )
    return out


def summarize_stages(clock: Clock, decisions: Sequence[SeenDecision], end_s: float) -> dict[str, StageSummary]:
    starts = {"before": 0.0, **{stage: s for stage, (_, s) in clock.stage_starts.items()},
              "after": end_s if clock.outage_end_s is None else clock.outage_end_s}
    what = {"before": "every provider answers",
            "primary_out": f"{PRIMARY} blackholed (its requests never answered)",
            "backup_slow": f"and {BACKUP} slow ({BACKUP_SLOW_MS} ms, past its {CLOUD_TIMEOUT_MS} ms timeout)",
            "network_cut": "and the cloud link blackholed", "after": "all back"}
    grouped: dict[str, Counter[str]] = {stage: Counter() for stage in STAGES}
    for d in decisions:
        grouped[clock.stage_of(d.received_at)][d.named_tier] += 1
    out = {}
    for i, stage in enumerate(STAGES):
        later = [starts[s] for s in STAGES[i + 1:] if s in starts]
        counts = grouped[stage]
        out[stage] = StageSummary(start_s=round(starts.get(stage, end_s), 3),
                                  end_s=round(later[0] if later else end_s, 3), what=what[stage],
                                  decisions=sum(counts.values()), by_tier_name=dict(counts.most_common()))
    return out


def summarize_providers(clock: Clock, changes: dict[str, list[tuple[float, str]]]) -> list[ProviderSummary]:
    failed = {PRIMARY: clock.stage_starts.get("primary_out"), BACKUP: clock.stage_starts.get("backup_slow")}
    failure = {PRIMARY: "blackholed", BACKUP: f"slow ({BACKUP_SLOW_MS} ms, timeout {CLOUD_TIMEOUT_MS} ms)"}
    end = clock.outage_end_s
    out = []
    for name, subject in PROVIDER_SUBJECTS.items():
        mark = failed[name]
        at = mark[1] if mark is not None else None
        history = changes.get(name, [])
        offline = next((t for t, state in history if at is not None and t >= at
                        and state != LinkState.ONLINE.value), None)
        online = next((t for t, state in history if end is not None and t >= end
                       and state == LinkState.ONLINE.value), None)
        out.append(ProviderSummary(
            name=name, subject=subject, failure=failure[name], failed_at_s=round(at, 3) if at is not None else None,
            offline_after_s=round(offline - at, 3) if offline is not None and at is not None else None,
            online_after_s=round(online - end, 3) if online is not None and end is not None else None,
            final_state=history[-1][1] if history else "", changes=[(round(t, 3), s) for t, s in history]))
    return out


def summarize_backlog(clock: Clock, samples: Sequence[Sample], final: int) -> BacklogSummary:
    peak = max(samples, key=lambda s: s.backlog, default=Sample(0.0, 0, "", "", 0))
    start, end = clock.outage_start_s, clock.outage_end_s
    steady = max((s.backlog for s in samples if start is None or s.t < start), default=0)
    drain_s = None
    if end is not None:
        # Drained: the first sample after the outage back at the steady level, once the backlog had grown.
        grown = False
        for s in samples:
            if s.t < end:
                grown = grown or s.backlog > steady
                continue
            grown = grown or s.backlog > steady
            if grown and s.backlog <= steady:
                drain_s = round(s.t - end, 3)
                break
    return BacklogSummary(peak=peak.backlog, peak_at_s=peak.t, steady=steady,
                          drained=drain_s is not None and final == 0, drain_s=drain_s, final=final)


def summarize_link(clock: Clock, changes: Sequence[tuple[float, str]]) -> LinkSummary:
    # The link itself is cut only in the outage's last stage; the providers failed before it.
    cut = clock.stage_starts.get("network_cut")
    start, end = (cut[1] if cut is not None else clock.outage_start_s), clock.outage_end_s
    offline = next((t for t, state in changes if start is not None and t >= start
                    and state != LinkState.ONLINE.value), None)
    online = next((t for t, state in changes if end is not None and t >= end and state == LinkState.ONLINE.value), None)
    return LinkSummary(
        offline_after_s=round(offline - start, 3) if offline is not None and start is not None else None,
        online_after_s=round(online - end, 3) if online is not None and end is not None else None,
        changes=[(round(t, 3), state) for t, state in changes],
    )


def timeline(clock: Clock, decisions: Sequence[SeenDecision], samples: Sequence[Sample], end_s: float) -> list[Second]:
    seconds = max(1, math.ceil(end_s))
    tiers: list[Counter[str]] = [Counter() for _ in range(seconds)]
    latencies: list[list[float]] = [[] for _ in range(seconds)]
    backlog = [0] * seconds
    for d in decisions:
        i = min(seconds - 1, max(0, int(clock.rel(d.received_at))))
        tiers[i][d.tier] += 1
        latencies[i].append(d.latency_ms)
    for s in samples:
        i = min(seconds - 1, max(0, int(s.t)))
        backlog[i] = max(backlog[i], s.backlog)
    return [Second(t=i, model=tiers[i]["model"], cloud=tiers[i]["cloud"], rules=tiers[i]["rules"],
                   latency_p50_ms=_pct(latencies[i], 0.5), latency_max_ms=_pct(latencies[i], 1.0),
                   backlog=backlog[i]) for i in range(seconds)]


def format_summary(s: DemoSummary, out_dir: Path, png: str) -> str:
    """The verified summary as the terminal shows it (within 100 columns)."""
    v = s.verification
    lines = [
        "",
        "edge demo: verified summary",
        f"  device {s.device}, seed {s.seed}: {s.duration_s:g}s of input at {s.rate_hz:g} Hz from {s.pumps} pumps",
        f"  outage {s.outage_start_s:.1f}s..{s.outage_end_s:.1f}s: {PRIMARY} blackholed, {BACKUP} slow from "
        f"{s.stages['backup_slow'].start_s:.1f}s, cloud link cut from {s.stages['network_cut'].start_s:.1f}s",
        "",
        f"  {'decisions':<19}{'model':>6}{'cloud':>7}{'rules':>7}{'total':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for phase in PHASES:
        p = s.phases[phase]
        span = f"{p.start_s:.1f}-{p.end_s:.1f}s"
        nums = "".join(f"{p.by_tier[t]:>7}" for t in TIERS)
        lat = "".join(f"{x:>9.1f}" if x is not None else f"{'-':>9}"
                      for x in (p.latency_p50_ms, p.latency_p99_ms, p.latency_max_ms))
        lines.append(f"  {phase:<7}{span:>11}{nums}{p.decisions:>7}{lat}")
    lines += ["", *_named_tier_table(s)]
    reasons = ", ".join(f"{k} {n}" for k, n in s.phases["during"].fallbacks.items()) or "none"
    drain = (f"drained {s.backlog.drain_s:.1f}s after the network came back" if s.backlog.drain_s is not None
             else "NOT drained after the network came back")
    paragraphs = [
        f"fallbacks during the outage: {reasons}",
        "",
        f"latency during the outage: longest {_ms(s.outage_max_latency_ms)} (decisions that waited on a "
        f"provider until its breaker opened); {_ms(s.outage_max_latency_after_breaker_ms)} at most once both "
        "were open",
        *(f"cloud {p.name} ({p.subject}, {p.failure}): offline {_secs(p.offline_after_s)} after it failed; online "
          f"again {_secs(p.online_after_s)} after the outage; now {p.final_state}" for p in s.providers),
        f"cloud link: offline {_secs(s.link.offline_after_s)} after the cut; online again "
        f"{_secs(s.link.online_after_s)} after the network came back",
        f"audit backlog: peak {s.backlog.peak} records (at {s.backlog.peak_at_s:.1f}s); {drain}; "
        f"{s.backlog.final} at the end",
        "approvals: " + (", ".join(f"{k} {n}" for k, n in s.approvals.items()) or "none"),
        "governance other than auto: " + (", ".join(f"{k} {n}" for k, n in s.governance.items()) or "none"),
        "",
        f"verification: {'PASSED' if v.ok else 'FAILED'} (stream {v.stream} against the local log)",
        f"  the stream holds seqs {v.upstream_first_seq}..{v.upstream_last_seq} of {v.local_last_seq} local: "
        f"{v.upstream_records} records, {v.gaps} gaps, {v.duplicates} duplicates, {v.out_of_order} out of order, "
        f"chain {'ok' if v.chain_ok else 'BROKEN'}",
        f"  decisions: {v.inputs_sent} inputs, {v.decisions_published} published, {v.decisions_in_log} in the log"
        + (f"; records synced after the runtime stopped: {v.synced_after_stop}" if v.synced_after_stop else ""),
        *(f"  problem: {p}" for p in v.problems),
        "",
        f"wrote {out_dir / 'summary.json'}" + (f" and {png}" if png else ""),
    ]
    for text in paragraphs:
        indent = "  " + " " * (len(text) - len(text.lstrip()))
        lines.append(textwrap.fill(text.strip(), width=99, initial_indent=indent, subsequent_indent=indent + "  ")
                     if text else "")
    return "\n".join(lines)


def _named_tier_table(s: DemoSummary) -> list[str]:
    """Decisions by named tier, a column per stage of the outage (and before, after)."""
    st = s.stages
    names = sorted({name for stage in st.values() for name in stage.by_tier_name}, key=_tier_order)
    lines = [f"  {'decided by':<20}" + "".join(f"{STAGE_LABELS[stage]:>12}" for stage in STAGES) + f"{'total':>8}",
             f"  {'(inputs received)':<20}" + "".join(f"{f'{st[x].start_s:.1f}-{st[x].end_s:.1f}s':>12}"
                                                       for x in STAGES)]
    for name in names:
        counts = [st[stage].by_tier_name.get(name, 0) for stage in STAGES]
        lines.append(f"  {name:<20}" + "".join(f"{n:>12}" for n in counts) + f"{sum(counts):>8}")
    agree = "agrees" if s.by_tier_name == {k: v for k, v in _totals(st).items() if v} else "DIFFERS"
    runtime_count = (f"the runtime's own count (status by_tier_name) {agree}: "
                     + ", ".join(f"{k} {v}" for k, v in s.by_tier_name.items()))
    return [line[:99] for line in lines] + textwrap.wrap(runtime_count, width=97, initial_indent="  ",
                                                         subsequent_indent="    ")


def _tier_order(name: str) -> tuple[int, str]:
    order = [f"cloud:{PRIMARY}", f"cloud:{BACKUP}", "model", "model:", "rules", "guard"]
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order)), name


def _totals(stages: dict[str, StageSummary]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for stage in stages.values():
        totals.update(stage.by_tier_name)
    return dict(totals)


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "-"


def _secs(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "never"


# ---------------------------------------------------------------------------------------------
# Verification: the stream against the local log


async def verify(cloud_url: str, stream: str, db: Path, recorder: Recorder, inputs_sent: int,
                 synced_after_stop: int) -> Verification:
    """Check the stream holds exactly seqs 1..last of the local log, chained, and every decision."""
    problems: list[str] = []
    local = await asyncio.to_thread(verify_chain, db)
    if not local.ok:
        problems.append(f"local chain: {local.summary()}")
    logged = await asyncio.to_thread(_logged_decisions, db)
    report: UpstreamReport | None = None
    newest_hash = ""
    try:
        nc = await nats.connect(cloud_url, connect_timeout=2, max_reconnect_attempts=1)
        try:
            js = nc.jetstream()
            report = (await verify_upstream(js, stream, DEVICE, idle_timeout=10.0)).get(DEVICE)
            newest_hash = decode_record((await js.get_last_msg(stream, f"audit.{DEVICE}")).data or b"").hash
        finally:
            await nc.close()
    except (SyncError, OSError, TimeoutError, nats.errors.Error) as exc:
        problems.append(f"reading {stream}: {type(exc).__name__}: {exc}")
    if report is None:
        problems.append(f"{stream} holds no records of {DEVICE}")
    local_hash = await asyncio.to_thread(_hash_of, db, local.last_seq)
    held = (report.records - report.duplicates - len(report.bad_hash) - len(report.conflicts)) if report else 0
    gaps = max(0, local.last_seq - held)
    gap_ranges = [*report.missing, *report.explained] if report else [(1, local.last_seq)]
    if report is not None and report.last_seq < local.last_seq:
        gap_ranges.append((report.last_seq + 1, local.last_seq))
    if gaps:
        problems.append(f"the stream lacks {gaps} of seqs 1..{local.last_seq}: {gap_ranges[:5]}")
    upstream_chain_ok = report is not None and not (report.chain_breaks or report.bad_hash or report.conflicts)
    if report is not None and not upstream_chain_ok:
        problems.append(f"upstream: {report.summary()}")
    if report is not None and report.last_seq > local.last_seq:
        problems.append(f"the stream holds seq {report.last_seq}, beyond the local log's {local.last_seq}")
    same_head = bool(newest_hash) and newest_hash == local_hash
    if report is not None and not same_head:
        problems.append("the stream's newest record is not the local log's newest record")
    duplicates = report.duplicates if report else 0
    if duplicates or (report and report.out_of_order):
        problems.append(f"{duplicates} duplicates, {report.out_of_order if report else 0} out of order upstream")
    published = recorder.decisions
    in_log = sum(1 for d in published if d.audit_seq is not None and logged.get(d.audit_seq) == d.id)
    if in_log != len(published):
        problems.append(f"{len(published) - in_log} published decisions are not in the local log")
    if len({d.id for d in published}) != inputs_sent:
        problems.append(f"{inputs_sent} inputs were sent but {len({d.id for d in published})} decisions published")
    if recorder.undecodable:
        problems.append(f"{recorder.undecodable} published decisions could not be decoded")
    return Verification(
        ok=not problems, stream=stream, local_records=local.records, local_last_seq=local.last_seq,
        local_chain_ok=local.ok, upstream_records=report.records if report else 0,
        upstream_first_seq=report.first_seq if report else 0, upstream_last_seq=report.last_seq if report else 0,
        gaps=gaps, gap_ranges=gap_ranges[:20], duplicates=duplicates,
        out_of_order=report.out_of_order if report else 0,
        chain_ok=local.ok and upstream_chain_ok and same_head, inputs_sent=inputs_sent,
        decisions_published=len(published), decisions_in_log=in_log, synced_after_stop=synced_after_stop,
        problems=problems,
    )


class _DecisionId(msgspec.Struct):
    id: str


def _logged_decisions(db: Path) -> dict[int, str]:
    decode = msgspec.json.Decoder(_DecisionId).decode
    return {r.seq: decode(r.body).id for r in iter_records(db, kinds=["decision"])}


def _hash_of(db: Path, seq: int) -> str:
    return next((r.hash for r in iter_records(db, from_seq=seq, to_seq=seq)), "")


async def sync_remainder(db: Path, upstream_url: str, stream: str, limit_s: float) -> int:
    """Upload what the stopped runtime had not synced (its drain and `stop` records); how many."""

    async def connect() -> NATS:
        return await connect_for_upload(upstream_url)

    async with AuditLog(db, DEVICE) as audit, Uploader(audit, connect, stream=stream) as uploader:
        left = await uploader.sync_now(limit_s)
        if left:
            raise SyncError(f"{left} audit records could not be synced after the runtime stopped")
        # It resumed after what the stream holds, so what it published is what the runtime left behind.
        published = uploader.status()["published"]
        return published if isinstance(published, int) else 0


# ---------------------------------------------------------------------------------------------
# The PNG timeline


def write_timeline_png(path: Path, summary: DemoSummary, samples: Sequence[Sample]) -> str:
    """Decisions/s by tier, latency and backlog over time, the outage shaded; "" without matplotlib.

    Blocking (matplotlib): run it in a thread.
    """
    try:
        import matplotlib
    except ImportError:
        return ""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    secs = summary.timeline
    xs = [s.t for s in secs]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True, constrained_layout=True)
    colors = {"model": "#4C72B0", "cloud": "#55A868", "rules": "#DD8452"}
    bottom = [0] * len(secs)
    for tier in TIERS:
        heights = [getattr(s, tier) for s in secs]
        ax1.bar(xs, heights, width=0.9, align="edge", bottom=bottom, color=colors[tier], label=tier)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax1.set_ylabel("decisions / s\n(by input's second)")
    ax1.set_title(f"edge demo: {summary.device}, {summary.rate_hz:g} Hz from {summary.pumps} pumps; "
                  f"cloud outage {summary.outage_start_s:.1f}-{summary.outage_end_s:.1f}s "
                  f"(link cut from {summary.stages['network_cut'].start_s:.1f}s)", pad=16)
    ax1.set_ylim(0, max(bottom, default=1) * 1.12 or 1)
    mids = [s.t + 0.5 for s in secs]
    for attr, color, label in (("latency_max_ms", "#C44E52", "max"), ("latency_p50_ms", "#333333", "p50")):
        points = [(x, getattr(s, attr)) for x, s in zip(mids, secs, strict=True) if getattr(s, attr) is not None]
        ax2.plot([x for x, _ in points], [y for _, y in points], "o-", color=color, ms=3, label=label)
    ax2.set_yscale("log")
    ax2.set_ylabel("decision latency (ms)\nper second")
    times = [s.t for s in samples]
    backlog = [s.backlog for s in samples]
    ax3.plot(times, backlog, color="#8172B2", label="last_seq - synced_seq")
    ax3.fill_between(times, backlog, color="#8172B2", alpha=0.25)
    ax3.set_ylabel("audit backlog (records)")
    ax3.set_xlabel("seconds since the sensors started")
    back = (summary.outage_end_s + summary.link.online_after_s) if summary.link.online_after_s is not None else None
    for ax in (ax1, ax2, ax3):
        ax.axvspan(summary.outage_start_s, summary.outage_end_s, color="#999999", alpha=0.3, lw=0, zorder=0)
        if back is not None:
            ax.axvline(back, color="#2E7D32", ls="--", lw=1, label="link online again" if ax is ax3 else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    ax1.set_xlim(0, max(xs[-1] + 1 if xs else 1, times[-1] if times else 1))
    label_at = blended_transform_factory(ax1.transData, ax1.transAxes)
    ax1.text((summary.outage_start_s + summary.outage_end_s) / 2, 1.01, "OUTAGE", transform=label_at,
             ha="center", va="bottom", fontsize=9, color="#555555", weight="bold")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Running it


async def _bounded(aw: Awaitable[T], limit_s: float, what: str) -> T | None:
    """Await `aw` to the end even if cancelled meanwhile (a second Ctrl-C), but never past `limit_s`."""
    task = asyncio.ensure_future(aw)
    deadline = time.monotonic() + limit_s
    interrupted = False
    while not task.done() and time.monotonic() < deadline:
        try:
            await asyncio.wait({task}, timeout=deadline - time.monotonic())
        except asyncio.CancelledError:
            interrupted = True  # keep closing: an exit cut short would leave processes behind
    if not task.done():
        print(f"edge demo: {what} did not stop within {limit_s:g}s; going on", file=sys.stderr)
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if interrupted:
        raise asyncio.CancelledError
    if task.done() and not task.cancelled():
        return task.result()
    return None


async def _enter(stack: AsyncExitStack, cm: AbstractAsyncContextManager[T], what: str,
                 limit_s: float = EXIT_LIMIT_S) -> T:
    """Enter `cm`; its exit goes on `stack`, shielded and bounded."""
    value = await cm.__aenter__()

    async def exit_(exc_type: Any, exc: Any, tb: Any) -> bool:
        return bool(await _bounded(cm.__aexit__(exc_type, exc, tb), limit_s, what))

    stack.push_async_exit(exit_)
    return value


async def _connect(stack: AsyncExitStack, url: str, name: str) -> NATS:
    nc = await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2)

    async def close() -> None:
        if not nc.is_closed:
            await nc.close()

    async def close_bounded() -> None:
        await _bounded(close(), 5.0, f"connection {name}")

    stack.push_async_callback(close_bounded)
    return nc


async def _until(predicate: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)  # poll with a deadline
    return True


async def _drive(nc: NATS, story: SensorStory, clock: Clock, duration_s: float) -> int:
    """Publish inputs on the open-loop schedule (late sends go at once, never skipped); how many."""
    k = 0
    while True:
        t, subject, values = story.at(k)
        if t >= duration_s:
            return k
        delay = t - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)  # pace: the offered load's schedule
        await nc.publish(subject, msgspec.json.encode(values))
        k += 1


async def _script_outage(proxy: FaultProxy, providers: dict[str, CloudSimulator], clock: Clock,
                         options: DemoOptions) -> None:
    """The scripted outage, a piece at a time: the primary provider blackholed (its requests never
    answered), then the backup slow past its timeout, then the whole cloud link blackholed; then
    everything passes again at once."""
    start = options.outage_start_s
    for stage, at in STAGE_AT.items():
        await asyncio.sleep(max(0.0, start + at * options.outage_s - clock.now()))  # pace: the script's schedule
        if stage == "primary_out":
            providers[PRIMARY].silent()
        elif stage == "backup_slow":
            providers[BACKUP].slow(BACKUP_SLOW_MS)
        else:
            proxy.blackhole()
        # Marked after the change: an input received after the mark met it.
        clock.mark_stage(stage)
        if stage == "primary_out":
            clock.outage_start_ns, clock.outage_start_s = clock.stage_starts[stage]
    await asyncio.sleep(max(0.0, start + options.outage_s - clock.now()))  # pace: the script's schedule
    # Marked before the link passes again: an input received after the mark is "after" the outage.
    clock.outage_end_ns, clock.outage_end_s = time.time_ns(), clock.now()
    for provider in providers.values():
        provider.normal()
    # The blackhole discarded bytes of connections it kept open; no TCP connection can go on after
    # losing bytes, and the nats-py clients on them would carry on out of step (publishes missing
    # from the audit stream, PONGs matched to the wrong PINGs). So the network comes back the way a
    # NAT or firewall that lost its state brings it back: the old connections are reset, new ones pass.
    proxy.reset()
    proxy.pass_through()


def _all_online(runtime: Runtime) -> bool:
    links = [runtime.link, *(runtime.provider_links.get(s) for s in PROVIDER_SUBJECTS.values())]
    return all(link is not None and link.state is LinkState.ONLINE for link in links)


def _runtime_by_tier_name(status: dict[str, Any]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for pipeline in status["pipelines"].values():
        for key, n in pipeline["by_tier_name"].items():
            tier, _, name = key.partition(":")
            counts[named_tier(tier, name)] += n
    return dict(counts.most_common())


async def _watch(runtime: Runtime, clock: Clock, recorder: Recorder, view: LiveView, stop: asyncio.Event) -> None:
    kicked = False
    while not stop.is_set():
        sample = recorder.sample(runtime)
        if not kicked and clock.outage_end_s is not None and sample.link == LinkState.ONLINE.value:
            kicked = True
            # The runtime's wake-up on the link's return does not cut the uploader's back-off short
            # (it can sleep up to 5 s after failing through the outage); `sync now` does.
            if runtime.uploader is not None:
                await runtime.uploader.sync_now(0)
        view.update(sample)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SAMPLE_S):
                await stop.wait()
    view.update(recorder.sample(runtime))


async def run_demo(options: DemoOptions) -> int:
    """Run the demo end to end; 0 when the verification passed, 1 otherwise."""
    out_dir = options.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty() if options.live is None else options.live
    clock = Clock()
    recorder = Recorder(clock)
    story = SensorStory(options)
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        work = Path(tmp)
        db = work / "var" / "audit.db"
        async with AsyncExitStack() as stack:
            cloud = await _enter(stack, NatsServer(name="demo-cloud", store_dir=work / "cloud",
                                                   jetstream_domain=CLOUD_DOMAIN, leafnode_port=-1,
                                                   leafnode_compression="s2_fast"),
                                 "the cloud nats-server")
            proxy = await _enter(stack, FaultProxy("127.0.0.1", cloud.leafnode_port or 0), "the fault proxy")
            # Keys made on the fly: the device obeys only its operator and settles approvals only
            # with answers its approver signed (nothing on the bus is trusted for being there).
            operator_seed, approver_seed = new_seed(), new_seed()
            config = demo_config("embedded", f"nats-leaf://127.0.0.1:{proxy.port}", work / "var",
                                 operator_key=public_key_of(operator_seed), approver_key=public_key_of(approver_seed),
                                 upstream_domain=CLOUD_DOMAIN)
            cloud_nc = await _connect(stack, cloud.url, "demo-cloud-sim")
            providers = {name: await _enter(stack, CloudSimulator(cloud_nc, subject=subject), f"the {name} cloud")
                         for name, subject in PROVIDER_SUBJECTS.items()}
            approver = await _enter(stack, AutoApprover(cloud_nc, delay_s=APPROVAL_DELAY_S, seed=options.seed,
                                                                key=approver_seed),
                                    "the approver")

            async with AsyncExitStack() as run:
                runtime = await _enter(run, Runtime(config), "the runtime")
                # The local bus is the runtime's own embedded server, up once the runtime is.
                local_nc = await _connect(stack, runtime.local_url, "demo-sensors")  # outlives the drain
                await local_nc.subscribe(f"edge.{DEVICE}.decision.>", cb=recorder.on_decision)
                await local_nc.flush()
                print(f"edge demo: device {DEVICE} on its embedded bus {runtime.local_url}, a leaf node of the cloud "
                      f"at {cloud.url},\n           linked through a fault proxy at {proxy.url}", flush=True)
                if not await _until(lambda: _all_online(runtime), ONLINE_LIMIT_S):
                    print(f"edge demo: the cloud link and providers did not come up within {ONLINE_LIMIT_S:g}s",
                          file=sys.stderr)
                    return 1
                view = LiveView(options, clock, recorder, tty=tty)
                stop = asyncio.Event()
                clock.start()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(_watch(runtime, clock, recorder, view, stop), name="demo-watch")
                    tasks.create_task(_script_outage(proxy, providers, clock, options), name="demo-outage")
                    sent = await _drive(local_nc, story, clock, options.duration_s)
                    clock.driver_done_s = clock.now()
                    # Every input decided (approvals take up to APPROVAL_DELAY_S), then every record upstream.
                    await local_nc.flush()
                    await _until(lambda: len(recorder.decisions) >= sent, DRAIN_LIMIT_S)
                    await _until(lambda: runtime.audit is not None and runtime.audit.backlog == 0, DRAIN_LIMIT_S)
                    stop.set()
                # The runtime's own count by named tier, before it stops: the summary's are the
                # published decisions', and the two must agree.
                runtime_by_tier_name = _runtime_by_tier_name(runtime.status())
                final_backlog = recorder.samples[-1].backlog if recorder.samples else 0
            # The runtime has drained and stopped: every decision it made was published (and heard
            # before its embedded server stopped).
            await _until(lambda: len(recorder.decisions) >= sent, 5.0)
            try:
                synced_after_stop = await sync_remainder(db, cloud.url, config.audit.stream, 10.0)
            except (SyncError, OSError, nats.errors.Error) as exc:
                print(f"edge demo: syncing the last records failed: {exc}", file=sys.stderr)
                synced_after_stop = 0
            verification = await verify(cloud.url, config.audit.stream, db, recorder, sent, synced_after_stop)
            approvals_asked = len(approver.requests)
        await asyncio.to_thread(_copy_log, db, out_dir / "audit.db")

    phases = summarize_phases(clock, recorder.decisions, options.duration_s)
    during = [d for d in recorder.decisions if clock.phase_of(d.received_at) == "during"]
    # Once every provider was skipped at once (breakers open), no decision waits on the cloud.
    first_skip = min((d.received_at for d in during if _skipped_every_cloud(d)), default=None)
    after_breaker = [d.latency_ms for d in during if first_skip is not None and d.received_at >= first_skip]
    governance = Counter(d.governance.status for d in recorder.decisions if d.governance.status != "auto")
    approvals = {"asked": approvals_asked, **{k: governance[k] for k in APPROVAL_OUTCOMES if governance[k]}}
    summary = DemoSummary(
        ok=verification.ok, device=DEVICE, seed=options.seed, duration_s=options.duration_s,
        rate_hz=options.rate_hz, pumps=options.pumps,
        outage_start_s=round(clock.outage_start_s or 0.0, 3), outage_end_s=round(clock.outage_end_s or 0.0, 3),
        phases=phases, outage_max_latency_ms=phases["during"].latency_max_ms,
        outage_max_latency_after_breaker_ms=_pct(after_breaker, 1.0),
        link=summarize_link(clock, recorder.link_changes),
        backlog=summarize_backlog(clock, recorder.samples, final_backlog),
        approvals=approvals, governance=dict(governance.most_common()),
        stages=summarize_stages(clock, recorder.decisions, options.duration_s),
        providers=summarize_providers(clock, recorder.provider_changes),
        by_tier_name=runtime_by_tier_name,
        verification=verification,
        timeline=timeline(clock, recorder.decisions, recorder.samples, options.duration_s),
    )
    (out_dir / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(summary)) + b"\n")
    png = await asyncio.to_thread(write_timeline_png, out_dir / "timeline.png", summary, recorder.samples)
    print(format_summary(summary, out_dir, png))
    if not png:
        print("  (no timeline.png: matplotlib is not installed; `pip install matplotlib` to get one)")
    print(await asyncio.to_thread(value_paragraph, out_dir / "audit.db", out_dir / "value.png" if png else None))
    return 0 if verification.ok else 1


def value_paragraph(db: Path, png: Path | None) -> str:
    """What the AI was worth in this run, as `edge report -c ... --png` says it, from the run's log."""
    from edge import plot_report, report_text, value_report
    from sync import iter_records

    report = value_report(iter_records(db), cloud_call_cost=DEMO_CLOUD_CALL_COST, currency="EUR")
    lines = ["", "what the AI was worth (edge report, from the audit log):", report_text(report)]
    if png is not None:
        plot_report(report, png)
        lines.append(f"  timeline and tier shares: {png}")
    return "\n".join(lines)


DEMO_CLOUD_CALL_COST = 0.002  # an illustrative price per cloud inference call, to show what avoiding one is worth


def _skipped_every_cloud(d: SeenDecision) -> bool:
    skipped = [f for f in d.fallbacks if f.tier == "cloud" and f.reason in ("breaker_open", "unreachable")]
    return len(skipped) == len(PROVIDER_SUBJECTS)


def _copy_log(src: Path, dst: Path) -> None:
    # The backup API gives one consistent file (no WAL beside it) for `edge audit verify`.
    dst.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(src)) as source, contextlib.closing(sqlite3.connect(dst)) as target:
        source.backup(target)


# ---------------------------------------------------------------------------------------------
# Command line: `python -m edge._demo` (the `edge demo` command wires the same options)


def parse_args(argv: Sequence[str] | None) -> DemoOptions:
    parser = argparse.ArgumentParser(prog="edge demo", description="The whole story on one machine, verified.")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sensor input (default 30)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the cloud link is cut (default 10)")
    parser.add_argument("--outage-at", type=float, default=None, help="when the cut starts (default: ~1/3 in)")
    parser.add_argument("--rate", type=float, default=20.0, help="inputs per second, all pumps together")
    parser.add_argument("--pumps", type=int, default=4, help="simulated pumps (default 4)")
    parser.add_argument("--seed", type=int, default=7, help="the sensor story's seed (default 7)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="where summary.json and timeline.png go")
    live = parser.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_true", default=None, help="force the live view")
    live.add_argument("--no-live", dest="live", action="store_false", help="one line a second instead")
    args = parser.parse_args(argv)
    try:
        return DemoOptions(duration_s=args.duration, outage_s=args.outage, outage_at_s=args.outage_at,
                           rate_hz=args.rate, pumps=args.pumps, seed=args.seed, out_dir=args.out, live=args.live)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge._demo [--duration S] [--outage S] [--rate HZ] [--out DIR] [--seed N]`; the exit code."""
    try:
        options = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    options.out_dir.mkdir(parents=True, exist_ok=True)
    # The runtime's log goes to a file: on the terminal it would tear the live view apart.
    logging.basicConfig(filename=options.out_dir / "demo.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run_demo(options))
    except KeyboardInterrupt:
        print("\nedge demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except EdgeError as exc:
        print(f"edge demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

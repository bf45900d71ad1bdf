"""The benchmark of SPEC §10: the runtime side by side with a bare baseline, on one machine, in one run.

    python scripts/bench.py [--quick] [--out DIR] [--sections a,b] [--profile] [--rss-decisions M]

How it measures, and why so:

* Processes. The system under test (the bare baseline or the Runtime) runs in this process, on
  this process's event loop (uvloop when `main` runs it, as `edge run` would); the *driver and
  sink* run in one child process of their own (`driver_main`, jobs on stdin, reports on stdout),
  so neither shares an event loop or a GIL with what it measures. Every nats-server is a child
  too. On a 2-core box the three compete for the cores; that is the price of measuring on the
  machine, so every saturation figure comes with the CPU seconds each process used (µs per
  decision), read from getrusage and /proc: a reader sees where the cores went.
* Inputs. Pump rows (rms, kurtosis, temp_c, rpm) drawn from a seeded generator that tells the
  story of scripts/build_models.py (70% healthy, 18% wearing, 12% severe), so the model, its
  out-of-range check and the rules all see a realistic mix. Every input carries a unique `asset`,
  so no two payloads are alike and a sink can tell inputs apart.
* Saturation. The driver keeps at most `window` inputs unanswered (it publishes in chunks and
  waits for the sink to catch up), so nothing is lost to slow-consumer limits; after a warm-up,
  rate = N / (first send → N-th output at the sink).
* Latency. Open loop: input i is due at t0 + i/rate whatever happened before it, and its latency
  runs from that *scheduled* time to the output's arrival at the sink, so queueing is never
  hidden (coordinated omission). The driver's own lateness (send lag) is reported beside it.
* Freshness. Every measurement gets fresh nats-server(s) (JetStream on, a temp store dir) and,
  for the runtime, a fresh data dir.
* A shared machine. Each section also records how many cores the whole machine was busy against
  the bench's own processes (/proc/stat): work by others shows up as `other_cores`, so a noisy
  figure can be recognised as such.

Sections (all in one run; `--sections` picks some):

1. saturation  bare vs runtime decisions/s (median of 3 alternating runs; 1 in --quick)
2. latency     open loop at 50% of the runtime's saturation and at 1000/s: p50/p99/p99.9
3. audit       the runtime per fsync mode; raw AuditLog appends/s and one-at-a-time commit latency
4. sync        a backlog (200k; 20k quick) drained by the Uploader vs js.publish_async, same payloads
5. blackhole   ladder cloud → model → rules at 200/s while a FaultProxy blackholes the cloud
6. memory      RSS of `python -m edge run` over 1M decisions (20k quick; --rss-decisions), start-up
               times in process (server already running) and as a process
   --profile   cProfile of the event-loop thread at saturation: top functions by tottime

The runtime runs the bundled example's pipeline and actions with ladder [model, rules], audit
fsync "batch", and the local server as upstream (the audit stream is synced there while it runs,
as with the bundled example config).

Only Linux is supported: CPU and memory figures come from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import hashlib
import importlib.metadata
import itertools
import logging
import math
import os
import platform
import pstats
import random
import resource
import shlex
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats
import nats.errors

from ._errors import EdgeError
from ._nats_server import NatsServer, nats_server_binary

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from ._config import Config

# Heavy imports (onnxruntime through `models`, the runtime) are made inside the sections that need
# them: the driver process imports this module too, and should stay small and quick to start.

log = logging.getLogger("edge.bench")

SECTIONS = ("saturation", "latency", "audit", "sync", "blackhole", "memory", "approvals")
FSYNC_MODES: tuple[Literal["off", "batch", "always"], ...] = ("off", "batch", "always")
INPUT_SUBJECT = "sensors.p1.pump"
BARE_RESULT_SUBJECT = "bench.bare.result"
PIPELINE = "pump"
WINDOW = 2048  # inputs unanswered at most during saturation: well under every pending limit on the way
CHUNK = 64  # inputs published per burst
SYNC_WINDOW = 256  # publishes in flight for raw JetStream: the uploader's default `audit.sync_window`
BLACKHOLE_RATE_HZ = 200.0
CLOUD_TIMEOUT_MS = 200
MIB = 1024 * 1024
SINK_PENDING_MSGS = 1 << 20  # a sink (or the bare service) must never be the slow consumer
SINK_PENDING_BYTES = 512 * MIB
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(EdgeError):
    """The benchmark could not measure something (a server did not start, outputs went missing...)."""


# =============================================================================================
# Options and results


class BenchOptions(msgspec.Struct, kw_only=True):
    """What to run. `quick` is the smoke mode (under a minute); `out` gets bench.json and bench.txt."""

    quick: bool = False
    out: str | None = "bench-out"
    sections: list[str] = msgspec.field(default_factory=lambda: list(SECTIONS))
    profile: bool = False
    rss_decisions: int | None = None  # default: 20k quick, 1M full
    seed: int = 20240601
    command: str = ""


class Sizes(msgspec.Struct, frozen=True, kw_only=True):
    """How much each section does; chosen by `quick`."""

    repeats: int  # saturation runs of each kind (the median is reported)
    saturation_n: int
    warmup: int
    latency_s: float  # duration of each open-loop run
    audit_n: int  # runtime decisions per fsync mode
    append_n: int  # raw AuditLog appends per fsync mode
    sequential_n: int  # appends one at a time (commit latency) per fsync mode
    sync_records: int
    blackhole_phases_s: tuple[float, float, float]  # before, during, after
    rss_decisions: int
    startup_repeats: int
    profile_n: int

    @classmethod
    def pick(cls, options: BenchOptions) -> Sizes:
        if options.quick:
            sizes = cls(repeats=1, saturation_n=2000, warmup=300, latency_s=1.5, audit_n=1500, append_n=5000,
                        sequential_n=40, sync_records=20_000, blackhole_phases_s=(1.5, 2.5, 7.5),
                        rss_decisions=20_000, startup_repeats=1, profile_n=3000)
        else:
            sizes = cls(repeats=3, saturation_n=20_000, warmup=2000, latency_s=10.0, audit_n=15_000,
                        append_n=50_000, sequential_n=300, sync_records=200_000,
                        blackhole_phases_s=(5.0, 8.0, 10.0), rss_decisions=1_000_000, startup_repeats=3,
                        profile_n=20_000)
        if options.rss_decisions is not None:
            sizes = msgspec.structs.replace(sizes, rss_decisions=options.rss_decisions)
        return sizes


class Machine(msgspec.Struct, kw_only=True):
    nproc: int
    cpu_model: str
    python: str
    platform: str
    event_loop: str
    nats_server: str
    packages: dict[str, str]
    filesystem: str  # where the audit logs and JetStream stores live (fsync cost depends on it)


class Contention(msgspec.Struct, kw_only=True):
    """What the whole machine did during a section: on a shared box, others' work slows every figure."""

    wall_s: float
    machine_busy_cores: float  # every process, from /proc/stat
    bench_cores: float  # this process, its finished children (servers, `edge run`) and the driver
    other_cores: float  # the rest: work that is not the bench's
    loadavg_1m: float  # at the end of the section


class CpuUse(msgspec.Struct, kw_only=True):
    """CPU time per decision in each process, and how many cores were busy on average."""

    sut_us: float
    driver_us: float
    server_us: float
    cores_busy: float


class Saturation(msgspec.Struct, kw_only=True):
    decisions_per_s: float
    n: int
    elapsed_s: float
    cpu: CpuUse


class SaturationPair(msgspec.Struct, kw_only=True):
    """Section 1: bare baseline and runtime at saturation (median of `runs`)."""

    bare: Saturation
    runtime: Saturation
    ratio: float  # runtime / bare
    bare_runs: list[float]
    runtime_runs: list[float]
    runtime_tiers: dict[str, int]
    runtime_fallbacks: dict[str, int]
    runtime_sync_backlog: int  # audit records not yet upstream when the last output arrived
    # The same runtime with its upstream out of reach: the audit log is as durable, but syncing to
    # JetStream (on this same 2-core machine, in the same event loop) is deferred. What the
    # runtime itself costs, apart from the upstream's work that a real deployment does elsewhere.
    deferred: Saturation
    deferred_ratio: float
    deferred_runs: list[float]


class Latency(msgspec.Struct, kw_only=True):
    count: int
    lost: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    send_lag_p99_ms: float  # how late the driver itself was (already inside the latencies)


class LatencyRun(msgspec.Struct, kw_only=True):
    rate_hz: float
    why: str  # "50% of runtime saturation" or "fixed"
    bare: Latency
    runtime: Latency
    # The runtime's own view (status(): start of handle() → decision published, last 8192 decisions):
    # what is not in it was spent before handle() (socket, inbox, workers) or on the way to the sink.
    runtime_internal_p50_ms: float
    runtime_internal_p99_ms: float


class AuditFigures(msgspec.Struct, kw_only=True):
    """Section 3: the runtime per fsync mode, and the log alone."""

    runtime_decisions_per_s: dict[str, float]  # median of `repeats` rounds
    runtime_runs: dict[str, list[float]]
    batch_over_off: float
    appends_per_s: dict[str, float]  # raw AuditLog.append, up to 256 awaiting at once (like the workers)
    commit_p50_ms: dict[str, float]  # one append at a time: append → committed
    commit_p99_ms: dict[str, float]


class SyncFigures(msgspec.Struct, kw_only=True):
    """Section 4: draining a backlog with the Uploader against raw JetStream publishing of the same bytes."""

    records: int
    mean_record_bytes: float
    uploader_records_per_s: float
    uploader_s: float
    publish_async_records_per_s: float  # js.publish_async, at most 256 pending
    publish_async_s: float
    window_records_per_s: float  # nc.publish with a reply inbox, 256 acks awaited at most (no bookkeeping)
    window_s: float
    ratio_vs_publish_async: float  # uploader / publish_async
    ratio_vs_window: float  # uploader / window


class BlackholeFigures(msgspec.Struct, kw_only=True):
    """Section 5: a cloud silently blackholed under a fixed offered load.

    Phases go by each input's scheduled time, except that an input still in flight when the
    blackhole began counts as "during" (it met the dead cloud).
    """

    offered_hz: float
    phases_s: list[float]
    before: Latency
    during: Latency
    during_after_open: Latency
    after: Latency
    breaker_open_ms: float  # blackhole → breaker OPEN (polled every 2 ms)
    first_breaker_open_decision_ms: float  # blackhole → first decision skipping the cloud as breaker_open
    waited_on_dead_cloud: int  # decisions with cloud fallback "timeout" after the blackhole
    unreachable: int  # decisions with cloud fallback "unreachable" after the blackhole
    cloud_recovered_ms: float  # pass-through again → first cloud decision
    decisions: int
    lost: int
    tiers: dict[str, int]


class MemoryFigures(msgspec.Struct, kw_only=True):
    """Section 6: RSS of `edge run` in its own process, and start-up times."""

    decisions: int
    rss_after_start_mib: float
    rss_checkpoints_mib: list[list[float]]  # [decisions so far, VmRSS MiB]
    rss_growth_mib: float  # from 10% to 100% of `decisions`
    rss_growth_per_100k_mib: float
    hwm_mib: float
    process_decisions_per_s: float  # the subprocess at saturation (uvloop, as `edge run`)
    startup_aenter_s: float  # in process: Runtime.__aenter__ (median); nats-server already running
    startup_first_decision_s: float  # in process: __aenter__ start → first decision's reply (median)
    startup_runs_s: list[float]
    process_first_decision_s: float  # `python -m edge run` exec → first decision's reply
    process_stop_s: float  # SIGTERM → exit (drain)


class ProfileEntry(msgspec.Struct, kw_only=True):
    function: str
    ncalls: int
    tottime_s: float
    cumtime_s: float
    percall_us: float


class ProfileFigures(msgspec.Struct, kw_only=True):
    decisions: int
    decisions_per_s: float  # under cProfile: slower than the real thing
    total_tottime_s: float
    top: list[ProfileEntry]
    by_component: dict[str, float]  # share of the loop thread's tottime: edge, models, sync, nats, asyncio...


class ApprovalFigures(msgspec.Struct, kw_only=True):
    """Section 7: decisions that need no approval while many wait for a human (issue: governance)."""

    pending: int  # approvals waiting on a slow approver while the other inputs were measured
    requests: int  # request/reply round trips of inputs that need no approval, per phase
    idle: Latency  # with no approval pending
    busy: Latency  # with `pending` approvals pending


class BenchResult(msgspec.Struct, kw_only=True):
    """Everything one run measured; written as bench.json."""

    date: str
    command: str
    mode: str
    machine: Machine
    sizes: Sizes
    notes: list[str]
    contention: dict[str, Contention] = msgspec.field(default_factory=dict)
    saturation: SaturationPair | None = None
    latency: list[LatencyRun] | None = None
    audit: AuditFigures | None = None
    sync: SyncFigures | None = None
    blackhole: BlackholeFigures | None = None
    approvals: ApprovalFigures | None = None
    memory: MemoryFigures | None = None
    profile: ProfileFigures | None = None
    elapsed_s: float = 0.0


NOTES = [
    "System under test in the bench process; driver and sink in one child process; nats-servers are children.",
    "Saturation: at most 2048 inputs unanswered; rate = N / (first send -> N-th output), after a warm-up.",
    "Latency: open loop, from each input's scheduled send time to its output's arrival at the sink.",
    "Runtime config: the bundled example's pipeline and actions, ladder [model, rules], audit fsync batch, "
    "upstream = the local server (audit stream synced there, as with the bundled example).",
    "Bare: nats-py subscriber, msgspec Struct decode, Model.predict on a 1-row float32 array on the loop, "
    "JSON result published; nothing else.",
    "CPU per decision: getrusage of this process and the driver, /proc/<pid>/stat of nats-server.",
]


# =============================================================================================
# Inputs


def pump_rows(seed: int, n: int) -> list[tuple[float, float, float, float]]:
    """`n` measured pump rows (rms, kurtosis, temp_c, rpm): scripts/build_models.py's story, no numpy."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        condition = rng.random()
        rpm = rng.uniform(900, 3000)
        rms = 0.2 + 0.0007 * rpm * rng.uniform(0.4, 1.5) + abs(rng.gauss(0, 0.4))
        kurtosis = 3.0 + rng.gauss(0, 0.3) + abs(rng.gauss(0, 0.4))
        temp = 40 + 0.008 * rpm + rng.gauss(0, 6)
        if 0.70 <= condition < 0.88:  # a wearing bearing
            rms, kurtosis = rng.uniform(2.5, 7.5), rng.uniform(3.5, 10.0)
            temp += rng.uniform(0, 15)
        elif condition >= 0.88:  # severe: looseness or a hot bearing
            if rng.random() < 0.5:
                rms, kurtosis = rng.uniform(6.5, 11.5), rng.uniform(2.5, 8.0)
            else:
                temp = rng.uniform(85, 118)
        rows.append((
            round(max(rms, 0.1) * (1 + rng.gauss(0, 0.03)), 3),
            round(max(kurtosis, 1.5) + rng.gauss(0, 0.25), 3),
            round(temp + rng.gauss(0, 0.8), 2),
            round(rpm + rng.gauss(0, 5), 1),
        ))
    return rows


class Payloads:
    """Input payloads: a cycle of seeded rows, each input with a unique `asset` (its index)."""

    CYCLE = 4096

    def __init__(self, seed: int) -> None:
        self._prefixes = [
            b'{"rms":%.3f,"kurtosis":%.3f,"temp_c":%.2f,"rpm":%.1f,"asset":"' % row
            for row in pump_rows(seed, self.CYCLE)
        ]

    def __call__(self, index: int) -> bytes:
        return self._prefixes[index % self.CYCLE] + b'%d"}' % index


# =============================================================================================
# The driver process: jobs in, reports out


class SaturateJob(msgspec.Struct, tag="saturate", kw_only=True):
    url: str
    out_subject: str
    n: int
    warmup: int
    window: int = WINDOW
    seed: int
    timeout_s: float


class OpenLoopJob(msgspec.Struct, tag="open_loop", kw_only=True):
    url: str
    out_subject: str
    rate_hz: float
    count: int
    seed: int
    key: Literal["asset", "sha256"]  # how an output names its input: bare echoes asset; a Decision has sha256
    details: bool = False  # report each decision's tier and cloud fallback reason
    drain_s: float = 10.0


Job = SaturateJob | OpenLoopJob


class SaturateReport(msgspec.Struct, tag="saturate", kw_only=True):
    n: int
    received: int
    started_at: float  # monotonic (CLOCK_MONOTONIC is shared by every process)
    finished_at: float
    cpu_s: float


class OpenLoopReport(msgspec.Struct, tag="open_loop", kw_only=True):
    count: int
    received: int
    started_at: float  # input i was due at started_at + i / rate_hz
    latency_s: list[float]  # -1.0: no output
    send_lag_p99_s: float
    cpu_s: float
    tiers: list[str] = msgspec.field(default_factory=list)
    cloud_reasons: list[str] = msgspec.field(default_factory=list)


class DriverFailed(msgspec.Struct, tag="failed"):
    error: str


Report = SaturateReport | OpenLoopReport | DriverFailed


class _BareView(msgspec.Struct):
    asset: str


class _FallbackView(msgspec.Struct):
    tier: str
    reason: str


class _DecisionView(msgspec.Struct):
    input_sha256: str
    tier: str = ""
    fallbacks: list[_FallbackView] = msgspec.field(default_factory=list)


_job_decoder = msgspec.json.Decoder(Job)
_report_decoder = msgspec.json.Decoder(Report)
_encoder = msgspec.json.Encoder()
_bare_view = msgspec.json.Decoder(_BareView)
_decision_view = msgspec.json.Decoder(_DecisionView)
_asset_ids = itertools.count()  # in the driver: unique assets across the jobs of one run


def _cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sink_connection(url: str) -> NATS:
    return await nats.connect(url, name="bench-driver", allow_reconnect=False, connect_timeout=5,
                              pending_size=16 * MIB)


async def _saturate(job: SaturateJob) -> SaturateReport:
    payload = Payloads(job.seed)
    nc = await _sink_connection(job.url)
    received = 0
    last_at = 0.0
    wake_at = 0
    progress = asyncio.Event()

    async def on_output(msg: Any) -> None:
        nonlocal received, last_at
        received += 1
        last_at = time.monotonic()
        if received >= wake_at:
            progress.set()

    async def until(count: int, deadline: float) -> None:
        nonlocal wake_at
        while received < count:
            wake_at = count
            progress.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"only {received} of {count} outputs on {job.out_subject} in {job.timeout_s}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await progress.wait()

    async def push(count: int, deadline: float) -> float:
        base = received
        sent = 0
        started = time.monotonic()
        while sent < count:
            room = job.window - (sent - (received - base))
            if room < CHUNK:
                await until(base + sent - (job.window - CHUNK), deadline)
                continue
            for _ in range(min(room, CHUNK, count - sent)):
                await nc.publish(INPUT_SUBJECT, payload(next(_asset_ids)))
                sent += 1
        await until(base + count, deadline)
        return started

    try:
        sub = await nc.subscribe(job.out_subject, cb=on_output, pending_msgs_limit=SINK_PENDING_MSGS,
                                 pending_bytes_limit=SINK_PENDING_BYTES)
        await nc.flush()
        deadline = time.monotonic() + job.timeout_s
        if job.warmup:
            await push(job.warmup, deadline)
        cpu = _cpu_self_s()
        started = await push(job.n, deadline)
        report = SaturateReport(n=job.n, received=received - job.warmup, started_at=started, finished_at=last_at,
                                cpu_s=_cpu_self_s() - cpu)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return report


async def _open_loop(job: OpenLoopJob) -> OpenLoopReport:
    payload = Payloads(job.seed)
    nc = await _sink_connection(job.url)
    n = job.count
    period = 1.0 / job.rate_hz
    latency = [-1.0] * n
    sent_at = [0.0] * n
    tiers = [""] * n if job.details else []
    reasons = [""] * n if job.details else []
    by_sha: dict[str, int] = {}
    first = next(_asset_ids)
    for _ in range(n):  # reserve the asset ids this job uses
        next(_asset_ids)
    received = 0
    t0 = 0.0
    all_in = asyncio.Event()

    def arrived(i: int, arrival: float, view: _DecisionView | None) -> None:
        nonlocal received
        if not 0 <= i < n or latency[i] >= 0:
            return
        # From the scheduled time, so a late send (queueing) is never hidden; from the send itself
        # when a timer fired a little early (timers have a 1 ms grain).
        latency[i] = arrival - min(t0 + i * period, sent_at[i])
        if view is not None and job.details:
            tiers[i] = view.tier
            reasons[i] = ",".join(f.reason for f in view.fallbacks if f.tier == "cloud")
        received += 1
        if received == n:
            all_in.set()

    async def on_bare(msg: Any) -> None:
        arrival = time.monotonic()
        arrived(int(_bare_view.decode(msg.data).asset) - first, arrival, None)

    async def on_decision(msg: Any) -> None:
        arrival = time.monotonic()
        view = _decision_view.decode(msg.data)
        arrived(by_sha.pop(view.input_sha256, -1), arrival, view)

    lags: list[float] = []
    try:
        sub = await nc.subscribe(job.out_subject, cb=on_bare if job.key == "asset" else on_decision,
                                 pending_msgs_limit=SINK_PENDING_MSGS, pending_bytes_limit=SINK_PENDING_BYTES)
        await nc.flush()
        cpu = _cpu_self_s()
        t0 = time.monotonic() + 0.05
        for i in range(n):
            due = t0 + i * period
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pace: the offered load's schedule
            data = payload(first + i)
            if job.key == "sha256":
                by_sha[hashlib.sha256(data).hexdigest()] = i
            now = sent_at[i] = time.monotonic()
            lags.append(now - due)
            await nc.publish(INPUT_SUBJECT, data)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(job.drain_s):
                await all_in.wait()
        cpu = _cpu_self_s() - cpu
        await sub.unsubscribe()
    finally:
        await nc.close()
    lags.sort()
    return OpenLoopReport(count=n, received=received, started_at=t0, latency_s=latency,
                          send_lag_p99_s=percentile(lags, 0.99), cpu_s=cpu, tiers=tiers, cloud_reasons=reasons)


async def _run_job(job: Job) -> Report:
    match job:
        case SaturateJob():
            return await _saturate(job)
        case OpenLoopJob():
            return await _open_loop(job)


def driver_main() -> int:
    """The driver process: one JSON job a line on stdin, one JSON report a line on stdout."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        for line in sys.stdin.buffer:
            if not line.strip():
                continue
            try:
                report: Report = runner.run(_run_job(_job_decoder.decode(line)))
            except (BenchError, OSError, TimeoutError, nats.errors.Error, msgspec.DecodeError) as exc:
                report = DriverFailed(f"{type(exc).__name__}: {exc}")
            sys.stdout.buffer.write(_encoder.encode(report) + b"\n")
            sys.stdout.buffer.flush()
    return 0


_DRIVER_BOOT = "import sys; from edge._bench import driver_main; sys.exit(driver_main())"


class Driver:
    """The parent's handle on the driver process: `await driver.run(job)` → its report."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Driver:
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DRIVER_BOOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env, limit=256 * MIB,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def run(self, job: Job, timeout_s: float) -> SaturateReport | OpenLoopReport:
        async with self._lock:
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(_encoder.encode(job) + b"\n")
            await proc.stdin.drain()
            try:
                async with asyncio.timeout(timeout_s):
                    line = await proc.stdout.readline()
            except TimeoutError:
                raise BenchError(f"the driver did not report within {timeout_s:.0f}s") from None
        if not line:
            raise BenchError(f"the driver exited ({proc.returncode})")
        report: Report = _report_decoder.decode(line)
        if isinstance(report, DriverFailed):
            raise BenchError(f"driver: {report.error}")
        return report

    async def saturate(self, url: str, out_subject: str, n: int, *, warmup: int, seed: int) -> SaturateReport:
        timeout = 60.0 + (n + warmup) / 200  # generous: a floor of 200 outputs/s
        report = await self.run(SaturateJob(url=url, out_subject=out_subject, n=n, warmup=warmup, seed=seed,
                                            timeout_s=timeout), timeout + 30)
        assert isinstance(report, SaturateReport)
        return report

    async def open_loop(self, job: OpenLoopJob) -> OpenLoopReport:
        report = await self.run(job, job.count / job.rate_hz + job.drain_s + 60)
        assert isinstance(report, OpenLoopReport)
        return report


# =============================================================================================
# Small measuring tools


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize(latencies_s: Sequence[float], *, lost: int = 0, send_lag_p99_s: float = 0.0) -> Latency:
    values = sorted(latencies_s)
    if not values:
        raise BenchError("no latency sample to summarize")
    return Latency(
        count=len(values), lost=lost,
        p50_ms=round(percentile(values, 0.50) * 1e3, 3), p99_ms=round(percentile(values, 0.99) * 1e3, 3),
        p999_ms=round(percentile(values, 0.999) * 1e3, 3), max_ms=round(values[-1] * 1e3, 3),
        mean_ms=round(statistics.fmean(values) * 1e3, 3), send_lag_p99_ms=round(send_lag_p99_s * 1e3, 3),
    )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class CpuMeter:
    """CPU seconds used by the system under test (this process or a pid) and a nats-server, over a span."""

    def __init__(self, server: NatsServer, sut_pid: int | None = None) -> None:
        self._server_pid = server.pid
        self._sut_pid = sut_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        sut = _cpu_self_s() if self._sut_pid is None else proc_cpu_s(self._sut_pid)
        server = proc_cpu_s(self._server_pid) if self._server_pid is not None else 0.0
        return sut, server, time.monotonic()

    def per_decision(self, decisions: int, driver_cpu_s: float) -> CpuUse:
        sut, server, now = self._read()
        sut -= self._start[0]
        server -= self._start[1]
        wall = now - self._start[2]
        return CpuUse(
            sut_us=round(sut / decisions * 1e6, 1), driver_us=round(driver_cpu_s / decisions * 1e6, 1),
            server_us=round(server / decisions * 1e6, 1),
            cores_busy=round((sut + server + driver_cpu_s) / wall, 2) if wall > 0 else 0.0,
        )


def _machine_busy_s() -> float:
    """CPU seconds all processes spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Machine-wide busy time against the bench's own, over one section."""

    def __init__(self, driver_pid: int) -> None:
        self._driver_pid = driver_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = _cpu_self_s() + children.ru_utime + children.ru_stime + proc_cpu_s(self._driver_pid)
        return time.monotonic(), _machine_busy_s(), ours

    def stop(self) -> Contention:
        now, busy, ours = self._read()
        wall = now - self._start[0]
        busy_cores = (busy - self._start[1]) / wall
        ours_cores = (ours - self._start[2]) / wall
        return Contention(wall_s=round(wall, 1), machine_busy_cores=round(busy_cores, 2),
                          bench_cores=round(ours_cores, 2), other_cores=round(max(0.0, busy_cores - ours_cores), 2),
                          loadavg_1m=round(os.getloadavg()[0], 2))


async def poll_until(predicate: Callable[[], bool], within: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)  # poll with a deadline


@contextlib.asynccontextmanager
async def fresh_server(work: Path, name: str) -> AsyncIterator[NatsServer]:
    """A new nats-server (JetStream on) with its own store dir under `work`."""
    store = Path(tempfile.mkdtemp(prefix=f"nats-{name}-", dir=work))
    async with NatsServer(name=name, store_dir=store) as server:
        yield server


async def connect(url: str) -> NATS:
    return await nats.connect(url, name="bench", allow_reconnect=False, connect_timeout=5)


_counter = itertools.count(1)


def device_name(what: str) -> str:
    return f"bench-{what}-{next(_counter)}"


# =============================================================================================
# The systems under test


class BarePump(msgspec.Struct):
    rms: float
    kurtosis: float
    temp_c: float
    rpm: float
    asset: str = ""


class BareResult(msgspec.Struct):
    asset: str
    label: str
    confidence: float | None


class BareService:
    """The baseline: decode with msgspec, the same ONNX model at batch 1, publish a small JSON result."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._nc: NATS | None = None

    async def __aenter__(self) -> BareService:
        import numpy as np

        from models import bundled_model_path, load_model

        model = await asyncio.to_thread(load_model, bundled_model_path())
        decoder = msgspec.json.Decoder(BarePump)
        encoder = msgspec.json.Encoder()
        nc = self._nc = await connect(self.url)
        publish, predict, asarray, float32 = nc.publish, model.predict, np.asarray, np.float32

        async def on_input(msg: Any) -> None:
            x = decoder.decode(msg.data)
            (p,) = predict(asarray([[x.rms, x.kurtosis, x.temp_c, x.rpm]], dtype=float32))
            await publish(BARE_RESULT_SUBJECT, encoder.encode(BareResult(x.asset, p.label, p.confidence)))

        await nc.subscribe("sensors.*.pump", cb=on_input, pending_msgs_limit=SINK_PENDING_MSGS,
                           pending_bytes_limit=SINK_PENDING_BYTES)
        await nc.flush()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None


def runtime_config_data(work: Path, local_url: str, *, device: str, upstream_url: str = "",
                        ladder: Sequence[str] = ("model", "rules"), fsync: str = "batch") -> dict[str, Any]:
    """The bundled example config (its pipeline, rules, labels and actions) pointed at bench servers.

    `link` keeps SPEC §4's defaults (probe every 1 s, breaker after 3 failures, reset after 5 s).
    """
    from models import bundled_model_path

    from ._config import BUNDLED_CONFIG

    data: dict[str, Any] = tomllib.loads(BUNDLED_CONFIG.read_text())
    data["device_id"] = device
    data["data_dir"] = str(work / f"var-{device}")
    data["nats"] = {"local": local_url, "upstream": upstream_url}
    data["audit"] = {"create_stream": True, "fsync": fsync}
    data["models"][0]["path"] = str(bundled_model_path())
    pipeline = data["pipelines"][0]
    pipeline["ladder"] = list(ladder)
    pipeline["cloud"] = {"subject": "cloud.infer.pump", "timeout_ms": CLOUD_TIMEOUT_MS}
    return data


def runtime_config(work: Path, local_url: str, **kwargs: Any) -> Config:
    from ._config import decode_config

    return decode_config(runtime_config_data(work, local_url, **kwargs), source="bench", base_dir=work, env={})


def decisions_subject(device: str) -> str:
    return f"edge.{device}.decision.{PIPELINE}"




# =============================================================================================
# Section 1: saturation


async def saturate_bare(work: Path, driver: Driver, sizes: Sizes, seed: int) -> Saturation:
    async with fresh_server(work, "bare") as server, BareService(server.url):
        meter = CpuMeter(server)
        report = await driver.saturate(server.url, BARE_RESULT_SUBJECT, sizes.saturation_n, warmup=sizes.warmup,
                                       seed=seed)
        return _saturation(report, meter)


async def saturate_runtime(work: Path, driver: Driver, n: int, warmup: int, seed: int, *, fsync: str = "batch",
                           status: list[dict[str, Any]] | None = None, sync: bool = True) -> Saturation:
    from ._runtime import Runtime

    device = device_name("sat")
    async with fresh_server(work, "runtime") as server:
        # Sync deferred: an upstream nobody listens on (port 1), as during an outage.
        upstream = "" if sync else "nats://127.0.0.1:1"
        async with Runtime(runtime_config(work, server.url, device=device, fsync=fsync, upstream_url=upstream)) as rt:
            meter = CpuMeter(server)
            report = await driver.saturate(server.url, decisions_subject(device), n, warmup=warmup, seed=seed)
            result = _saturation(report, meter)
            if status is not None:
                status.append(rt.status())
        return result


def _saturation(report: SaturateReport, meter: CpuMeter) -> Saturation:
    elapsed = report.finished_at - report.started_at
    return Saturation(decisions_per_s=round(report.n / elapsed, 1), n=report.n, elapsed_s=round(elapsed, 3),
                      cpu=meter.per_decision(report.n, report.cpu_s))


async def bench_saturation(work: Path, driver: Driver, sizes: Sizes, seed: int) -> SaturationPair:
    bare: list[Saturation] = []
    runtime: list[Saturation] = []
    status: list[dict[str, Any]] = []
    deferred: list[Saturation] = []
    for _ in range(sizes.repeats):  # alternate, so drift on the machine touches all alike
        bare.append(await saturate_bare(work, driver, sizes, seed))
        runtime.append(await saturate_runtime(work, driver, sizes.saturation_n, sizes.warmup, seed, status=status))
        deferred.append(await saturate_runtime(work, driver, sizes.saturation_n, sizes.warmup, seed, sync=False))
    b, r, d = _median_run(bare), _median_run(runtime), _median_run(deferred)
    pump = status[-1]["pipelines"][PIPELINE]
    return SaturationPair(
        bare=b, runtime=r, ratio=round(r.decisions_per_s / b.decisions_per_s, 3),
        bare_runs=[s.decisions_per_s for s in bare], runtime_runs=[s.decisions_per_s for s in runtime],
        runtime_tiers=dict(pump["by_tier"]), runtime_fallbacks=dict(pump["fallbacks"]),
        runtime_sync_backlog=int(status[-1]["sync"]["backlog"]),
        deferred=d, deferred_ratio=round(d.decisions_per_s / b.decisions_per_s, 3),
        deferred_runs=[x.decisions_per_s for x in deferred],
    )


def _median_run(runs: list[Saturation]) -> Saturation:
    return sorted(runs, key=lambda s: s.decisions_per_s)[len(runs) // 2]


# =============================================================================================
# Section 2: latency at a fixed offered load


async def latency_bare(work: Path, driver: Driver, rate: float, count: int, seed: int) -> Latency:
    async with fresh_server(work, "bare") as server, BareService(server.url):
        report = await driver.open_loop(OpenLoopJob(url=server.url, out_subject=BARE_RESULT_SUBJECT, rate_hz=rate,
                                                    count=count, seed=seed, key="asset"))
    return _open_loop_latency(report)


async def latency_runtime(work: Path, driver: Driver, rate: float, count: int,
                          seed: int) -> tuple[Latency, dict[str, float]]:
    """End-to-end latency, and the runtime's own p50/p99 (ms) of the same run."""
    from ._runtime import Runtime

    device = device_name("lat")
    async with (fresh_server(work, "runtime") as server,
                Runtime(runtime_config(work, server.url, device=device)) as rt):
        report = await driver.open_loop(OpenLoopJob(url=server.url, out_subject=decisions_subject(device),
                                                    rate_hz=rate, count=count, seed=seed, key="sha256"))
        internal = rt.status()["pipelines"][PIPELINE]["latency_ms"]
    return _open_loop_latency(report), internal


def _open_loop_latency(report: OpenLoopReport) -> Latency:
    got = [x for x in report.latency_s if x >= 0]
    return summarize(got, lost=report.count - len(got), send_lag_p99_s=report.send_lag_p99_s)


async def bench_latency(work: Path, driver: Driver, sizes: Sizes, seed: int, runtime_rate: float) -> list[LatencyRun]:
    runs = []
    for rate, why in ((round(runtime_rate * 0.5), "50% of runtime saturation"), (1000.0, "fixed")):
        count = max(100, int(rate * sizes.latency_s))
        bare = await latency_bare(work, driver, rate, count, seed)
        runtime, internal = await latency_runtime(work, driver, rate, count, seed)
        runs.append(LatencyRun(rate_hz=rate, why=why, bare=bare, runtime=runtime,
                               runtime_internal_p50_ms=internal["p50"], runtime_internal_p99_ms=internal["p99"]))
    return runs


# =============================================================================================
# Section 3: the audit log


def decision_body(i: int) -> dict[str, Any]:
    """A body shaped like a real Decision (what the runtime appends for every input)."""
    now = time.time_ns()
    return {
        "id": f"{now:016x}{i:08x}", "device": "bench", "pipeline": PIPELINE, "subject": INPUT_SUBJECT,
        "received_at": now - 250_000, "decided_at": now, "action": "none", "label": "normal",
        "confidence": 0.9731, "tier": "model", "fallbacks": [],
        "model": {"name": "pump-anomaly", "version": "1",
                  "sha256": "b3886a2dd60e9a3301a8e1c373998513969d3a37cf53c633e1062fa00b0731cb"},
        "shadow": None, "governance": {"status": "auto", "requested_action": "none"}, "audit_seq": None,
        "input_sha256": hashlib.sha256(b"%d" % i).hexdigest(),
    }


async def append_rate(path: Path, fsync: Literal["off", "batch", "always"], n: int, window: int = 256) -> float:
    """Raw AuditLog.append throughput with up to `window` appends awaiting at once."""
    from sync import AuditLog

    bodies = [decision_body(i) for i in range(min(n, 4096))]
    async with AuditLog(path, "bench", fsync=fsync) as audit:
        started = time.perf_counter()
        pending: deque[asyncio.Future[int]] = deque()
        for i in range(n):
            pending.append(audit.append("decision", bodies[i % len(bodies)]))
            if len(pending) >= window:
                await pending.popleft()
        await asyncio.gather(*pending)
        return n / (time.perf_counter() - started)


async def commit_latency(path: Path, fsync: Literal["off", "batch", "always"], n: int) -> list[float]:
    """append → committed, one record at a time (the latency a lone decision pays for durability)."""
    from sync import AuditLog

    body = decision_body(0)
    samples = []
    async with AuditLog(path, "bench", fsync=fsync) as audit:
        for _ in range(n):
            started = time.perf_counter()
            await audit.append("decision", body)
            samples.append(time.perf_counter() - started)
    return sorted(samples)


async def bench_audit(work: Path, driver: Driver, sizes: Sizes, seed: int) -> AuditFigures:
    runs: dict[str, list[float]] = {mode: [] for mode in FSYNC_MODES}
    for _ in range(sizes.repeats):  # rounds of off, batch, always: drift on the machine touches all alike
        for mode in FSYNC_MODES:
            run = await saturate_runtime(work, driver, sizes.audit_n, sizes.warmup, seed, fsync=mode)
            runs[mode].append(run.decisions_per_s)
    rates = {mode: statistics.median(values) for mode, values in runs.items()}
    appends: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for mode in FSYNC_MODES:
        folder = Path(tempfile.mkdtemp(prefix=f"audit-{mode}-", dir=work))
        appends[mode] = round(await append_rate(folder / "rate.db", mode, sizes.append_n), 1)
        samples = await commit_latency(folder / "latency.db", mode, sizes.sequential_n)
        p50[mode] = round(percentile(samples, 0.5) * 1e3, 3)
        p99[mode] = round(percentile(samples, 0.99) * 1e3, 3)
    return AuditFigures(runtime_decisions_per_s=rates, runtime_runs=runs,
                        batch_over_off=round(rates["batch"] / rates["off"], 3), appends_per_s=appends,
                        commit_p50_ms=p50, commit_p99_ms=p99)


# =============================================================================================
# Section 4: sync catch-up


async def bench_sync(work: Path, sizes: Sizes) -> SyncFigures:
    from nats.js.api import StorageType

    from sync import AuditLog, Uploader, encode_record, iter_records

    device = device_name("sync")
    path = work / f"{device}.db"
    n = sizes.sync_records
    # The backlog: written with no upstream at all (fsync off: building it is not what is measured).
    async with AuditLog(path, device, fsync="off") as audit:
        bodies = [decision_body(i) for i in range(4096)]
        pending: deque[asyncio.Future[int]] = deque()
        for i in range(n):
            pending.append(audit.append("decision", bodies[i % len(bodies)]))
            if len(pending) >= 4096:
                await pending.popleft()
        await asyncio.gather(*pending)
    # The same payloads and headers for the raw run, read before anything is timed.
    wire = [(r.seq, r.kind, encode_record(r)) for r in iter_records(path)]
    mean_bytes = statistics.fmean(len(p) for _, _, p in wire)

    async def make_stream(nc: NATS, name: str) -> None:
        await nc.jetstream().add_stream(name=name, subjects=["audit.>"], storage=StorageType.FILE,
                                        duplicate_window=120.0)

    async with fresh_server(work, "sync-up") as server:
        setup = await connect(server.url)
        await make_stream(setup, "EDGE_AUDIT")
        await setup.close()

        async def uploader_connection() -> NATS:
            return await nats.connect(server.url, name=f"{device}-audit", allow_reconnect=False, pending_size=0,
                                      connect_timeout=2, max_reconnect_attempts=1)

        async with AuditLog(path, device, fsync="batch") as audit:
            if audit.backlog != n:
                raise BenchError(f"the backlog is {audit.backlog} records, expected {n}")
            started = time.perf_counter()
            async with Uploader(audit, uploader_connection, stream="EDGE_AUDIT") as uploader:
                left = await uploader.sync_now(timeout=60 + n / 500)
                uploader_s = time.perf_counter() - started
            if left:
                raise BenchError(f"the uploader left {left} of {n} records unsynced: {uploader.status()}")

    timings: dict[str, float] = {}
    for style in ("publish_async", "window"):
        async with fresh_server(work, f"sync-{style}") as server:
            nc = await connect(server.url)
            try:
                await make_stream(nc, "EDGE_AUDIT")
                started = time.perf_counter()
                async with asyncio.timeout(60 + n / 500):
                    if style == "publish_async":
                        failed = await publish_async_all(nc, device, wire)
                    else:
                        failed = await publish_window_all(nc, device, wire)
                timings[style] = time.perf_counter() - started
            finally:
                await nc.close()
        if failed:
            raise BenchError(f"raw JetStream publishing ({style}): {failed} of {n} publishes failed")
    up_rate = n / uploader_s
    async_rate, window_rate = n / timings["publish_async"], n / timings["window"]
    return SyncFigures(
        records=n, mean_record_bytes=round(mean_bytes, 1), uploader_records_per_s=round(up_rate, 1),
        uploader_s=round(uploader_s, 3), publish_async_records_per_s=round(async_rate, 1),
        publish_async_s=round(timings["publish_async"], 3), window_records_per_s=round(window_rate, 1),
        window_s=round(timings["window"], 3), ratio_vs_publish_async=round(up_rate / async_rate, 3),
        ratio_vs_window=round(up_rate / window_rate, 3),
    )


class _Ack(msgspec.Struct):
    error: dict[str, Any] | None = None


_ack_view = msgspec.json.Decoder(_Ack)


async def publish_async_all(nc: NATS, device: str, wire: Sequence[tuple[int, str, bytes]]) -> int:
    """Every record through js.publish_async, at most SYNC_WINDOW pending; returns how many failed."""
    js = nc.jetstream(publish_async_max_pending=SYNC_WINDOW)
    subject = f"audit.{device}"
    in_flight: deque[asyncio.Future[Any]] = deque()
    failed = 0
    for seq, kind, payload in wire:
        headers = {"Nats-Msg-Id": f"{device}:{seq}", "Edge-Kind": kind}
        in_flight.append(await js.publish_async(subject, payload, stream="EDGE_AUDIT", headers=headers))
        while in_flight and in_flight[0].done():
            failed += in_flight.popleft().exception() is not None
    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    return failed + sum(isinstance(outcome, BaseException) for outcome in outcomes)


async def publish_window_all(nc: NATS, device: str, wire: Sequence[tuple[int, str, bytes]]) -> int:
    """Every record by nc.publish with a reply inbox, at most SYNC_WINDOW unacknowledged; returns failures."""
    inbox = nc.new_inbox()
    subject = f"audit.{device}"
    acked = failed = 0
    progress = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acked, failed
        acked += 1
        if (msg.headers and msg.headers.get("Status")) or _ack_view.decode(msg.data).error is not None:
            failed += 1
        progress.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    sent = 0
    headers = {"Nats-Expected-Stream": "EDGE_AUDIT", "Nats-Msg-Id": "", "Edge-Kind": ""}
    for seq, kind, payload in wire:
        while sent - acked >= SYNC_WINDOW:
            progress.clear()
            await progress.wait()
        headers["Nats-Msg-Id"] = f"{device}:{seq}"
        headers["Edge-Kind"] = kind
        await nc.publish(subject, payload, reply=f"{inbox}.{seq}", headers=headers)
        sent += 1
    while acked < sent:
        progress.clear()
        await progress.wait()
    await sub.unsubscribe()
    return failed


# =============================================================================================
# Section 5: a blackholed cloud


async def bench_blackhole(work: Path, driver: Driver, sizes: Sizes, seed: int) -> BlackholeFigures:
    from ._link import BreakerState, LinkState
    from ._runtime import Runtime
    from .chaos import FaultProxy
    from .cloudsim import CloudSimulator

    before_s, during_s, after_s = sizes.blackhole_phases_s
    rate = BLACKHOLE_RATE_HZ
    device = device_name("bh")
    async with (fresh_server(work, "local") as local, fresh_server(work, "cloud") as cloud,
                FaultProxy("127.0.0.1", cloud.port) as proxy):
        cloud_nc = await connect(cloud.url)
        try:
            config = runtime_config(work, local.url, device=device, upstream_url=proxy.url,
                                    ladder=("cloud", "model", "rules"))
            async with CloudSimulator(cloud_nc), Runtime(config) as rt:
                await poll_until(lambda: rt.link.state is LinkState.ONLINE, 15, "the cloud link to come online")
                # Warm every path (cloud requests, audit stream through the proxy) before the clock runs.
                await driver.open_loop(OpenLoopJob(url=local.url, out_subject=decisions_subject(device), rate_hz=rate,
                                                   count=int(rate / 2), seed=seed, key="sha256"))
                await poll_until(lambda: rt.link.state is LinkState.ONLINE, 15, "the cloud link to stay online")
                job = OpenLoopJob(url=local.url, out_subject=decisions_subject(device), rate_hz=rate,
                                  count=int(rate * (before_s + during_s + after_s)), seed=seed, key="sha256",
                                  details=True)
                run = asyncio.create_task(driver.open_loop(job))
                try:
                    # The schedule: the driver's own clock starts a little later (it connects first), and
                    # every decision is put in its phase afterwards by absolute times, so this need not be exact.
                    await asyncio.sleep(before_s + 0.05)
                    proxy.blackhole()
                    blackholed_at = time.monotonic()
                    opened_at = math.nan
                    while time.monotonic() < blackholed_at + during_s:
                        if math.isnan(opened_at) and rt.link.breaker.state is not BreakerState.CLOSED:
                            opened_at = time.monotonic()
                        await asyncio.sleep(0.002)  # poll the breaker
                    proxy.pass_through()
                    restored_at = time.monotonic()
                    report = await run
                finally:
                    if not run.done():
                        run.cancel()
                        await asyncio.gather(run, return_exceptions=True)
        finally:
            await cloud_nc.close()
    if math.isnan(opened_at):
        raise BenchError(f"the breaker did not open within the {during_s}s blackhole")
    return _blackhole_figures(report, rate, sizes, blackholed_at, opened_at, restored_at)


def _blackhole_figures(report: OpenLoopReport, rate: float, sizes: Sizes, blackholed_at: float, opened_at: float,
                       restored_at: float) -> BlackholeFigures:
    phases: dict[str, list[float]] = {"before": [], "during": [], "open": [], "after": []}
    lost = {"before": 0, "during": 0, "after": 0}
    first_skip = math.inf
    recovered = math.inf
    waited = unreachable = 0
    tiers: dict[str, int] = {}
    for i, latency in enumerate(report.latency_s):
        due = report.started_at + i / rate
        arrival = due + latency if latency >= 0 else due
        # "before" holds the decisions that were over before the blackhole began; one in flight
        # then met the dead cloud, and counts as "during".
        phase = "before" if arrival < blackholed_at else "during" if due < restored_at else "after"
        if latency < 0:
            lost[phase] += 1
            continue
        phases[phase].append(latency)
        if phase == "during" and due >= opened_at:
            phases["open"].append(latency)
        tiers[report.tiers[i]] = tiers.get(report.tiers[i], 0) + 1
        reasons = report.cloud_reasons[i].split(",")
        if phase != "before":
            waited += "timeout" in reasons
            unreachable += "unreachable" in reasons
            if "breaker_open" in reasons:
                first_skip = min(first_skip, arrival)
        if phase == "after" and report.tiers[i] == "cloud":
            recovered = min(recovered, arrival)
    def phase_latency(name: str) -> Latency:
        return summarize(phases[name], lost=lost.get(name, 0), send_lag_p99_s=report.send_lag_p99_s)

    if math.isinf(recovered):
        raise BenchError(f"the cloud tier did not decide again within {sizes.blackhole_phases_s[2]}s of the "
                         "blackhole ending")
    if math.isinf(first_skip):
        raise BenchError("no decision skipped the cloud as breaker_open during the blackhole")
    return BlackholeFigures(
        offered_hz=rate, phases_s=list(sizes.blackhole_phases_s),
        before=phase_latency("before"), during=phase_latency("during"), during_after_open=phase_latency("open"),
        after=phase_latency("after"),
        breaker_open_ms=round((opened_at - blackholed_at) * 1e3, 1),
        first_breaker_open_decision_ms=round((first_skip - blackholed_at) * 1e3, 1),
        waited_on_dead_cloud=waited, unreachable=unreachable,
        cloud_recovered_ms=round((recovered - restored_at) * 1e3, 1),
        decisions=report.received, lost=report.count - report.received, tiers=tiers,
    )


# =============================================================================================
# Section 6: memory and start-up


async def first_decision(nc: NATS, payload: bytes, within: float) -> float:
    """Ask (request/reply) until a runtime answers with a decision; returns when it did (monotonic)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await nc.request(INPUT_SUBJECT, payload, timeout=1.0)
            return time.monotonic()
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise BenchError(f"no decision within {within}s of start") from None
            await asyncio.sleep(0.002)  # poll with a deadline: the runtime is still starting


async def startup_in_process(work: Path, repeats: int) -> list[tuple[float, float]]:
    """(__aenter__ seconds, __aenter__ start → first decision seconds) per run; the server runs already."""
    from ._runtime import Runtime

    runs = []
    payload = Payloads(1)(0)
    for _ in range(repeats):
        device = device_name("start")
        async with fresh_server(work, "start") as server:
            nc = await connect(server.url)
            try:
                config = runtime_config(work, server.url, device=device)
                started = time.monotonic()
                async with Runtime(config):
                    entered = time.monotonic()
                    answered = await first_decision(nc, payload, 30)
                runs.append((entered - started, answered - started))
            finally:
                await nc.close()
    return runs


async def bench_memory(work: Path, driver: Driver, sizes: Sizes, seed: int) -> MemoryFigures:
    m = sizes.rss_decisions
    steps = 10
    device = device_name("rss")
    config_path = work / f"{device}.toml"
    log_path = work / f"{device}.log"
    async with fresh_server(work, "rss") as server:
        from ._config import config_to_toml

        config_path.write_text(config_to_toml(runtime_config_data(work, server.url, device=device)))
        nc = await connect(server.url)
        env = {k: v for k, v in os.environ.items() if k != "EDGE_DEVICE_ID"}
        probe = Payloads(1)(0)
        try:
            with log_path.open("ab") as log_file:
                spawned = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge", "--log-level", "warning", "run", "-c", str(config_path),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_file, env=env,
                )
            try:
                first = await first_decision(nc, probe, 60) - spawned
                rss_start, _ = proc_memory_mib(proc.pid)
                checkpoints: list[list[float]] = []
                done = 0
                busy = 0.0
                for step in range(steps):
                    n = m * (step + 1) // steps - done
                    report = await driver.saturate(server.url, decisions_subject(device), n,
                                                   warmup=sizes.warmup if step == 0 else 0, seed=seed + step)
                    done += n
                    busy += report.finished_at - report.started_at
                    checkpoints.append([done, round(proc_memory_mib(proc.pid)[0], 1)])
                _, hwm = proc_memory_mib(proc.pid)
                stopping = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(60):
                        code = await proc.wait()
                except TimeoutError:
                    raise BenchError("`edge run` did not stop within 60s of SIGTERM") from None
                stop_s = time.monotonic() - stopping
                if code != 0:
                    tail = log_path.read_text(errors="replace")[-1500:]
                    raise BenchError(f"`edge run` exited with {code}; its log ends:\n{tail}")
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        finally:
            await nc.close()
    runs = await startup_in_process(work, sizes.startup_repeats)
    growth = checkpoints[-1][1] - checkpoints[0][1]
    span = checkpoints[-1][0] - checkpoints[0][0]
    return MemoryFigures(
        decisions=m, rss_after_start_mib=round(rss_start, 1), rss_checkpoints_mib=checkpoints,
        rss_growth_mib=round(growth, 1), rss_growth_per_100k_mib=round(growth / span * 100_000, 2),
        hwm_mib=round(hwm, 1), process_decisions_per_s=round(m / busy, 1),
        startup_aenter_s=round(statistics.median(r[0] for r in runs), 4),
        startup_first_decision_s=round(statistics.median(r[1] for r in runs), 4),
        startup_runs_s=[round(r[1], 4) for r in runs], process_first_decision_s=round(first, 3),
        process_stop_s=round(stop_s, 3),
    )


# =============================================================================================
# The profile


async def profile_runtime(work: Path, driver: Driver, sizes: Sizes, seed: int, top: int = 15) -> ProfileFigures:
    """cProfile of the event-loop thread while the runtime runs at saturation (after an unprofiled warm-up)."""
    from ._runtime import Runtime

    device = device_name("prof")
    profiler = cProfile.Profile()
    async with fresh_server(work, "profile") as server, Runtime(runtime_config(work, server.url, device=device)):
        await driver.saturate(server.url, decisions_subject(device), sizes.warmup, warmup=0, seed=seed)
        profiler.enable()
        try:
            report = await driver.saturate(server.url, decisions_subject(device), sizes.profile_n, warmup=0,
                                           seed=seed)
        finally:
            profiler.disable()
    stats = pstats.Stats(profiler)
    entries = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
            raw.items(), key=lambda item: item[1][2], reverse=True)[:top]:
        entries.append(ProfileEntry(function=_where(file, line, func), ncalls=ncalls, tottime_s=round(tottime, 4),
                                    cumtime_s=round(cumtime, 4), percall_us=round(tottime / ncalls * 1e6, 2)))
    components: dict[str, float] = {}
    for (file, _line, func), value in raw.items():
        component = _component(file, func)
        components[component] = components.get(component, 0.0) + value[2]
    by_component = {k: round(v / total, 3) for k, v in sorted(components.items(), key=lambda kv: -kv[1])}
    elapsed = report.finished_at - report.started_at
    return ProfileFigures(decisions=report.n, decisions_per_s=round(report.n / elapsed, 1),
                          total_tottime_s=round(total, 3), top=entries, by_component=by_component)


def _component(file: str, func: str) -> str:
    if file == "~":  # C functions: name them by what they belong to
        for marker, name in (("msgspec", "msgspec"), ("sqlite", "sqlite3"), ("numpy", "numpy"),
                             ("hashlib", "hashlib"), ("_hashlib", "hashlib"), ("onnxruntime", "onnxruntime")):
            if marker in func:
                return name
        return "builtins"
    for marker, name in (("/nats/", "nats-py"), ("/edge/", "edge"), ("/models/", "models"), ("/sync/", "sync"),
                         ("/asyncio/", "asyncio"), ("/uvloop/", "asyncio"), ("/msgspec/", "msgspec"),
                         ("/numpy/", "numpy")):
        if marker in file:
            return name
    return "other"


def _where(file: str, line: int, func: str) -> str:
    if file == "~":
        return func
    path = file
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{line}({func})"


# =============================================================================================
# Running it all


def machine_info(work: Path) -> Machine:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    packages = {}
    for name in ("nats-py", "msgspec", "onnxruntime", "numpy", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    server = "unknown"
    with contextlib.suppress(OSError):
        import subprocess

        server = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    return Machine(nproc=os.cpu_count() or 0, cpu_model=cpu, python=platform.python_version(),
                   platform=platform.platform(), event_loop=loop, nats_server=server, packages=packages,
                   filesystem=_filesystem(work))


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    return kind


async def run_bench(options: BenchOptions) -> BenchResult:
    """Run the sections in `options`, write bench.json and bench.txt to `options.out`, return the figures."""
    unknown = set(options.sections) - set(SECTIONS)
    if unknown:
        raise BenchError(f"unknown sections {sorted(unknown)}; expected some of {', '.join(SECTIONS)}")
    sizes = Sizes.pick(options)
    begun = time.monotonic()
    seed = options.seed
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        result = BenchResult(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command=options.command or _command_line(),
            mode="quick" if options.quick else "full", machine=machine_info(work), sizes=sizes, notes=NOTES,
        )
        async with Driver() as driver:
            runtime_rate = 0.0

            async def saturation() -> None:
                nonlocal runtime_rate
                result.saturation = await bench_saturation(work, driver, sizes, seed)
                runtime_rate = result.saturation.runtime.decisions_per_s

            async def latency() -> None:
                rate = runtime_rate or (await saturate_runtime(work, driver, sizes.saturation_n, sizes.warmup,
                                                               seed)).decisions_per_s
                result.latency = await bench_latency(work, driver, sizes, seed, rate)

            async def audit() -> None:
                result.audit = await bench_audit(work, driver, sizes, seed)

            async def sync() -> None:
                result.sync = await bench_sync(work, sizes)

            async def blackhole() -> None:
                result.blackhole = await bench_blackhole(work, driver, sizes, seed)

            async def memory() -> None:
                result.memory = await bench_memory(work, driver, sizes, seed)

            async def approvals() -> None:
                result.approvals = await bench_approvals(work, sizes)

            async def profile() -> None:
                result.profile = await profile_runtime(work, driver, sizes, seed)

            steps: dict[str, Callable[[], Awaitable[None]]] = {
                "saturation": saturation, "latency": latency, "audit": audit, "sync": sync,
                "blackhole": blackhole, "memory": memory, "approvals": approvals, "profile": profile,
            }
            chosen = [name for name in SECTIONS if name in options.sections] + (["profile"] if options.profile else [])
            for name in chosen:
                log.info("bench section %s", name)
                meter = ContentionMeter(driver.pid)
                await steps[name]()
                result.contention[name] = meter.stop()
    result.elapsed_s = round(time.monotonic() - begun, 1)
    if options.out is not None:
        await asyncio.to_thread(write_report, result, Path(options.out))
    return result


async def bench_approvals(work: Path, sizes: Sizes) -> ApprovalFigures:
    """p50/p99 of inputs that need no approval, with none and then 100 approvals pending."""
    import nats as nats_client

    from ._runtime import Runtime
    from .cloudsim import AutoApprover

    pending, requests = 100, (300 if sizes.repeats == 1 else 2000)
    device = device_name("appr")
    data = runtime_config_data(work, "", device=device, ladder=("rules",))
    async with fresh_server(work, "approvals") as server:
        data["nats"] = {"local": server.url, "upstream": ""}
        data["pipelines"][0]["actions"]["shutdown"] = {"approval": "required", "approval_timeout_ms": 60_000,
                                                       "instead": "hold"}
        from ._config import decode_config

        config = decode_config(data, base_dir=work, env={})
        async with Runtime(config) as rt:
            nc = await nats_client.connect(server.url)
            approver_nc = await nats_client.connect(server.url)
            try:
                normal = msgspec.json.encode({"rms": 1.2, "kurtosis": 3.0, "temp_c": 45.0, "rpm": 1480.0})
                critical = msgspec.json.encode({"rms": 9.0, "kurtosis": 4.0, "temp_c": 99.0, "rpm": 1480.0})
                subject = "sensors.p1.pump"

                async def measure() -> Latency:
                    samples: list[float] = []
                    for _ in range(requests):
                        started = time.perf_counter()
                        await nc.request(subject, normal, timeout=5)
                        samples.append((time.perf_counter() - started) * 1000)
                    return _latency_of(samples)

                idle = await measure()
                # A human who takes a minute: every critical input waits on its own.
                async with AutoApprover(approver_nc, delay_s=(60.0, 60.0)):
                    for _ in range(pending):
                        await nc.publish(subject, critical)
                    pipeline = rt.pipelines[PIPELINE]
                    for _ in range(1000):  # poll, 10 s at most
                        if pipeline.pending_approvals >= pending:
                            break
                        await asyncio.sleep(0.01)
                    waiting = pipeline.pending_approvals
                    busy = await measure()
                    rt.approvals.link_lost()  # settle the pending ones now rather than after a minute
            finally:
                await nc.close()
                await approver_nc.close()
    return ApprovalFigures(pending=waiting, requests=requests, idle=idle, busy=busy)


def _latency_of(samples_ms: list[float]) -> Latency:
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return Latency(count=len(ordered), lost=0, p50_ms=at(0.5), p99_ms=at(0.99), p999_ms=at(0.999),
                   max_ms=round(ordered[-1], 3), mean_ms=round(sum(ordered) / len(ordered), 3), send_lag_p99_ms=0.0)


def write_report(result: BenchResult, out: Path) -> None:
    """bench.json (every figure) and bench.txt (the table) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    (out / "bench.txt").write_text(format_table(result))


# =============================================================================================
# The table


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def format_table(r: BenchResult) -> str:
    """The figures as plain text, one section after another."""
    m = r.machine
    lines = [
        f"edge bench ({r.mode}) {r.date}  {r.elapsed_s:.0f}s",
        f"machine: {m.nproc} CPU, {m.cpu_model}; Python {m.python} ({m.event_loop}); {m.nats_server}",
        f"storage: {m.filesystem}",
        f"command: {r.command}",
        "",
    ]
    if r.saturation is not None:
        s = r.saturation
        lines += [
            f"1. Saturation: decisions/s (N={s.bare.n:,}, window {WINDOW}, median of {len(s.bare_runs)})",
            f"   {'':34}{'bare':>12}{'runtime':>12}{'ratio':>9}",
            f"   {'decisions/s':34}{_n(s.bare.decisions_per_s):>12}{_n(s.runtime.decisions_per_s):>12}"
            f"{s.ratio:>9.3f}",
            f"   {'each run (bare; runtime)':34}{_runs(s.bare_runs)}; {_runs(s.runtime_runs)}",
            f"   {'CPU us/decision: SUT':34}{s.bare.cpu.sut_us:>12.1f}{s.runtime.cpu.sut_us:>12.1f}",
            f"   {'CPU us/decision: driver+sink':34}{s.bare.cpu.driver_us:>12.1f}{s.runtime.cpu.driver_us:>12.1f}",
            f"   {'CPU us/decision: nats-server':34}{s.bare.cpu.server_us:>12.1f}{s.runtime.cpu.server_us:>12.1f}",
            f"   {'cores busy (of ' + str(m.nproc) + ')':34}{s.bare.cpu.cores_busy:>12.2f}"
            f"{s.runtime.cpu.cores_busy:>12.2f}",
            f"   runtime tiers {s.runtime_tiers}  fallbacks {s.runtime_fallbacks}  "
            f"sync backlog at end {s.runtime_sync_backlog:,}",
            f"   runtime, sync deferred (upstream out of reach; audit as durable): {_n(s.deferred.decisions_per_s)}"
            f"/s, ratio {s.deferred_ratio:.3f}  (each run {_runs(s.deferred_runs)}; "
            f"SUT {s.deferred.cpu.sut_us:.1f} us/decision)",
            "",
        ]
    if r.latency is not None:
        lines += ["2. Latency, open loop (ms from the scheduled send to the output at the sink)",
                  f"   {'':30}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'n':>8}{'lost':>6}{'lag p99':>9}"]
        for run in r.latency:
            for name, lat in (("bare", run.bare), ("runtime", run.runtime)):
                label = f"{name} @ {_n(run.rate_hz)}/s"
                lines.append(f"   {label:30}{_lat_row(lat)}")
            lines.append(f"   {'  runtime, inside handle()':30}{run.runtime_internal_p50_ms:>9.2f}"
                         f"{run.runtime_internal_p99_ms:>9.2f}   ({run.why})")
        lines.append("")
    if r.audit is not None:
        a = r.audit

        def row(label: str, values: dict[str, float], fmt: str) -> str:
            return f"   {label:34}" + "".join(format(values[k], fmt).rjust(10) for k in FSYNC_MODES)

        lines += [
            f"3. Audit log by fsync mode (runtime: N={r.sizes.audit_n:,}, median of {r.sizes.repeats})",
            f"   {'':34}{'off':>10}{'batch':>10}{'always':>10}",
            row("runtime decisions/s", a.runtime_decisions_per_s, ",.0f"),
            row("AuditLog appends/s (256 waiting)", a.appends_per_s, ",.0f"),
            row("commit p50 ms (one at a time)", a.commit_p50_ms, ".3f"),
            row("commit p99 ms (one at a time)", a.commit_p99_ms, ".3f"),
            f"   runtime batch/off: {a.batch_over_off:.3f}   (each run: "
            + "; ".join(f"{k} {_runs(v)}" for k, v in a.runtime_runs.items()) + ")",
            "",
        ]
    if r.sync is not None:
        y = r.sync
        lines += [
            f"4. Sync catch-up: {y.records:,} records (~{y.mean_record_bytes:.0f} B each), same bytes and Msg-Ids",
            f"   {'Uploader':34}{_n(y.uploader_records_per_s):>10} records/s  ({y.uploader_s:.2f}s)",
            f"   {f'raw js.publish_async ({SYNC_WINDOW} pending)':34}{_n(y.publish_async_records_per_s):>10} "
            f"records/s  ({y.publish_async_s:.2f}s)  uploader/raw {y.ratio_vs_publish_async:.3f}",
            f"   {f'raw nc.publish, {SYNC_WINDOW} unacked':34}{_n(y.window_records_per_s):>10} records/s  "
            f"({y.window_s:.2f}s)  uploader/raw {y.ratio_vs_window:.3f}",
            "",
        ]
    if r.blackhole is not None:
        b = r.blackhole
        lines += [
            f"5. Blackholed cloud at {_n(b.offered_hz)}/s offered (phases {'/'.join(f'{p:g}' for p in b.phases_s)}s;"
            " ladder cloud, model, rules)",
            f"   {'':30}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'n':>8}{'lost':>6}{'lag p99':>9}",
            f"   {'before':30}{_lat_row(b.before)}",
            f"   {'during (all)':30}{_lat_row(b.during)}",
            f"   {'during, breaker open':30}{_lat_row(b.during_after_open)}",
            f"   {'after':30}{_lat_row(b.after)}",
            f"   blackhole -> breaker open {b.breaker_open_ms:.0f} ms; -> first breaker_open decision "
            f"{b.first_breaker_open_decision_ms:.0f} ms",
            f"   decisions that waited on the dead cloud (timeout): {b.waited_on_dead_cloud}; unreachable: "
            f"{b.unreachable}",
            f"   pass-through -> cloud decides again: {b.cloud_recovered_ms:.0f} ms; tiers {b.tiers}",
            "",
        ]
    if r.memory is not None:
        mm = r.memory
        first, last = mm.rss_checkpoints_mib[0], mm.rss_checkpoints_mib[-1]
        lines += [
            f"6. Memory and start-up (`edge run` in its own process, {mm.decisions:,} decisions)",
            f"   RSS after start {mm.rss_after_start_mib:.1f} MiB; after {first[0]:,.0f}: {first[1]:.1f} MiB; "
            f"after {last[0]:,.0f}: {last[1]:.1f} MiB; peak {mm.hwm_mib:.1f} MiB",
            f"   growth {first[0]:,.0f} -> {last[0]:,.0f}: {mm.rss_growth_mib:+.1f} MiB "
            f"({mm.rss_growth_per_100k_mib:+.2f} MiB per 100k decisions)",
            f"   process at saturation: {_n(mm.process_decisions_per_s)} decisions/s",
            f"   start-up in process: __aenter__ {mm.startup_aenter_s * 1e3:.0f} ms, first decision "
            f"{mm.startup_first_decision_s * 1e3:.0f} ms (server already up; runs "
            f"{', '.join(f'{x * 1e3:.0f}' for x in mm.startup_runs_s)} ms)",
            f"   `python -m edge run`: exec -> first decision {mm.process_first_decision_s * 1e3:.0f} ms; "
            f"SIGTERM -> exit {mm.process_stop_s * 1e3:.0f} ms",
            "",
        ]
    if r.approvals is not None:
        ap = r.approvals
        lines += [
            f"7. Inputs that need no approval, request/reply round trip ms ({ap.requests:,} each; closed loop)",
            f"   {'':30}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}",
        ]
        for name, lat in (("no approval pending", ap.idle), (f"{ap.pending} approvals pending", ap.busy)):
            lines.append(f"   {name:30}{lat.p50_ms:>9.2f}{lat.p99_ms:>9.2f}{lat.p999_ms:>9.2f}{lat.max_ms:>9.2f}")
        lines.append("")
    if r.profile is not None:
        p = r.profile
        lines += [
            f"Profile: event-loop thread, {p.decisions:,} decisions at saturation under cProfile "
            f"({_n(p.decisions_per_s)}/s), top by tottime (total {p.total_tottime_s:.2f}s)",
            f"   {'tottime s':>10}{'cumtime s':>10}{'ncalls':>10}{'us/call':>9}  function",
        ]
        lines += [f"   {e.tottime_s:>10.3f}{e.cumtime_s:>10.3f}{e.ncalls:>10}{e.percall_us:>9.2f}  {e.function}"
                  for e in p.top]
        lines.append("   tottime by component: " + ", ".join(f"{k} {v:.0%}" for k, v in p.by_component.items()))
        lines.append("")
    if r.contention:
        lines.append("Machine load during each section (cores busy; 'others' is work that is not the bench's)")
        for name, c in r.contention.items():
            lines.append(f"   {name:12}{c.wall_s:>7.0f}s  all {c.machine_busy_cores:4.2f}  bench {c.bench_cores:4.2f}  "
                         f"others {c.other_cores:4.2f}  load avg {c.loadavg_1m:.2f}")
        lines.append("")
    return "\n".join(lines)


def _runs(values: list[float]) -> str:
    return "/".join(f"{v / 1000:.1f}k" for v in values)


def _lat_row(lat: Latency) -> str:
    return (f"{lat.p50_ms:>9.2f}{lat.p99_ms:>9.2f}{lat.p999_ms:>9.2f}{lat.max_ms:>9.2f}{lat.count:>8}{lat.lost:>6}"
            f"{lat.send_lag_p99_ms:>9.2f}")


# =============================================================================================
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="The edge runtime benchmark (SPEC §10).")
    parser.add_argument("--quick", action="store_true", help="smoke mode: small sizes, under a minute")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json, bench.txt and bench.log")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--profile", action="store_true", help="also profile the runtime's hot path (cProfile)")
    parser.add_argument("--rss-decisions", type=int, default=None,
                        help="decisions for the RSS run (default 20k quick, 1M full)")
    parser.add_argument("--seed", type=int, default=20240601)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`scripts/bench.py` and `edge bench`: run, print the table, write bench.json.

    Exit 0, 1 when something could not be measured, 2 on bad usage.
    """
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    options = BenchOptions(quick=args.quick, out=args.out, sections=sections, profile=args.profile,
                           rss_decisions=args.rss_decisions, seed=args.seed, command=_command_line())
    if set(sections) - set(SECTIONS):
        print(f"bench: unknown sections {sorted(set(sections) - set(SECTIONS))}; expected some of {SECTIONS}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The runtime's own warnings (link changes, uploader back-off) go to a file: the table stays readable.
    handler = logging.FileHandler(out / "bench.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        result = _run(run_bench(options))
    except (EdgeError, OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        handler.close()
    print(format_table(result))
    print(f"wrote {out / 'bench.json'}")
    return 0


def _command_line() -> str:
    """How this process was started, as a reader would type it again."""
    program = sys.argv[0] if sys.argv else "bench"
    if Path(program).name == "__main__.py":
        head = f"python -m {Path(program).parent.name}"
    else:
        head = shlex.quote(program)
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])


def _run(coro: Awaitable[BenchResult]) -> BenchResult:
    async def wrapped() -> BenchResult:
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapped())
    return uvloop.run(wrapped())

"""The driver process (load generator and sink, apart from what it measures) and the parent's handle on it.

The driver reads one JSON job a line on stdin and writes one JSON report a line on stdout: a
saturation run (at most `window` inputs unanswered) or an open-loop run (input i due at
t0 + i/rate). The functions at the end turn its reports into the figures of a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nats
import nats.errors

from ._constants import CHUNK, INPUT_SUBJECT, MIB, SINK_PENDING_BYTES, SINK_PENDING_MSGS, WINDOW
from ._inputs import Payloads
from ._measure import CpuMeter, cpu_self_s, percentile, summarize
from ._results import BenchError, CpuUse, Latency, Saturation

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from edge import NatsServer

REPO_ROOT = Path(__file__).resolve().parents[3]  # on the driver's PYTHONPATH, so it imports this `edge`


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
        cpu = cpu_self_s()
        started = await push(job.n, deadline)
        report = SaturateReport(n=job.n, received=received - job.warmup, started_at=started, finished_at=last_at,
                                cpu_s=cpu_self_s() - cpu)
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
        cpu = cpu_self_s()
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
        cpu = cpu_self_s() - cpu
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


_DRIVER_BOOT = "import sys; from edge.tools.bench import driver_main; sys.exit(driver_main())"


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
        if proc is not None:
            await stop_child(proc)

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


async def measured_saturation(driver: Driver, server: NatsServer, out_subject: str, n: int, *, warmup: int, seed: int,
                              before_measuring: Callable[[], None] | None = None) -> Saturation:
    """A warm-up of `warmup` inputs as a run of its own, then `n` inputs with every process's CPU metered over them.

    `before_measuring` runs between the two (a runtime's status read there is subtracted later).
    """
    if warmup:
        await driver.saturate(server.url, out_subject, warmup, warmup=0, seed=seed)
    if before_measuring is not None:
        before_measuring()
    meter = CpuMeter(server)
    report = await driver.saturate(server.url, out_subject, n, warmup=0, seed=seed)
    return saturation_from_report(report, meter)


async def measured_open_loop(driver: Driver, server: NatsServer, job: OpenLoopJob, *, warmup_s: float,
                             before_measuring: Callable[[], None] | None = None) -> tuple[OpenLoopReport, CpuUse]:
    """`job` after a warm-up of `warmup_s` at the same rate (a job of its own), CPU metered over `job` only."""
    warmup = int(job.rate_hz * warmup_s)
    if warmup:
        await driver.open_loop(msgspec.structs.replace(job, count=warmup, details=False))
    if before_measuring is not None:
        before_measuring()
    meter = CpuMeter(server)
    report = await driver.open_loop(job)
    return report, meter.per_decision(max(1, report.received), report.cpu_s)


def saturation_from_report(report: SaturateReport, meter: CpuMeter) -> Saturation:
    elapsed = report.finished_at - report.started_at
    return Saturation(decisions_per_s=round(report.n / elapsed, 1), n=report.n, elapsed_s=round(elapsed, 3),
                      cpu=meter.per_decision(report.n, report.cpu_s))


def latency_from_report(report: OpenLoopReport) -> Latency:
    got = [x for x in report.latency_s if x >= 0]
    return summarize(got, lost=report.count - len(got), send_lag_p99_s=report.send_lag_p99_s)


async def stop_child(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    """End a child that serves commands on its stdin: close stdin (its signal to finish), wait,
    and kill it if it has not finished within `grace_s`."""
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()

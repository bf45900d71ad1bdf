"""Section 6: the ladder cloud → model → rules under a fixed load while a FaultProxy blackholes the cloud.

Run `sizes.blackhole_runs` times, each with fresh servers and runtime: issue 15 asks that p99 with
the breaker open stay within 2x the steady state's in every run, so every run is reported.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from ._constants import BLACKHOLE_RATE_HZ
from ._driver import Driver, OpenLoopJob, OpenLoopReport
from ._measure import poll_until, summarize
from ._results import BenchError, BlackholeFigures, BlackholeRun, Latency, Sizes
from ._runtime_side import decisions_subject, device_name, runtime_config
from ._servers import connect, fresh_server


async def bench_blackhole(work: Path, driver: Driver, sizes: Sizes, seed: int) -> BlackholeFigures:
    runs = [await blackhole_run(work, driver, sizes, seed) for _ in range(sizes.blackhole_runs)]
    return BlackholeFigures(offered_hz=BLACKHOLE_RATE_HZ, phases_s=list(sizes.blackhole_phases_s), runs=runs,
                            worst_open_over_steady_p99=max(run.open_over_steady_p99 for run in runs))


async def blackhole_run(work: Path, driver: Driver, sizes: Sizes, seed: int) -> BlackholeRun:
    from edge import BreakerState, LinkState, Runtime
    from edge.tools.chaos import FaultProxy
    from edge.tools.cloudsim import CloudSimulator

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
                       restored_at: float) -> BlackholeRun:
    dues = [report.started_at + i / rate for i in range(report.count)]
    arrivals = [due + latency if latency >= 0 else due for due, latency in zip(dues, report.latency_s, strict=True)]
    # "before" holds the decisions that were over before the blackhole began; one in flight
    # then met the dead cloud, and counts as "during".
    phase_of = ["before" if arrival < blackholed_at else "during" if due < restored_at else "after"
                for due, arrival in zip(dues, arrivals, strict=True)]
    skipped = [arrivals[i] for i, latency in enumerate(report.latency_s)
               if latency >= 0 and phase_of[i] != "before" and "breaker_open" in report.cloud_reasons[i].split(",")]
    first_skip = min(skipped, default=math.inf)
    # The poll sees the breaker open up to its interval late (more on a busy loop); a decision that
    # skipped the cloud as breaker_open proves it was open when that decision arrived.
    opened_at = min(opened_at, first_skip)
    phases: dict[str, list[float]] = {"before": [], "during": [], "open": [], "after": []}
    lost = {"before": 0, "during": 0, "after": 0}
    recovered = math.inf
    waited = unreachable = 0
    tiers: dict[str, int] = {}
    for i, latency in enumerate(report.latency_s):
        phase = phase_of[i]
        if latency < 0:
            lost[phase] += 1
            continue
        phases[phase].append(latency)
        if phase == "during" and dues[i] >= opened_at:
            phases["open"].append(latency)
        tiers[report.tiers[i]] = tiers.get(report.tiers[i], 0) + 1
        reasons = report.cloud_reasons[i].split(",")
        if phase != "before":
            waited += "timeout" in reasons
            unreachable += "unreachable" in reasons
        if phase == "after" and report.tiers[i] == "cloud":
            recovered = min(recovered, arrivals[i])

    def phase_latency(name: str) -> Latency:
        return summarize(phases[name], lost=lost.get(name, 0), send_lag_p99_s=report.send_lag_p99_s)

    if math.isinf(recovered):
        raise BenchError(f"the cloud tier did not decide again within {sizes.blackhole_phases_s[2]}s of the "
                         "blackhole ending")
    if math.isinf(first_skip):
        raise BenchError("no decision skipped the cloud as breaker_open during the blackhole")
    before, during_after_open = phase_latency("before"), phase_latency("open")
    return BlackholeRun(
        before=before, during=phase_latency("during"), during_after_open=during_after_open,
        after=phase_latency("after"),
        breaker_open_ms=round((opened_at - blackholed_at) * 1e3, 1),
        first_breaker_open_decision_ms=round((first_skip - blackholed_at) * 1e3, 1),
        waited_on_dead_cloud=waited, unreachable=unreachable,
        cloud_recovered_ms=round((recovered - restored_at) * 1e3, 1),
        decisions=report.received, lost=report.count - report.received, tiers=tiers,
        open_over_steady_p99=round(during_after_open.p99_ms / before.p99_ms, 3),
    )

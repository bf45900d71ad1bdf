"""Sections 1 and 2: bare baseline against runtime at saturation, then open loop at a fixed offered load."""

from __future__ import annotations

from pathlib import Path

from ._bare import latency_bare, saturate_bare
from ._constants import PIPELINE
from ._driver import Driver
from ._results import BatchSizes, LatencyRun, LoopLag, Saturation, SaturationPair, Sizes
from ._runtime_side import RuntimeSaturation, latency_runtime, saturate_runtime


async def bench_saturation(work: Path, driver: Driver, sizes: Sizes, seed: int) -> SaturationPair:
    bare: list[Saturation] = []
    noop: list[Saturation] = []
    runtime: list[RuntimeSaturation] = []
    deferred: list[Saturation] = []
    always: list[Saturation] = []
    n, warmup = sizes.saturation_n, sizes.warmup
    for _ in range(sizes.repeats):  # alternate, so drift on the machine touches all alike
        bare.append(await saturate_bare(work, driver, sizes, seed))
        noop.append(await saturate_bare(work, driver, sizes, seed, noop=True))
        runtime.append(await saturate_runtime(work, driver, n, warmup, seed))
        deferred.append((await saturate_runtime(work, driver, n, warmup, seed, sync=False)).saturation)
        always.append((await saturate_runtime(work, driver, n, warmup, seed, fsync="always")).saturation)
    b, o, d, a = _median_run(bare), _median_run(noop), _median_run(deferred), _median_run(always)
    median = sorted(runtime, key=lambda run: run.saturation.decisions_per_s)[len(runtime) // 2]
    r = median.saturation
    pump = runtime[-1].status["pipelines"][PIPELINE]
    return SaturationPair(
        bare=b, runtime=r, ratio=round(r.decisions_per_s / b.decisions_per_s, 3),
        bare_runs=[s.decisions_per_s for s in bare], runtime_runs=[s.saturation.decisions_per_s for s in runtime],
        runtime_tiers=dict(pump["by_tier"]), runtime_fallbacks=dict(pump["fallbacks"]),
        runtime_sync_backlog=int(runtime[-1].status["sync"]["backlog"]),
        runtime_loop_lag=LoopLag.from_status(median.status), runtime_batches=median.batches,
        bare_noop=o, bare_noop_runs=[s.decisions_per_s for s in noop],
        bare_over_noop=round(b.decisions_per_s / o.decisions_per_s, 3),
        fsync_always=a, fsync_always_ratio=round(a.decisions_per_s / b.decisions_per_s, 3),
        fsync_always_runs=[s.decisions_per_s for s in always],
        deferred=d, deferred_ratio=round(d.decisions_per_s / b.decisions_per_s, 3),
        deferred_runs=[x.decisions_per_s for x in deferred],
    )


def _median_run(runs: list[Saturation]) -> Saturation:
    return sorted(runs, key=lambda s: s.decisions_per_s)[len(runs) // 2]


async def bench_latency(work: Path, driver: Driver, sizes: Sizes, seed: int, runtime_rate: float) -> list[LatencyRun]:
    runs = []
    for rate, why in ((round(runtime_rate * 0.5), "50% of runtime saturation"), (1000.0, "fixed")):
        count = max(100, int(rate * sizes.latency_s))
        bare = await latency_bare(work, driver, rate, count, seed)
        runtime, status = await latency_runtime(work, driver, rate, count, seed)
        internal = status["pipelines"][PIPELINE]["latency_ms"]
        runs.append(LatencyRun(rate_hz=rate, why=why, bare=bare, runtime=runtime,
                               runtime_internal_p50_ms=internal["p50"], runtime_internal_p99_ms=internal["p99"],
                               runtime_loop_lag=LoopLag.from_status(status),
                               runtime_batches=BatchSizes.from_status(status, PIPELINE)))
    return runs

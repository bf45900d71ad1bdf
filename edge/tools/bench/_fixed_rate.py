"""Section 3: the bare service and the runtime at a fixed offered load (issue 15: 400 inputs/s), open loop.

At saturation CPU per decision mixes the work with the contention of a full machine; at a fixed
rate well under both services' saturation it is what each decision costs, and the SUT's share of
one core says how much room is left on the device. Bytes per decision (disk, wire) come from a
third, dedicated runtime run at the same rate.
"""

from __future__ import annotations

from pathlib import Path

from ._bare import fixed_rate_bare
from ._constants import FIXED_RATE_HZ
from ._driver import Driver
from ._results import FixedRateFigures, Sizes
from ._runtime_side import fixed_rate_runtime, runtime_footprint


async def bench_fixed_rate(work: Path, driver: Driver, sizes: Sizes, seed: int) -> FixedRateFigures:
    rate = FIXED_RATE_HZ
    count = int(rate * sizes.fixed_rate_s)
    warmup_s = sizes.fixed_rate_s / 10
    bare = await fixed_rate_bare(work, driver, rate, count, seed, warmup_s)
    runtime = await fixed_rate_runtime(work, driver, rate, count, seed, warmup_s)
    footprint = await runtime_footprint(work, driver, rate, count, seed, warmup_s)
    footprint_leaf = await runtime_footprint(work, driver, rate, count, seed, warmup_s, leaf=True)
    return FixedRateFigures(
        rate_hz=rate, duration_s=sizes.fixed_rate_s, warmup_s=warmup_s, bare=bare, runtime=runtime.run,
        sut_us_ratio=round(runtime.run.cpu.sut_us / bare.cpu.sut_us, 3), runtime_loop_lag=runtime.loop_lag,
        runtime_batches=runtime.batches, footprint=footprint, footprint_leaf=footprint_leaf,
    )

"""Running the chosen sections in one go, with the machine's contention for each, and writing bench.json/bench.txt."""

from __future__ import annotations

import asyncio
import datetime
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from ._approvals import bench_approvals
from ._audit_sync import bench_audit, bench_sync
from ._backlog import bench_backlog
from ._blackhole import bench_blackhole
from ._constants import SECTIONS
from ._driver import Driver
from ._fixed_rate import bench_fixed_rate
from ._measure import ContentionMeter, machine_info
from ._memory import bench_memory
from ._profile import profile_runtime
from ._race import bench_race
from ._replay import bench_replay
from ._results import NOTES, BenchError, BenchOptions, BenchResult, Sizes
from ._runtime_side import saturate_runtime
from ._saturation_latency import bench_latency, bench_saturation
from ._summary import build_summary
from ._table import format_table

log = logging.getLogger("edge.bench")


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
            command=options.command or command_line(),
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
                                                               seed)).saturation.decisions_per_s
                result.latency = await bench_latency(work, driver, sizes, seed, rate)

            async def fixed_rate() -> None:
                result.fixed_rate = await bench_fixed_rate(work, driver, sizes, seed)

            async def audit() -> None:
                result.audit = await bench_audit(work, driver, sizes, seed)

            async def sync() -> None:
                result.sync = await bench_sync(work, sizes)

            async def blackhole() -> None:
                result.blackhole = await bench_blackhole(work, driver, sizes, seed)

            async def backlog() -> None:
                result.backlog = await bench_backlog(work, driver, sizes, seed)

            async def memory() -> None:
                result.memory = await bench_memory(work, driver, sizes, seed)

            async def approvals() -> None:
                result.approvals = await bench_approvals(work, sizes)

            async def race() -> None:
                result.race = await bench_race(work, driver, sizes, seed)

            async def replay() -> None:
                result.replay = await bench_replay(work, sizes, seed)

            async def profile() -> None:
                result.profile = await profile_runtime(work, driver, sizes, seed)

            steps: dict[str, Callable[[], Awaitable[None]]] = {
                "saturation": saturation, "latency": latency, "fixed_rate": fixed_rate, "audit": audit, "sync": sync,
                "blackhole": blackhole, "backlog": backlog, "memory": memory, "approvals": approvals,
                "race": race, "replay": replay, "profile": profile,
            }
            chosen = [name for name in SECTIONS if name in options.sections] + (["profile"] if options.profile else [])
            for name in chosen:
                log.info("bench section %s", name)
                meter = ContentionMeter(driver.pid)
                await steps[name]()
                result.contention[name] = meter.stop()
    result.summary = build_summary(result)
    result.elapsed_s = round(time.monotonic() - begun, 1)
    if options.out is not None:
        await asyncio.to_thread(write_report, result, Path(options.out))
    return result


def write_report(result: BenchResult, out: Path) -> None:
    """bench.json (every figure) and bench.txt (the table) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")
    (out / "bench.txt").write_text(format_table(result))


def command_line() -> str:
    """How this process was started, as a reader would type it again."""
    program = sys.argv[0] if sys.argv else "bench"
    if Path(program).name == "__main__.py":
        head = f"python -m {Path(program).parent.name}"
    else:
        head = shlex.quote(program)
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])

"""Section 8: RSS of `python -m edge run` over many decisions, and start-up times in process and as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import nats.errors

from ._constants import INPUT_SUBJECT
from ._driver import Driver
from ._inputs import Payloads
from ._measure import proc_memory_mib
from ._results import BenchError, MemoryFigures, Sizes
from ._runtime_side import decisions_subject, device_name, runtime_config, runtime_config_data
from ._servers import connect, fresh_server

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS


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
    from edge import Runtime

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
        from edge import config_to_toml

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

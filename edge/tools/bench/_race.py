"""Section 10: two cloud providers, A slow and B fast, asked one after the other or raced.

The runtime's pipeline has ladder cloud:a, cloud:b, model, rules, and the two providers answer on
their own subjects. A takes RACE_SLOW_MS to think and stays well inside its timeout
(RACE_TIMEOUT_MS), so asked in ladder order every decision waits for A and B is never asked. With
`race = ["cloud:a", "cloud:b"]` both are asked at once and B's answer decides; A's still counts (its
answer is recorded later as a `race` audit record) and costs a cloud request of its own. Both runs
take the same fixed offered load, open loop, after a warm-up of their own.

The simulated providers run in a child process (`cloud_main`): their model runs per request, and
on this process's loop it would be counted as the runtime's CPU, twice as much of it in the race.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from ._constants import MIB, PIPELINE, RACE_RATE_HZ, RACE_SLOW_MS, RACE_TIMEOUT_MS
from ._driver import REPO_ROOT, Driver, OpenLoopJob, latency_from_report, stop_child
from ._measure import CpuMeter, poll_until, proc_cpu_s
from ._results import BenchError, RaceFigures, RaceRun, Sizes
from ._runtime_side import decisions_subject, device_name, runtime_config_data
from ._servers import fresh_server

SLOW_SUBJECT = "cloud.infer.a"
FAST_SUBJECT = "cloud.infer.b"
LADDER = ("cloud:a", "cloud:b", "model", "rules")
RACED = ["cloud:a", "cloud:b"]
SETTLE_S = 10.0  # bound on waiting for the slow provider's last (late) answers


async def bench_race(work: Path, driver: Driver, sizes: Sizes, seed: int) -> RaceFigures:
    sequential = await race_run(work, driver, sizes, seed, race=False)
    raced = await race_run(work, driver, sizes, seed, race=True)
    return RaceFigures(
        offered_hz=RACE_RATE_HZ, duration_s=sizes.race_s, slow_ms=RACE_SLOW_MS, timeout_ms=RACE_TIMEOUT_MS,
        sequential=sequential, raced=raced,
        p50_gain=round(sequential.latency.p50_ms / raced.latency.p50_ms, 2),
        p99_gain=round(sequential.latency.p99_ms / raced.latency.p99_ms, 2),
        extra_requests_per_decision=round(raced.requests_per_decision - sequential.requests_per_decision, 3),
        sut_us_ratio=round(raced.cpu.sut_us / sequential.cpu.sut_us, 3),
    )


async def race_run(work: Path, driver: Driver, sizes: Sizes, seed: int, *, race: bool) -> RaceRun:
    from edge import LinkState, Runtime, decode_config

    device = device_name("race" if race else "seq")
    async with fresh_server(work, "race") as server, CloudProcess(server.url, RACE_SLOW_MS) as clouds:
        data = runtime_config_data(work, server.url, device=device, ladder=LADDER)
        pipeline = data["pipelines"][0]
        pipeline.pop("cloud", None)
        pipeline["clouds"] = {"a": {"subject": SLOW_SUBJECT, "timeout_ms": RACE_TIMEOUT_MS},
                              "b": {"subject": FAST_SUBJECT, "timeout_ms": RACE_TIMEOUT_MS}}
        if race:
            pipeline["race"] = RACED
        config = decode_config(data, source="bench", base_dir=work, env={})
        async with Runtime(config) as rt:
            await poll_until(lambda: _providers_online(rt.status(), LinkState.ONLINE.value), 15,
                             "both cloud providers' links to come online")
            subject = decisions_subject(device)
            warmup = OpenLoopJob(url=server.url, out_subject=subject, rate_hz=RACE_RATE_HZ,
                                 count=int(RACE_RATE_HZ / 2), seed=seed, key="sha256")
            await driver.open_loop(warmup)
            await _settled(rt)
            answered_before = await clouds.answered()
            tiers_before = Counter(rt.status()["pipelines"][PIPELINE]["by_tier_name"])
            late_before = _race_records(rt.status())
            cloud_cpu_before = proc_cpu_s(clouds.pid)
            meter = CpuMeter(server)
            job = msgspec.structs.replace(warmup, count=int(RACE_RATE_HZ * sizes.race_s))
            report = await driver.open_loop(job)
            # The race's losers answer after their decision: their requests (and the runtime's work
            # recording them) belong to the run, so the meters stop once they are in.
            await _settled(rt)
            cpu = meter.per_decision(max(1, report.received), report.cpu_s)
            cloud_cpu_s = proc_cpu_s(clouds.pid) - cloud_cpu_before
            answered_after = await clouds.answered()
            status = rt.status()
    slow = answered_after[SLOW_SUBJECT] - answered_before[SLOW_SUBJECT]
    fast = answered_after[FAST_SUBJECT] - answered_before[FAST_SUBJECT]
    decisions = max(1, report.received)
    tiers = Counter(status["pipelines"][PIPELINE]["by_tier_name"])
    tiers.subtract(tiers_before)
    return RaceRun(
        ladder=list(LADDER), race=RACED if race else [], latency=latency_from_report(report),
        decisions=report.received, by_tier_name={name: n for name, n in tiers.items() if n > 0},
        answered_a=slow, answered_b=fast, requests_per_decision=round((slow + fast) / decisions, 3),
        race_records=_race_records(status) - late_before, cpu=cpu,
        cloud_cpu_us=round(cloud_cpu_s / decisions * 1e6, 1),
    )


def _providers_online(status: dict[str, Any], online: str) -> bool:
    clouds = status["clouds"]
    return all(clouds.get(s, {}).get("state") == online for s in (SLOW_SUBJECT, FAST_SUBJECT))


def _race_records(status: dict[str, Any]) -> int:
    return sum(status["pipelines"][PIPELINE]["race_late"].values())


async def _settled(rt: Any) -> None:
    """Every race lost by the slow provider recorded: in a race, each decision B won leaves one."""

    def settled() -> bool:
        pipeline = rt.status()["pipelines"][PIPELINE]
        return bool(sum(pipeline["race_late"].values()) >= pipeline["by_tier_name"].get("cloud:b", 0))

    await poll_until(settled, SETTLE_S, "the slow provider's late answers")


class _Answered(msgspec.Struct):
    """The child's reply to `count`: inference requests answered, by subject."""

    answered: dict[str, int]


class CloudProcess:
    """Two simulated providers in a child process: SLOW_SUBJECT (`slow_ms` per request) and FAST_SUBJECT.

    One command a line on stdin (`count`: how many each has answered, as JSON on stdout); EOF stops it.
    """

    def __init__(self, url: str, slow_ms: float) -> None:
        self.url = url
        self.slow_ms = slow_ms
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> CloudProcess:
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLOUD_BOOT, self.url, str(self.slow_ms), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": path}, limit=MIB)
        await self._line(30.0)  # "ready": both subscribed, the model loaded
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop_child(proc)

    async def answered(self) -> dict[str, int]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(b"count\n")
        await self._proc.stdin.drain()
        return msgspec.json.decode(await self._line(10.0), type=_Answered).answered

    async def _line(self, timeout_s: float) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = await self._proc.stdout.readline()
        except TimeoutError:
            raise BenchError(f"the simulated clouds did not answer within {timeout_s:g}s") from None
        if not line:
            raise BenchError(f"the simulated clouds exited ({self._proc.returncode})")
        return line


_CLOUD_BOOT = "import sys; from edge.tools.bench._race import cloud_main; sys.exit(cloud_main(sys.argv[1:]))"


def cloud_main(argv: list[str]) -> int:
    """The child process of CloudProcess: `URL SLOW_MS`."""
    url, slow_ms = argv[0], float(argv[1])
    asyncio.run(_serve_clouds(url, slow_ms))
    return 0


async def _serve_clouds(url: str, slow_ms: float) -> None:
    import nats

    from edge.tools.cloudsim import CloudSimulator

    nc = await nats.connect(url, name="bench-clouds", allow_reconnect=False, connect_timeout=5)
    try:
        async with (CloudSimulator(nc, subject=SLOW_SUBJECT) as slow,
                    CloudSimulator(nc, subject=FAST_SUBJECT) as fast):
            slow.slow(slow_ms)
            _reply("ready")
            while await asyncio.to_thread(sys.stdin.readline):  # "" at EOF: the parent is done
                _reply(msgspec.json.encode(_Answered({SLOW_SUBJECT: slow.answered,
                                                      FAST_SUBJECT: fast.answered})).decode())
    finally:
        await nc.close()


def _reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

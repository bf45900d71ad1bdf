"""The event-loop lag monitor: its figures from a fake clock, and a real Runtime reporting a stall."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge import Runtime
from edge._looplag import LoopLagMonitor, LoopLagStats, SecondLag
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import make_config


def test_each_completed_second_keeps_its_max_and_p99() -> None:
    stats = LoopLagStats(interval_s=0.05, window_s=60)
    # Second 100: 200 wake-ups (more than one interval allows, to make p99 differ from the max),
    # lags 1..200 ms; its p99 (nearest rank) is the 198th value.
    for i in range(200):
        stats.record(100.0 + i * 0.004, (i + 1) / 1000)
    assert stats.seconds() == []  # second 100 is still open
    assert stats.snapshot(100.9)["last_s_max_ms"] is None

    stats.record(101.0, 0.002)  # the first wake-up of second 101 closes second 100
    (second,) = stats.seconds()
    assert second == SecondLag(second=100, samples=200, max_s=0.2, p99_s=0.198)
    status = stats.snapshot(101.0)
    assert status["last_s_max_ms"] == 200.0 and status["last_s_p99_ms"] == 198.0
    assert status["max_ms"] == 200.0 and status["window_max_ms"] == 200.0
    assert status["window_s"] == 60 and status["interval_ms"] == 50.0

    # A quiet second after a busy one: "last second" moves on, the max since start stays.
    for i in range(1, 20):
        stats.record(101.0 + i * 0.05, 0.001)
    stats.record(102.0, 0.001)
    status = stats.snapshot(102.0)
    assert status["last_s_max_ms"] == 2.0 and status["last_s_p99_ms"] == 2.0
    assert status["max_ms"] == 200.0


def test_an_early_wake_up_counts_as_no_lag() -> None:
    stats = LoopLagStats()
    stats.record(5.0, -0.0003)
    stats.record(6.0, 0.0)
    assert stats.seconds() == [SecondLag(5, 1, 0.0, 0.0)]


def test_the_window_forgets_what_is_older_than_window_s_and_stays_bounded() -> None:
    stats = LoopLagStats(interval_s=0.05, window_s=10)
    stats.record(0.0, 0.150)  # a stall at the start
    for i in range(1, 20 * 100):  # then 100 s of 1 ms lag, 20 wake-ups a second
        stats.record(i * 0.05, 0.001)
    seconds = stats.seconds()
    assert len(seconds) == 10 and [s.second for s in seconds] == list(range(89, 99))
    status = stats.snapshot(99.95)
    assert status["window_max_ms"] == 1.0 and status["window_p99_ms"] == 1.0  # the stall is out of the window
    assert status["max_ms"] == 150.0  # ... but not out of the max since start
    # Memory: at most window_s seconds of samples, whatever the run's length.
    assert len(stats._samples) <= 10 * 20 + 1  # noqa: SLF001 (the bound itself is the promise)

    # Seconds with no wake-up (the loop blocked) are simply absent; ages still count in clock time.
    stats.record(105.0, 3.0)
    assert [s.second for s in stats.seconds()] == [95, 96, 97, 98, 99]
    status = stats.snapshot(105.0)
    assert status["window_max_ms"] == 3000.0 and status["last_s_max_ms"] == 1.0  # second 105 is still open


def test_a_bad_interval_or_window_is_refused() -> None:
    with pytest.raises(ValueError):
        LoopLagStats(interval_s=0)
    with pytest.raises(ValueError):
        LoopLagStats(window_s=0)


async def test_the_monitor_measures_a_stall_and_stops_when_closed() -> None:
    async with LoopLagMonitor(interval_s=0.01) as monitor:
        await asyncio.sleep(0.02)
        time.sleep(0.08)  # noqa: ASYNC251 (blocks the loop on purpose: that is the lag to see)
        await wait_until(lambda: (monitor.snapshot()["max_ms"] or 0) >= 60, within=2, what="the stall measured")
    seen = monitor.snapshot()["window_max_ms"]
    await asyncio.sleep(0.05)
    assert monitor.snapshot()["window_max_ms"] == seen and monitor.state.value == "closed"
    await monitor.aclose()  # idempotent


async def test_a_running_runtime_reports_a_blocked_loop_in_status(nats_servers: ServerFactory,
                                                                  tmp_path: Path) -> None:
    local = await nats_servers("local")
    async with Runtime(make_config(tmp_path, local.url)) as runtime:
        await wait_until(lambda: runtime.status()["loop_lag"]["last_s_max_ms"] is not None, within=5,
                         what="a completed second of loop lag")
        lag = runtime.status()["loop_lag"]
        assert set(lag) >= {"last_s_max_ms", "last_s_p99_ms", "max_ms", "window_s", "window_p99_ms"}
        assert lag["max_ms"] < 100  # nothing has blocked the loop yet

        async def blocks_the_loop() -> None:
            # time.sleep, not asyncio.sleep: a coroutine that does synchronous work without
            # yielding holds the whole event loop, which is exactly the stall the monitor exists
            # to expose (its next wake-up comes ~150 ms late).
            time.sleep(0.150)  # noqa: ASYNC251

        await blocks_the_loop()
        await wait_until(lambda: runtime.status()["loop_lag"]["max_ms"] >= 100, within=5,
                         what="the 150 ms stall in status")
        await wait_until(lambda: (runtime.status()["loop_lag"]["last_s_max_ms"] or 0) >= 100, within=5,
                         what="the stall in its completed second")

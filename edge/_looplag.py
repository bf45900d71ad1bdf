"""How late the event loop runs: a lag monitor for `status` and the bench (issue 15).

A task sleeps `interval_s` (50 ms) again and again. Each wake-up comes late by however long the
loop was busy with something that did not yield (a callback's long loop, synchronous I/O, a GC
pause), plus the loop's own scheduling cost: that lateness (the wake-up's time minus the time it
asked for) is the loop's lag, what every other ready coroutine (a decision, a heartbeat) waited
beyond its turn. A stall shows up in the first wake-up after it, so a blocked loop is reported
once it runs again, never while it is blocked.

`LoopLagStats` is the pure part: samples go in with the time they were taken. It keeps, for each
completed second that had samples, that second's max and p99, and the raw samples of the last
`window_s` seconds, all in deques bounded in count (a second holds at most 1/interval samples),
plus the max since start. `LoopLagMonitor` is the one asyncio task feeding it, an async context
manager owning its task.

At 20 samples a second the nearest-rank p99 of one second is its max; the window's p99 (over up
to 1,200 samples) is the figure that tells a steady lag from a rare stall.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, NamedTuple

from ._link import Clock

INTERVAL_S = 0.05
WINDOW_S = 60


class SecondLag(NamedTuple):
    """One completed second: its index (whole seconds of the clock) and its lag figures."""

    second: int
    samples: int
    max_s: float
    p99_s: float


def _p99(sorted_values: list[float]) -> float:
    """Nearest-rank p99 of already sorted, non-empty values (as the bench's percentile)."""
    rank = max(1, math.ceil(0.99 * len(sorted_values)))
    return sorted_values[rank - 1]


class LoopLagStats:
    """Lag samples → per-second max/p99, a bounded window, and the max since start. No I/O, no clock."""

    def __init__(self, *, interval_s: float = INTERVAL_S, window_s: int = WINDOW_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if window_s < 1:
            raise ValueError(f"window_s must be at least 1, got {window_s}")
        self.interval_s = interval_s
        self.window_s = window_s
        self.max_s = 0.0
        self._seconds: deque[SecondLag] = deque(maxlen=window_s)
        # (time, lag) of the last window_s seconds; the bound holds even if a clock misbehaves.
        self._samples: deque[tuple[float, float]] = deque(maxlen=window_s * math.ceil(1 / interval_s) + 1)
        self._current = -1  # the second being filled
        self._current_lags: list[float] = []

    def record(self, now: float, lag_s: float) -> None:
        """A wake-up at `now` that came `lag_s` late (an early one counts as 0)."""
        lag_s = max(0.0, lag_s)
        second = math.floor(now)
        if second != self._current:
            self._close_current()
            self._current = second
        self._current_lags.append(lag_s)
        self._samples.append((now, lag_s))
        self.max_s = max(self.max_s, lag_s)
        self._forget_before(now)

    def _close_current(self) -> None:
        if not self._current_lags:
            return
        lags = sorted(self._current_lags)
        self._seconds.append(SecondLag(self._current, len(lags), lags[-1], _p99(lags)))
        self._current_lags = []

    def _forget_before(self, now: float) -> None:
        oldest = now - self.window_s
        while self._samples and self._samples[0][0] < oldest:
            self._samples.popleft()
        while self._seconds and self._seconds[0].second < math.floor(oldest):
            self._seconds.popleft()

    def seconds(self) -> list[SecondLag]:
        """The completed seconds of the window, oldest first."""
        return list(self._seconds)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The figures for `status`, in ms (None: no completed second, or no sample, yet)."""
        self._forget_before(now)
        last = self._seconds[-1] if self._seconds else None
        window = sorted(lag for _, lag in self._samples)

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 3)

        return {
            "interval_ms": ms(self.interval_s),
            "last_s_max_ms": ms(last.max_s if last else None),
            "last_s_p99_ms": ms(last.p99_s if last else None),
            "window_s": self.window_s,
            "window_max_ms": ms(window[-1] if window else None),
            "window_p99_ms": ms(_p99(window) if window else None),
            "max_ms": ms(self.max_s),
        }


class MonitorState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class LoopLagMonitor:
    """Measures the running loop's lag every `interval_s` until closed; `snapshot()` for `status`."""

    def __init__(self, *, interval_s: float = INTERVAL_S, window_s: int = WINDOW_S,
                 clock: Clock = time.monotonic) -> None:
        self.stats = LoopLagStats(interval_s=interval_s, window_s=window_s)
        self._clock = clock
        self._stack = AsyncExitStack()
        self._task: asyncio.Task[None] | None = None
        self.state = MonitorState.NEW

    async def __aenter__(self) -> LoopLagMonitor:
        if self.state is not MonitorState.NEW:
            raise RuntimeError(f"a LoopLagMonitor starts once; this one is {self.state.value}")
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = tasks.create_task(self._run(), name="loop-lag-monitor")
        self.state = MonitorState.RUNNING
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop measuring. Idempotent."""
        if self.state is MonitorState.CLOSED:
            return
        self.state = MonitorState.CLOSED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        await self._stack.aclose()  # the task group awaits the cancelled task

    async def _run(self) -> None:
        interval = self.stats.interval_s
        while True:
            expected = self._clock() + interval
            await asyncio.sleep(interval)  # the measurement itself: how late does this wake up?
            now = self._clock()
            self.stats.record(now, now - expected)

    def snapshot(self) -> dict[str, Any]:
        """`status()["loop_lag"]`: see `LoopLagStats.snapshot`."""
        return self.stats.snapshot(self._clock())

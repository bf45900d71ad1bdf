"""The cloud's reachability: a circuit breaker and the link state machine built on it.

Pure logic: no I/O, no tasks, time from an injectable clock. The runtime feeds `CloudLink` with
the upstream connection's events, the periodic probe's results and the outcomes of real cloud
requests; the cloud tier asks `skip_reason()` before every request, so no decision ever waits on
a cloud that is known to be gone (SPEC §6, §9).

    CLOSED --failures in a row--> OPEN --reset_s elapsed, next probe--> HALF_OPEN
    HALF_OPEN --trial succeeds--> CLOSED        HALF_OPEN --trial fails--> OPEN (a fresh timer)
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds; `time.monotonic` in production, a hand-driven fake in tests."""

    def __call__(self) -> float: ...


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class LinkState(enum.Enum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


BreakerListener = Callable[[BreakerState, BreakerState], None]
LinkListener = Callable[[LinkState, LinkState, str], None]


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` one trial may close it again.

    Live decisions ask `allow_request()` (True only when closed); the link's probe asks
    `try_begin_trial()`, so the half-open trial is always a probe, never a live decision.
    Every transition is reported once to `on_change(old, new)`.
    """

    def __init__(
        self,
        failures: int = 3,
        reset_s: float = 5.0,
        clock: Clock = time.monotonic,
        on_change: BreakerListener | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be at least 1, got {failures}")
        if reset_s < 0:
            raise ValueError(f"reset_s must not be negative, got {reset_s}")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._count = 0
        # When the breaker last opened, or when the current trial began (half-open).
        self._since = 0.0

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN stays OPEN until a probe starts the trial (`try_begin_trial`)."""
        return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive failures since the last success (0 when healthy)."""
        return self._count

    def allow_request(self) -> bool:
        """Whether a live request may go to the cloud: only when closed."""
        return self._state is BreakerState.CLOSED

    def try_begin_trial(self) -> bool:
        """For probes: True once when `reset_s` has passed since opening; the breaker becomes half-open.

        A trial whose outcome never arrives (its probe was cancelled) would wedge the breaker
        half-open for ever, so another trial is allowed once `reset_s` has passed since it began.
        """
        if self._state is BreakerState.CLOSED:
            return False
        now = self._clock()
        if now - self._since < self.reset_s:
            return False
        self._since = now
        self._set(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        """A request or probe succeeded: closes a half-open breaker, clears the failure count.

        A success reported while open is ignored: it was started before the breaker opened, and
        only the trial may close it.
        """
        if self._state is BreakerState.OPEN:
            return
        self._count = 0
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A request or probe failed: counts when closed (opening at the limit), reopens when half-open.

        A failure reported while open is ignored, so late outcomes cannot extend the reset timer.
        """
        if self._state is BreakerState.OPEN:
            return
        self._count += 1
        if self._state is BreakerState.HALF_OPEN or self._count >= self.failures:
            self._since = self._clock()
            self._set(BreakerState.OPEN)

    def _set(self, new: BreakerState) -> None:
        old = self._state
        if new is old:
            return
        self._state = new
        if self._on_change is not None:
            self._on_change(old, new)


class CloudLink:
    """The cloud's reachability: ONLINE, DEGRADED or OFFLINE, judged from connection, probes and requests.

    - OFFLINE: the upstream connection is down, or the breaker is open or half-open (the cloud tier
      is skipped, so for decisions the cloud is gone; the half-open trial is a probe, and its
      outcome decides whether the link comes back);
    - DEGRADED: connected, breaker closed, but the last request or probe failed;
    - ONLINE: connected, breaker closed, no failure since the last success.

    Feed every outcome through the link (not the breaker directly): the state is recomputed only
    on these events, which keeps `skip_reason()` a single attribute read.
    """

    def __init__(
        self,
        breaker: CircuitBreaker,
        on_change: LinkListener | None = None,
        *,
        connected: bool = False,
    ) -> None:
        self.breaker = breaker
        self._on_change = on_change
        self._connected = connected
        self._state = LinkState.OFFLINE
        self._skip: str | None = "unreachable"
        self.last_rtt_s: float | None = None
        self.last_failure: str | None = None
        self._live_failures = 0  # live requests failed since one last succeeded
        self._update("initial", notify=False)

    @property
    def state(self) -> LinkState:
        """The current link state."""
        return self._state

    @property
    def connected(self) -> bool:
        """Whether the upstream connection is up."""
        return self._connected

    def skip_reason(self) -> str | None:
        """Why the cloud tier must be skipped now (`unreachable`, `breaker_open`), or None if it may go."""
        return self._skip

    def begin_probe(self) -> bool:
        """Whether the probe should be sent now: connected, and the breaker closed or due for its trial.

        When the breaker is open and its reset time has passed, this starts the half-open trial:
        the probe sent now is the trial, and its result closes or reopens the breaker.
        """
        if not self._connected:
            return False
        if self.breaker.allow_request():
            return True
        started = self.breaker.try_begin_trial()
        if started:
            self._update("trial")
        return started

    def connection_lost(self) -> None:
        """The upstream connection dropped (nats-py disconnected callback)."""
        self._connected = False
        self._update("disconnected")

    def connection_restored(self) -> None:
        """The upstream connection is (re)established."""
        self._connected = True
        self._update("connected")

    def probe_succeeded(self, rtt_s: float, *, as_a_request: bool = False) -> None:
        """The probe was answered in `rtt_s` seconds. `as_a_request`: it was a real request (a
        half-open trial made with a recent input, within the tiers' deadline), which vouches for
        live requests too.

        A plain probe does not erase live requests' failures: a provider that answers its health
        probe at once but is slower than the tiers' timeout for real requests must still open the
        breaker, and a trial by such a probe must not close it for more than one live request.
        """
        self.last_rtt_s = rtt_s
        if as_a_request:
            self._live_failures = 0
        if self._live_failures == 0 or self.breaker.state is BreakerState.HALF_OPEN:
            self.breaker.record_success()
        self._update("probe_ok")

    def probe_failed(self, reason: str) -> None:
        """The probe failed (`timeout`, `no_responders`, ...)."""
        self.last_failure = reason
        self.breaker.record_failure()
        self._update(f"probe_failed: {reason}")

    def request_succeeded(self) -> None:
        """A live cloud request was answered."""
        self._live_failures = 0
        self.breaker.record_success()
        self._update("request_ok")

    def request_failed(self, reason: str) -> None:
        """A live cloud request failed; a timeout counts too."""
        self.last_failure = reason
        self._live_failures += 1
        self.breaker.record_failure()
        self._update(f"request_failed: {reason}")

    def _update(self, reason: str, *, notify: bool = True) -> None:
        breaker = self.breaker.state
        new: LinkState
        if not self._connected:
            new, self._skip = LinkState.OFFLINE, "unreachable"
        elif breaker is not BreakerState.CLOSED:
            new, self._skip = LinkState.OFFLINE, "breaker_open"
        elif self.breaker.failure_count > 0:
            new, self._skip = LinkState.DEGRADED, None
        else:
            new, self._skip = LinkState.ONLINE, None
        old = self._state
        if new is old:
            return
        self._state = new
        if notify and self._on_change is not None:
            self._on_change(old, new, reason)

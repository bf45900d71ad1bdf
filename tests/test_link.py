"""CircuitBreaker and CloudLink: every transition, driven by a fake clock, no network."""

from __future__ import annotations

import pytest

from edge import BreakerState, CircuitBreaker, CloudLink, LinkState
from tests.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
ONLINE, DEGRADED, OFFLINE = LinkState.ONLINE, LinkState.DEGRADED, LinkState.OFFLINE


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_breaker(
    clock: FakeClock, failures: int = 3, reset_s: float = 5.0
) -> tuple[CircuitBreaker, list[tuple[BreakerState, BreakerState]]]:
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(failures, reset_s, clock, on_change=lambda old, new: changes.append((old, new)))
    return breaker, changes


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failures):
        breaker.record_failure()
    assert breaker.state is OPEN


# --- CircuitBreaker ---------------------------------------------------------------------------


def test_breaker_starts_closed_and_allows_requests(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock)
    assert breaker.state is CLOSED
    assert breaker.allow_request()
    assert not breaker.try_begin_trial()  # nothing to try while closed
    assert changes == []


def test_breaker_opens_after_n_consecutive_failures(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock, failures=3)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.failure_count == 2
    assert breaker.allow_request()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow_request()
    assert changes == [(CLOSED, OPEN)]


def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock, failures=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.failure_count == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED  # 2 in a row, not 4 in total
    assert changes == []


def test_open_breaker_blocks_requests_and_trials_until_reset(clock: FakeClock) -> None:
    breaker, _ = make_breaker(clock, reset_s=5.0)
    open_breaker(breaker)
    clock.advance(4.9)
    assert not breaker.allow_request()
    assert not breaker.try_begin_trial()
    assert breaker.state is OPEN
    clock.advance(0.1)
    assert breaker.try_begin_trial()  # the trial comes exactly reset_s after opening


def test_half_open_allows_exactly_one_trial_and_never_a_live_request(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock, reset_s=5.0)
    open_breaker(breaker)
    clock.advance(5.0)
    assert not breaker.allow_request()  # a live decision never serves as the trial
    assert breaker.state is OPEN
    assert breaker.try_begin_trial()
    assert breaker.state is HALF_OPEN
    assert not breaker.try_begin_trial()
    assert not breaker.allow_request()
    clock.advance(1.0)
    assert not breaker.try_begin_trial()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_trial_success_closes(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock)
    open_breaker(breaker)
    clock.advance(5.0)
    assert breaker.try_begin_trial()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.failure_count == 0
    assert breaker.allow_request()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_trial_failure_reopens_with_a_fresh_timer(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock, reset_s=5.0)
    open_breaker(breaker)
    clock.advance(5.0)
    assert breaker.try_begin_trial()
    clock.advance(0.5)
    breaker.record_failure()  # one failure is enough when half-open
    assert breaker.state is OPEN
    clock.advance(4.9)
    assert not breaker.try_begin_trial()  # the timer restarted at the trial's failure
    clock.advance(0.1)
    assert breaker.try_begin_trial()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_late_outcomes_while_open_are_ignored(clock: FakeClock) -> None:
    breaker, changes = make_breaker(clock, reset_s=5.0)
    open_breaker(breaker)
    clock.advance(3.0)
    breaker.record_success()  # started before the breaker opened: only the trial may close it
    assert breaker.state is OPEN
    breaker.record_failure()  # must not push the reset timer back
    clock.advance(2.0)
    assert breaker.try_begin_trial()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_a_lost_trial_does_not_wedge_the_breaker(clock: FakeClock) -> None:
    breaker, _ = make_breaker(clock, reset_s=5.0)
    open_breaker(breaker)
    clock.advance(5.0)
    assert breaker.try_begin_trial()
    clock.advance(4.0)
    assert not breaker.try_begin_trial()
    clock.advance(1.0)  # the first trial never reported back
    assert breaker.try_begin_trial()
    assert breaker.state is HALF_OPEN


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_s=-1)


# --- CloudLink ----------------------------------------------------------------------------------


def make_link(
    clock: FakeClock, *, connected: bool = True, failures: int = 3
) -> tuple[CloudLink, list[tuple[LinkState, LinkState, str]]]:
    changes: list[tuple[LinkState, LinkState, str]] = []
    breaker = CircuitBreaker(failures, 5.0, clock)
    link = CloudLink(breaker, lambda old, new, why: changes.append((old, new, why)), connected=connected)
    return link, changes


def test_link_starts_offline_until_connected(clock: FakeClock) -> None:
    link, changes = make_link(clock, connected=False)
    assert link.state is OFFLINE
    assert link.skip_reason() == "unreachable"
    assert not link.begin_probe()  # no point probing without a connection
    link.connection_restored()
    assert link.state is ONLINE
    assert link.skip_reason() is None
    assert changes == [(OFFLINE, ONLINE, "connected")]


def test_link_connection_loss_and_restore(clock: FakeClock) -> None:
    link, changes = make_link(clock)
    assert link.state is ONLINE
    clock.advance(1.0)
    link.connection_lost()
    assert link.state is OFFLINE
    assert link.skip_reason() == "unreachable"
    link.connection_lost()  # a repeated event is not a change
    link.connection_restored()
    assert link.state is ONLINE
    assert link.skip_reason() is None
    assert changes == [(ONLINE, OFFLINE, "disconnected"), (OFFLINE, ONLINE, "connected")]


def test_link_degrades_on_failures_then_goes_offline_when_the_breaker_opens(clock: FakeClock) -> None:
    link, changes = make_link(clock, failures=3)
    link.probe_failed("timeout")
    assert link.state is DEGRADED
    assert link.skip_reason() is None  # still worth asking the cloud
    assert link.last_failure == "timeout"
    link.request_failed("timeout")
    assert link.state is DEGRADED
    link.probe_failed("timeout")
    assert link.state is OFFLINE
    assert link.breaker.state is OPEN
    assert link.skip_reason() == "breaker_open"
    assert changes == [
        (ONLINE, DEGRADED, "probe_failed: timeout"),
        (DEGRADED, OFFLINE, "probe_failed: timeout"),
    ]


def test_link_recovers_from_degraded_on_success(clock: FakeClock) -> None:
    link, changes = make_link(clock)
    link.request_failed("error")
    link.request_succeeded()
    assert link.state is ONLINE
    link.probe_failed("no_responders")
    link.probe_succeeded(0.012)
    assert link.state is ONLINE
    assert link.last_rtt_s == 0.012
    assert [c[1] for c in changes] == [DEGRADED, ONLINE, DEGRADED, ONLINE]


def test_link_half_open_trial_is_a_probe_and_decisions_stay_skipped(clock: FakeClock) -> None:
    link, changes = make_link(clock, failures=1)
    link.request_failed("timeout")
    assert link.state is OFFLINE
    assert not link.begin_probe()  # open, reset time not reached: do not hammer the cloud
    clock.advance(5.0)
    assert link.begin_probe()  # this probe is the trial
    assert link.breaker.state is HALF_OPEN
    assert link.skip_reason() == "breaker_open"  # live decisions never serve as the trial
    assert link.state is OFFLINE
    assert not link.begin_probe()  # exactly one trial
    link.probe_succeeded(0.02)
    assert link.state is ONLINE
    assert link.skip_reason() is None
    assert link.begin_probe()  # closed: probe every interval
    assert changes == [(ONLINE, OFFLINE, "request_failed: timeout"), (OFFLINE, ONLINE, "probe_ok")]


def test_link_failed_trial_stays_offline_without_a_change(clock: FakeClock) -> None:
    link, changes = make_link(clock, failures=1)
    link.probe_failed("timeout")
    clock.advance(5.0)
    assert link.begin_probe()
    link.probe_failed("timeout")
    assert link.breaker.state is OPEN
    assert link.state is OFFLINE
    assert changes == [(ONLINE, OFFLINE, "probe_failed: timeout")]  # an outage is one change, not a flicker


def test_link_reconnect_with_an_open_breaker_stays_offline(clock: FakeClock) -> None:
    link, changes = make_link(clock, failures=1)
    link.request_failed("timeout")
    link.connection_lost()
    assert link.skip_reason() == "unreachable"  # the connection is the more basic reason
    link.connection_restored()
    assert link.state is OFFLINE
    assert link.skip_reason() == "breaker_open"
    assert changes == [(ONLINE, OFFLINE, "request_failed: timeout")]


def test_link_on_change_once_per_change_over_a_whole_outage(clock: FakeClock) -> None:
    link, changes = make_link(clock, failures=2)
    for _ in range(3):
        link.probe_succeeded(0.01)
    link.request_failed("timeout")
    link.request_failed("timeout")
    link.connection_lost()
    link.connection_lost()
    link.connection_restored()
    clock.advance(5.0)
    assert link.begin_probe()
    link.probe_succeeded(0.01)
    link.probe_succeeded(0.01)
    transitions = [(old, new) for old, new, _ in changes]
    assert transitions == [(ONLINE, DEGRADED), (DEGRADED, OFFLINE), (OFFLINE, ONLINE)]


def test_a_probe_answered_at_once_does_not_erase_live_requests_timing_out(clock: FakeClock) -> None:
    """A provider whose health probe answers at once while every real request times out: live
    timeouts still open the breaker, and a trial by a plain probe closes it for one request only;
    a trial made as a real request (`as_a_request`) vouches for live requests again."""
    link, _ = make_link(clock, failures=3)
    for _ in range(3):
        link.request_failed("timeout")
        link.probe_succeeded(0.001)  # the health endpoint is fine
    assert link.breaker.state is OPEN and link.skip_reason() == "breaker_open"
    clock.advance(5.0)
    assert link.begin_probe()  # the half-open trial
    link.probe_succeeded(0.001)  # a plain probe: closes, as a trial may
    assert link.breaker.state is CLOSED
    link.request_failed("timeout")
    link.probe_succeeded(0.001)
    assert link.state is DEGRADED  # the live failure stands: the probe did not clear it
    clock.advance(5.0)
    link.request_succeeded()
    assert link.state is ONLINE
    for _ in range(3):
        link.request_failed("timeout")
    clock.advance(5.0)
    assert link.begin_probe()
    link.probe_succeeded(0.2, as_a_request=True)  # a real input answered within the deadline
    link.probe_succeeded(0.001)
    assert link.state is ONLINE and link.breaker.state is CLOSED

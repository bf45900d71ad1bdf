"""Governance (edge._governance): every path of `review`, `settle` and `block`, on a fake clock."""

from __future__ import annotations

import msgspec
import pytest

from edge._config import ActionPolicy
from edge._governance import (
    ApprovalNeeded,
    Approved,
    Backlog,
    Denied,
    Governor,
    TimedOut,
    TokenBucket,
    Unreachable,
    Verdict,
)
from tests.fakes import FakeClock

MINUTE = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def spec_example(clock: FakeClock) -> Governor:
    """The policy of SPEC §4: shutdown needs approval, falls back to hold, 3/h, a 0.95 bar."""
    return Governor({
        "shutdown": ActionPolicy(approval="required", approval_timeout_ms=30000, instead="hold",
                                 rate_limit="3/h", min_confidence=0.95),
        "hold": ActionPolicy(),
    }, clock=clock)


# ---------------------------------------------------------------------------------------------
# TokenBucket


def test_bucket_bursts_then_refills_continuously(clock: FakeClock) -> None:
    bucket = TokenBucket(3, 3600.0, clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    clock.advance(10 * MINUTE)
    assert bucket.available == pytest.approx(0.5)
    assert not bucket.try_take()
    clock.advance(10 * MINUTE)
    assert bucket.try_take()
    assert not bucket.try_take()


def test_bucket_never_holds_more_than_capacity(clock: FakeClock) -> None:
    bucket = TokenBucket(3, 3600.0, clock)
    clock.advance(100 * 3600.0)
    assert bucket.available == 3.0
    bucket.put_back()
    assert bucket.available == 3.0
    assert bucket.try_take()
    bucket.put_back()
    assert bucket.available == 3.0


@pytest.mark.parametrize(("capacity", "period"), [(0, 1.0), (-1, 1.0), (1, 0.0)])
def test_bucket_refuses_nonsense(clock: FakeClock, capacity: int, period: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, period, clock)


# ---------------------------------------------------------------------------------------------
# review: the simple paths


def test_no_policy_is_auto(clock: FakeClock) -> None:
    gov = spec_example(clock)
    for tier, confidence in (("model", 0.1), ("cloud", 0.5), ("rules", None)):
        assert gov.review("inspect", tier, confidence, paused=False) == Verdict("inspect", "auto", "inspect")
    # An action with a table but no restriction (the SPEC's `hold`) is auto too.
    assert gov.review("hold", "model", 0.1, paused=False) == Verdict("hold", "auto", "hold")


def test_many_unlisted_actions_stay_correct(clock: FakeClock) -> None:
    # Unlisted verdicts are cached up to a bound; past it they must still be right.
    gov = Governor({}, clock=clock)
    for i in range(3000):
        verdict = gov.review(f"label-{i}", "cloud", 0.9, paused=i % 2 == 0)
        assert verdict.action == verdict.requested_action == f"label-{i}"
        assert verdict.status == ("paused" if i % 2 == 0 else "auto")


def test_threshold_applies_to_model_and_cloud_not_rules(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", min_confidence=0.95)}, clock=clock)
    for tier in ("model", "cloud"):
        assert gov.review("shutdown", tier, 0.94, paused=False) == Verdict("hold", "threshold", "shutdown")
        assert gov.review("shutdown", tier, 0.95, paused=False) == Verdict("shutdown", "auto", "shutdown")
    # A model answer with no confidence cannot clear a bar.
    assert gov.review("shutdown", "model", None, paused=False).status == "threshold"
    # Rules have no confidence and are not held to the bar.
    assert gov.review("shutdown", "rules", None, paused=False) == Verdict("shutdown", "auto", "shutdown")


def test_tier_restriction(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", tiers=["rules", "cloud"])}, clock=clock)
    refused = Verdict("hold", "tier_not_allowed", "shutdown")
    assert gov.review("shutdown", "model", 0.99, paused=False) == refused
    assert gov.review("shutdown", "rules", None, paused=False).status == "auto"
    assert gov.review("shutdown", "cloud", 0.99, paused=False).status == "auto"


def test_tier_restriction_comes_before_threshold(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", tiers=["rules"], min_confidence=0.95)},
                   clock=clock)
    assert gov.review("shutdown", "model", 0.5, paused=False).status == "tier_not_allowed"


def test_replacement_is_taken_as_is(clock: FakeClock) -> None:
    # `inspect` is itself rate-limited, yet as shutdown's replacement it is not reviewed again.
    gov = Governor({
        "shutdown": ActionPolicy(instead="inspect", min_confidence=0.95),
        "inspect": ActionPolicy(instead="none", rate_limit="1/h"),
    }, clock=clock)
    replaced = Verdict("inspect", "threshold", "shutdown")
    for _ in range(3):
        assert gov.review("shutdown", "model", 0.5, paused=False) == replaced
    assert gov.review("inspect", "model", 0.5, paused=False).status == "auto"  # its token was untouched


def test_a_looping_chain_is_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="loops"):
        Governor({"a": ActionPolicy(instead="b"), "b": ActionPolicy(instead="a")}, clock=clock)


# ---------------------------------------------------------------------------------------------
# pause


def test_pause_turns_every_policed_action_into_its_instead(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", rate_limit="3/h")}, clock=clock)
    for tier, confidence in (("model", 0.99), ("cloud", 0.99), ("rules", None)):
        assert gov.review("shutdown", tier, confidence, paused=True) == Verdict("hold", "paused", "shutdown")
    assert gov.review("shutdown", "rules", None, paused=False).status == "auto"


def test_pause_leaves_an_action_without_instead_standing_but_says_paused(clock: FakeClock) -> None:
    gov = spec_example(clock)
    for action in ("none", "hold"):  # unlisted, and listed with no instead
        verdict = gov.review(action, "rules", None, paused=True)
        assert (verdict.action, verdict.status, verdict.requested_action) == (action, "paused", action)
        assert verdict.reason is not None and "no instead" in verdict.reason


def test_pause_follows_the_instead_chain_to_its_end(clock: FakeClock) -> None:
    gov = Governor({
        "shutdown": ActionPolicy(instead="slow_down", rate_limit="3/h"),
        "slow_down": ActionPolicy(instead="hold", rate_limit="10/h"),
    }, clock=clock)
    assert gov.review("shutdown", "rules", None, paused=True) == Verdict("hold", "paused", "shutdown")
    assert gov.review("slow_down", "rules", None, paused=True) == Verdict("hold", "paused", "slow_down")
    # Not paused, a refusal takes one step only.
    for _ in range(3):
        gov.review("shutdown", "rules", None, paused=False)
    one_step = Verdict("slow_down", "rate_limited", "shutdown")
    assert gov.review("shutdown", "rules", None, paused=False) == one_step


def test_pause_spends_no_token_and_asks_nobody(clock: FakeClock) -> None:
    gov = spec_example(clock)
    for _ in range(10):
        verdict = gov.review("shutdown", "rules", None, paused=True)
        assert verdict.approval is None and verdict.status == "paused"
    # All three tokens are still there once resumed.
    assert [gov.review("shutdown", "rules", None, paused=False).status for _ in range(4)] == [
        "approval_pending", "approval_pending", "approval_pending", "rate_limited"]


# ---------------------------------------------------------------------------------------------
# rate limit


def test_rate_limit_exhausts_and_refills(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", rate_limit="3/h")}, clock=clock)
    statuses = [gov.review("shutdown", "rules", None, paused=False).status for _ in range(3)]
    assert statuses == ["auto"] * 3
    assert gov.review("shutdown", "rules", None, paused=False) == Verdict("hold", "rate_limited", "shutdown")
    clock.advance(19 * MINUTE)
    assert gov.review("shutdown", "rules", None, paused=False).status == "rate_limited"
    clock.advance(1 * MINUTE)
    assert gov.review("shutdown", "rules", None, paused=False).status == "auto"
    assert gov.review("shutdown", "rules", None, paused=False).status == "rate_limited"


def test_rate_limits_are_per_action_and_per_governor(clock: FakeClock) -> None:
    actions = {"shutdown": ActionPolicy(instead="hold", rate_limit="1/h"),
               "vent": ActionPolicy(instead="hold", rate_limit="1/h")}
    first, second = Governor(actions, clock=clock), Governor(actions, clock=clock)
    assert first.review("shutdown", "rules", None, paused=False).status == "auto"
    assert first.review("shutdown", "rules", None, paused=False).status == "rate_limited"
    assert first.review("vent", "rules", None, paused=False).status == "auto"
    assert second.review("shutdown", "rules", None, paused=False).status == "auto"


def test_an_action_refused_on_its_merits_spends_no_token(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", rate_limit="1/h", min_confidence=0.9,
                                             tiers=["model", "rules"])}, clock=clock)
    assert gov.review("shutdown", "model", 0.5, paused=False).status == "threshold"
    assert gov.review("shutdown", "cloud", 0.99, paused=False).status == "tier_not_allowed"
    assert gov.review("shutdown", "model", 0.99, paused=False).status == "auto"
    assert gov.review("shutdown", "model", 0.99, paused=False).status == "rate_limited"


# ---------------------------------------------------------------------------------------------
# approval


def approval_only(clock: FakeClock) -> Governor:
    return Governor({"shutdown": ActionPolicy(approval="required", approval_timeout_ms=5000, instead="hold")},
                    clock=clock)


def test_approval_required_is_pending_with_what_the_caller_needs(clock: FakeClock) -> None:
    verdict = approval_only(clock).review("shutdown", "rules", None, paused=False)
    assert verdict.status == "approval_pending"
    assert verdict.requested_action == "shutdown"
    assert verdict.approval == ApprovalNeeded(timeout_ms=5000, instead="hold")
    # A caller that acts without settling acts safely.
    assert verdict.action == "hold"


def test_settle_approved_keeps_who_and_why(clock: FakeClock) -> None:
    gov = approval_only(clock)
    pending = gov.review("shutdown", "cloud", 0.99, paused=False)
    assert gov.settle(pending, Approved(by="alice", reason="bearing noise confirmed")) == Verdict(
        "shutdown", "approved", "shutdown", by="alice", reason="bearing noise confirmed")


def test_settle_denied_takes_instead_and_keeps_who(clock: FakeClock) -> None:
    gov = approval_only(clock)
    pending = gov.review("shutdown", "cloud", 0.99, paused=False)
    assert gov.settle(pending, Denied(by="bob", reason="sensor glitch")) == Verdict(
        "hold", "denied", "shutdown", by="bob", reason="sensor glitch")
    # An empty `by` (an anonymous reply) is recorded as absent, not as "".
    assert gov.settle(pending, Denied()).by is None


@pytest.mark.parametrize(("outcome", "status"), [
    (TimedOut(), "timeout"),
    (Unreachable(), "unreachable"),
    (Backlog(), "approval_backlog"),
])
def test_settle_without_an_answer_takes_instead(clock: FakeClock, outcome: TimedOut | Unreachable | Backlog,
                                                status: str) -> None:
    gov = approval_only(clock)
    pending = gov.review("shutdown", "model", 0.99, paused=False)
    assert gov.settle(pending, outcome) == Verdict("hold", status, "shutdown")


def test_only_a_pending_verdict_can_be_settled(clock: FakeClock) -> None:
    gov = approval_only(clock)
    paused = gov.review("shutdown", "rules", None, paused=True)
    with pytest.raises(ValueError, match="approval_pending"):
        gov.settle(paused, Approved(by="alice"))


def test_a_pause_during_the_approval_wins(clock: FakeClock) -> None:
    gov = approval_only(clock)
    pending = gov.review("shutdown", "rules", None, paused=False)
    verdict = gov.settle(pending, Approved(by="alice"), paused=True)
    assert (verdict.action, verdict.status, verdict.requested_action, verdict.by) == (
        "hold", "paused", "shutdown", "alice")


def test_approval_and_rate_limit_a_token_is_taken_before_asking(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(approval="required", instead="hold", rate_limit="2/h")},
                   clock=clock)
    first = gov.review("shutdown", "rules", None, paused=False)
    second = gov.review("shutdown", "rules", None, paused=False)
    assert first.status == second.status == "approval_pending"
    # Two asks are in flight: a third is not even asked for.
    third = gov.review("shutdown", "rules", None, paused=False)
    assert third == Verdict("hold", "rate_limited", "shutdown")
    # The approved ones need no further token: both go ahead.
    assert gov.settle(first, Approved(by="a")).action == "shutdown"
    assert gov.settle(second, Approved(by="b")).action == "shutdown"
    assert gov.review("shutdown", "rules", None, paused=False).status == "rate_limited"


@pytest.mark.parametrize(("outcome", "returned"), [
    (Denied(by="bob"), False),  # a human was asked: the ask is what the token paid for
    (TimedOut(), False),
    (Unreachable(), True),  # nobody asked, nothing done: the token comes back
    (Backlog(), True),
])
def test_approval_and_rate_limit_which_outcomes_return_the_token(
        clock: FakeClock, outcome: Denied | TimedOut | Unreachable | Backlog, returned: bool) -> None:
    gov = Governor({"shutdown": ActionPolicy(approval="required", instead="hold", rate_limit="1/h")},
                   clock=clock)
    gov.settle(gov.review("shutdown", "rules", None, paused=False), outcome)
    expected = "approval_pending" if returned else "rate_limited"
    assert gov.review("shutdown", "rules", None, paused=False).status == expected


# ---------------------------------------------------------------------------------------------
# audit full (on_full = "block")


def test_block_turns_a_policed_action_into_its_instead(clock: FakeClock) -> None:
    gov = Governor({
        "shutdown": ActionPolicy(instead="slow_down", rate_limit="3/h"),
        "slow_down": ActionPolicy(instead="hold", rate_limit="10/h"),
    }, clock=clock)
    assert gov.block("shutdown", "audit log full") == Verdict("hold", "audit_full", "shutdown",
                                                              reason="audit log full")


def test_block_leaves_an_action_without_instead_unchanged_and_says_so(clock: FakeClock) -> None:
    verdict = spec_example(clock).block("inspect", "audit log full")
    assert (verdict.action, verdict.status, verdict.requested_action) == ("inspect", "audit_full", "inspect")
    assert verdict.reason is not None
    assert verdict.reason.startswith("audit log full") and "hold back" in verdict.reason


def test_block_spends_no_token(clock: FakeClock) -> None:
    gov = Governor({"shutdown": ActionPolicy(instead="hold", rate_limit="1/h")}, clock=clock)
    gov.block("shutdown")
    assert gov.review("shutdown", "rules", None, paused=False).status == "auto"


# ---------------------------------------------------------------------------------------------
# The SPEC's example, end to end


def test_spec_example_end_to_end(clock: FakeClock) -> None:
    gov = spec_example(clock)
    # A model sure enough for its own ladder bar (0.8) but not for shutdown's (0.95): hold.
    assert gov.review("shutdown", "model", 0.9, paused=False) == Verdict("hold", "threshold", "shutdown")
    # Paused: hold, nobody asked.
    assert gov.review("shutdown", "model", 0.99, paused=True) == Verdict("hold", "paused", "shutdown")
    # Three asks in the hour: one from a sure model, two from rules (no bar for rules).
    by_model = gov.review("shutdown", "model", 0.97, paused=False)
    by_rules = gov.review("shutdown", "rules", None, paused=False)
    third = gov.review("shutdown", "rules", None, paused=False)
    assert [v.status for v in (by_model, by_rules, third)] == ["approval_pending"] * 3
    assert by_model.approval == ApprovalNeeded(30000, "hold")
    assert gov.settle(by_model, Approved(by="op-1", reason="ok")) == Verdict(
        "shutdown", "approved", "shutdown", by="op-1", reason="ok")
    assert gov.settle(by_rules, Denied(by="op-2")).action == "hold"
    assert gov.settle(third, TimedOut()).action == "hold"
    # The fourth in the hour is not asked for.
    assert gov.review("shutdown", "rules", None, paused=False) == Verdict("hold", "rate_limited", "shutdown")
    # Twenty minutes later one more may be asked for.
    clock.advance(20 * MINUTE)
    fourth = gov.review("shutdown", "rules", None, paused=False)
    assert fourth.status == "approval_pending"
    assert gov.settle(fourth, Approved(by="op-1")).status == "approved"
    # Other actions pass untouched throughout.
    assert gov.review("inspect", "model", 0.5, paused=False) == Verdict("inspect", "auto", "inspect")


def test_verdict_is_plain_data(clock: FakeClock) -> None:
    # The caller copies it into Decision.governance and the audit record; it must encode.
    pending = spec_example(clock).review("shutdown", "rules", None, paused=False)
    data = msgspec.to_builtins(pending)
    assert data["status"] == "approval_pending"
    assert data["approval"] == {"timeout_ms": 30000, "instead": "hold"}

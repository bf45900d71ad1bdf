"""Governance (SPEC §4 `actions`, §5 `governance`, §7 `block`, §8 pause): may this action happen now?

Pure logic with a clock you can drive; the caller does the I/O (the approval request, the audit).
A `Governor` reviews the action a decision asks for and answers with a `Verdict`: the action to take
now, a status, and the action that was asked for. `review` checks, in this order:

1. **paused** — the fleet kill switch overrides everything, and a paused device must neither spend
   rate tokens nor ask a human for an action it will not take.
2. **tier not allowed** — a categorical refusal: this tier may never choose this action.
3. **threshold** — a model's or the cloud's confidence below the action's own bar (rules have none).
   Refusals 2 and 3 come before the rate limit: an action refused on its merits spends no token.
4. **rate limit** — a token is taken, even when approval is still to come, so that a human is never
   asked for an action the limit forbids anyway, and the asks in flight plus the actions performed
   can never together exceed the limit. The token pays for *asking*: it is kept when the human
   denies or does not answer (so a condition that fires at every event asks at most N times per
   period, not once per timeout), and given back when nobody was asked (upstream unreachable,
   approval backlog), since then nothing was performed and nobody was bothered.
5. **approval required** — `approval_pending`; the caller sends the request and calls `settle`.

A refused action becomes its `instead`, taken as is: it is the safe action, and reviewing it in turn
could refuse the safe action itself. Pause and a blocking full audit log are different: they stop
*every* restricted action, so they follow the `instead` chain to its end, to an action that cannot
itself be refused. An action without an `instead` (by config, one that nothing can refuse) stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

import msgspec

from ._config import ActionPolicy, parse_rate

Clock = Callable[[], float]

# Unlisted actions (any label the cloud returns is its own action) get cached verdicts, but the
# cache is bounded so a cloud returning ever new labels cannot grow memory without end.
_CACHE_LIMIT: Final = 1024
_EPSILON: Final = 1e-9  # float drift from continuous refill must not cost a whole token
_CHOOSERS_WITH_CONFIDENCE: Final = frozenset({"model", "cloud"})


class TokenBucket:
    """`capacity` tokens, refilled continuously at `capacity` per `period_s`; starts full.

    "3/h" is `TokenBucket(3, 3600.0, clock)`: a burst of three, then one every twenty minutes.
    """

    __slots__ = ("capacity", "period_s", "_clock", "_tokens", "_last")

    def __init__(self, capacity: int, period_s: float, clock: Clock = time.monotonic) -> None:
        if capacity <= 0 or period_s <= 0:
            raise ValueError("a token bucket needs a positive capacity and period")
        self.capacity = capacity
        self.period_s = period_s
        self._clock = clock
        self._tokens = float(capacity)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            # elapsed * capacity / period (not elapsed * rate): exact for whole multiples of 1/rate.
            self._tokens = min(float(self.capacity), self._tokens + elapsed * self.capacity / self.period_s)
            self._last = now

    @property
    def available(self) -> float:
        """Tokens available now (fractional while refilling)."""
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def put_back(self) -> None:
        """Return a token taken for something that did not happen (never above capacity)."""
        self._refill()
        self._tokens = min(float(self.capacity), self._tokens + 1.0)


class ApprovalNeeded(msgspec.Struct, frozen=True):
    """What the caller needs to ask for approval: how long to wait, and what to do if not approved."""

    timeout_ms: int
    instead: str


class Verdict(msgspec.Struct, frozen=True):
    """Governance's answer: `action` is what to do now; `requested_action` what the decision asked for.

    `status` is one of auto, threshold, tier_not_allowed, rate_limited, paused, approval_pending,
    approved, denied, timeout, unreachable, approval_backlog, audit_full, disagreement. While `approval_pending`,
    `action` is already the safe `instead`, so a caller that acts without settling still acts safely.
    """

    action: str
    status: str
    requested_action: str
    by: str | None = None  # who settled an approval: the approver's public key when answers are signed
    reason: str | None = None
    approval: ApprovalNeeded | None = None
    by_name: str | None = None  # the name the approver gave (free text; `by` is what was verified)


class Approved(msgspec.Struct, frozen=True):
    """A human approved the action."""

    by: str = ""
    reason: str = ""
    by_name: str = ""


class Denied(msgspec.Struct, frozen=True):
    """A human refused the action."""

    by: str = ""
    reason: str = ""
    by_name: str = ""


class TimedOut(msgspec.Struct, frozen=True):
    """Nobody answered within `approval_timeout_ms`."""


class Unreachable(msgspec.Struct, frozen=True):
    """Upstream is known to be down: decided at once, nobody was asked."""


class Backlog(msgspec.Struct, frozen=True):
    """Too many approvals already pending: nobody was asked."""


ApprovalOutcome = Approved | Denied | TimedOut | Unreachable | Backlog

DISAGREEMENT_APPROVAL_MS: Final = 30_000  # how long a disagreement waits for a human, for an action with no policy


class CrossCheckLike(Protocol):
    """What `disagree` reads of a cross-check (edge's CrossCheck message)."""

    @property
    def tier_name(self) -> str: ...

    @property
    def action(self) -> str: ...


class _Plan:
    """One policed action: its policy digested once, and every verdict that does not vary prebuilt."""

    __slots__ = ("tiers", "min_confidence", "bucket", "approval", "auto", "paused", "tier_not_allowed",
                 "threshold", "rate_limited", "pending", "instead", "final_instead", "approval_timeout_ms")

    def __init__(self, action: str, policy: ActionPolicy, final_instead: str, clock: Clock) -> None:
        self.tiers = frozenset(policy.tiers)
        self.min_confidence = policy.min_confidence
        self.bucket: TokenBucket | None = None
        if policy.rate_limit:
            self.bucket = TokenBucket(*parse_rate(policy.rate_limit), clock)
        self.instead = policy.instead or action
        self.final_instead = final_instead
        self.approval_timeout_ms = policy.approval_timeout_ms
        self.approval = (ApprovalNeeded(policy.approval_timeout_ms, self.instead)
                         if policy.approval == "required" else None)
        self.auto = Verdict(action, "auto", action)
        self.paused = _paused(action, final_instead)
        self.tier_not_allowed = Verdict(self.instead, "tier_not_allowed", action)
        self.threshold = Verdict(self.instead, "threshold", action)
        self.rate_limited = Verdict(self.instead, "rate_limited", action)
        self.pending = (Verdict(self.instead, "approval_pending", action, approval=self.approval)
                        if self.approval is not None else None)


def _paused(action: str, final_instead: str) -> Verdict:
    if final_instead == action:
        return Verdict(action, "paused", action, reason="no instead: the action stands")
    return Verdict(final_instead, "paused", action)


class Governor:
    """Governance for one pipeline: its action policies and one rate-limit bucket per policed action."""

    def __init__(self, actions: Mapping[str, ActionPolicy], *, clock: Clock = time.monotonic) -> None:
        self._policies = dict(actions)
        self._plans = {action: _Plan(action, policy, self._chain_end(action), clock)
                       for action, policy in self._policies.items()}
        self._auto: dict[str, Verdict] = {}
        self._paused: dict[str, Verdict] = {}

    def _chain_end(self, action: str) -> str:
        # Config loading rejects loops; this guard only keeps a hand-built Governor from spinning.
        seen = {action}
        policy = self._policies.get(action)
        while policy is not None and policy.instead:
            action = policy.instead
            if action in seen:
                raise ValueError(f"`instead` chain loops at {action!r}")
            seen.add(action)
            policy = self._policies.get(action)
        return action

    def review(self, action: str, tier: str, confidence: float | None, *, paused: bool) -> Verdict:
        """Review the action `tier` chose with `confidence` (None for rules); see the module for the order."""
        plan = self._plans.get(action)
        if plan is None:
            # The hot path: an action nobody policed; one lookup, a prebuilt verdict.
            verdict = (self._paused if paused else self._auto).get(action)
            return verdict if verdict is not None else self._unpoliced(action, paused)
        if paused:
            return plan.paused
        if plan.tiers and tier not in plan.tiers:
            return plan.tier_not_allowed
        if (plan.min_confidence is not None and tier in _CHOOSERS_WITH_CONFIDENCE
                and (confidence is None or confidence < plan.min_confidence)):
            # A model or cloud answer without a confidence cannot clear a bar: treated as below it.
            return plan.threshold
        if plan.bucket is not None and not plan.bucket.try_take():
            return plan.rate_limited
        if plan.pending is not None:
            return plan.pending
        return plan.auto

    def disagree(self, verdict: Verdict, policy: str, check: CrossCheckLike) -> Verdict:
        """The verdict when the pipeline's cross-check chose another action than the decision's
        (`on_disagreement`): "approval" asks a human first (the AI may be wrong), "instead" takes the
        action's `instead` at once (status `disagreement`). Only a verdict that would act as asked
        (auto, or already waiting for approval) changes: one already refused stays refused."""
        requested = verdict.requested_action
        why = f"cross-check {check.tier_name} chose {check.action!r}"
        plan = self._plans.get(requested)
        instead = plan.instead if plan is not None else requested
        if verdict.status not in ("auto", "approval_pending"):
            return verdict
        if policy == "instead":
            if verdict.status == "approval_pending":
                self._put_back(requested)  # nobody will be asked
            return Verdict(instead, "disagreement", requested, reason=why)
        if policy == "approval" and verdict.status == "auto":
            timeout_ms = plan.approval_timeout_ms if plan is not None else DISAGREEMENT_APPROVAL_MS
            return Verdict(instead, "approval_pending", requested, reason=why,
                           approval=ApprovalNeeded(timeout_ms, instead))
        return verdict

    def _unpoliced(self, action: str, paused: bool) -> Verdict:
        cache = self._paused if paused else self._auto
        verdict = _paused(action, action) if paused else Verdict(action, "auto", action)
        if len(cache) < _CACHE_LIMIT:
            cache[action] = verdict
        return verdict

    def settle(self, verdict: Verdict, outcome: ApprovalOutcome, *, paused: bool = False) -> Verdict:
        """The final verdict for an `approval_pending` one, given how the approval ended.

        `paused`: whether the device is paused *now*. A pause that came while the approval was pending
        wins over the approval (status `paused`, `by` kept): the kill switch must stop actions already
        asked for; any refusal then also goes to the end of the `instead` chain, as pause does.
        """
        if verdict.status != "approval_pending" or verdict.approval is None:
            raise ValueError(f"only an approval_pending verdict can be settled, not {verdict.status!r}")
        requested = verdict.requested_action
        instead = verdict.approval.instead
        if paused:
            plan = self._plans.get(requested)
            instead = plan.final_instead if plan is not None else instead
        match outcome:
            case Approved(by=by, reason=reason, by_name=name):
                if paused:
                    return Verdict(instead, "paused", requested, by or None, "approved, but paused meanwhile",
                                   by_name=name or None)
                return Verdict(requested, "approved", requested, by or None, reason or None, by_name=name or None)
            case Denied(by=by, reason=reason, by_name=name):
                return Verdict(instead, "denied", requested, by or None, reason or None, by_name=name or None)
            case TimedOut():
                return Verdict(instead, "timeout", requested)
            case Unreachable():
                self._put_back(requested)
                return Verdict(instead, "unreachable", requested)
            case Backlog():
                self._put_back(requested)
                return Verdict(instead, "approval_backlog", requested)

    def _put_back(self, action: str) -> None:
        # Nobody was asked and nothing was performed: the token taken at review is returned.
        plan = self._plans.get(action)
        if plan is not None and plan.bucket is not None:
            plan.bucket.put_back()

    def block(self, action: str, reason: str = "audit log full") -> Verdict:
        """The verdict while a full audit log blocks acting (`on_full = "block"`): status `audit_full`.

        A policed action becomes the end of its `instead` chain. An action with no `instead` has
        nothing safer to become: it is returned unchanged and `reason` says the caller must hold
        back its effect.
        """
        plan = self._plans.get(action)
        final = action if plan is None else plan.final_instead
        if final == action:
            return Verdict(action, "audit_full", action,
                           reason=f"{reason}; no instead: the caller must hold back the effect")
        return Verdict(final, "audit_full", action, reason=reason)

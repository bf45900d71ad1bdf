"""The ladder (SPEC §6): tiers tried in order until one gives an acceptable answer.

Each tier either answers (`Answer`) or steps aside with a reason (`Fallback`). The rules tier is
last and always answers, so `Ladder.decide` always returns an answer. Tiers hold their I/O
behind small seams (a model slot, a NATS request function, a link) so the ladder's choice can be
tested without a network.

Guards come before every tier. A guard that holds decides at once (tier `guard`, no fallbacks):
no model is run and no cloud is asked, so nothing a model or whoever answers as the cloud says can
override a site's hard limit. Governance still reviews the guard's action, as any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from models import Manifest, Model, ModelError, Prediction

from ._link import CloudLink
from ._messages import CLOUD_REPLY_DECODER, JSON_ENCODER, CrossCheck, Fallback, ModelRef
from ._rules import GuardSet, RuleSet


class Answer(msgspec.Struct, frozen=True):
    """A tier's acceptable answer: the label it chose and the action that label maps to.

    `late`: a race's other requests, still running when this answer won (their outcomes are
    recorded when they end); `cross_check`: the second opinion, when the pipeline asks one.
    """

    tier: str
    label: str
    action: str
    confidence: float | None
    model: ModelRef | None = None
    tier_name: str = ""
    late: tuple[Any, ...] = ()
    cross_check: CrossCheck | None = None


class Tier(Protocol):
    name: str

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback: ...


def action_for(label: str, labels: Mapping[str, str]) -> str:
    """A model's or the cloud's label → action; an unlisted label is its own action."""
    return labels.get(label, label)


class ModelSlotLike(Protocol):
    """What the model tier needs from the registry: the serving model and a way to ask it."""

    @property
    def model(self) -> Model | None: ...

    async def predict(self, row: Sequence[float]) -> Prediction: ...

    async def predict_many(self, rows: Sequence[Sequence[float]]) -> list[Prediction]: ...


FLOAT32_MAX = 3.4028234663852886e38  # a model's input is float32: a larger value cannot reach it


def feature_row(model: Model, values: Mapping[str, Any]) -> list[float]:
    """The input values in the order the model wants its columns."""
    return [values[name] for name in model.manifest.features]


def fits_float32(row: Sequence[float]) -> bool:
    """Every value is a number the model's float32 input can hold (an int64 is; 1e308 is not, nor NaN)."""
    return all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in row)


def rows_for(model: Model, batch: Sequence[Mapping[str, Any]],
             takes: Callable[[list[float]], bool]) -> tuple[list[list[float]], list[int]]:
    """The feature rows of the inputs `model` takes, and where each sits in `batch`."""
    rows: list[list[float]] = []
    where: list[int] = []
    for i, values in enumerate(batch):
        row = feature_row(model, values)
        if takes(row):
            rows.append(row)
            where.append(i)
    return rows, where


class ModelTier:
    name = "model"

    def __init__(self, slot: ModelSlotLike, *, min_confidence: float, labels: Mapping[str, str],
                 tier_name: str = "") -> None:
        self.tier_name = tier_name
        self.slot = slot
        self.min_confidence = min_confidence
        self.labels = dict(labels)
        self._ref_cache: tuple[Model, ModelRef] | None = None

    def _ref(self, model: Model) -> ModelRef:
        cached = self._ref_cache
        if cached is not None and cached[0] is model:
            return cached[1]
        m: Manifest = model.manifest
        ref = ModelRef(name=m.name, version=m.version, sha256=model.sha256)
        self._ref_cache = (model, ref)
        return ref

    async def answer_many(self, batch: Sequence[Mapping[str, Any]]) -> list[Answer | Fallback]:
        """`answer` for a batch: one inference for every row the model may see."""
        model = self.slot.model
        if model is None:
            return [Fallback("model", "unavailable", self.tier_name)] * len(batch)
        out_of_range = model.manifest.out_of_range
        rows, where = rows_for(model, batch, lambda row: out_of_range(row) is None and fits_float32(row))
        results: list[Answer | Fallback] = [Fallback("model", "out_of_range", self.tier_name)] * len(batch)
        if rows:
            try:
                predictions = await self.slot.predict_many(rows)
            except (ModelError, ArithmeticError, ValueError, TypeError):  # whatever the rows, the inputs are answered
                for i in where:
                    results[i] = Fallback("model", "error", self.tier_name)
            else:
                ref = self._ref(model)
                for i, prediction in zip(where, predictions, strict=True):
                    results[i] = self._judge(prediction, ref)
        return results

    def _judge(self, prediction: Prediction, ref: ModelRef) -> Answer | Fallback:
        confidence = prediction.confidence
        if confidence is not None:
            # A model's scores are float32: seven significant digits. What lies beyond six decimals
            # is the float32-to-float64 conversion's noise, which would cost every record (and every
            # byte on a metered link) ten digits that mean nothing. Judged as recorded.
            confidence = round(confidence, CONFIDENCE_DECIMALS)
        if confidence is None or not confidence >= self.min_confidence:  # NaN is never confident enough
            return Fallback("model", "low_confidence", self.tier_name)
        return Answer("model", prediction.label, action_for(prediction.label, self.labels), confidence, ref,
                      tier_name=self.tier_name)

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        model = self.slot.model
        if model is None:
            return Fallback("model", "unavailable", self.tier_name)
        row = feature_row(model, values)
        if model.manifest.out_of_range(row) is not None or not fits_float32(row):
            return Fallback("model", "out_of_range", self.tier_name)
        try:
            prediction = await self.slot.predict(row)
        except (ModelError, ArithmeticError, ValueError, TypeError):  # whatever the row, the input is answered
            return Fallback("model", "error", self.tier_name)
        return self._judge(prediction, self._ref(model))


CONFIDENCE_DECIMALS = 6
Requester = Callable[[str, bytes, float], Awaitable[bytes]]


class CloudRequestFailed(Exception):
    """What a cloud requester raises when no answer came: `reason` is `timeout`, `unreachable`
    (nobody answers, or the connection is down) or `error`. The transport's own errors stay in
    the requester, so the ladder's choice is tested without a network."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CloudTier:
    """Asks the cloud over NATS; skipped at once when the link says it is gone."""

    name = "cloud"

    def __init__(self, link: CloudLink, request: Requester, *, subject: str, timeout_ms: int,
                 min_confidence: float, labels: Mapping[str, str], tier_name: str = "") -> None:
        self.tier_name = tier_name
        self.link = link
        self.request = request
        self.subject = subject
        self.timeout_s = timeout_ms / 1000
        self.min_confidence = min_confidence
        self.labels = dict(labels)

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        skip = self.link.skip_reason()
        if skip is not None:
            return Fallback("cloud", skip, self.tier_name)
        try:
            data = await self.request(self.subject, JSON_ENCODER.encode(values), self.timeout_s)
        except CloudRequestFailed as failure:
            self.link.request_failed(failure.reason)
            return Fallback("cloud", failure.reason, self.tier_name)
        self.link.request_succeeded()
        try:
            reply = CLOUD_REPLY_DECODER.decode(data)
        except msgspec.DecodeError:
            return Fallback("cloud", "invalid_reply", self.tier_name)
        if not reply.label or not 0.0 <= reply.confidence <= 1.0:
            return Fallback("cloud", "invalid_reply", self.tier_name)
        if reply.confidence < self.min_confidence:
            return Fallback("cloud", "low_confidence", self.tier_name)
        return Answer("cloud", reply.label, action_for(reply.label, self.labels), reply.confidence,
                      tier_name=self.tier_name)


class RaceTier:
    """Consecutive cloud tiers asked at once (`race`): the first acceptable answer decides.

    Tiers whose link says they are gone are skipped at once, as on their own. The answer that wins
    carries the others still running (`Answer.late`), each with its own timeout, so that what they
    say is recorded when they end; it never waits for them. When none answers acceptably, each
    one's fallback is returned, in ladder order.
    """

    name = "cloud"

    def __init__(self, tiers: Sequence[CloudTier]) -> None:
        self.tiers = tuple(tiers)
        self.tier_name = "+".join(t.tier_name for t in self.tiers)

    def skip_reason(self) -> str | None:
        """Why every raced tier would be skipped, or None when one of them is to be asked."""
        reasons = [t.link.skip_reason() for t in self.tiers]
        return None if any(r is None for r in reasons) else reasons[0]

    async def race(self, values: Mapping[str, Any]) -> tuple[Answer | None, list[Fallback]]:
        tasks = {asyncio.ensure_future(t.answer(values)): i for i, t in enumerate(self.tiers)}
        results: list[Answer | Fallback | None] = [None] * len(self.tiers)
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result = task.result()
                results[tasks[task]] = result
            winners = [r for r in results if isinstance(r, Answer)]
            if winners:
                answer = winners[0]
                fallbacks = [r for r in results if isinstance(r, Fallback)]
                late = tuple((self.tiers[tasks[t]].tier_name, t) for t in pending)
                return msgspec.structs.replace(answer, late=late), fallbacks
        return None, [r for r in results if isinstance(r, Fallback)]

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        answer, fallbacks = await self.race(values)
        return answer if answer is not None else fallbacks[0]


class RulesTier:
    """Deterministic rules: always answers."""

    name = "rules"

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules

    async def answer(self, values: Mapping[str, Any]) -> Answer:
        return self.answer_now(values)

    def answer_now(self, values: Mapping[str, Any]) -> Answer:
        rule = self.rules.decide(values)
        return Answer("rules", rule.label or rule.action, rule.action, None)


class Ladder:
    """Guards first, then tiers in order; the first acceptable answer decides, every step aside is a
    `Fallback`. With a `cross` tier (rules or a model), every answer a tier gives is checked against
    that tier's own (`Answer.cross_check`): a second opinion, never a decider."""

    def __init__(self, tiers: Sequence[Tier], rules: RulesTier, guards: GuardSet | None = None,
                 cross: RulesTier | ModelTier | None = None) -> None:
        self.tiers = tuple(tiers)
        self.rules = rules
        self.cross = cross
        # No guards is None, so a pipeline without any pays one check per decision.
        self.guards = guards if guards else None
        # One answer per guard, built once: Rule.index is the guard's place in the list.
        self._guard_answers = tuple(Answer("guard", g.label, g.action, None) for g in guards or ())

    async def decide(self, values: Mapping[str, Any]) -> tuple[Answer, list[Fallback]]:
        if self.guards is not None:
            guard = self.guards.match(values)
            if guard is not None:
                return self._guard_answers[guard.index], []
        return await self.resume(values, Resume(0, []))

    async def resume(self, values: Mapping[str, Any], where: Resume) -> tuple[Answer, list[Fallback]]:
        """Go on down the ladder from tier `where.tier`, after the steps aside already taken."""
        fallbacks = list(where.fallbacks)
        answer: Answer | None = None
        for tier in self.tiers[where.tier:]:
            if isinstance(tier, RaceTier):
                answer, stepped_aside = await tier.race(values)
                fallbacks += stepped_aside
            else:
                result = await tier.answer(values)
                if isinstance(result, Answer):
                    answer = result
                else:
                    fallbacks.append(result)
            if answer is not None:
                break
        if answer is None:
            answer = self.rules.answer_now(values)
        cross = self.cross
        if cross is not None and self._checks(answer):
            second = cross.answer_now(values) if isinstance(cross, RulesTier) else await cross.answer(values)
            answer = _checked(answer, second)
        return answer, fallbacks

    def _checks(self, answer: Answer) -> bool:
        """Whether `answer` gets a second opinion: any tier's but a guard's and the cross tier's own."""
        cross = self.cross
        return cross is not None and answer.tier != "guard" and not (
            answer.tier == cross.name and (answer.tier_name or answer.tier) == getattr(cross, "tier_name", cross.name))

    async def decide_many(self, batch: Sequence[Mapping[str, Any]]) -> list[tuple[Answer, list[Fallback]] | Resume]:
        """Decide a batch tier by tier: one model run for the whole batch, the rules over it.

        An input that must ask the cloud (its link is up) comes back as a `Resume`: the caller
        finishes it on its own with `resume`, so a cloud round trip never holds up the batch.
        """
        results: list[tuple[Answer, list[Fallback]] | Resume | None] = [None] * len(batch)
        open_: list[int] = []  # inputs still going down the ladder
        if self.guards is not None:
            match = self.guards.match
            for i, values in enumerate(batch):
                guard = match(values)
                if guard is not None:
                    results[i] = (self._guard_answers[guard.index], [])
                else:
                    open_.append(i)
        else:
            open_ = list(range(len(batch)))
        fallbacks: dict[int, list[Fallback]] = {i: [] for i in open_}
        for place, tier in enumerate(self.tiers):
            if not open_:
                break
            if isinstance(tier, ModelTier):
                answers: list[Answer | Fallback | list[Fallback]] = list(
                    await tier.answer_many([batch[i] for i in open_]))
            elif isinstance(tier, CloudTier | RaceTier):
                skip = tier.link.skip_reason() if isinstance(tier, CloudTier) else tier.skip_reason()
                if skip is None:  # the cloud is to be asked: each of these leaves the batch here
                    for i in open_:
                        results[i] = Resume(place, fallbacks[i])
                    open_ = []
                    break
                if isinstance(tier, RaceTier):
                    skipped = [Fallback("cloud", t.link.skip_reason() or skip, t.tier_name) for t in tier.tiers]
                    answers = [skipped] * len(open_)
                else:
                    answers = [Fallback("cloud", skip, tier.tier_name)] * len(open_)
            else:
                answers = [await tier.answer(batch[i]) for i in open_]
            still: list[int] = []
            for i, result in zip(open_, answers, strict=True):
                if isinstance(result, Answer):
                    results[i] = (result, fallbacks.pop(i))
                elif isinstance(result, list):
                    fallbacks[i].extend(result)
                    still.append(i)
                else:
                    fallbacks[i].append(result)
                    still.append(i)
            open_ = still
        for i in open_:
            results[i] = (self.rules.answer_now(batch[i]), fallbacks[i])
        if self.cross is not None:
            await self._cross_check_many(batch, results)
        return results  # type: ignore[return-value]  # every slot is filled above

    async def _cross_check_many(self, batch: Sequence[Mapping[str, Any]],
                                results: list[tuple[Answer, list[Fallback]] | Resume | None]) -> None:
        """The second opinion on a batch's answers: one model run for all of them, or the rules."""
        cross = self.cross
        checked = [i for i, r in enumerate(results) if isinstance(r, tuple) and self._checks(r[0])]
        if not checked or cross is None:
            return
        if isinstance(cross, RulesTier):
            seconds: list[Answer | Fallback] = [cross.answer_now(batch[i]) for i in checked]
        else:
            seconds = await cross.answer_many([batch[i] for i in checked])
        for i, second in zip(checked, seconds, strict=True):
            answer, fallbacks = results[i]  # type: ignore[misc]  # a tuple: checked above
            results[i] = (_checked(answer, second), fallbacks)


def _checked(answer: Answer, second: Answer | Fallback) -> Answer:
    """`answer` with the cross tier's opinion on it (none when that tier could not answer)."""
    if not isinstance(second, Answer):
        return answer
    check = CrossCheck(tier=second.tier, tier_name=second.tier_name or second.tier, action=second.action,
                       agreed=second.action == answer.action)
    return msgspec.structs.replace(answer, cross_check=check)


class Resume(msgspec.Struct, frozen=True):
    """Where an input left a batch to ask the cloud: the tier to go on from, and the steps aside so far."""

    tier: int
    fallbacks: list[Fallback]

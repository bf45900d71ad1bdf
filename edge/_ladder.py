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

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from models import Manifest, Model, ModelError, Prediction

from ._link import CloudLink
from ._messages import CLOUD_REPLY_DECODER, JSON_ENCODER, Fallback, ModelRef
from ._rules import GuardSet, RuleSet


class Answer(msgspec.Struct, frozen=True):
    """A tier's acceptable answer: the label it chose and the action that label maps to."""

    tier: str
    label: str
    action: str
    confidence: float | None
    model: ModelRef | None = None


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

    def __init__(self, slot: ModelSlotLike, *, min_confidence: float, labels: Mapping[str, str]) -> None:
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
            return [Fallback("model", "unavailable")] * len(batch)
        out_of_range = model.manifest.out_of_range
        rows, where = rows_for(model, batch, lambda row: out_of_range(row) is None and fits_float32(row))
        results: list[Answer | Fallback] = [Fallback("model", "out_of_range")] * len(batch)
        if rows:
            try:
                predictions = await self.slot.predict_many(rows)
            except (ModelError, ArithmeticError, ValueError, TypeError):  # whatever the rows, the inputs are answered
                for i in where:
                    results[i] = Fallback("model", "error")
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
            return Fallback("model", "low_confidence")
        return Answer("model", prediction.label, action_for(prediction.label, self.labels), confidence, ref)

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        model = self.slot.model
        if model is None:
            return Fallback("model", "unavailable")
        row = feature_row(model, values)
        if model.manifest.out_of_range(row) is not None or not fits_float32(row):
            return Fallback("model", "out_of_range")
        try:
            prediction = await self.slot.predict(row)
        except (ModelError, ArithmeticError, ValueError, TypeError):  # whatever the row, the input is answered
            return Fallback("model", "error")
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
                 min_confidence: float, labels: Mapping[str, str]) -> None:
        self.link = link
        self.request = request
        self.subject = subject
        self.timeout_s = timeout_ms / 1000
        self.min_confidence = min_confidence
        self.labels = dict(labels)

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        skip = self.link.skip_reason()
        if skip is not None:
            return Fallback("cloud", skip)
        try:
            data = await self.request(self.subject, JSON_ENCODER.encode(values), self.timeout_s)
        except CloudRequestFailed as failure:
            self.link.request_failed(failure.reason)
            return Fallback("cloud", failure.reason)
        self.link.request_succeeded()
        try:
            reply = CLOUD_REPLY_DECODER.decode(data)
        except msgspec.DecodeError:
            return Fallback("cloud", "invalid_reply")
        if not reply.label or not 0.0 <= reply.confidence <= 1.0:
            return Fallback("cloud", "invalid_reply")
        if reply.confidence < self.min_confidence:
            return Fallback("cloud", "low_confidence")
        return Answer("cloud", reply.label, action_for(reply.label, self.labels), reply.confidence)


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
    `Fallback`."""

    def __init__(self, tiers: Sequence[Tier], rules: RulesTier, guards: GuardSet | None = None) -> None:
        self.tiers = tuple(tiers)
        self.rules = rules
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
        for tier in self.tiers[where.tier:]:
            result = await tier.answer(values)
            if isinstance(result, Answer):
                return result, fallbacks
            fallbacks.append(result)
        return self.rules.answer_now(values), fallbacks

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
                answers = await tier.answer_many([batch[i] for i in open_])
            elif isinstance(tier, CloudTier):
                skip = tier.link.skip_reason()
                if skip is None:  # the cloud is to be asked: each of these leaves the batch here
                    for i in open_:
                        results[i] = Resume(place, fallbacks[i])
                    open_ = []
                    break
                answers = [Fallback("cloud", skip)] * len(open_)
            else:
                answers = [await tier.answer(batch[i]) for i in open_]
            still: list[int] = []
            for i, result in zip(open_, answers, strict=True):
                if isinstance(result, Answer):
                    results[i] = (result, fallbacks.pop(i))
                else:
                    fallbacks[i].append(result)
                    still.append(i)
            open_ = still
        for i in open_:
            results[i] = (self.rules.answer_now(batch[i]), fallbacks[i])
        return results  # type: ignore[return-value]  # every slot is filled above


class Resume(msgspec.Struct, frozen=True):
    """Where an input left a batch to ask the cloud: the tier to go on from, and the steps aside so far."""

    tier: int
    fallbacks: list[Fallback]

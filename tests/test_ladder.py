"""The ladder (edge._ladder): each tier's answer or step aside, and the ladder's order. No network.

The model tier is fed a fake slot (a `.model` and an `async predict(row)`) so every outcome of a
prediction can be staged; one test serves the bundled ONNX model through a real registry slot. The
cloud tier gets a fake requester and a real `CloudLink` on a fake clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

import models
from edge import BreakerState, CircuitBreaker, CloudLink, Fallback, LinkState, ModelRef, RuleError
from edge._ladder import (
    Answer,
    CloudRequestFailed,
    CloudTier,
    Ladder,
    ModelTier,
    RulesTier,
    action_for,
    feature_row,
)
from edge._rules import GuardSet, RuleSpec, compile_guards, compile_rules
from models import Manifest, ModelError, ModelUnavailable, Prediction
from tests.fakes import FakeClock

FEATURES = ["rms", "kurtosis", "temp_c", "rpm"]
RANGES = {"rms": (0.5, 11.9), "kurtosis": (1.8, 10.5), "temp_c": (29.0, 119.0), "rpm": (880.0, 3010.0)}
LABELS = {"anomaly": "alert", "normal": "none"}  # "critical" is deliberately unlisted
# In range, and given in a different order from the manifest's features, with an extra field.
VALUES: dict[str, Any] = {"rpm": 1500.0, "temp_c": 70.0, "site": "north", "rms": 2.0, "kurtosis": 3.0}
ROW = [2.0, 3.0, 70.0, 1500.0]


# --- model tier -------------------------------------------------------------------------------


class FakeModel:
    """What the model tier reads from a `models.Model`: its manifest and its file's sha256."""

    def __init__(self, version: str = "1", sha256: str = "a" * 64) -> None:
        self.manifest = Manifest(
            name="pump-anomaly", version=version, sha256=sha256, features=list(FEATURES),
            labels=["normal", "anomaly", "critical"], training_range=dict(RANGES),
        )
        self.sha256 = sha256


class FakeSlot:
    """A model slot whose prediction (or failure) the test chooses; records the rows it was asked."""

    def __init__(self, model: FakeModel | None, result: Prediction | Exception | None = None) -> None:
        self.model = model
        self.result = result
        self.rows: list[list[float]] = []

    async def predict(self, row: Sequence[float]) -> Prediction:
        self.rows.append(list(row))
        if isinstance(self.result, Exception):
            raise self.result
        assert self.result is not None, "predict was not expected to be called"
        return self.result


def model_tier(slot: FakeSlot, min_confidence: float = 0.6) -> ModelTier:
    return ModelTier(slot, min_confidence=min_confidence, labels=LABELS)


async def test_model_tier_without_a_model_is_unavailable() -> None:
    slot = FakeSlot(None, Prediction("anomaly", 0.99))
    assert await model_tier(slot).answer(VALUES) == Fallback("model", "unavailable")
    assert slot.rows == []


async def test_model_tier_on_an_empty_registry_slot_is_unavailable() -> None:
    async with models.ModelRegistry() as registry:
        tier = ModelTier(registry.slot("pump-anomaly"), min_confidence=0.6, labels=LABELS)
        assert await tier.answer(VALUES) == Fallback("model", "unavailable")


@pytest.mark.parametrize(
    ("name", "value"),
    [("temp_c", 119.5), ("temp_c", 28.9), ("rpm", 5000.0), ("rms", math.nan), ("kurtosis", -math.inf)],
)
async def test_model_tier_steps_aside_outside_the_training_range(name: str, value: float) -> None:
    slot = FakeSlot(FakeModel(), Prediction("anomaly", 0.99))
    assert await model_tier(slot).answer({**VALUES, name: value}) == Fallback("model", "out_of_range")
    assert slot.rows == []  # the model is never asked about what it was not trained on


async def test_model_tier_accepts_the_edges_of_the_training_range() -> None:
    slot = FakeSlot(FakeModel(), Prediction("anomaly", 0.99))
    low = {name: lo for name, (lo, _) in RANGES.items()}
    high = {name: hi for name, (_, hi) in RANGES.items()}
    assert isinstance(await model_tier(slot).answer(low), Answer)
    assert isinstance(await model_tier(slot).answer(high), Answer)


@pytest.mark.parametrize("error", [ModelError("boom"), ModelUnavailable("batch failed")])
async def test_model_tier_steps_aside_when_the_model_fails(error: ModelError) -> None:
    slot = FakeSlot(FakeModel(), error)
    assert await model_tier(slot).answer(VALUES) == Fallback("model", "error")
    assert slot.rows == [ROW]


@pytest.mark.parametrize("confidence", [0.59, 0.0, math.nan, None])
async def test_model_tier_steps_aside_below_min_confidence(confidence: float | None) -> None:
    slot = FakeSlot(FakeModel(), Prediction("anomaly", confidence))
    assert await model_tier(slot, min_confidence=0.6).answer(VALUES) == Fallback("model", "low_confidence")


async def test_model_tier_answers_at_exactly_min_confidence() -> None:
    slot = FakeSlot(FakeModel(), Prediction("anomaly", 0.6))
    answer = await model_tier(slot, min_confidence=0.6).answer(VALUES)
    assert isinstance(answer, Answer)
    assert answer.confidence == 0.6


async def test_model_tier_answer_maps_the_label_and_names_the_model() -> None:
    model = FakeModel(version="7", sha256="b" * 64)
    slot = FakeSlot(model, Prediction("anomaly", 0.91))
    answer = await model_tier(slot).answer(VALUES)
    assert answer == Answer("model", "anomaly", "alert", 0.91, ModelRef("pump-anomaly", "7", "b" * 64))
    assert slot.rows == [ROW]  # asked in the manifest's feature order


async def test_model_tier_unlisted_label_is_its_own_action() -> None:
    slot = FakeSlot(FakeModel(), Prediction("critical", 0.97))
    answer = await model_tier(slot).answer(VALUES)
    assert isinstance(answer, Answer)
    assert (answer.label, answer.action) == ("critical", "critical")


async def test_model_ref_is_reused_for_the_same_model_and_follows_a_swap() -> None:
    v1, v2 = FakeModel("1", "1" * 64), FakeModel("2", "2" * 64)
    slot = FakeSlot(v1, Prediction("normal", 0.99))
    tier = model_tier(slot)
    first, second = await tier.answer(VALUES), await tier.answer(VALUES)
    assert isinstance(first, Answer) and isinstance(second, Answer)
    assert first.model == ModelRef("pump-anomaly", "1", "1" * 64)
    assert second.model is first.model  # cached, not rebuilt per answer

    slot.model = v2  # a deploy swapped the model in the slot
    third = await tier.answer(VALUES)
    assert isinstance(third, Answer)
    assert third.model == ModelRef("pump-anomaly", "2", "2" * 64)

    slot.model = v1  # and a rollback swaps it back
    fourth = await tier.answer(VALUES)
    assert isinstance(fourth, Answer)
    assert fourth.model == ModelRef("pump-anomaly", "1", "1" * 64)


def test_feature_row_follows_the_manifest_order() -> None:
    model = cast(models.Model, FakeModel())
    assert feature_row(model, VALUES) == ROW
    assert feature_row(model, dict(reversed(list(VALUES.items())))) == ROW


def test_action_for_maps_listed_labels_and_passes_others_through() -> None:
    assert action_for("anomaly", LABELS) == "alert"
    assert action_for("critical", LABELS) == "critical"
    assert action_for("anything", {}) == "anything"


async def test_model_tier_with_the_bundled_model() -> None:
    folder = models.bundled_model_path("pump-anomaly")
    async with models.ModelRegistry() as registry:
        slot = await registry.load("pump-anomaly", folder)
        assert slot.model is not None
        tier = ModelTier(slot, min_confidence=0.6, labels=LABELS)
        values = {"rms": 1.0, "kurtosis": 2.5, "temp_c": 40.0, "rpm": 1500.0}  # plainly normal
        answer = await tier.answer(values)
        manifest = models.load_manifest(folder / "manifest.toml")
        assert isinstance(answer, Answer)
        assert (answer.tier, answer.label, answer.action) == ("model", "normal", "none")
        assert answer.confidence is not None and 0.6 <= answer.confidence <= 1.0
        assert answer.model == ModelRef(manifest.name, manifest.version, manifest.sha256)
        assert await tier.answer({**values, "temp_c": 150.0}) == Fallback("model", "out_of_range")


# --- cloud tier -------------------------------------------------------------------------------

SUBJECT = "cloud.classify.pump"


class FakeCloud:
    """A requester: answers (or fails) from a script, recording (subject, payload, timeout) per call."""

    def __init__(self, *replies: bytes | Exception) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[str, bytes, float]] = []

    async def __call__(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        self.calls.append((subject, payload, timeout_s))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def reply(label: str = "anomaly", confidence: float = 0.93, **extra: object) -> bytes:
    return json.dumps({"label": label, "confidence": confidence, **extra}).encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def link(clock: FakeClock) -> CloudLink:
    link = CloudLink(CircuitBreaker(3, 5.0, clock), connected=True)
    assert link.skip_reason() is None
    return link


def cloud_tier(link: CloudLink, cloud: FakeCloud, min_confidence: float = 0.6) -> CloudTier:
    return CloudTier(link, cloud, subject=SUBJECT, timeout_ms=250, min_confidence=min_confidence, labels=LABELS)


async def test_cloud_tier_skips_a_disconnected_link_without_asking(clock: FakeClock) -> None:
    link = CloudLink(CircuitBreaker(3, 5.0, clock), connected=False)
    cloud = FakeCloud(reply())
    assert await cloud_tier(link, cloud).answer(VALUES) == Fallback("cloud", "unreachable")
    assert cloud.calls == []


async def test_cloud_tier_skips_an_open_breaker_without_asking(link: CloudLink, clock: FakeClock) -> None:
    for _ in range(3):
        link.request_failed("timeout")
    assert link.breaker.state is BreakerState.OPEN
    cloud = FakeCloud(reply())
    tier = cloud_tier(link, cloud)
    assert await tier.answer(VALUES) == Fallback("cloud", "breaker_open")
    clock.advance(10.0)
    assert link.begin_probe()  # the half-open trial is the probe's, never a live decision's
    assert link.breaker.state is BreakerState.HALF_OPEN
    assert await tier.answer(VALUES) == Fallback("cloud", "breaker_open")
    assert cloud.calls == []


@pytest.mark.parametrize("reason", ["timeout", "unreachable", "error"])
async def test_cloud_request_failure_is_the_reason_and_counts_on_the_link(link: CloudLink, reason: str) -> None:
    cloud = FakeCloud(CloudRequestFailed(reason))
    assert await cloud_tier(link, cloud).answer(VALUES) == Fallback("cloud", reason)
    assert len(cloud.calls) == 1
    assert link.breaker.failure_count == 1
    assert link.last_failure == reason
    assert link.state is LinkState.DEGRADED


async def test_cloud_failures_open_the_breaker_and_then_the_cloud_is_skipped(link: CloudLink) -> None:
    cloud = FakeCloud(CloudRequestFailed("timeout"))
    tier = cloud_tier(link, cloud)
    for _ in range(3):
        assert await tier.answer(VALUES) == Fallback("cloud", "timeout")
    assert link.breaker.state is BreakerState.OPEN
    assert link.state is LinkState.OFFLINE
    assert await tier.answer(VALUES) == Fallback("cloud", "breaker_open")
    assert len(cloud.calls) == 3  # the fourth decision did not wait on a cloud known to be gone


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"",
        b"[]",
        b'{"confidence": 0.9}',
        b'{"label": "anomaly"}',
        reply(label=""),
        reply(confidence=1.5),
        reply(confidence=-0.01),
        b'{"label": "anomaly", "confidence": "high"}',
        b'{"label": 3, "confidence": 0.9}',
    ],
)
async def test_cloud_tier_rejects_an_invalid_reply(link: CloudLink, data: bytes) -> None:
    cloud = FakeCloud(data)
    assert await cloud_tier(link, cloud, min_confidence=0.0).answer(VALUES) == Fallback("cloud", "invalid_reply")


@pytest.mark.parametrize("confidence", [0.59, 0.0])
async def test_cloud_tier_steps_aside_below_min_confidence(link: CloudLink, confidence: float) -> None:
    cloud = FakeCloud(reply(confidence=confidence))
    assert await cloud_tier(link, cloud, min_confidence=0.6).answer(VALUES) == Fallback("cloud", "low_confidence")


@pytest.mark.parametrize("confidence", [0.6, 1.0])
async def test_cloud_tier_answers_from_min_confidence_up_to_one(link: CloudLink, confidence: float) -> None:
    cloud = FakeCloud(reply(confidence=confidence))
    answer = await cloud_tier(link, cloud, min_confidence=0.6).answer(VALUES)
    assert answer == Answer("cloud", "anomaly", "alert", confidence)


async def test_cloud_good_reply_answers_and_records_success(link: CloudLink) -> None:
    link.request_failed("timeout")
    assert link.state is LinkState.DEGRADED
    cloud = FakeCloud(reply("anomaly", 0.93, scores={"anomaly": 0.93, "normal": 0.07}, extra="ignored"))
    answer = await cloud_tier(link, cloud).answer(VALUES)
    assert answer == Answer("cloud", "anomaly", "alert", 0.93, None)
    assert link.breaker.failure_count == 0
    assert link.state is LinkState.ONLINE


async def test_cloud_unlisted_label_is_its_own_action(link: CloudLink) -> None:
    answer = await cloud_tier(link, FakeCloud(reply("critical", 0.8))).answer(VALUES)
    assert answer == Answer("cloud", "critical", "critical", 0.8)


async def test_cloud_request_sends_the_input_as_json_on_the_configured_subject(link: CloudLink) -> None:
    cloud = FakeCloud(reply())
    await cloud_tier(link, cloud).answer(VALUES)
    assert len(cloud.calls) == 1
    subject, payload, timeout = cloud.calls[0]
    assert subject == SUBJECT
    assert json.loads(payload) == VALUES
    assert timeout == pytest.approx(0.25)


# --- rules tier and the ladder ----------------------------------------------------------------

FIELDS = {"rms": "float", "kurtosis": "float", "temp_c": "float", "rpm": "float", "site": "str"}


def rules_tier() -> RulesTier:
    return RulesTier(compile_rules([
        RuleSpec(when="temp_c > 100", action="shutdown", label="overheat"),
        RuleSpec(default=True, action="hold"),
    ], FIELDS))


RULES_DEFAULT = Answer("rules", "hold", "hold", None)


async def test_rules_tier_answers_with_the_first_matching_rule() -> None:
    assert await rules_tier().answer({**VALUES, "temp_c": 110.0}) == Answer("rules", "overheat", "shutdown", None)


async def test_rules_tier_always_answers_with_the_default() -> None:
    assert await rules_tier().answer(VALUES) == RULES_DEFAULT
    assert await rules_tier().answer({}) == RULES_DEFAULT  # even with no fields at all


class StubTier:
    """A tier with a fixed answer or step aside, logging its name to a shared list when asked."""

    def __init__(self, name: str, result: Answer | Fallback, log: list[str]) -> None:
        self.name = name
        self.result = result
        self.log = log

    async def answer(self, values: Mapping[str, Any]) -> Answer | Fallback:
        self.log.append(self.name)
        return self.result


async def test_ladder_returns_the_first_answer_and_the_fallbacks_before_it() -> None:
    log: list[str] = []
    cloud = Answer("cloud", "anomaly", "alert", 0.9)
    ladder = Ladder([
        StubTier("model", Fallback("model", "low_confidence"), log),
        StubTier("cloud", cloud, log),
        StubTier("other", Answer("other", "x", "x", 1.0), log),
    ], rules_tier())
    assert await ladder.decide(VALUES) == (cloud, [Fallback("model", "low_confidence")])
    assert log == ["model", "cloud"]  # nothing after the tier that answered is asked


async def test_ladder_first_tier_answering_has_no_fallbacks() -> None:
    log: list[str] = []
    model = Answer("model", "normal", "none", 0.99)
    ladder = Ladder([StubTier("model", model, log), StubTier("cloud", Fallback("cloud", "timeout"), log)],
                    rules_tier())
    assert await ladder.decide(VALUES) == (model, [])
    assert log == ["model"]


async def test_ladder_falls_to_the_rules_with_every_fallback_in_order() -> None:
    log: list[str] = []
    ladder = Ladder([
        StubTier("model", Fallback("model", "out_of_range"), log),
        StubTier("cloud", Fallback("cloud", "breaker_open"), log),
    ], rules_tier())
    answer, fallbacks = await ladder.decide(VALUES)
    assert answer == RULES_DEFAULT
    assert fallbacks == [Fallback("model", "out_of_range"), Fallback("cloud", "breaker_open")]
    assert log == ["model", "cloud"]


async def test_ladder_without_tiers_is_the_rules() -> None:
    assert await Ladder([], rules_tier()).decide({**VALUES, "temp_c": 110.0}) == (
        Answer("rules", "overheat", "shutdown", None), [])


async def test_ladder_fallbacks_are_fresh_per_decision() -> None:
    ladder = Ladder([StubTier("cloud", Fallback("cloud", "timeout"), [])], rules_tier())
    _, first = await ladder.decide(VALUES)
    _, second = await ladder.decide(VALUES)
    assert first == second == [Fallback("cloud", "timeout")]
    assert first is not second


async def test_ladder_of_real_tiers_that_all_step_aside(clock: FakeClock) -> None:
    link = CloudLink(CircuitBreaker(3, 5.0, clock), connected=False)
    cloud = FakeCloud(reply())
    ladder = Ladder([model_tier(FakeSlot(None)), cloud_tier(link, cloud)], rules_tier())
    assert await ladder.decide(VALUES) == (
        RULES_DEFAULT, [Fallback("model", "unavailable"), Fallback("cloud", "unreachable")])
    assert cloud.calls == []


async def test_ladder_of_real_tiers_where_the_cloud_answers(link: CloudLink) -> None:
    slot = FakeSlot(FakeModel(), Prediction("anomaly", 0.3))
    ladder = Ladder([model_tier(slot), cloud_tier(link, FakeCloud(reply("critical", 0.95)))], rules_tier())
    assert await ladder.decide(VALUES) == (
        Answer("cloud", "critical", "critical", 0.95), [Fallback("model", "low_confidence")])


# --- guards -----------------------------------------------------------------------------------


def guards(*specs: RuleSpec) -> GuardSet:
    return compile_guards(list(specs), FIELDS)


INTERLOCK = RuleSpec(when="temp_c > 119", action="shutdown", label="interlock")


async def test_a_matching_guard_decides_before_any_tier_is_asked() -> None:
    log: list[str] = []
    ladder = Ladder([
        StubTier("model", Answer("model", "normal", "none", 0.99), log),
        StubTier("cloud", Answer("cloud", "normal", "none", 0.99), log),
    ], rules_tier(), guards(INTERLOCK))
    assert await ladder.decide({**VALUES, "temp_c": 120.0}) == (Answer("guard", "interlock", "shutdown", None), [])
    assert log == []  # neither the model nor the cloud was asked


async def test_no_matching_guard_leaves_the_ladder_as_it_was() -> None:
    log: list[str] = []
    tiers = [StubTier("model", Fallback("model", "low_confidence"), log),
             StubTier("cloud", Answer("cloud", "normal", "none", 0.99), log)]
    guarded = Ladder(tiers, rules_tier(), guards(INTERLOCK))
    plain = Ladder(tiers, rules_tier())
    for temp_c in (60.0, 119.0):  # 119 is not above 119
        values = {**VALUES, "temp_c": temp_c}
        assert await guarded.decide(values) == await plain.decide(values) == (
            Answer("cloud", "normal", "none", 0.99), [Fallback("model", "low_confidence")])
    assert log == ["model", "cloud"] * 4


async def test_a_guard_is_not_overridden_by_a_confident_cloud(link: CloudLink) -> None:
    cloud = FakeCloud(reply("normal", 0.99))
    ladder = Ladder([cloud_tier(link, cloud)], rules_tier(), guards(INTERLOCK))
    assert (await ladder.decide({**VALUES, "temp_c": 150.0}))[0].tier == "guard"
    assert cloud.calls == []
    # Below the limit the cloud decides: the guard only takes the inputs it names.
    assert await ladder.decide(VALUES) == (Answer("cloud", "normal", "none", 0.99), [])
    assert len(cloud.calls) == 1


async def test_a_guard_decides_even_when_every_tier_would_step_aside(clock: FakeClock) -> None:
    link = CloudLink(CircuitBreaker(3, 5.0, clock), connected=False)
    ladder = Ladder([model_tier(FakeSlot(None)), cloud_tier(link, FakeCloud(reply()))], rules_tier(),
                    guards(INTERLOCK))
    # No fallbacks: the tiers were never tried, so none stepped aside.
    assert await ladder.decide({**VALUES, "temp_c": 120.0}) == (Answer("guard", "interlock", "shutdown", None), [])


async def test_the_first_matching_guard_decides_and_a_label_defaults_to_the_action() -> None:
    ladder = Ladder([], rules_tier(), guards(
        RuleSpec(when="rpm > 3500", action="trip"),
        RuleSpec(when="temp_c > 119", action="shutdown", label="interlock"),
        RuleSpec(when="temp_c > 110 and rpm > 3000", action="slow_down"),
    ))
    assert await ladder.decide({**VALUES, "rpm": 3600.0, "temp_c": 130.0}) == (
        Answer("guard", "trip", "trip", None), [])
    assert await ladder.decide({**VALUES, "rpm": 3100.0, "temp_c": 130.0}) == (
        Answer("guard", "interlock", "shutdown", None), [])
    assert await ladder.decide({**VALUES, "rpm": 3100.0, "temp_c": 115.0}) == (
        Answer("guard", "slow_down", "slow_down", None), [])
    # No guard holds: the rules decide (temp_c > 100 is the rules' own shutdown).
    assert await ladder.decide({**VALUES, "temp_c": 105.0}) == (Answer("rules", "overheat", "shutdown", None), [])


async def test_a_guard_on_a_missing_field_does_not_match() -> None:
    ladder = Ladder([], rules_tier(), guards(RuleSpec(when="site == 'north'", action="hold_north")))
    assert (await ladder.decide(VALUES))[0] == Answer("guard", "hold_north", "hold_north", None)
    values = {k: v for k, v in VALUES.items() if k != "site"}
    assert await ladder.decide(values) == (RULES_DEFAULT, [])


async def test_an_empty_guard_list_is_no_guards_at_all() -> None:
    ladder = Ladder([], rules_tier(), guards())
    assert ladder.guards is None  # the hot path: one check per decision, no call
    assert Ladder([], rules_tier()).guards is None
    assert await ladder.decide({**VALUES, "temp_c": 150.0}) == (Answer("rules", "overheat", "shutdown", None), [])


def test_guards_compile_without_a_default_and_refuse_one() -> None:
    compiled = guards(INTERLOCK)
    assert len(compiled) == 1 and compiled.actions == frozenset({"shutdown"})
    assert compiled.match({**VALUES, "temp_c": 120.0}) == next(iter(compiled))
    assert compiled.match(VALUES) is None
    with pytest.raises(RuleError, match=r"guards\[1\]\.default: guards have no default"):
        guards(INTERLOCK, RuleSpec(default=True, action="none"))
    with pytest.raises(RuleError, match=r"guards\[0\]: guards have no default"):
        guards(RuleSpec(action="none"))

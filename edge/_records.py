"""A decision's audit record holds what is specific to the decision: pure logic, no I/O.

A Decision (the message published, SPEC §5) repeats what is the same for many decisions: the
device, the model's name, version and sha256, its own audit seq. Its audit record does not:

- `device` and `audit_seq` are the record's own `device` and `seq`;
- `model` is the seq of a `model` record with `event = "in_use"` (`{event, pipeline, name,
  version, sha256}`) that a pipeline writes before the first decision a model makes, again after
  any change of model, and again once retention has deleted the one it referred to;
- `decided_at` is left out when it is the record's `ts` (a batch's decisions are decided, and
  recorded, at one time);
- `shadow`, `confidence` and `fallbacks` are left out when empty;
- with `audit.inputs = "full"` (the default) the record holds the decoded `input` (as validated:
  what the ladder saw, so it can be decided again) instead of `input_sha256`, the digest of the
  raw message bytes, which only `"hash"` keeps. The input is the better evidence and, on a
  metered link, 64 hex digits cheaper than a digest that no compression can shrink.

Everything else is the Decision's own field, under its own name. `DecisionReader` turns records
back into full Decisions (`edge audit ... --decisions`; `input_sha256` is empty where the record
holds the input instead); the hash chain covers the compact body exactly as it was written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import msgspec

from sync import AuditRecord

from ._messages import CrossCheck, Decision, Fallback, Governance, ModelRef, ShadowResult

DECISION_KIND = "decision"
MODEL_KIND = "model"
IN_USE = "in_use"


class DecisionRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of a `decision` audit record (see the module docstring)."""

    id: str
    pipeline: str
    subject: str
    received_at: int
    action: str
    label: str
    tier: str
    governance: Governance
    decided_at: int | None = None  # None: the record's ts
    input: dict[str, Any] | None = None  # audit.inputs = "full"
    input_sha256: str = ""  # audit.inputs = "hash"
    confidence: float | None = None
    fallbacks: list[Fallback] = []
    model: int | None = None  # the seq of the `model` record naming the model that decided
    shadow: ShadowResult | None = None
    tier_name: str | None = None  # None: the tier's kind, or the model's name when a model decided
    cross_check: CrossCheck | None = None


class ModelInUse(msgspec.Struct, frozen=True):
    """The body of a `model` record that says which model a pipeline's decisions refer to."""

    event: str
    pipeline: str
    name: str
    version: str
    sha256: str


class _ModelEvent(msgspec.Struct):
    event: str = ""


_record_decoder = msgspec.json.Decoder(DecisionRecord)
_in_use_decoder = msgspec.json.Decoder(ModelInUse)
_event_decoder = msgspec.json.Decoder(_ModelEvent)


def decision_record(decision: Decision, model_seq: int | None,
                    values: Mapping[str, Any] | None = None, *, ts: int | None = None) -> DecisionRecord:
    """The record body of `decision`; `model_seq` is the seq of the record naming its model,
    `values` its decoded input when inputs are recorded in full (else its digest is), `ts` the
    time its record will carry."""
    return DecisionRecord(
        id=decision.id, pipeline=decision.pipeline, subject=decision.subject, received_at=decision.received_at,
        decided_at=None if decision.decided_at == ts else decision.decided_at, action=decision.action,
        label=decision.label, tier=decision.tier,
        governance=decision.governance, input=dict(values) if values is not None else None,
        input_sha256=decision.input_sha256 if values is None else "", confidence=decision.confidence,
        fallbacks=decision.fallbacks, model=model_seq if decision.model is not None else None,
        shadow=decision.shadow, tier_name=_recorded_tier_name(decision), cross_check=decision.cross_check,
    )


def _recorded_tier_name(decision: Decision) -> str | None:
    implied = decision.model.name if decision.model is not None and decision.tier == "model" else decision.tier
    return None if decision.tier_name in (implied, "") else decision.tier_name


def model_in_use(pipeline: str, model: ModelRef) -> ModelInUse:
    """The body of the `model` record a pipeline writes before decisions that refer to `model`."""
    return ModelInUse(event=IN_USE, pipeline=pipeline, name=model.name, version=model.version, sha256=model.sha256)


class Recorded(NamedTuple):
    """A decision as its record holds it: the full Decision, and the input when it was recorded."""

    record: AuditRecord
    decision: Decision
    input: dict[str, Any] | None


class DecisionReader:
    """Reads audit records in seq order and gives back the full Decisions they record.

    Feed it every `model` record before the decisions that refer to them (reading a range, feed
    the range's earlier `model` records first: `remember`). A decision whose model record is not
    known (deleted, or outside what was read) gets `model = None`, and its seq is in `unresolved`.
    """

    def __init__(self) -> None:
        self._models: dict[int, ModelRef] = {}
        self.unresolved: list[int] = []

    def remember(self, records: Iterable[AuditRecord]) -> None:
        """Learn the model records among `records` (others are ignored)."""
        for record in records:
            self._learn(record)

    def _learn(self, record: AuditRecord) -> None:
        if record.kind != MODEL_KIND:
            return
        body = bytes(record.body)
        try:
            if _event_decoder.decode(body).event != IN_USE:
                return
            model = _in_use_decoder.decode(body)
        except msgspec.DecodeError:
            return
        self._models[record.seq] = ModelRef(name=model.name, version=model.version, sha256=model.sha256)

    def decisions(self, records: Iterable[AuditRecord]) -> Iterator[Recorded]:
        """Each decision record among `records` read back, learning model records on the way."""
        for record in records:
            if record.kind == MODEL_KIND:
                self._learn(record)
            elif record.kind == DECISION_KIND:
                recorded = self.read(record)
                if recorded is not None:
                    yield recorded

    def read(self, record: AuditRecord) -> Recorded | None:
        """A decision record read back (None if its body is not a decision)."""
        try:
            body = _record_decoder.decode(bytes(record.body))
        except msgspec.DecodeError:
            return None
        return Recorded(record, self._decision(record, body), body.input)

    def _decision(self, record: AuditRecord, body: DecisionRecord) -> Decision:
        seq = record.seq
        model: ModelRef | None = None
        if body.model is not None:
            model = self._models.get(body.model)
            if model is None:
                self.unresolved.append(seq)
        return Decision(
            id=body.id, device=record.device, pipeline=body.pipeline,
            subject=body.subject, received_at=body.received_at,
            decided_at=body.decided_at if body.decided_at is not None else record.ts, action=body.action,
            label=body.label, confidence=body.confidence, tier=body.tier, fallbacks=body.fallbacks, model=model,
            shadow=body.shadow, governance=body.governance, audit_seq=seq, input_sha256=body.input_sha256,
            tier_name=body.tier_name or (model.name if model is not None and body.tier == "model" else body.tier),
            cross_check=body.cross_check,
        )

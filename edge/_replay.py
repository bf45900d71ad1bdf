"""`edge replay`: recorded inputs decided again, offline, by a candidate model and/or config.

What a decision's record holds (`_records`) is enough to decide it again: its decoded input
(`audit.inputs = "full"`), the tier that decided, the fallbacks on the way, and the cloud's answer
when the cloud decided. A replay walks the candidate's ladder for each input:

- guards, then each tier in order, then the rules, exactly as the runtime would (the candidate
  model's manifest checks included: training range, float32, its confidence floor);
- a model tier runs the candidate model (`--model`) when it is the pipeline's `model` (or has the
  candidate's name), else the model its config names; every model runs in batches;
- a cloud tier is taken as recorded: the cloud's recorded answer when it decided, the recorded
  fallback when it stepped aside, and `not_recorded` when the recorded decision never reached it
  (the cloud was not asked then, so what it would have said is unknown).

What depends on time and people (approvals, rate limits, pause) is not replayed: a replay compares
the action a decision *requested* (`governance.requested_action`) with the one the candidate's
ladder chooses. It reads the log (or an export) and never publishes or writes anything.

The report (`ReplayReport`, `--json`) is a stable schema: see the README's "Replay" section.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from models import Model, ModelError, load_model
from sync import AuditRecord

from ._config import Config, PipelineConfig, parse_tier
from ._errors import EdgeError
from ._ladder import FLOAT32_MAX, action_for
from ._records import DECISION_KIND, DecisionRecord
from ._rules import GuardSet, RuleSet, compile_guards, compile_rules

BATCH = 1024  # rows per model run


class Replayed(msgspec.Struct, frozen=True):
    tier: str
    tier_name: str
    label: str
    action: str
    confidence: float | None = None


class Change(msgspec.Struct, frozen=True):
    """A decision the candidate would have made differently (by requested action)."""

    seq: int
    pipeline: str
    recorded: Replayed
    replayed: Replayed


class ReplayReport(msgspec.Struct, kw_only=True):
    """What `edge replay` reports (its `--json`)."""

    candidate: dict[str, str]  # the candidate model {name, version, sha256}, or {} with --config only
    records_read: int
    replayed: int
    skipped: dict[str, int]  # reason -> inputs: hash_only, unknown_pipeline, input_mismatch, not_a_decision
    label_agreement: float | None
    action_agreement: float | None  # requested actions (before approvals and rate limits)
    changed: int
    confusion: dict[str, dict[str, int]]  # recorded requested action -> replayed action -> count
    changes: list[Change]  # the first --changes of them, in seq order
    by_tier: dict[str, int]  # "kind:name" of the replayed deciding tier -> count
    fallbacks: dict[str, int]  # "kind:name:reason" -> count
    model_runs: int
    model_us_per_input: float | None  # the candidate's inference time per input, batched
    elapsed_s: float


class ReplayError(EdgeError):
    """A replay that cannot run (no such model, a candidate config without the pipeline...)."""


class _Tier(msgspec.Struct):
    kind: str
    name: str
    model: Model | None = None
    floor: float = 0.0
    entry: str = ""


class _Pipeline:
    """One pipeline's candidate ladder, compiled once."""

    def __init__(self, p: PipelineConfig, config: Config, candidate: Model | None, models: dict[str, Model]) -> None:
        self.config = p
        self.rules: RuleSet = compile_rules(p.rules, p.input)
        self.guards: GuardSet = compile_guards(p.guards, p.input)
        self.tiers: list[_Tier] = []
        for entry in p.ladder:
            ref = parse_tier(entry, p.model)
            if ref is None or ref.kind == "rules":
                continue
            if ref.kind == "cloud":
                self.tiers.append(_Tier("cloud", ref.name, entry=entry))
                continue
            use_candidate = candidate is not None and (entry == "model" or ref.name == candidate.manifest.name)
            model = candidate if use_candidate else models.get(ref.name)
            settings = config.model(ref.name)
            floor = p.min_confidence
            if settings is not None and settings.min_confidence is not None and entry != "model":
                floor = settings.min_confidence
            self.tiers.append(_Tier("model", ref.name, model, floor, entry))


class Replayer:
    """Decides recorded inputs again with a candidate; `run(records)` gives the report."""

    def __init__(self, config: Config, *, candidate: Model | None = None, changes: int = 20) -> None:
        self.config = config
        self.candidate = candidate
        self.max_changes = changes
        models: dict[str, Model] = {}
        for p in config.pipelines:
            for entry in p.ladder:
                ref = parse_tier(entry, p.model)
                if ref is None or ref.kind != "model" or ref.name in models:
                    continue
                if candidate is not None and (entry == "model" or ref.name == candidate.manifest.name):
                    continue
                settings = config.model(ref.name)
                if settings is None:
                    continue
                try:
                    models[ref.name] = load_model(config.resolve(settings.path))
                except ModelError as exc:
                    raise ReplayError(f"model {ref.name!r} of the config: {exc}") from None
        self.pipelines = {p.name: _Pipeline(p, config, candidate, models) for p in config.pipelines}
        self.model_runs = 0
        self._model_s = 0.0
        self._model_rows = 0

    def run(self, records: Iterable[AuditRecord]) -> ReplayReport:
        started = time.perf_counter()
        read = 0
        skipped: Counter[str] = Counter()
        pending: dict[str, list[tuple[int, DecisionRecord]]] = defaultdict(list)
        decoder = msgspec.json.Decoder(DecisionRecord)
        for record in records:
            read += 1
            if record.kind != DECISION_KIND:
                continue
            try:
                body = decoder.decode(bytes(record.body))
            except msgspec.DecodeError:
                skipped["not_a_decision"] += 1
                continue
            if body.input is None:
                skipped["hash_only"] += 1
                continue
            pipeline = self.pipelines.get(body.pipeline)
            if pipeline is None:
                skipped["unknown_pipeline"] += 1
                continue
            if any(name not in body.input for name, kind in pipeline.config.input.items() if not kind.endswith("?")):
                skipped["input_mismatch"] += 1
                continue
            pending[body.pipeline].append((record.seq, body))
        results: list[tuple[int, str, DecisionRecord, Replayed, list[str]]] = []
        for name, items in pending.items():
            for (seq, body), (answer, fallbacks) in zip(items, self._decide(self.pipelines[name], items), strict=True):
                results.append((seq, name, body, answer, fallbacks))
        results.sort(key=lambda r: r[0])
        return self._report(read, skipped, results, time.perf_counter() - started)

    def _decide(self, p: _Pipeline, items: Sequence[tuple[int, DecisionRecord]]) -> list[tuple[Replayed, list[str]]]:
        """The candidate ladder over a pipeline's inputs, tier by tier (each model in batches)."""
        inputs = [body.input or {} for _, body in items]
        out: list[tuple[Replayed, list[str]] | None] = [None] * len(items)
        fallbacks: list[list[str]] = [[] for _ in items]
        open_: list[int] = []
        for i, values in enumerate(inputs):
            guard = p.guards.match(values) if p.guards else None
            if guard is not None:
                out[i] = (Replayed("guard", "guard", guard.label or guard.action, guard.action), [])
            else:
                open_.append(i)
        labels = p.config.labels
        for tier in p.tiers:
            if not open_:
                break
            still: list[int] = []
            if tier.kind == "cloud":
                for i in open_:
                    answer, reason = _as_recorded(items[i][1], tier, labels)
                    if answer is not None:
                        out[i] = (answer, fallbacks[i])
                    else:
                        fallbacks[i].append(f"cloud:{tier.name}:{reason}")
                        still.append(i)
            else:
                answers = self._model_answers(tier, [inputs[i] for i in open_], labels)
                for i, (answer, reason) in zip(open_, answers, strict=True):
                    if answer is not None:
                        out[i] = (answer, fallbacks[i])
                    else:
                        fallbacks[i].append(f"model:{tier.name}:{reason}")
                        still.append(i)
            open_ = still
        for i in open_:
            rule = p.rules.decide(inputs[i])
            out[i] = (Replayed("rules", "rules", rule.label or rule.action, rule.action), fallbacks[i])
        return [r for r in out if r is not None]

    def _model_answers(self, tier: _Tier, batch: Sequence[Mapping[str, Any]],
                       labels: Mapping[str, str]) -> list[tuple[Replayed | None, str]]:
        model = tier.model
        if model is None:
            return [(None, "unavailable")] * len(batch)
        features = model.manifest.features
        answers: list[tuple[Replayed | None, str]] = [(None, "out_of_range")] * len(batch)
        rows: list[list[float]] = []
        where: list[int] = []
        for i, values in enumerate(batch):
            try:
                row = [float(values[f]) for f in features]
            except (KeyError, TypeError, ValueError):
                continue
            if model.manifest.out_of_range(row) is None and all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in row):
                rows.append(row)
                where.append(i)
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            began = time.perf_counter()
            try:
                predictions = _predict(model, chunk)
            except (ModelError, ValueError, ArithmeticError) as exc:
                raise ReplayError(f"model {tier.name!r} failed to run: {exc}") from None
            if model is self.candidate:
                self._model_s += time.perf_counter() - began
                self._model_rows += len(chunk)
            self.model_runs += 1
            for i, prediction in zip(where[start:start + BATCH], predictions, strict=True):
                confidence = prediction.confidence
                if confidence is not None:
                    confidence = round(confidence, 6)
                if confidence is None or not confidence >= tier.floor:
                    answers[i] = (None, "low_confidence")
                else:
                    answers[i] = (Replayed("model", tier.name, prediction.label,
                                           action_for(prediction.label, labels), confidence), "")
        return answers

    def _report(self, read: int, skipped: Counter[str], results: Sequence[tuple[int, str, DecisionRecord, Replayed,
                list[str]]], elapsed: float) -> ReplayReport:
        confusion: dict[str, Counter[str]] = defaultdict(Counter)
        by_tier: Counter[str] = Counter()
        fallbacks: Counter[str] = Counter()
        same_label = same_action = 0
        changes: list[Change] = []
        changed = 0
        for seq, pipeline, body, answer, stepped in results:
            requested = body.governance.requested_action
            confusion[requested][answer.action] += 1
            by_tier[f"{answer.tier}:{answer.tier_name}"] += 1
            fallbacks.update(stepped)
            same_label += body.label == answer.label
            if requested == answer.action:
                same_action += 1
                continue
            changed += 1
            if len(changes) < self.max_changes:
                recorded = Replayed(body.tier, body.tier_name or body.tier, body.label, requested, body.confidence)
                changes.append(Change(seq, pipeline, recorded, answer))
        n = len(results)
        candidate = self.candidate
        return ReplayReport(
            candidate={"name": candidate.manifest.name, "version": candidate.manifest.version,
                       "sha256": candidate.sha256} if candidate is not None else {},
            records_read=read, replayed=n, skipped=dict(skipped),
            label_agreement=round(same_label / n, 4) if n else None,
            action_agreement=round(same_action / n, 4) if n else None,
            changed=changed, confusion={k: dict(v) for k, v in sorted(confusion.items())}, changes=changes,
            by_tier=dict(by_tier), fallbacks=dict(fallbacks), model_runs=self.model_runs,
            model_us_per_input=round(self._model_s / self._model_rows * 1e6, 3) if self._model_rows else None,
            elapsed_s=round(elapsed, 3),
        )


def _as_recorded(body: DecisionRecord, tier: _Tier, labels: Mapping[str, str]) -> tuple[Replayed | None, str]:
    """A cloud tier as it was recorded: its answer when it decided, its fallback when it stepped aside."""
    if body.tier == "cloud" and (body.tier_name or "cloud") == tier.name:
        return Replayed("cloud", tier.name, body.label, action_for(body.label, labels), body.confidence), ""
    for fallback in body.fallbacks:
        if fallback.tier == "cloud" and (fallback.tier_name or "cloud") == tier.name:
            return None, fallback.reason
    return None, "not_recorded"


def _predict(model: Model, rows: Sequence[Sequence[float]]) -> list[Any]:
    fixed = model.fixed_batch
    if not fixed:
        return model.predict(np.asarray(rows, dtype=np.float32))
    predictions: list[Any] = []
    for start in range(0, len(rows), fixed):
        chunk = list(rows[start:start + fixed])
        real = len(chunk)
        chunk += [chunk[-1]] * (fixed - real)  # a fixed batch dimension: padded, the padding dropped
        predictions += model.predict(np.asarray(chunk, dtype=np.float32))[:real]
    return predictions


def records_from_export(path: Path) -> Iterator[AuditRecord]:
    """The records of an `edge audit export` file (JSON lines of {device, seq, ts, kind, body, ...})."""
    encoder = msgspec.json.Encoder(order="sorted")
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    raw = msgspec.json.decode(line)
                    yield AuditRecord(device=str(raw["device"]), seq=int(raw["seq"]), ts=int(raw["ts"]),
                                      kind=str(raw["kind"]), body=msgspec.Raw(encoder.encode(raw["body"])),
                                      prev=str(raw.get("prev", "")), hash=str(raw.get("hash", "")))
                except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ReplayError(f"{path}:{number}: not an exported audit record ({exc})") from None
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc}") from None

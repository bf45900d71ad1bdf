"""Staged rollouts, the pure part: the record kept in KV, the canaries' choice, the gates.

A rollout takes one model version to one group in stages, and is driven by the operator's
command line (`edge fleet rollout`), never by a controller on the hub. Everything it does to the
devices goes through the fleet's desired state (`_desired`), so it needs nothing new from them:

    canary   the candidate as a SHADOW on a canary share of the group's online devices (a
             device-level desired value each); after a window, each canary's gates: shadow
             agreement, the share of decisions the candidate gave no answer for (error rate),
             the model's fallback rate, and enough decisions to judge
    rest     the candidate promoted on the canaries (device level), then ACTIVE for the whole
             group (the group's desired value, which devices offline now apply when they come
             back), the canaries' own values cleared; after a window, the same gates (but
             agreement: there is no shadow any more) on every device of the group that is online
    done     or, when a gate fails or a device cannot apply, `rolled_back`: every desired value
             the rollout wrote goes back to what it was, and a device left serving the candidate
             where no desired value names another version gets `model.rollback`

Why a rollout that stops anywhere can be continued or undone: the record (`Rollout`) says which
stage it reached and which desired values it wrote, and holds what they were before; every step
of a stage writes a desired value and waits for the devices' reports, so doing a stage again
writes the same intent again (a device already there runs nothing). `--resume` redoes the stage
the record names; `abort` rolls back from it. The record is written before each stage starts,
so a stage is never believed done when it was not.

Records live in their own KV bucket (`EDGE_ROLLOUTS`, one key per rollout), not in `EDGE_FLEET`:
devices never read them, and `EDGE_FLEET` holds only keys devices resolve. Each value is signed
like a desired value, in the same envelope, under its own tag (`edge-rollout-v1`, over the key),
so a record cannot pass for a command or a desired value, nor be moved to another key.

Measurements come from each device's `status` at the start and at the end of a window
(counters since start, so the window's figure is the difference; a counter that went back, a
restart or a new shadow, counts from zero).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from .._errors import CommandError
from ._desired import DeviceReport, ModelIntent, ModelVersion
from ._signing import seal, unseal

BUCKET = "EDGE_ROLLOUTS"
TAG_ROLLOUT = "edge-rollout-v1"
MAX_RECORD_BYTES = 256 * 1024
MAX_EVENTS = 200  # the oldest go first (the first, the upload, is kept)
MAX_PASSING_KEPT = 50  # devices whose passing gates a record keeps per stage (every failing one is kept)
ERROR_REASONS = frozenset({"error", "unavailable"})  # a model fallback that is a failure, not a judgement

Stage = Literal["canary", "rest", "done", "rolling_back", "rolled_back"]
State = Literal["running", "interrupted", "done", "rolled_back", "failed"]
GateName = Literal["applied", "answered", "decisions", "agreement", "error_rate", "fallback_rate"]


class Gates(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The bars a stage must clear on every device it measures."""

    window_s: float = 60.0
    min_agreement: float = 0.9
    max_fallback_rate: float = 0.2
    max_error_rate: float = 0.05
    min_decisions: int = 50
    apply_timeout_s: float = 120.0  # for a device to apply a desired value (fetch and warm-up included)


class Measure(msgspec.Struct, frozen=True):
    """One gate on one device: what was measured (None: nothing to measure) against its bar."""

    device: str
    gate: GateName
    value: float | None
    bar: float
    ok: bool
    note: str = ""


class Event(msgspec.Struct, frozen=True):
    ts: int  # unix ns, the operator's clock
    text: str


class Rollout(msgspec.Struct, kw_only=True):
    """A rollout as kept in KV: what, where, how far, and what to put back."""

    id: str
    group: str
    model: str
    artifact: ModelVersion  # the candidate as model.deploy fetches it (signed by the operator)
    gates: Gates
    canary: str  # as asked: a share ("0.2") or a count ("2")
    canaries: list[str] = []
    devices: list[str] = []  # the group's devices when it started (pinned ones left out)
    pinned: list[str] = []  # devices whose own desired value for the model wins: not rolled out to
    before: ModelIntent | None = None  # the group's desired value for the model before (None: none)
    before_devices: dict[str, ModelIntent | None] = {}  # each canary's resolved value before
    written: list[str] = []  # desired keys this rollout wrote (what a rollback puts back)
    stage: Stage = "canary"
    state: State = "running"
    failed_stage: str = ""  # the stage a rollback started from
    reason: str = ""  # why it was rolled back
    incomplete: list[str] = []  # what the rollback could not undo (state `failed`)
    measures: dict[str, list[Measure]] = {}  # stage -> the last window's gates
    pending: list[str] = []  # devices offline when the group's value was written: they apply it on return
    events: list[Event] = []
    by: str = ""
    started: int = 0
    updated: int = 0
    finished: int = 0

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def finished_ok(self) -> bool:
        return self.state == "done"

    def note(self, text: str) -> None:
        self.events.append(Event(time.time_ns(), text[:500]))
        if len(self.events) > MAX_EVENTS:
            del self.events[1]


_RECORD = msgspec.json.Decoder(Rollout)
_JSON = msgspec.json.Encoder()


def new_id(now_ns: int | None = None) -> str:
    """A rollout id that sorts by start time: `r20261201-153012-ab12` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime((time.time_ns() if now_ns is None else now_ns) / 1e9))
    return f"r{stamp}-{secrets.token_hex(2)}"


def check_id(rollout_id: str) -> str:
    if not (0 < len(rollout_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in rollout_id)):
        raise CommandError("bad_target", f"rollout id {rollout_id[:100]!r}: expected [A-Za-z0-9_-]{{1,64}}")
    return rollout_id


# ---------------------------------------------------------------------------------------------
# The record, signed


def encode_record(seed: bytes, rollout: Rollout) -> bytes:
    """The envelope that stores `rollout` under its id, signed with `seed`."""
    return seal(seed, TAG_ROLLOUT, rollout.id, _JSON.encode(rollout))


def read_record(key: str, data: bytes) -> tuple[Rollout, str]:
    """The rollout stored under `key` and who signed it; CommandError (`too_large`, `bad_value`,
    `unsigned`, `bad_signature`) when it is not one, checked before the record is decoded."""
    envelope = unseal(TAG_ROLLOUT, key, data, label=f"rollout {key[:100]}", max_bytes=MAX_RECORD_BYTES)
    try:
        rollout = _RECORD.decode(bytes(envelope.value))
    except msgspec.DecodeError as exc:
        raise CommandError("bad_value", f"rollout {key[:100]}: {str(exc)[:200]}") from None
    if rollout.id != key:
        raise CommandError("bad_value", f"rollout {key[:100]}: the record says it is {rollout.id[:100]}")
    return rollout, envelope.signer


# ---------------------------------------------------------------------------------------------
# Canaries


def parse_canary(text: str) -> float | int:
    """`--canary`: a share of the online devices (`0.2`, `20%`) or a count (`2`)."""
    spec = text.strip()
    try:
        if spec.endswith("%"):
            share = float(spec[:-1]) / 100
        elif spec.isdigit():
            count = int(spec)
            if count < 1:
                raise ValueError
            return count
        else:
            share = float(spec)
    except ValueError:
        raise CommandError("bad_target", f"--canary {text[:50]!r}: expected a share (0.2, 20%) or a count (2)"
                           ) from None
    if not 0 < share <= 1:
        raise CommandError("bad_target", f"--canary {text[:50]!r}: a share is more than 0 and at most 1")
    return share


def pick_canaries(online: Iterable[str], canary: float | int) -> list[str]:
    """The canaries among the online devices: a count, or a share rounded up (at least one), in
    device order (so a resumed or repeated rollout picks the same ones)."""
    devices = sorted(online)
    if not devices:
        return []
    count = canary if isinstance(canary, int) else max(1, math.ceil(canary * len(devices)))
    return devices[:min(count, len(devices))]


def group_members(reports: Mapping[str, tuple[DeviceReport, int]], group: str) -> list[str]:
    return sorted(device for device, (report, _) in reports.items() if group in report.groups)


# ---------------------------------------------------------------------------------------------
# Measuring


class Counts(msgspec.Struct, frozen=True):
    """A device's counters for the pipelines that use one model (since start)."""

    decisions: int = 0
    fallbacks: int = 0  # decisions where the model stepped aside, whatever the reason
    errors: int = 0  # ... because it failed or had no model
    compared: int = 0  # decisions a shadow candidate answered
    agreed: int = 0  # ... with the decision's label

    def since(self, before: Counts) -> Counts:
        """The window's figures: each counter's growth (from zero where it went back)."""
        def grew(after: int, start: int) -> int:
            return after - start if after >= start else after

        return Counts(decisions=grew(self.decisions, before.decisions),
                      fallbacks=grew(self.fallbacks, before.fallbacks), errors=grew(self.errors, before.errors),
                      compared=grew(self.compared, before.compared), agreed=grew(self.agreed, before.agreed))


def counts_of(status: Mapping[str, Any], model: str) -> Counts | None:
    """The counters of the pipelines that use `model`, from a device's `status`; None when none does."""
    decisions = fallbacks = errors = compared = agreed = 0
    found = False
    for pipeline in (status.get("pipelines") or {}).values():
        if not isinstance(pipeline, Mapping) or pipeline.get("model", model) != model:
            continue
        found = True
        decisions += int(pipeline.get("decisions") or 0)
        for key, count in (pipeline.get("fallbacks") or {}).items():
            tier, _, reason = str(key).partition(":")
            if tier == "model":
                fallbacks += int(count)
                errors += int(count) if reason in ERROR_REASONS else 0
        shadow = pipeline.get("shadow") or {}
        seen = int(shadow.get("compared") or 0)
        compared += seen
        agreement = shadow.get("agreement")
        agreed += int(shadow["agreed"]) if isinstance(shadow.get("agreed"), int) else \
            round(float(agreement) * seen) if isinstance(agreement, int | float) else 0
    return Counts(decisions, fallbacks, errors, compared, agreed) if found else None


def evaluate(stage: Literal["canary", "rest"], device: str, window: Counts | None, gates: Gates) -> list[Measure]:
    """The gates of one device over one window.

    canary: the candidate is a shadow, so `decisions` counts the decisions it answered, `agreement`
    is the share of those whose label it matched, and `error_rate` the share of decisions it gave
    no answer for (it failed, or had no model); `fallback_rate` is the device's own (the active
    model stepping aside), as it decides with the candidate beside it.
    rest: the candidate is active: `decisions`, `error_rate` (the model failed or was missing) and
    `fallback_rate` (it stepped aside, e.g. low confidence) are its own.
    """
    if window is None:
        return [Measure(device, "decisions", None, gates.min_decisions, False, "no pipeline uses the model")]
    decisions = window.decisions
    if stage == "canary":
        basis = window.compared
        agreement = window.agreed / window.compared if window.compared else None
        error = max(0, decisions - window.compared) / decisions if decisions else None
    else:
        basis, agreement = decisions, None
        error = window.errors / decisions if decisions else None
    fallback = window.fallbacks / decisions if decisions else None
    measures = [Measure(device, "decisions", float(basis), gates.min_decisions, basis >= gates.min_decisions)]
    if stage == "canary":
        measures.append(Measure(device, "agreement", _round(agreement), gates.min_agreement,
                                agreement is not None and agreement >= gates.min_agreement))
    measures.append(Measure(device, "error_rate", _round(error), gates.max_error_rate,
                            error is not None and error <= gates.max_error_rate))
    measures.append(Measure(device, "fallback_rate", _round(fallback), gates.max_fallback_rate,
                            fallback is not None and fallback <= gates.max_fallback_rate))
    return measures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def describe(measure: Measure) -> str:
    """One gate in words: `gw-1: agreement 0% (bar >= 90%)`."""
    text = f"{measure.device}: {gate_text(measure)}"
    return f"{text} ({measure.note})" if measure.note else text


def gate_text(measure: Measure) -> str:
    match measure.gate:
        case "decisions":
            value = "-" if measure.value is None else f"{measure.value:.0f}"
            return f"decisions {value} (bar >= {measure.bar:.0f})"
        case "agreement":
            return f"agreement {_percent(measure.value)} (bar >= {_percent(measure.bar)})"
        case "error_rate" | "fallback_rate":
            return f"{measure.gate.replace('_', ' ')} {_percent(measure.value)} (bar <= {_percent(measure.bar)})"
        case "applied" | "answered":
            return f"{measure.gate} {'yes' if measure.ok else 'no'}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}".replace(".0%", "%")


def failures(measures: Iterable[Measure]) -> list[str]:
    return [describe(m) for m in measures if not m.ok]


def kept(measures: list[Measure]) -> list[Measure]:
    """What a record keeps of one stage's gates: every device that failed one, and the first
    MAX_PASSING_KEPT of the others (so a record stays small for a group of thousands)."""
    failed = {m.device for m in measures if not m.ok}
    passing = sorted({m.device for m in measures} - failed)[:MAX_PASSING_KEPT]
    keep = failed | set(passing)
    return [m for m in measures if m.device in keep]


# ---------------------------------------------------------------------------------------------
# Progress


class Progress(msgspec.Struct, frozen=True):
    """How many of the group's devices run the candidate, from their reports."""

    on: list[str]  # report the version active
    off: list[str]  # report another (or none)
    missing: list[str]  # not seen for three heartbeats: they converge when they return

    @property
    def total(self) -> int:
        return len(self.on) + len(self.off)

    def text(self, version: str) -> str:
        return f"{len(self.on)}/{self.total} devices on {version}"


def progress(rollout: Rollout, reports: Mapping[str, tuple[DeviceReport, int]],
             missing: Iterable[str] = ()) -> Progress:
    """Every device of the group (as it reports now, or as it was at the start), pinned ones aside."""
    devices = (set(group_members(reports, rollout.group)) | set(rollout.devices)) - set(rollout.pinned)
    on: list[str] = []
    off: list[str] = []
    for device in sorted(devices):
        report = reports.get(device)
        serving = report[0].models.get(rollout.model) if report is not None else None
        (on if serving is not None and serving.active == rollout.version else off).append(device)
    return Progress(on=on, off=off, missing=sorted(set(missing) & devices))

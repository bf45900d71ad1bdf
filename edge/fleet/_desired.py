"""Desired state: the fleet's intent, kept where a device that was offline will find it.

A command reaches whoever is online; intent must reach everyone. So `edge fleet` writes each
group or `all` intent into the JetStream KV bucket `EDGE_FLEET` before it sends the command, and
every device follows the keys that concern it:

    all.<what>    group.<group>.<what>    device.<id>.<what>
    <what>        paused | config | model.<name>

The most specific key wins: a device's own key over its groups', a group's over `all`. Among
the device's groups (equally specific) the newest value wins, so the last thing an operator said
to any group the device is in is what it does. A key whose value is `null` (a signed "clear")
says nothing at its level: the device falls back to the less specific keys.

Each value is signed as a command (`edge-command-v1`) whose subject is the KV key, so a value
cannot be moved to another key (a group's pause written under another group) and still verify.
It travels in a small envelope, `{value, signer, timestamp, nonce, signature}`, not in message
headers: nats-py 2.16's `KeyValue.put` takes no headers and its entries carry none, so headers
would mean writing and watching below the KV API; the envelope is read whole by any KV tool
(`nats kv get EDGE_FLEET group.north.paused` shows who signed what), survives copies, and
`value` is kept as the exact bytes that were signed (`msgspec.Raw`), never re-encoded.

Trust and replay. A value counts only when signed by one of `fleet.trusted_keys`; an unsigned,
wrongly signed or malformed value (a deletion too: it carries no signature) is ignored, counted
and recorded, and the last good value of that key is kept. The command window (±5 min) cannot
apply: a desired value lives for months and is read again on every reconnect. Instead each key
has a high-water mark, the newest timestamp accepted for it (kept across restarts): an older
value written back under the same key (a captured one) is refused as `stale`.

This module is pure (no network, no runtime, no onnxruntime): key names, values, envelopes,
verification, resolution, the steps that bring a model to its desired versions, the device's
report and the operator's reading of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from .._config import DEVICE_ID
from .._errors import CommandError
from ._protocol import (
    Command,
    ConfigApply,
    ModelDeploy,
    ModelPromote,
    ModelRollback,
    Pause,
    Resume,
    _Bucket,
    _Name,
    _Sha256,
)
from ._signing import TAG_COMMAND, seal, unseal

BUCKET = "EDGE_FLEET"  # desired state: operators write, devices read
STATUS_BUCKET = "EDGE_FLEET_STATUS"  # reported state: each device writes its own `device.<id>`
MAX_VALUE_BYTES = 1024 * 1024  # a desired value (a config is the big one); larger is refused before decoding
MISSING_AFTER_HEARTBEATS = 3  # a device not seen for this many of its heartbeats is `missing`

Scope = Literal["all", "group", "device"]
_RANK: dict[str, int] = {"all": 0, "group": 1, "device": 2}


# ---------------------------------------------------------------------------------------------
# Values: what each <what> holds


class _Intent(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Unknown fields are refused, as in commands: a mistyped field in fleet intent must not be ignored.
    by: str = ""  # who asked (free text, audited beside the signer)


class PausedIntent(_Intent):
    paused: bool
    reason: str = ""


class ConfigIntent(_Intent):
    config: dict[str, Any]  # the same shape as the TOML file, as `config.apply` takes it


class ModelVersion(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One version of a model as `model.deploy` fetches it."""

    version: _Name
    bucket: _Bucket
    object: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    sha256: _Sha256
    signature: str = ""


class ModelIntent(_Intent):
    active: ModelVersion | None = None  # None: whatever the device serves
    shadow: ModelVersion | None = None  # None: no shadow candidate
    previous: ModelVersion | None = None  # the operator's memory, for a later `model.rollback`; devices ignore it


Intent = PausedIntent | ConfigIntent | ModelIntent
_INTENT_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(t | None) for kind, t in
    (("paused", PausedIntent), ("config", ConfigIntent), ("model", ModelIntent))
}


_JSON = msgspec.json.Encoder()


class Desired(msgspec.Struct, frozen=True):
    """One verified desired value: where it was, what it says (None: cleared), who signed it when."""

    key: str
    scope: Scope
    target: str  # "" for all, the group, or the device id
    what: str
    value: Intent | None
    signer: str
    timestamp: int

    @property
    def by(self) -> str:
        return (self.value.by if self.value is not None else "") or self.signer


# ---------------------------------------------------------------------------------------------
# Keys


def check_what(what: str) -> str:
    """`what` itself, when it is `paused`, `config` or `model.<name>`; CommandError `bad_key` otherwise."""
    if what in ("paused", "config"):
        return what
    name = what.removeprefix("model.")
    if name != what and _valid_name(name):
        return what
    raise CommandError("bad_key", f"{what[:100]!r}: expected paused, config or model.<name>")


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and name[0] != "." and ".." not in name and not name.endswith(".") \
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)


def desired_key(target: str, what: str) -> str:
    """The key of `what` for a target as the CLI names it: `all`, `group:<g>` or a device id."""
    check_what(what)
    if target == "all":
        return f"all.{what}"
    group = target.removeprefix("group:")
    if not DEVICE_ID.fullmatch(group) or (group == target and target == "group"):
        raise CommandError("bad_target", f"target {target[:100]!r}: expected a device id, group:<name> or all")
    return f"group.{group}.{what}" if group != target else f"device.{target}.{what}"


def parse_key(key: str) -> tuple[Scope, str, str]:
    """(scope, target, what) of a desired-state key; CommandError `bad_key` when it is not one."""
    head, _, rest = key.partition(".")
    if head == "all":
        return "all", "", check_what(rest)
    if head in ("group", "device"):
        target, _, what = rest.partition(".")
        if DEVICE_ID.fullmatch(target):
            return ("group" if head == "group" else "device"), target, check_what(what)
    raise CommandError("bad_key", f"{key[:100]!r} is not a desired-state key (all.<what>, group.<g>.<what>, "
                                  "device.<id>.<what>)")


def watch_subjects(device: str, groups: Sequence[str]) -> list[str]:
    """The key patterns that concern a device, in the bucket's own subjects (`$KV.EDGE_FLEET.…`)."""
    keys = ["all.>", *(f"group.{g}.>" for g in groups), f"device.{device}.>"]
    return [f"$KV.{BUCKET}.{k}" for k in keys]


def concerns(desired: Desired, device: str, groups: Sequence[str]) -> bool:
    return desired.scope == "all" or (desired.scope == "group" and desired.target in groups) \
        or (desired.scope == "device" and desired.target == device)


def resolve(values: Iterable[Desired], device: str, groups: Sequence[str]) -> dict[str, Desired]:
    """For each <what>, the value that applies to this device: the most specific key that says
    something (a cleared key says nothing), the newest among its groups."""
    best: dict[str, Desired] = {}
    for desired in values:
        if desired.value is None or not concerns(desired, device, groups):
            continue
        current = best.get(desired.what)
        if current is None or _outranks(desired, current, groups):
            best[desired.what] = desired
    return best


def _outranks(a: Desired, b: Desired, groups: Sequence[str]) -> bool:
    if _RANK[a.scope] != _RANK[b.scope]:
        return _RANK[a.scope] > _RANK[b.scope]
    if a.timestamp != b.timestamp:
        return a.timestamp > b.timestamp
    order = list(groups)
    return a.scope == "group" and order.index(a.target) < order.index(b.target)


# ---------------------------------------------------------------------------------------------
# Signing and verifying values


def encode_value(seed: bytes, key: str, value: Intent | None, *, timestamp_ns: int | None = None,
                 nonce: str | None = None) -> bytes:
    """The envelope that stores `value` (None: clear this key's level) under `key`, signed with `seed`
    (`edge-command-v1` over the key: a desired value says what a command would)."""
    parse_key(key)
    return seal(seed, TAG_COMMAND, key, _JSON.encode(value), timestamp_ns=timestamp_ns, nonce=nonce)


def read_value(key: str, data: bytes, trusted: Sequence[str] | None = None) -> Desired:
    """The desired value stored under `key`, its signature checked (by one of `trusted`, when given).

    CommandError codes: bad_key, too_large, bad_value, unsigned, unauthorized, bad_signature.
    The signature is checked before the value is decoded.
    """
    scope, target, what = parse_key(key)
    envelope = unseal(TAG_COMMAND, key, data, label=key, max_bytes=MAX_VALUE_BYTES, trusted=trusted)
    try:
        value = decode_intent(what, bytes(envelope.value))
    except CommandError as error:
        raise CommandError("bad_value", f"{key}: {error.message}") from None
    return Desired(key=key, scope=scope, target=target, what=what, value=value, signer=envelope.signer,
                   timestamp=int(envelope.timestamp))


def decode_intent(what: str, data: bytes | str) -> Intent | None:
    """The value of a <what> from JSON (`null`: cleared); CommandError `bad_value` names what is wrong."""
    kind = "model" if check_what(what).startswith("model.") else what
    try:
        value: Intent | None = _INTENT_DECODERS[kind].decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise CommandError("bad_value", f"{what}: {str(exc)[:200]}") from None
    return value


class DesiredVerifier:
    """Checks desired values against the trusted keys and each key's high-water mark (see the
    module docstring); `export`/`load` keep the marks across restarts."""

    def __init__(self) -> None:
        self._marks: dict[str, int] = {}

    def verify(self, key: str, data: bytes, trusted: Sequence[str]) -> Desired:
        """The verified value; CommandError (read_value's codes, and `stale`) otherwise."""
        desired = read_value(key, data, trusted)
        mark = self._marks.get(key, 0)
        if desired.timestamp < mark:
            raise CommandError("stale", f"{key}: signed {(mark - desired.timestamp) / 1e9:.0f}s before the value "
                                        "already accepted for this key (an old value written back)")
        self._marks[key] = desired.timestamp
        return desired

    def export(self) -> bytes:
        return _JSON.encode(self._marks)

    def load(self, data: bytes) -> None:
        try:
            self._marks = msgspec.json.decode(data, type=dict[str, int])
        except msgspec.DecodeError:
            self._marks = {}


# ---------------------------------------------------------------------------------------------
# The operator's side: the intent a command states


def next_intent(command: Command, current: Intent | None) -> tuple[str, Intent] | None:
    """(what, new value) that `command` makes the desired state at its target, given the value
    there now; None for verbs that state no intent (status, sync.now, ...) or when there is
    nothing to say (a promote with no desired shadow)."""
    model = current if isinstance(current, ModelIntent) else ModelIntent()
    match command:
        case Pause(reason=reason, by=by):
            return "paused", PausedIntent(paused=True, reason=reason, by=by)
        case Resume(reason=reason, by=by):
            return "paused", PausedIntent(paused=False, reason=reason, by=by)
        case ConfigApply(config=config, by=by):
            return "config", ConfigIntent(config=config, by=by)
        case ModelDeploy(name=name, mode=mode, by=by):
            version = ModelVersion(version=command.version, bucket=command.bucket, object=command.object,
                                   sha256=command.sha256, signature=command.signature)
            if mode == "shadow":
                return f"model.{name}", ModelIntent(active=model.active, shadow=version, previous=model.previous, by=by)
            return f"model.{name}", ModelIntent(active=version, shadow=model.shadow, previous=model.active, by=by)
        case ModelPromote(name=name, by=by):
            if model.shadow is None:
                return None
            return f"model.{name}", ModelIntent(active=model.shadow, previous=model.active, by=by)
        case ModelRollback(name=name, by=by):
            if model.shadow is not None:
                return f"model.{name}", ModelIntent(active=model.active, previous=model.previous, by=by)
            if model.previous is None:
                return None
            return f"model.{name}", ModelIntent(active=model.previous, previous=model.active, by=by)
        case _:
            return None


# ---------------------------------------------------------------------------------------------
# The device's side: the steps that reach a desired model


def model_steps(name: str, intent: ModelIntent, active: str | None,
                shadow: str | None) -> list[ModelDeploy | ModelPromote | ModelRollback]:
    """The model commands that take a device serving `active` (and `shadow`) to `intent`.

    The shadow candidate becoming active with no new shadow (a promote, by command or by a staged
    rollout) is a promote: the loaded candidate is swapped in, not loaded a second time."""
    steps: list[ModelDeploy | ModelPromote | ModelRollback] = []
    if intent.active is not None and intent.active.version == shadow != active and intent.shadow is None:
        return [ModelPromote(name=name, by=intent.by)]
    if intent.active is not None and intent.active.version != active:
        steps.append(_deploy(name, intent.active, "active"))
    if intent.shadow is not None:
        if intent.shadow.version != shadow:
            steps.append(_deploy(name, intent.shadow, "shadow"))
    elif shadow is not None:
        steps.append(ModelRollback(name=name, by=intent.by))  # with a shadow deployed, rollback drops it
    return steps


def _deploy(name: str, version: ModelVersion, mode: Literal["active", "shadow"]) -> ModelDeploy:
    return ModelDeploy(name=name, version=version.version, bucket=version.bucket, object=version.object,
                       sha256=version.sha256, signature=version.signature, mode=mode)


# ---------------------------------------------------------------------------------------------
# Reported state: what a device writes under `device.<id>` in EDGE_FLEET_STATUS


class Serving(msgspec.Struct, frozen=True, omit_defaults=True):
    active: str | None = None  # version
    shadow: str | None = None


class Applied(msgspec.Struct, frozen=True):
    """The desired value a device runs for one <what> (key and signing time identify it)."""

    key: str
    timestamp: int


class Divergence(msgspec.Struct, frozen=True):
    """A desired value the device could not apply, and why (it keeps its last good state)."""

    key: str
    timestamp: int
    code: str
    message: str


class DeviceReport(msgspec.Struct, kw_only=True):
    """What a device actually runs, as it says itself (wire: tolerates new fields)."""

    device: str
    groups: list[str] = []
    version: str = ""
    last_seen: int = 0  # unix ns, the device's clock
    heartbeat_s: float = 10.0
    paused: bool = False
    config_sha256: str = ""
    models: dict[str, Serving] = {}
    shadow_agreement: dict[str, float] = {}  # pipeline -> share of inputs the shadow agreed on
    applied: dict[str, Applied] = {}  # what -> the desired value it runs
    divergence: dict[str, Divergence] = {}  # what -> why it could not
    ignored: int = 0  # desired values refused (unsigned, wrongly signed, stale, malformed) since start
    ignored_last: str = ""  # the last one's reason


REPORT_DECODER = msgspec.json.Decoder(DeviceReport)


def serving_of(slots: Iterable[Mapping[str, Any]]) -> dict[str, Serving]:
    """Each model's active and shadow versions, from the registry's slots as `status` lists them
    (a shadow candidate has a slot of its own, `<name>.shadow`)."""
    models: dict[str, dict[str, str]] = {}
    for slot in slots:
        name, served = str(slot.get("name") or ""), slot.get("version")
        if not name or served is None:
            continue
        if name.endswith(".shadow"):
            models.setdefault(name.removesuffix(".shadow"), {})["shadow"] = str(served)
        else:
            models.setdefault(name, {})["active"] = str(served)
    return {name: Serving(active=m.get("active"), shadow=m.get("shadow")) for name, m in models.items()}


def shadow_agreement_of(pipelines: Mapping[str, Any]) -> dict[str, float]:
    """Each pipeline's shadow agreement, from `status` (only where a shadow was compared)."""
    agreement = {}
    for pipeline, stats in pipelines.items():
        value = ((stats or {}).get("shadow") or {}).get("agreement")
        if isinstance(value, int | float):
            agreement[pipeline] = float(value)
    return agreement


def report_key(device: str) -> str:
    return f"device.{device}"


def is_missing(report: DeviceReport, seen_ns: int, now_ns: int) -> bool:
    """Not seen for MISSING_AFTER_HEARTBEATS of its own heartbeats."""
    return now_ns - seen_ns > MISSING_AFTER_HEARTBEATS * report.heartbeat_s * 1e9


def divergence(report: DeviceReport, desired: Mapping[str, Desired]) -> list[str]:
    """How a device differs from the desired state that applies to it, one line per <what>:
    what it could not apply and why, or a desired value it has not applied (yet)."""
    lines = []
    for what in sorted(set(desired) | set(report.divergence)):
        failed = report.divergence.get(what)
        want = desired.get(what)
        if failed is not None and (want is None or (failed.key, failed.timestamp) == (want.key, want.timestamp)):
            lines.append(f"{what}: {failed.code}: {failed.message[:200]}")
        elif want is not None and report.applied.get(what) != Applied(want.key, want.timestamp):
            lines.append(f"{what}: {want.key} not applied yet")
    return lines


# ---------------------------------------------------------------------------------------------
# The operator's view: reported state beside live answers and the desired state


class DeviceView(msgspec.Struct, kw_only=True):
    """One device as `edge fleet ls` shows it."""

    device: str
    state: Literal["online", "missing", "silent"]  # silent: seen lately, but did not answer now
    groups: list[str]
    paused: bool | None
    models: dict[str, Serving]
    shadow_agreement: dict[str, float]
    last_seen: int | None  # unix ns (the hub's clock when the report was stored), None: never reported
    seen_ago_s: float | None
    heartbeat_s: float | None
    divergence: list[str]
    ignored: int = 0  # desired values the device refused (unsigned, wrongly signed, ...)


def view_fleet(reports: Mapping[str, tuple[DeviceReport, int]], desired: Iterable[Desired],
               live: Mapping[str, Mapping[str, Any]], now_ns: int) -> list[DeviceView]:
    """Every device that ever reported or answers now: missing ones (not seen for
    MISSING_AFTER_HEARTBEATS heartbeats), and how each differs from its desired state.

    `reports`: device -> (its last report, when it was stored); `live`: device -> its `status` now.
    """
    values = list(desired)
    views = []
    for device in sorted(reports.keys() | live.keys()):
        report, seen = reports.get(device, (None, None))
        status = live.get(device)
        groups = list(status.get("groups") or []) if status is not None else report.groups if report else []
        if status is not None:
            state: Literal["online", "missing", "silent"] = "online"
        else:
            assert report is not None and seen is not None
            state = "missing" if is_missing(report, seen, now_ns) else "silent"
        wanted = resolve(values, device, groups)
        if report is not None:
            lines = divergence(report, wanted)
        else:
            lines = [f"{what}: {d.key}: the device has not reported yet" for what, d in sorted(wanted.items())]
        if status is not None:
            paused: bool | None = bool(status.get("paused"))
            models = serving_of(status.get("models") or [])
            agreement = shadow_agreement_of(status.get("pipelines") or {})
        else:
            assert report is not None
            paused, models, agreement = report.paused, report.models, report.shadow_agreement
        views.append(DeviceView(
            device=device, state=state, groups=groups, paused=paused, models=models, shadow_agreement=agreement,
            last_seen=seen, seen_ago_s=round((now_ns - seen) / 1e9, 1) if seen is not None else None,
            heartbeat_s=report.heartbeat_s if report is not None else None, divergence=lines,
            ignored=report.ignored if report is not None else 0,
        ))
    return views

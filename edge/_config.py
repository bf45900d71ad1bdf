"""The configuration file (SPEC §4): TOML decoded into Structs, then checked as a whole.

Loading has two stages. msgspec decodes the TOML into `Config`, refusing unknown keys and wrong
types (it stops at the first structural problem). Then `check_config` walks the result and
collects *every* semantic problem — rule expressions, ladder order, `instead` chains, manifests
against inputs, subjects — each with its key path, so an operator fixes a file in one pass. A
config is either wholly valid or rejected; nothing here has side effects.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from models import ModelError, load_manifest

from ._codec import validation_issue
from ._config_keys import NOT_A_KEY, in_table, key_problems
from ._errors import ConfigError, Problem, quoted
from ._files import write_atomically
from ._rules import FIELD_TYPES, RuleSpec, check_guards, check_rules

DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")
_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|m|h|d)\s*")
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
NUMERIC_TYPES = ("float", "int")  # the input types a model can read
TIERS = ("model", "cloud", "rules")
TIER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TierRef(msgspec.Struct, frozen=True):
    """A ladder entry read: its kind (model, cloud, rules) and name. `"model"` names the pipeline's
    `model`, `"cloud"` its single `cloud` (name "cloud"), `"model:NAME"` and `"cloud:NAME"` their NAME."""

    kind: str
    name: str
    entry: str


def parse_tier(entry: str, model: str = "") -> TierRef | None:
    """A ladder entry as a TierRef (`model`: the pipeline's model, the name of a plain "model"), or
    None when it is not a tier at all."""
    if entry in TIERS:
        return TierRef(entry, model if entry == "model" else entry, entry)
    kind, sep, name = entry.partition(":")
    if sep and kind in ("model", "cloud") and TIER_NAME.fullmatch(name):
        return TierRef(kind, name, entry)
    return None
# Lower bounds for timing settings: below them a timer fires so often that it is a busy loop (a
# heartbeat every nanosecond floods the hub, a 0 ms probe spins), which no deployment wants.
MIN_HEARTBEAT_S = 0.1
MIN_TIMER_MS = 10  # link probes and breaker reset, approval timeouts, model warm-up
MAX_WARMUP_MS = 600_000
BUNDLED_CONFIG = Path(__file__).parent / "bundled" / "example.toml"
DEFAULT_DATA_DIR = "./var"
# Who may command the device, settle approvals, and which key it signs with: only the config FILE
# says so. A pushed config cannot change them, and the applied config kept in data_dir never
# holds them (a key removed from the file and a restart is a revocation).
TRUST_ROOTS = ("trusted_keys", "approver_keys", "allow_unsigned", "device_key")
FILE_ONLY = ("device_id", "data_dir", "nats", "audit")  # with the trust roots: never changed by a push
_SECRET_FIELDS = ("password", "token", "nkey_seed")
LEAF_SCHEME = "nats-leaf://"
JS_DOMAIN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TLS_SCHEMES = ("tls", "wss")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config tables: unknown keys are errors, not silently ignored typos."""


def _doc(meaning: str) -> msgspec.Meta:
    """A key's one-line meaning: what `edge config reference` prints and the config's JSON Schema says.

    Every config key has one (tests/test_reference.py checks), so the reference is generated from
    these Structs and cannot drift from what the loader accepts.
    """
    return msgspec.Meta(description=meaning)


class Tls(_Strict):
    """TLS for one connection (paths relative to the config file)."""

    ca: Annotated[str, _doc("CA certificate(s) that verify the server (PEM file)")] = ""
    cert: Annotated[str, _doc("client certificate (PEM file)")] = ""
    key: Annotated[str, _doc("the client certificate's private key (PEM file)")] = ""


class Auth(_Strict):
    """Credentials for one NATS connection, passed through to nats-py."""

    creds: Annotated[str, _doc("a NATS .creds file (JWT and seed)")] = ""
    nkey_seed: Annotated[str, _doc("a file holding an nkey seed: the connection's NATS identity")] = ""
    user: Annotated[str, _doc("user name (goes with password)")] = ""
    password: Annotated[str, _doc("password (goes with user); shown as ***")] = ""
    token: Annotated[str, _doc("an authentication token; shown as ***")] = ""
    tls: Annotated[Tls | None, _doc("TLS client settings {ca, cert, key}")] = None


class NatsConfig(_Strict):
    """The two connections: the local bus and upstream (the cloud)."""

    local: Annotated[str, _doc('the local bus: a nats:// URL, or "embedded" (start and supervise a nats-server)')
                     ] = "embedded"
    upstream: Annotated[str, _doc(
        "the cloud's NATS URL; empty: the same connection as local; nats-leaf://HOST:PORT: the embedded "
        "server joins the hub as a compressed leaf node and carries every upstream exchange")] = ""
    upstream_domain: Annotated[str, _doc(
        "the hub's JetStream domain (its jetstream.domain); required with nats-leaf://, where the embedded "
        "server has a JetStream domain of its own")] = ""
    embedded_port: Annotated[int, _doc("the embedded server's port; -1: any free port")] = 4222
    mqtt_port: Annotated[int, _doc(
        "the embedded server's MQTT listener (MQTT 3.1.1, on the same host and with the same authorization "
        "as its NATS port): topic sensors/p1/pump is subject sensors.p1.pump; 0: off; -1: any free port")] = 0
    local_auth: Annotated[Auth, _doc("credentials for the local bus")] = msgspec.field(default_factory=Auth)
    upstream_auth: Annotated[Auth, _doc("credentials for upstream")] = msgspec.field(default_factory=Auth)
    reply_prefixes: Annotated[list[str], _doc(
        "replies go only to subjects whose first token is one of these, or begins with one and '_'")
    ] = msgspec.field(default_factory=lambda: ["_INBOX"])
    allow_insecure: Annotated[bool, _doc(
        "allow a password or token to reach a non-loopback host without TLS")] = False

    @property
    def leaf(self) -> bool:
        """Leaf mode: the embedded server is a leaf node of the hub, the runtime talks only to it."""
        return self.upstream.strip().startswith(LEAF_SCHEME)

    @property
    def js_domain(self) -> str | None:
        """The domain every upstream JetStream context uses (None: the connection's own JetStream)."""
        return self.upstream_domain or None


class LinkConfig(_Strict):
    """How the cloud's reachability is judged."""

    probe_interval_ms: Annotated[int, _doc("milliseconds between two probes of the cloud")] = 1000
    probe_timeout_ms: Annotated[int, _doc("milliseconds a probe waits for an answer")] = 500
    probe_subject: Annotated[str, _doc(
        "the subject the probe asks; empty: the first pipeline's cloud subject, else a server round trip")] = ""
    breaker_failures: Annotated[int, _doc("consecutive failures that open the breaker")] = 3
    breaker_reset_ms: Annotated[int, _doc(
        "milliseconds the breaker stays open; then a probe is the trial (half-open)")] = 5000


class AuditConfig(_Strict):
    """The durable audit log and its sync to the upstream stream."""

    fsync: Annotated[Literal["always", "batch", "off"], _doc(
        "always: fsync every commit; batch: one fsync per commit_interval_ms; off: never")] = "batch"
    commit_interval_ms: Annotated[float, _doc("batch mode: milliseconds between two fsyncs")] = 2.0
    max_bytes: Annotated[str | int, _doc('the log\'s size limit ("3GiB", "500MB" or a number of bytes)')] = "3GiB"
    on_full: Annotated[Literal["drop_oldest", "block"], _doc(
        "with only unsynced records left: drop the oldest (a gap record says so), or block (act as instead)")
    ] = "drop_oldest"
    stream: Annotated[str, _doc("the upstream JetStream stream that receives the log")] = "EDGE_AUDIT"
    create_stream: Annotated[bool, _doc("create the stream when it is missing")] = False
    keep_synced: Annotated[str, _doc('how long synced records are kept for re-sending ("7d", "12h")')] = "7d"
    inputs: Annotated[Literal["full", "hash"], _doc(
        "full: a decision's record holds its decoded input (it can be decided again: edge replay); "
        "hash: only the input message's sha256")] = "full"
    sync_window: Annotated[int, _doc("publishes in flight to JetStream at once")] = 256
    sign_every: Annotated[int, _doc(
        "sign every Nth record upstream with the device key (and always the last of a burst)")] = 64
    stream_max_msg_size: Annotated[str | int, _doc(
        'a stream this device creates: the largest record it accepts ("1MiB")')] = "1MiB"
    stream_max_bytes: Annotated[str | int, _doc(
        'a stream this device creates: its size limit; past it new records are refused, kept locally ("1GiB")')
    ] = "1GiB"
    stream_replicas: Annotated[int, _doc("a stream this device creates: its replicas on a clustered hub (1..5)")] = 1


class ValueConfig(_Strict):
    """What `edge report` prices."""

    cloud_call_cost: Annotated[float, _doc("the price of one cloud call: edge report prices the calls avoided")
                               ] = 0.0
    currency: Annotated[str, _doc('the price\'s currency, as shown ("EUR", "USD")')] = ""


class FleetConfig(_Strict):
    """Fleet commands, approvals and the device's own key."""

    heartbeat_s: Annotated[float, _doc("seconds between two heartbeats")] = 10.0
    trusted_keys: Annotated[list[str], _doc(
        "operators' public nkeys ('U...'): who may command the device and deploy models")
    ] = msgspec.field(default_factory=list)
    approver_keys: Annotated[list[str], _doc("approvers' public nkeys: whose signed answers settle approvals")
                             ] = msgspec.field(default_factory=list)
    allow_unsigned: Annotated[bool, _doc(
        "accept unsigned commands and approvals (labs and demos only; warned and audited)")] = False
    device_key: Annotated[str, _doc(
        "the device's nkey seed file; empty: data_dir/device.nk, made on first start")] = ""


class ModelConfig(_Strict):
    """One model pipelines may run."""

    name: Annotated[str, _doc("the name pipelines' model and shadow use")]
    path: Annotated[str, _doc("a folder holding the model file and manifest.toml")]
    max_batch: Annotated[int, _doc("most inputs in one model call (1..4096)")] = 64
    max_wait_us: Annotated[int, _doc("microseconds a batch waits to fill")] = 500
    # SPEC's `models.warmup_timeout_ms`, per model (`models` is the list of model tables).
    warmup_timeout_ms: Annotated[int, _doc("milliseconds the warm-up run may take; longer is refused "
                                           "(warmup_timeout)")] = 5000
    min_confidence: Annotated[float | None, _doc(
        "its tier's confidence floor (model:NAME in a ladder); unset: the pipeline's min_confidence")] = None


class CloudConfig(_Strict):
    """A cloud model asked over NATS."""

    subject: Annotated[str, _doc("the upstream subject of its requests")]
    timeout_ms: Annotated[int, _doc("milliseconds a decision waits for its answer")] = 200
    min_confidence: Annotated[float | None, _doc(
        "its answers' confidence floor; unset: the pipeline's min_confidence")] = None


class ActionPolicy(_Strict):
    """What it takes for a pipeline to perform one action."""

    approval: Annotated[Literal["none", "required"], _doc("required: a human approves each one")] = "none"
    approval_timeout_ms: Annotated[int, _doc("milliseconds to wait for an approver")] = 30000
    instead: Annotated[str, _doc(
        "the action taken when this one is not allowed (denied, rate-limited, paused); empty: none")] = ""
    rate_limit: Annotated[str, _doc('at most this many ("3/h", "10/s"); empty: no limit')] = ""
    min_confidence: Annotated[float | None, _doc(
        "a stricter bar when a model or the cloud chose it; unset: the pipeline's")] = None
    tiers: Annotated[list[str], _doc("the tiers that may choose it (model, cloud, rules, guard); empty: any")
                     ] = msgspec.field(default_factory=list)


class PipelineConfig(_Strict):
    """One decision flow: input subjects, ladder, governance, decision."""

    name: Annotated[str, _doc("the pipeline's name, in its subjects and records")]
    subscribe: Annotated[list[str], _doc("the local subjects of its inputs (wildcards allowed)")]
    input: Annotated[dict[str, str], _doc(
        'the input\'s fields: name = "float", "int", "str" or "bool" (with "?" when optional)')]
    rules: Annotated[list[RuleSpec], _doc("tried in order; the last one is the default")]
    guards: Annotated[list[RuleSpec], _doc("hard limits, checked before any tier; no default")
                      ] = msgspec.field(default_factory=list)
    queue_group: Annotated[str, _doc("a queue group: several runtimes share the inputs")] = ""
    ladder: Annotated[list[str], _doc(
        "the tiers asked in order: model, cloud, model:NAME (a model of [[models]]), cloud:NAME (of clouds), "
        "rules (always last)")] = msgspec.field(default_factory=lambda: ["model", "cloud", "rules"])
    model: Annotated[str, _doc("the model (of [[models]]) the model tier runs")] = ""
    shadow: Annotated[str, _doc("a candidate model run beside, recorded, never acted on")] = ""
    cloud: Annotated[CloudConfig | None, _doc("the cloud tier {subject, timeout_ms}")] = None
    clouds: Annotated[dict[str, CloudConfig], _doc(
        "named cloud providers {subject, timeout_ms, min_confidence}, for cloud:NAME in the ladder")
    ] = msgspec.field(default_factory=dict)
    race: Annotated[list[str], _doc(
        'consecutive cloud tiers of the ladder asked at once ("cloud:a", "cloud:b"): the first acceptable '
        "answer decides")] = msgspec.field(default_factory=list)
    cross_check: Annotated[str, _doc(
        'a second opinion asked after the deciding tier: "rules" or "model:NAME"; empty: none')
    ] = ""
    on_disagreement: Annotated[Literal["record", "approval", "instead"], _doc(
        "when the cross-check's action differs: record it, ask a human (approval), or take the action's "
        "instead")] = "record"
    min_confidence: Annotated[float, _doc(
        "a model's or the cloud's answer below this falls through to the next tier")] = 0.8
    labels: Annotated[dict[str, str], _doc("model or cloud label -> action; an unlisted label is its own action")
                      ] = msgspec.field(default_factory=dict)
    publish: Annotated[str, _doc("the subject of its decisions ({device} and {pipeline} are filled in)")
                       ] = "edge.{device}.decision.{pipeline}"
    actions: Annotated[dict[str, ActionPolicy], _doc("a policy per action name")] = msgspec.field(default_factory=dict)
    max_input_bytes: Annotated[int, _doc("larger inputs are rejected (too_large)")] = 64 * 1024
    max_pending_approvals: Annotated[int, _doc(
        "approvals waiting at once; beyond, the instead action (approval_backlog)")] = 256


class Config(_Strict):
    """A device's configuration file."""

    pipelines: Annotated[list[PipelineConfig], _doc("the decision flows (at least one)")]
    device_id: Annotated[str, _doc("the device's name; env EDGE_DEVICE_ID overrides; empty: the hostname")] = ""
    groups: Annotated[list[str], _doc("the groups whose commands the device receives")
                      ] = msgspec.field(default_factory=list)
    data_dir: Annotated[str, _doc(
        "audit log, applied config, model store; left at ./var, $STATE_DIRECTORY when set (systemd)")] = "./var"
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _doc(
        "the log level of edge run (--log-level wins)")] = "info"
    nats: Annotated[NatsConfig, _doc("the connections")] = msgspec.field(default_factory=NatsConfig)
    link: Annotated[LinkConfig, _doc("how the cloud's reachability is judged")
                    ] = msgspec.field(default_factory=LinkConfig)
    audit: Annotated[AuditConfig, _doc("the audit log and its sync")] = msgspec.field(default_factory=AuditConfig)
    value: Annotated[ValueConfig, _doc("what edge report prices")] = msgspec.field(default_factory=ValueConfig)
    fleet: Annotated[FleetConfig, _doc("fleet commands, approvals, the device's key")
                     ] = msgspec.field(default_factory=FleetConfig)
    models: Annotated[list[ModelConfig], _doc("the models pipelines may run")] = msgspec.field(default_factory=list)
    # Not a key: the folder relative paths are resolved against (set by the loader, refused in a file:
    # where relative paths start is the file's folder, never the file's say).
    base_dir: Annotated[str, NOT_A_KEY] = ""

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir or ".") / p

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


# ---------------------------------------------------------------------------------------------
# Units


def parse_size(value: str | int) -> int:
    """`"1GiB"`, `"500MB"`, `1048576` → bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be a positive number of bytes")
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"expected a size such as '1GiB' or '500MB', got {value!r}")
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str) -> float:
    """`"7d"`, `"90s"`, `"250ms"` → seconds."""
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f"expected a duration such as '7d', '12h', '90s' or '250ms', got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_rate(value: str) -> tuple[int, float]:
    """`"3/h"` → (3 events, 3600 seconds)."""
    match = _RATE.fullmatch(value)
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"expected a rate such as '3/h' or '10/s', got {value!r}")
    return int(match.group(1)), _SECONDS[match.group(2)]


# ---------------------------------------------------------------------------------------------
# Loading


def default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return name or "edge"


def decode_config(data: Mapping[str, Any], *, source: str = "", base_dir: Path | None = None,
                  env: Mapping[str, str] | None = None) -> Config:
    """Decode and check a config given as a mapping (a parsed TOML file or a pushed config).

    Every problem at once: first every unknown, missing or mistyped key (`key_problems`); then, when
    the data without those keys still decodes, the semantic checks, leaving out problems with keys
    beside a bad one (such a problem may only be its consequence: `model` judged on its default
    because the file says `modle`).
    """
    keys = key_problems(data, Config)
    try:
        config = msgspec.convert(keys.cleaned, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(keys.problems or [_problem_from_msgspec(str(exc))], source) from None
    env = os.environ if env is None else env
    updates: dict[str, Any] = {"base_dir": str(base_dir) if base_dir is not None else config.base_dir}
    if env.get("EDGE_DEVICE_ID"):
        updates["device_id"] = env["EDGE_DEVICE_ID"]
    elif not config.device_id:
        updates["device_id"] = default_device_id()
    config = msgspec.structs.replace(config, **updates)
    semantic = [p for p in check_config(config) if not any(in_table(p.path, table) for table in keys.tables)]
    problems = [*keys.problems, *semantic]
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, decode and check a TOML config file (the bundled example when `path` is None)."""
    if path is None:
        # The bundled example lives inside the package: its data goes to ./var of the working
        # directory (or systemd's state directory), never next to the installed file.
        bundled = load_config(BUNDLED_CONFIG, env=env)
        if bundled.data_dir != DEFAULT_DATA_DIR:
            return bundled
        return msgspec.structs.replace(bundled, data_dir=str(Path.cwd() / "var"))
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read the file: {exc.strerror or exc}")], source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("", f"not valid TOML: {exc}")], source) from None
    config = decode_config(data, source=source, base_dir=path.resolve().parent, env=env)
    return _in_state_directory(config, os.environ if env is None else env)


def _in_state_directory(config: Config, env: Mapping[str, str]) -> Config:
    """Under systemd (StateDirectory=), data goes to `$STATE_DIRECTORY` unless the file names a data_dir."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]  # systemd lists one per StateDirectory= entry
    if not state or config.data_dir != DEFAULT_DATA_DIR:
        return config
    return msgspec.structs.replace(config, data_dir=state)


def encode_config(config: Config, *, redact: bool = True) -> dict[str, Any]:
    """The config as plain data (for `config.get`); when `redact`, secrets are replaced by "***" and
    URLs lose their user info, so nothing secret is shown or hashed."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    data.pop("base_dir", None)
    if redact:
        nats = data["nats"]
        for key in ("local", "upstream"):
            nats[key] = redact_url(nats[key])
        for key in ("local_auth", "upstream_auth"):
            auth = nats[key]
            for secret in _SECRET_FIELDS:
                if auth.get(secret):
                    auth[secret] = "***"
    return data


def redact_url(url: str) -> str:
    """A NATS URL (or a comma-separated list of them) as it may be shown: without user info.

    `nats://user:pass@hub:4222` → `nats://hub:4222`. Everything up to the last "@" goes, so a
    password that itself holds "@" or "/" is not half shown.
    """
    shown = []
    for part in url.split(","):
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = "", part
        if "@" in rest:
            rest = rest.rpartition("@")[2]
        shown.append(f"{scheme}{sep}{rest}")
    return ",".join(shown)


def config_to_toml(data: Mapping[str, Any]) -> str:
    """A config given as data written as TOML: top-level keys with inline tables (`edge run -c` reads it)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return msgspec.json.encode(v).decode()
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{msgspec.json.encode(str(k)).decode()} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    return "".join(f"{key} = {value(v)}\n" for key, v in data.items())


def config_sha256(config: Config) -> str:
    """A fingerprint of a config's content (what operators compare across a fleet).

    Of the redacted config: a digest of the secrets would let anyone who sees the redacted
    config and the digest test guesses of a password offline.
    """
    return hashlib.sha256(msgspec.json.encode(encode_config(config, redact=True), order="sorted")).hexdigest()


def with_file_only(data: Mapping[str, Any], file: Config) -> dict[str, Any]:
    """Config data with what only the config file may say taken from `file`: device_id, data_dir,
    the connections (`nats`, secrets included), `audit` and the fleet's trust roots."""
    current = encode_config(file, redact=False)
    merged = {**data, **{key: current[key] for key in FILE_ONLY}}
    fleet = data.get("fleet")
    merged["fleet"] = {**(fleet if isinstance(fleet, Mapping) else {}),
                       **{key: current["fleet"][key] for key in TRUST_ROOTS}}
    return merged


def write_persisted_config(path: Path, config: Config) -> None:
    """Keep a config in `data_dir` so a restart comes back with it (written atomically, 0600).

    Without `nats` and the fleet's trust roots: connection secrets and trust come from the config
    file only (`read_persisted_config` takes them from it), so they are never copied to disk and a
    key removed from the file stays removed after a restart.
    """
    content = encode_config(config, redact=False)
    del content["nats"]
    for key in TRUST_ROOTS:
        del content["fleet"][key]
    write_atomically(path, msgspec.json.encode({"base_dir": config.base_dir, "config": content}))


def read_persisted_config(path: Path, file: Config) -> Config:
    """A config written by `write_persisted_config`, completed from the config `file` (see
    `with_file_only`) and checked again as if it were new."""
    try:
        data = msgspec.json.decode(path.read_bytes())
        content = with_file_only(data["config"], file)
    except (OSError, msgspec.DecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError([Problem("", f"cannot read the persisted config: {exc}")], str(path)) from None
    base = Path(data.get("base_dir") or ".")
    return decode_config(content, source=str(path), base_dir=base, env={})


def check_pushed_models(new: Config, running: Config) -> Iterator[Problem]:
    """Model folders a config from outside (`config.apply`, the applied config kept in data_dir) may
    name: the folder the running config already names for that model, or one inside data_dir's model
    store, where `model.deploy` puts only what it verified (and keeps the signature to check again).
    Anything else (an absolute path elsewhere, a `..` escape, a link out of the store) is a problem."""
    store = (running.resolve(running.data_dir) / "models").resolve()
    for i, model in enumerate(new.models):
        before = running.model(model.name)
        folder = new.resolve(model.path)
        if before is not None and running.resolve(before.path) == folder:
            continue
        where = f"models[{i}].path"
        if ".." in Path(model.path).parts:
            yield Problem(where, f"{quoted(model.path)}: '..' is not allowed in a model path pushed to a device")
        elif not folder.resolve().is_relative_to(store):
            yield Problem(where, f"{quoted(model.path)} is outside this device's model store ({store}): a pushed "
                                 "config may name a folder that model.deploy put there, or the model's current path")


def connect_options(auth: Auth, base: Path) -> dict[str, Any]:
    """nats-py connect() keyword arguments for one connection's credentials (paths relative to `base`).

    The one recipe for the runtime's connections and the operator's command line.
    """
    options: dict[str, Any] = {}
    if auth.creds:
        options["user_credentials"] = str(base / auth.creds)
    if auth.nkey_seed:
        options["nkeys_seed"] = str(base / auth.nkey_seed)
    if auth.user:
        options["user"], options["password"] = auth.user, auth.password
    if auth.token:
        options["token"] = auth.token
    if auth.tls is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(base / auth.tls.ca) if auth.tls.ca else None)
        if auth.tls.cert:
            context.load_cert_chain(str(base / auth.tls.cert), str(base / auth.tls.key) if auth.tls.key else None)
        options["tls"] = context
    return options


def _problem_from_msgspec(message: str) -> Problem:
    issue = validation_issue(message)
    if not issue.located:
        return Problem("", message)
    if issue.unknown:
        return Problem(f"{issue.path}.{issue.unknown}" if issue.path else issue.unknown, "unknown key")
    if issue.missing:
        return Problem(f"{issue.path}.{issue.missing}" if issue.path else issue.missing, "required key is missing")
    return Problem(issue.path, issue.message or message)


# ---------------------------------------------------------------------------------------------
# Semantic checks: each yields every problem it finds


def check_config(config: Config) -> Iterator[Problem]:
    if not DEVICE_ID.fullmatch(config.device_id) or config.device_id in ("all", "group"):
        yield Problem("device_id", f"expected [A-Za-z0-9_-]{{1,64}}, not 'all' or 'group'; got {config.device_id!r}")
    for i, group in enumerate(config.groups):
        if not DEVICE_ID.fullmatch(group):
            yield Problem(f"groups[{i}]", f"expected [A-Za-z0-9_-]{{1,64}}, got {group!r}")
    yield from _check_nats(config.nats, config.device_id)
    yield from _check_link(config.link)
    yield from _check_audit(config.audit)
    if not (math.isfinite(config.fleet.heartbeat_s) and config.fleet.heartbeat_s >= MIN_HEARTBEAT_S):
        yield Problem("fleet.heartbeat_s", f"expected at least {MIN_HEARTBEAT_S} seconds")
    for i, key in enumerate(config.fleet.trusted_keys):
        if not (key.startswith("U") and len(key) == 56):
            yield Problem(f"fleet.trusted_keys[{i}]", "expected an operator's public nkey (56 characters, 'U...')")
    names: set[str] = set()
    model_features: dict[str, list[str]] = {}
    for i, model in enumerate(config.models):
        where = f"models[{i}]"
        if model.name in names:
            yield Problem(f"{where}.name", f"duplicate model name {model.name!r}")
        names.add(model.name)
        if not 1 <= model.max_batch <= 4096:
            yield Problem(f"{where}.max_batch", "expected 1..4096")
        if not 0 <= model.max_wait_us <= 1_000_000:
            yield Problem(f"{where}.max_wait_us", "expected 0..1000000 microseconds")
        if not MIN_TIMER_MS <= model.warmup_timeout_ms <= MAX_WARMUP_MS:
            yield Problem(f"{where}.warmup_timeout_ms", f"expected {MIN_TIMER_MS}..{MAX_WARMUP_MS} milliseconds")
        try:
            manifest = load_manifest(config.resolve(model.path))
        except ModelError as exc:
            yield Problem(f"{where}.path", f"bad model at {config.resolve(model.path)}: {exc}")
        else:
            model_features[model.name] = list(manifest.features)
    pipeline_names: set[str] = set()
    if not config.pipelines:
        yield Problem("pipelines", "expected at least one pipeline")
    for i, pipeline in enumerate(config.pipelines):
        if pipeline.name in pipeline_names:
            yield Problem(f"pipelines[{i}].name", f"duplicate pipeline name {pipeline.name!r}")
        pipeline_names.add(pipeline.name)
        yield from check_pipeline(pipeline, f"pipelines[{i}]", model_features, device=config.device_id)


def _check_nats(nats: NatsConfig, device_id: str = "") -> Iterator[Problem]:
    # URLs are quoted redacted: a problem is printed, returned and audited.
    if nats.local != "embedded" and not _is_nats_url(nats.local):
        yield Problem("nats.local", f"expected 'embedded' or a nats:// URL, got {redact_url(nats.local)!r}")
    if nats.upstream_domain and not JS_DOMAIN.fullmatch(nats.upstream_domain):
        yield Problem("nats.upstream_domain", "expected a JetStream domain of 1 to 64 characters from "
                                              f"A-Z a-z 0-9 _ -, got {nats.upstream_domain!r}")
    if nats.leaf:
        yield from _check_leaf(nats, device_id)
    elif nats.upstream and not _is_nats_url(nats.upstream):
        yield Problem("nats.upstream", "expected a nats:// or nats-leaf:// URL (or empty for the local connection), "
                                       f"got {redact_url(nats.upstream)!r}")
    if not nats.allow_insecure:
        for key, url, credentials in (("local", nats.local, nats.local_auth),
                                      ("upstream", nats.upstream, nats.upstream_auth)):
            exposed = _plaintext_secret_hosts(url, credentials) if url != "embedded" else []
            if exposed:
                yield Problem(f"nats.{key}", f"a password or token would cross the network in the clear to "
                                             f"{', '.join(exposed)}: use tls:// (or nats.{key}_auth.tls), or set "
                                             "nats.allow_insecure = true")
    if not (nats.embedded_port == -1 or 1 <= nats.embedded_port <= 65535):
        yield Problem("nats.embedded_port", "expected a port 1..65535, or -1 for any free port")
    if not (nats.mqtt_port in (0, -1) or 1 <= nats.mqtt_port <= 65535):
        yield Problem("nats.mqtt_port", "expected a port 1..65535, -1 for any free port, or 0 for no MQTT listener")
    elif nats.mqtt_port and nats.local != "embedded":
        yield Problem("nats.mqtt_port", 'an MQTT listener is the embedded server\'s: expected nats.local = "embedded" '
                                        "(a server of your own takes MQTT in its own config: an mqtt block)")
    elif nats.mqtt_port > 0 and nats.mqtt_port == nats.embedded_port:
        yield Problem("nats.mqtt_port", f"the embedded server's NATS port is {nats.embedded_port} too: "
                                        "expected another port")
    for key in ("local_auth", "upstream_auth"):
        auth: Auth = getattr(nats, key)
        if bool(auth.user) != bool(auth.password):
            yield Problem(f"nats.{key}", "user and password go together")


def local_jetstream_domain(device_id: str) -> str:
    """The embedded server's own JetStream domain in leaf mode: one per device, so that no two
    leaf nodes and the hub share a domain (a shared one would answer `$JS.API` from either side)."""
    return f"edge-{device_id}"


def _check_leaf(nats: NatsConfig, device_id: str) -> Iterator[Problem]:
    urls = [u.strip() for u in nats.upstream.split(",")]
    if not all(re.fullmatch(r"nats-leaf://[^\s/]+", u) for u in urls):
        yield Problem("nats.upstream", "expected nats-leaf://HOST:PORT (comma-separated for several hub servers), "
                                       f"got {redact_url(nats.upstream)!r}")
    if nats.local != "embedded":
        yield Problem("nats.local", 'expected "embedded" with a nats-leaf:// upstream: only a server this device '
                                    f"starts can be made a leaf node of the hub, got {redact_url(nats.local)!r}")
    if not nats.upstream_domain:
        yield Problem("nats.upstream_domain", "required with a nats-leaf:// upstream: the hub's JetStream domain "
                                              "(its `jetstream { domain }`); without it `$JS.API` requests would "
                                              "be answered by the embedded server's own JetStream, not the hub's")
    elif nats.upstream_domain == local_jetstream_domain(device_id):
        yield Problem("nats.upstream_domain", f"{nats.upstream_domain!r} is this device's own JetStream domain "
                                              "in leaf mode: name the hub's")
    auth = nats.upstream_auth
    if auth.token:
        yield Problem("nats.upstream_auth.token", "a leaf node cannot log in with a token: use nkey_seed, creds, "
                                                  "or user and password")
    if sum(bool(x) for x in (auth.nkey_seed, auth.creds, auth.user)) > 1:
        yield Problem("nats.upstream_auth", "a leaf node logs in one way: nkey_seed, creds, or user and password")
    if auth.tls is not None and bool(auth.tls.cert) != bool(auth.tls.key):
        yield Problem("nats.upstream_auth.tls", "cert and key go together for a leaf node")


def _is_nats_url(url: str) -> bool:
    return all(re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+", u.strip()) for u in url.split(",")) and bool(url)


def _plaintext_secret_hosts(url: str, auth: Auth) -> list[str]:
    """The non-loopback hosts of `url` that would be sent a password or token without TLS.

    A secret is a password or token in the URL's user info (a user alone is a token to nats-py)
    or in `auth`; nkeys and creds answer a challenge and send nothing reusable.
    """
    if not url or auth.tls is not None:
        return []
    hosts = []
    for part in url.split(","):
        try:
            split = urlsplit(part.strip())
            host = split.hostname or ""
        except ValueError:
            continue  # malformed: reported as such by the URL check
        secret = "@" in split.netloc or bool(auth.password or auth.token)
        if secret and split.scheme not in _TLS_SCHEMES and not _is_loopback(host):
            hosts.append(host)
    return hosts


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_link(link: LinkConfig) -> Iterator[Problem]:
    for key in ("probe_interval_ms", "probe_timeout_ms", "breaker_reset_ms"):
        if getattr(link, key) < MIN_TIMER_MS:
            yield Problem(f"link.{key}", f"expected at least {MIN_TIMER_MS} milliseconds")
    if link.breaker_failures < 1:
        yield Problem("link.breaker_failures", "expected at least 1")
    if link.probe_subject and not valid_subject(link.probe_subject, wildcards=False):
        yield Problem("link.probe_subject", f"malformed subject {link.probe_subject!r}")


def _check_audit(audit: AuditConfig) -> Iterator[Problem]:
    try:
        parse_size(audit.max_bytes)
    except ValueError as exc:
        yield Problem("audit.max_bytes", str(exc))
    try:
        parse_duration(audit.keep_synced)
    except ValueError as exc:
        yield Problem("audit.keep_synced", str(exc))
    if not 0 <= audit.commit_interval_ms <= 1000:
        yield Problem("audit.commit_interval_ms", "expected 0..1000 milliseconds")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", audit.stream):
        yield Problem("audit.stream", f"expected a JetStream stream name ([A-Za-z0-9_-]), got {audit.stream!r}")
    if not 1 <= audit.sync_window <= 65536:
        yield Problem("audit.sync_window", "expected 1..65536")
    if not 1 <= audit.sign_every <= 1_000_000:
        yield Problem("audit.sign_every", "expected 1..1000000")
    for key in ("stream_max_msg_size", "stream_max_bytes"):
        try:
            if parse_size(getattr(audit, key)) < 1024:
                yield Problem(f"audit.{key}", "expected at least 1KiB")
        except ValueError as exc:
            yield Problem(f"audit.{key}", str(exc))
    if not 1 <= audit.stream_replicas <= 5:
        yield Problem("audit.stream_replicas", "expected 1..5")


def valid_subject(subject: str, *, wildcards: bool) -> bool:
    """A NATS subject: dot-separated non-empty tokens; `*` and a final `>` only when `wildcards`."""
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if wildcards and (token == "*" or (token == ">" and i == len(tokens) - 1)):
            continue
        if not _SUBJECT_TOKEN.fullmatch(token):
            return False
    return True


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both patterns (`*` one token, a final `>` one or more)."""
    left, right = a.split("."), b.split(".")
    for i in range(max(len(left), len(right))):
        if i == len(left) or i == len(right):
            return False  # one ran out of tokens while the other still needs one
        x, y = left[i], right[i]
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return True


def check_pipeline(p: PipelineConfig, where: str, model_features: Mapping[str, list[str]], *,
                   device: str = "*") -> Iterator[Problem]:
    """Every problem with one pipeline, each with its key path under `where`."""
    if not DEVICE_ID.fullmatch(p.name):
        yield Problem(f"{where}.name", f"expected [A-Za-z0-9_-]{{1,64}}, got {p.name!r}")
    if not p.subscribe:
        yield Problem(f"{where}.subscribe", "expected at least one subject")
    # The device's own output (decisions, rejections, approvals, heartbeats, commands): a pipeline
    # hearing it would decide on its own decisions, in a loop.
    own = f"edge.{device or '*'}.>"
    try:
        publish = p.publish.format(device=device or "*", pipeline=p.name)
    except (KeyError, IndexError, ValueError):
        publish = ""  # reported below
    for i, subject in enumerate(p.subscribe):
        if not valid_subject(subject, wildcards=True):
            yield Problem(f"{where}.subscribe[{i}]", f"malformed subject {quoted(subject)}")
        elif subjects_overlap(subject, own):
            yield Problem(f"{where}.subscribe[{i}]", f"{quoted(subject)} overlaps the device's own subjects "
                                                     f"({own}): the pipeline would hear its own output")
        elif publish and valid_subject(publish, wildcards=True) and subjects_overlap(subject, publish):
            yield Problem(f"{where}.subscribe[{i}]", f"{quoted(subject)} overlaps the pipeline's publish subject "
                                                     f"{quoted(publish)}: it would decide on its own decisions")
    if p.queue_group and not re.fullmatch(r"[A-Za-z0-9_.-]+", p.queue_group):
        yield Problem(f"{where}.queue_group", f"malformed queue group {p.queue_group!r}")
    if not p.input:
        yield Problem(f"{where}.input", "expected at least one field")
    for name, kind in p.input.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            yield Problem(f"{where}.input.{name}", "a field name must be an identifier")
        if kind.removesuffix("?") not in FIELD_TYPES:
            expected = ", ".join(FIELD_TYPES)
            yield Problem(f"{where}.input.{name}", f"expected one of {expected} (with '?' if optional), got {kind!r}")
    yield from _check_ladder(p, where, model_features)
    if "model" in p.ladder and not p.model:
        yield Problem(f"{where}.model", "the ladder has 'model' but no model is named")
    named = [(key, getattr(p, key)) for key in ("model", "shadow")]
    named += [(f"ladder[{i}]", ref.name) for i, ref in enumerate(map(parse_tier, p.ladder))
              if ref is not None and ref.kind == "model" and ref.entry != "model"]
    for key, name in named:
        if not name:
            continue
        if name not in model_features:
            if not key.startswith("ladder"):  # the ladder's own check names it
                yield Problem(f"{where}.{key}", f"unknown model {name!r} (define it under [[models]])")
            continue
        for feature in model_features[name]:
            wanted = p.input.get(feature)
            if wanted is None:
                yield Problem(f"{where}.{key}",
                              f"model {name!r} needs input field {feature!r}, which the pipeline's input lacks")
            elif wanted not in NUMERIC_TYPES:
                yield Problem(f"{where}.input.{feature}", f"model {name!r} needs a required number, got {wanted!r}")
    if "cloud" in p.ladder and p.cloud is None:  # (a named cloud's table is checked with the ladder)
        yield Problem(f"{where}.cloud", "the ladder has 'cloud' but no cloud = {subject, timeout_ms} is set")
    clouds = [("cloud", p.cloud)] if p.cloud is not None else []
    clouds += [(f"clouds.{name}", cloud) for name, cloud in p.clouds.items()]
    for key, cloud in clouds:
        if not valid_subject(cloud.subject, wildcards=False):
            yield Problem(f"{where}.{key}.subject", f"malformed subject {cloud.subject!r}")
        if cloud.timeout_ms < 1:
            yield Problem(f"{where}.{key}.timeout_ms", "expected at least 1 millisecond")
        if cloud.min_confidence is not None and not 0.0 <= cloud.min_confidence <= 1.0:
            yield Problem(f"{where}.{key}.min_confidence", "expected 0..1")
    for name in p.clouds:
        if not TIER_NAME.fullmatch(name):
            yield Problem(f"{where}.clouds.{name}", "a cloud's name must be [A-Za-z0-9_-]{1,64}")
    if not 0.0 <= p.min_confidence <= 1.0:
        yield Problem(f"{where}.min_confidence", "expected 0..1")
    try:
        probe = p.publish.format(device="d", pipeline="p")
    except (KeyError, IndexError, ValueError):
        yield Problem(f"{where}.publish", "expected a subject with only {device} and {pipeline} placeholders")
    else:
        if not valid_subject(probe, wildcards=False):
            yield Problem(f"{where}.publish", f"malformed subject {p.publish!r}")
    if p.max_input_bytes <= 0:
        yield Problem(f"{where}.max_input_bytes", "expected a positive number of bytes")
    if p.max_pending_approvals < 0:
        yield Problem(f"{where}.max_pending_approvals", "expected 0 or more")
    for key, message in check_rules(p.rules, p.input, f"{where}.rules"):
        yield Problem(key, message)
    for key, message in check_guards(p.guards, p.input, f"{where}.guards"):
        yield Problem(key, message)
    yield from _check_actions(p, where)


def _check_ladder(p: PipelineConfig, where: str, model_features: Mapping[str, list[str]]) -> Iterator[Problem]:
    """Known tiers, each once, rules last (it always answers); named ones defined; races and the
    cross-check made of tiers that can be."""
    seen: set[tuple[str, str]] = set()
    refs: list[TierRef | None] = []
    for i, entry in enumerate(p.ladder):
        ref = parse_tier(entry, p.model)
        refs.append(ref)
        if ref is None:
            yield Problem(f"{where}.ladder[{i}]", f"unknown tier {entry!r} (expected model, cloud, rules, "
                                                  "model:NAME or cloud:NAME)")
            continue
        if ref.kind == "model" and entry != "model" and ref.name not in model_features:
            yield Problem(f"{where}.ladder[{i}]", f"no model named {ref.name!r} (define it under [[models]])")
        if ref.kind == "cloud" and entry != "cloud" and ref.name not in p.clouds:
            yield Problem(f"{where}.ladder[{i}]", f"no cloud named {ref.name!r} (define it as "
                                                  f"[pipelines.clouds.{ref.name}])")
        if (ref.kind, ref.name) in seen:
            yield Problem(f"{where}.ladder[{i}]", f"{entry!r} appears twice")
        seen.add((ref.kind, ref.name))
    if not p.ladder or p.ladder[-1] != "rules":
        yield Problem(f"{where}.ladder", "expected 'rules' as the last tier: it is the one that always answers")
    if p.race:
        places = [p.ladder.index(entry) if entry in p.ladder else -1 for entry in p.race]
        for i, (entry, place) in enumerate(zip(p.race, places, strict=True)):
            ref = refs[place] if place >= 0 else None
            if place < 0:
                yield Problem(f"{where}.race[{i}]", f"{entry!r} is not in the ladder")
            elif ref is None or ref.kind != "cloud":
                yield Problem(f"{where}.race[{i}]", f"{entry!r} is not a cloud tier: only clouds are raced")
        if len(p.race) < 2 or len(set(p.race)) != len(p.race):
            yield Problem(f"{where}.race", "expected two or more different cloud tiers")
        elif min(places) >= 0 and sorted(places) != list(range(min(places), min(places) + len(places))):
            yield Problem(f"{where}.race", "raced tiers must stand next to each other in the ladder")
    if p.cross_check:
        ref = parse_tier(p.cross_check, p.model)
        if ref is None or ref.entry == "model" or ref.kind == "cloud":
            # A second opinion is a cheap, local one: a cloud's would make every decision wait a round trip.
            yield Problem(f"{where}.cross_check", f"expected 'rules' or 'model:NAME' (a local second opinion), "
                                                  f"got {p.cross_check!r}")
        elif ref.kind == "model" and ref.name not in model_features:
            yield Problem(f"{where}.cross_check", f"no model named {ref.name!r} (define it under [[models]])")
    elif p.on_disagreement != "record":
        yield Problem(f"{where}.on_disagreement", "set without a cross_check to disagree with")


def _check_actions(p: PipelineConfig, where: str) -> Iterator[Problem]:
    produced = {r.action for r in p.rules} | {g.action for g in p.guards} | set(p.labels.values())
    known = produced | set(p.actions)
    for action, policy in p.actions.items():
        at = f"{where}.actions.{action}"
        if policy.instead and policy.instead not in known:
            yield Problem(f"{at}.instead", f"unknown action {policy.instead!r} "
                          "(not produced by rules, guards or labels, and no table of its own)")
        if policy.rate_limit:
            try:
                parse_rate(policy.rate_limit)
            except ValueError as exc:
                yield Problem(f"{at}.rate_limit", str(exc))
        if policy.min_confidence is not None and not 0.0 <= policy.min_confidence <= 1.0:
            yield Problem(f"{at}.min_confidence", "expected 0..1")
        if policy.approval_timeout_ms < MIN_TIMER_MS:
            yield Problem(f"{at}.approval_timeout_ms", f"expected at least {MIN_TIMER_MS} milliseconds")
        for i, tier in enumerate(policy.tiers):
            if tier not in TIERS and tier != "guard":  # a guard decides as tier "guard"
                yield Problem(f"{at}.tiers[{i}]", f"unknown tier {tier!r}")
        restricted = (policy.approval == "required" or policy.rate_limit or policy.min_confidence is not None
                      or policy.tiers)
        if restricted and not policy.instead:
            yield Problem(f"{at}.instead", "an action that can be refused needs an `instead` action to take")
    # Chains of `instead` must end.
    for action in p.actions:
        seen = [action]
        current = p.actions[action].instead
        while current:
            if current in seen:
                chain = " -> ".join([*seen, current])
                yield Problem(f"{where}.actions.{action}.instead", f"`instead` chain loops: {chain}")
                break
            seen.append(current)
            nxt = p.actions.get(current)
            current = nxt.instead if nxt is not None else ""

"""The operator's side of desired and reported state: the two KV buckets, intent written, the fleet read.

`edge fleet` writes the intent of every group or `all` command that changes a device (pause,
resume, config.apply, model.deploy, model.promote, model.rollback) into `EDGE_FLEET`, signed,
before it sends the command to the devices online; devices offline apply it when they come back
(edge.fleet._desired says how keys resolve and values are signed). `edge fleet ls` reads
`EDGE_FLEET_STATUS`, where every device reports what it runs, beside the live answers.

Both buckets are created here when missing: operators own them (devices only read the first and
write their own key of the second). Nothing here prints: the command line (`_operator`) does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from .._errors import CommandError
from ..fleet._desired import (
    BUCKET,
    MAX_VALUE_BYTES,
    REPORT_DECODER,
    STATUS_BUCKET,
    Desired,
    DeviceReport,
    Intent,
    desired_key,
    encode_value,
    next_intent,
    parse_key,
    read_value,
)
from ..fleet._protocol import decode_command

DESIRED_HISTORY = 5  # earlier values kept per key: what the fleet was told before
STATUS_MAX_VALUE = 64 * 1024
INTENT_VERBS = frozenset({"pause", "resume", "config.apply", "model.deploy", "model.promote", "model.rollback"})
READ_TIMEOUT_S = 5.0  # a hub without JetStream must not hold a pause up for long
_JSON = msgspec.json.Encoder()


class Intended(msgspec.Struct, frozen=True):
    """A desired value written: its key, and the more specific keys that still win over it."""

    key: str
    overridden_by: list[str]


class FleetState(msgspec.Struct):
    """Both buckets as read: each device's last report and when the hub stored it, every desired
    value whose signature holds, and the keys whose values do not (key -> why)."""

    reports: dict[str, tuple[DeviceReport, int]]
    desired: list[Desired]
    bad: dict[str, str]


async def fleet_buckets(nc: NATS) -> tuple[KeyValue, KeyValue]:
    """The desired-state and reported-state buckets, each created when missing."""
    js = nc.jetstream(timeout=READ_TIMEOUT_S)
    desired = await _bucket(js, BUCKET, history=DESIRED_HISTORY, max_value_size=MAX_VALUE_BYTES,
                            description="edge fleet: desired state (signed intent per all/group/device)")
    status = await _bucket(js, STATUS_BUCKET, history=1, max_value_size=STATUS_MAX_VALUE,
                           description="edge fleet: what each device reports it runs")
    return desired, status


async def _bucket(js: Any, name: str, **config: Any) -> KeyValue:
    try:
        kv: KeyValue = await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(bucket=name, **config)
    return kv


def states_intent(target: str, verb: str) -> bool:
    """Whether a command to `target` is written as desired state first (groups and `all`)."""
    return verb in INTENT_VERBS and (target == "all" or target.startswith("group:"))


async def write_intent(nc: NATS, target: str, verb: str, body: dict[str, Any], seed: bytes) -> Intended | None:
    """Write the intent a command states into EDGE_FLEET at `target`'s level, signed with `seed`.

    None when the command states nothing new (a promote with no desired shadow). A body the
    command would refuse raises CommandError (`bad_command`) and nothing is written.
    """
    command = decode_command(verb, _JSON.encode(body))
    desired_kv, _ = await fleet_buckets(nc)
    current: Intent | None = None
    name = getattr(command, "name", None)
    if verb.startswith("model.") and isinstance(name, str):
        current = await _current(desired_kv, desired_key(target, f"model.{name}"))
    stated = next_intent(command, current)
    if stated is None:
        return None
    what, intent = stated
    key = desired_key(target, what)
    await desired_kv.put(key, encode_value(seed, key, intent))
    return Intended(key=key, overridden_by=await _overriding(desired_kv, key))


async def write_value(nc: NATS, key: str, value: Intent | None, seed: bytes) -> None:
    """Write one desired value (None: clear the key's level) as given."""
    desired_kv, _ = await fleet_buckets(nc)
    await desired_kv.put(key, encode_value(seed, key, value))


async def _current(kv: KeyValue, key: str) -> Intent | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    try:
        return read_value(key, entry.value or b"").value
    except CommandError:
        return None  # not built upon: a forged value is never carried into a signed one


async def _overriding(kv: KeyValue, key: str) -> list[str]:
    """Keys more specific than `key` for the same <what> that say something: they win over it."""
    scope, _, what = parse_key(key)
    if scope == "device":
        return []
    found = []
    for entry_key, data in await _entries(kv):
        try:
            other = read_value(entry_key, data)
        except CommandError:
            continue
        if other.what == what and other.value is not None and (
                other.scope == "device" or (scope == "all" and other.scope == "group")):
            found.append(entry_key)
    return sorted(found)


async def _entries(kv: KeyValue, keys: str = ">") -> list[tuple[str, bytes]]:
    """(key, value) of every key that holds a value, and (for reports) when it was stored."""
    return [(key, value) for key, value, _ in await _stored(kv, keys)]


async def _stored(kv: KeyValue, keys: str = ">") -> list[tuple[str, bytes, int]]:
    watcher = await kv.watch(keys)
    found: list[tuple[str, bytes, int]] = []
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            async for entry in watcher:
                if entry is None:  # every current value delivered
                    break
                if entry.operation is None and entry.value is not None:
                    stored = int(entry.created.timestamp() * 1e9) if entry.created is not None else 0
                    found.append((entry.key, entry.value, stored))
    finally:
        with contextlib.suppress(nats.errors.Error):  # the connection is going: nothing left to stop
            await watcher.stop()  # type: ignore[no-untyped-call]
    return found


async def read_fleet(nc: NATS) -> FleetState:
    """Both buckets (created when missing, so devices can start reporting)."""
    desired_kv, status_kv = await fleet_buckets(nc)
    reports = await read_reports(status_kv)
    desired: list[Desired] = []
    bad: dict[str, str] = {}
    for key, data in await _entries(desired_kv):
        try:
            desired.append(read_value(key, data))
        except CommandError as error:
            bad[key] = f"{error.code}: {error.message[:200]}"
    return FleetState(reports=reports, desired=desired, bad=bad)


async def read_reports(status_kv: KeyValue) -> dict[str, tuple[DeviceReport, int]]:
    """Each device's last report in EDGE_FLEET_STATUS, and when the hub stored it (unix ns)."""
    reports: dict[str, tuple[DeviceReport, int]] = {}
    for key, data, stored in await _stored(status_kv, "device.>"):
        try:
            report = REPORT_DECODER.decode(data)
        except msgspec.DecodeError:
            continue
        if key != f"device.{report.device}":
            continue  # a report is believed only under its own device's key (hub permissions say who writes it)
        reports[report.device] = (report, stored or report.last_seen)
    return reports

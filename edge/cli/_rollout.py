"""`edge fleet rollout start|status|abort`: a model to a group in stages, gated, rolled back on failure.

The rollout runs here, in the operator's process: there is no controller on the hub. What it does
and why it can stop anywhere is `edge.fleet._rollout`'s docstring; this module is the I/O: the
`EDGE_ROLLOUTS` bucket, desired values written, devices' reports waited for, `status` read at
both ends of each window, and what is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from .._config import DEVICE_ID, parse_duration
from .._errors import CommandError
from ..fleet import sign_model
from ..fleet._desired import (
    DeviceReport,
    ModelIntent,
    ModelVersion,
    desired_key,
    encode_value,
    is_missing,
    resolve,
)
from ..fleet._rollout import (
    BUCKET,
    MAX_RECORD_BYTES,
    Gates,
    Measure,
    Progress,
    Rollout,
    check_id,
    counts_of,
    encode_record,
    evaluate,
    failures,
    gate_text,
    group_members,
    kept,
    new_id,
    parse_canary,
    pick_canaries,
    progress,
    read_record,
)
from ._fleet_state import _entries, fleet_buckets, read_fleet, read_reports
from ._operator import (
    Add,
    _ago,
    _connected,
    _error_text,
    _run,
    _seed,
    _upstream_args,
    check_model_folder,
    publish_model,
    send_command,
)
from ._output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, print_json

POLL_S = 0.25  # how often reports are read while devices apply a desired value
STATUS_CONCURRENCY = 32  # `status` requests in flight at once
UNFINISHED = ("running", "interrupted", "failed")
INTERRUPTED_SAVE_S = 5.0  # how long Ctrl-C waits to record where the rollout stopped


class GateFailed(Exception):
    """A stage's gate failed (or a device could not apply): the rollout rolls back, saying why."""


Outcome = Literal["applied", "failed", "stuck", "silent"]


class RolloutRun:
    """One rollout driven from its record's stage to its end (done, or rolled back)."""

    def __init__(self, nc: NATS, seed: bytes, rollout: Rollout, *, timeout: float,  # noqa: ASYNC109
                 say: Callable[[str], None]) -> None:
        self.nc = nc
        self.seed = seed
        self.rollout = rollout
        self.timeout = timeout
        self.say = say
        self.by = f"rollout {rollout.id}"
        self._kv: tuple[KeyValue, KeyValue, KeyValue] | None = None

    @property
    def what(self) -> str:
        return f"model.{self.rollout.model}"

    async def buckets(self) -> tuple[KeyValue, KeyValue, KeyValue]:
        if self._kv is None:
            desired, status = await fleet_buckets(self.nc)
            self._kv = (desired, status, await rollout_bucket(self.nc))
        return self._kv

    async def save(self, text: str = "") -> None:
        """Write the record (before each step it announces: a stage is never believed done early)."""
        rollout = self.rollout
        if text:
            rollout.note(text)
            self.say(text)
        rollout.updated = time.time_ns()
        _, _, kv = await self.buckets()
        await kv.put(rollout.id, encode_record(self.seed, rollout))

    async def write(self, key: str, value: ModelIntent | None) -> int:
        """Write one desired value, signed; its timestamp (what a device reports once it applied it)."""
        desired_kv, _, _ = await self.buckets()
        timestamp = time.time_ns()
        await desired_kv.put(key, encode_value(self.seed, key, value, timestamp_ns=timestamp))
        return timestamp

    # -- the stages --------------------------------------------------------------------------------

    async def run(self) -> Rollout:
        rollout = self.rollout
        try:
            try:
                if rollout.stage == "canary":
                    await self._canary()
                if rollout.stage == "rest":
                    await self._rest()
            except GateFailed as failed:
                await self.rollback(str(failed))
            if rollout.stage == "rolling_back" or rollout.state == "failed":  # a rollback to finish or try again
                await self.rollback(rollout.reason)
        except asyncio.CancelledError:  # Ctrl-C: say where it stopped, so --resume or abort can take it on
            rollout.state = "interrupted"
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                # Bounded, but not tight: on a busy gateway or hub a KV write can take a second or two,
                # and a record left "running" hides where the rollout stopped.
                await asyncio.wait_for(self.save(f"interrupted at stage {rollout.stage}"), INTERRUPTED_SAVE_S)
            raise
        return rollout

    async def _canary(self) -> None:
        rollout = self.rollout
        keys = {device: desired_key(device, self.what) for device in rollout.canaries}
        rollout.written = _union(rollout.written, keys.values())
        await self.save(f"canary: {rollout.model} {rollout.version} as shadow on {', '.join(rollout.canaries)}")
        targets = {}
        for device, key in keys.items():
            before = rollout.before_devices.get(device) or ModelIntent()
            intent = ModelIntent(active=before.active, shadow=rollout.artifact, previous=before.previous, by=self.by)
            targets[device] = (key, await self.write(key, intent))
        applied = self.require_applied("canary", await self.await_applied(targets), offline_ok=False)
        await self.window("canary", applied)
        rollout.stage = "rest"
        await self.save(f"canary gates passed on {', '.join(rollout.canaries)}")

    async def _rest(self) -> None:
        rollout = self.rollout
        group_key = desired_key(f"group:{rollout.group}", self.what)
        keys = {device: desired_key(device, self.what) for device in rollout.canaries}
        rollout.written = _union(rollout.written, [*keys.values(), group_key])
        await self.save(f"rest: promoting {rollout.version} on the canaries, then active for group {rollout.group}")
        # The canaries first (a promote: the candidate they shadow becomes active), then the group.
        targets = {}
        for device, key in keys.items():
            before = rollout.before_devices.get(device) or ModelIntent()
            intent = ModelIntent(active=rollout.artifact, previous=before.active, by=self.by)
            targets[device] = (key, await self.write(key, intent))
        self.require_applied("promote", await self.await_applied(targets), offline_ok=True)
        previous = rollout.before.active if rollout.before is not None else None
        stamp = await self.write(group_key, ModelIntent(active=rollout.artifact, previous=previous, by=self.by))
        _, status_kv, _ = await self.buckets()
        reports = await read_reports(status_kv)
        members = (set(group_members(reports, rollout.group)) | set(rollout.devices)) - set(rollout.pinned)
        rest = sorted(members - set(rollout.canaries))
        gone = [d for d in rest if d not in reports or is_missing(*reports[d], time.time_ns())]
        targets = {device: (group_key, stamp) for device in rest if device not in gone}
        # The canaries follow the group again: their own values are cleared (the group's now says the same).
        for device, key in keys.items():
            await self.write(key, None)
            targets[device] = (group_key, stamp)
        self.say(f"rest: {rollout.version} active for group {rollout.group}: waiting for {len(targets)} device(s)"
                 + (f"; offline, they apply it when they return: {', '.join(gone)}" if gone else ""))
        outcomes = await self.await_applied(targets)
        applied = self.require_applied("rest", outcomes, offline_ok=True)
        rollout.pending = sorted({*gone, *(d for d, outcome in outcomes.items() if outcome[0] == "silent")})
        await self.window("rest", applied)
        rollout.stage, rollout.state, rollout.finished = "done", "done", time.time_ns()
        await self.save(f"done: {rollout.model} {rollout.version} active for group {rollout.group}"
                        + (f" (offline, they apply it when they return: {', '.join(rollout.pending)})"
                           if rollout.pending else ""))

    async def rollback(self, reason: str) -> None:
        """Every desired value the rollout wrote back to what it was; `model.rollback` for a device left
        serving the candidate where no desired value names another version."""
        rollout = self.rollout
        if rollout.stage not in ("rolling_back", "rolled_back"):
            rollout.failed_stage = rollout.stage
        rollout.stage, rollout.state, rollout.reason, rollout.incomplete = "rolling_back", "running", reason, []
        await self.save(f"rolling back: {reason}")
        group_key = desired_key(f"group:{rollout.group}", self.what)
        targets = {}
        for device in rollout.canaries:
            key = desired_key(device, self.what)
            if key in rollout.written:  # first as it was (its shadow dropped), then following its groups again
                before = rollout.before_devices.get(device) or ModelIntent()
                intent = ModelIntent(active=before.active, shadow=before.shadow, previous=before.previous, by=self.by)
                targets[device] = (key, await self.write(key, intent))
        if group_key in rollout.written:
            await self.write(group_key, rollout.before)
        self.require_applied("rollback", await self.await_applied(targets), offline_ok=True, fail=False)
        for device in targets:
            await self.write(desired_key(device, self.what), None)
        # Who still serves the candidate with nothing to take it back: the device's own previous version.
        state = await read_fleet(self.nc)
        now = time.time_ns()
        commands, offline = [], []
        ours = {*rollout.devices, *rollout.canaries, *group_members(state.reports, rollout.group)}
        for device, (report, seen) in sorted(state.reports.items()):
            serving = report.models.get(rollout.model)
            if device not in ours or device in rollout.pinned or serving is None or serving.active != rollout.version:
                continue
            wanted = resolve(state.desired, device, report.groups).get(self.what)
            names = wanted is not None and isinstance(wanted.value, ModelIntent) and wanted.value.active is not None
            if names:
                continue  # the desired state takes it back
            if is_missing(report, seen, now):
                offline.append(device)
            elif serving.shadow is None:
                commands.append(device)
        problems = [f"{d} is offline on {rollout.version}: roll it back when it returns "
                    f"(edge fleet cmd {d} model.rollback)" for d in offline]
        for device, outcome in zip(commands, await self._model_rollback(commands), strict=True):
            if outcome:
                problems.append(f"{device}: model.rollback: {outcome}")
        left = await self._still_on_candidate(ours - set(rollout.pinned) - set(offline))
        problems += [f"{d} still serves {rollout.version}" for d in left]
        rollout.stage, rollout.finished, rollout.incomplete = "rolled_back", time.time_ns(), problems
        rollout.state = "failed" if problems else "rolled_back"
        await self.save(f"rolled back{' (incomplete: ' + '; '.join(problems) + ')' if problems else ''}")

    async def _model_rollback(self, devices: list[str]) -> list[str]:
        """`model.rollback` to each device, signed; per device "" or what went wrong."""
        async def one(device: str) -> str:
            got = await send_command(self.nc, device, "model.rollback", {"name": self.rollout.model, "by": self.by},
                                     timeout=max(self.timeout, 10.0), seed=self.seed, discover=False)
            if not got.replies:
                return "no answer"
            return "" if got.replies[0].ok else _error_text(got.replies[0])

        return list(await asyncio.gather(*(one(d) for d in devices)))

    async def _still_on_candidate(self, devices: set[str]) -> list[str]:
        """Devices that still report the candidate active (or as shadow), once the rollback had time."""
        _, status_kv, _ = await self.buckets()
        deadline = time.monotonic() + self.rollout.gates.apply_timeout_s
        while True:
            reports = await read_reports(status_kv)
            now = time.time_ns()
            left = sorted(d for d in devices if d in reports and not is_missing(*reports[d], now)
                          and self.rollout.version in _serving(reports[d][0], self.rollout.model))
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(POLL_S)  # pace: reports come every heartbeat and after each change

    # -- waiting and measuring ---------------------------------------------------------------------

    async def await_applied(self, targets: Mapping[str, tuple[str, int]]) -> dict[str, tuple[Outcome, str]]:
        """Until each device reports the desired value (key, timestamp) applied, or could not apply it,
        or the apply timeout: then `stuck` when it kept reporting, `silent` when it did not (offline)."""
        if not targets:
            return {}
        _, status_kv, _ = await self.buckets()
        outcomes: dict[str, tuple[Outcome, str]] = {}
        first_seen: dict[str, int] = {}
        reported: set[str] = set()
        deadline = time.monotonic() + self.rollout.gates.apply_timeout_s
        while True:
            reports = await read_reports(status_kv)
            now = time.time_ns()
            for device, (key, stamp) in targets.items():
                if device in outcomes or device not in reports:
                    continue
                report, seen = reports[device]
                first_seen.setdefault(device, seen)
                reported.update([device] if seen != first_seen[device] else [])
                applied, failed = report.applied.get(self.what), report.divergence.get(self.what)
                if applied is not None and (applied.key, applied.timestamp) == (key, stamp):
                    outcomes[device] = ("applied", "")
                elif failed is not None and (failed.key, failed.timestamp) == (key, stamp):
                    outcomes[device] = ("failed", f"{failed.code}: {failed.message[:300]}")
                elif is_missing(report, seen, now):
                    outcomes[device] = ("silent", "offline (not seen for three heartbeats)")
            if len(outcomes) == len(targets) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)  # pace: reports come every heartbeat and after each change
        timeout = f"{self.rollout.gates.apply_timeout_s:g}s"
        for device in targets:
            if device not in outcomes:
                outcomes[device] = ("stuck", f"reports, but did not apply it within {timeout}") \
                    if device in reported else ("silent", f"did not report within {timeout}")
        return outcomes

    def require_applied(self, stage: str, outcomes: Mapping[str, tuple[Outcome, str]], *, offline_ok: bool,
                        fail: bool = True) -> list[str]:
        """The devices that applied; GateFailed (when `fail`) if one could not, or went silent
        where that is not allowed."""
        measures = []
        for device, (outcome, why) in sorted(outcomes.items()):
            ok = outcome == "applied" or (outcome == "silent" and offline_ok)
            measures.append(Measure(device, "applied", 1.0 if outcome == "applied" else 0.0, 1.0, ok,
                                    "" if outcome == "applied" else why))
        self.rollout.measures[f"{stage}.applied"] = kept(measures)
        failed = failures(measures)
        if failed and fail:
            raise GateFailed(f"{stage}: could not apply: {'; '.join(failed)}")
        return [m.device for m in measures if m.value]

    async def window(self, stage: Literal["canary", "rest"], devices: list[str]) -> None:
        """Each device's gates over one window: `status` at both ends."""
        rollout, gates = self.rollout, self.rollout.gates
        if not devices:
            raise GateFailed(f"{stage}: no device to measure")
        start = await self.statuses(devices)
        self.say(f"{stage}: measuring {len(devices)} device(s) for {gates.window_s:g}s")
        await asyncio.sleep(gates.window_s)  # the window itself: what the gates are measured over
        end = await self.statuses(devices)
        measures: list[Measure] = []
        for device in devices:
            if device not in start or device not in end:
                if stage == "canary":
                    measures.append(Measure(device, "answered", 0.0, 1.0, False, "did not answer status"))
                else:  # offline meanwhile: it keeps the group's value, and is measured by no one
                    measures.append(Measure(device, "answered", 0.0, 1.0, True, "not measured: did not answer"))
                continue
            before, after = counts_of(start[device], rollout.model), counts_of(end[device], rollout.model)
            counts = after.since(before) if after is not None and before is not None else None
            measures += evaluate(stage, device, counts, gates)
        rollout.measures[stage] = kept(measures)
        if not any(m.gate != "answered" for m in measures):
            raise GateFailed(f"{stage}: no device answered status at both ends of the window")
        failed = failures(measures)
        if failed:
            raise GateFailed(f"{stage} gate failed: {'; '.join(failed)}")

    async def statuses(self, devices: list[str]) -> dict[str, dict[str, Any]]:
        """Each device's `status` now (those that answered)."""
        limit = asyncio.Semaphore(STATUS_CONCURRENCY)

        async def one(device: str) -> tuple[str, dict[str, Any] | None]:
            async with limit:
                got = await send_command(self.nc, device, "status", timeout=self.timeout, discover=False)
            reply = got.replies[0] if got.replies else None
            ok = reply is not None and reply.ok and isinstance(reply.result, dict)
            return device, reply.result if ok and reply is not None else None

        return {d: s for d, s in await asyncio.gather(*(one(d) for d in devices)) if s is not None}


def _union(items: list[str], more: Any) -> list[str]:
    return [*items, *(m for m in more if m not in items)]


def _serving(report: DeviceReport, model: str) -> set[str | None]:
    serving = report.models.get(model)
    return {serving.active, serving.shadow} if serving is not None else set()


# ---------------------------------------------------------------------------------------------
# The bucket


async def rollout_bucket(nc: NATS) -> KeyValue:
    """`EDGE_ROLLOUTS`, created when missing: one signed record per rollout."""
    js = nc.jetstream(timeout=5.0)
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=BUCKET, history=1, max_value_size=MAX_RECORD_BYTES,
                                         description="edge fleet: staged rollouts (progress and history)")


async def read_rollouts(nc: NATS) -> tuple[list[tuple[Rollout, str]], dict[str, str]]:
    """Every rollout record whose signature holds (newest first) and its signer; the others, and why."""
    records, bad = [], {}
    for key, data in await _entries(await rollout_bucket(nc)):
        try:
            records.append(read_record(key, data))
        except CommandError as error:
            bad[key] = f"{error.code}: {error.message[:200]}"
    records.sort(key=lambda pair: (pair[0].started, pair[0].id), reverse=True)
    return records, bad


# ---------------------------------------------------------------------------------------------
# Commands


async def rollout_start(args: argparse.Namespace) -> int:
    """`edge fleet rollout start GROUP FOLDER` (or `--resume ID`): run a rollout to its end."""
    seed = _seed(args)
    if seed is None:
        print("edge: a rollout writes desired state, which must be signed: give --sign-with", file=sys.stderr)
        return EXIT_USAGE
    if args.resume:
        if args.group or args.folder:
            print("edge: --resume ID continues a rollout: give no GROUP or FOLDER", file=sys.stderr)
            return EXIT_USAGE
        return await _resume(args, seed, check_id(args.resume))
    if not args.group or not args.folder:
        print("edge: rollout start needs GROUP and FOLDER (or --resume ID)", file=sys.stderr)
        return EXIT_USAGE
    group = args.group.removeprefix("group:")
    if not DEVICE_ID.fullmatch(group):
        print(f"edge: group {group[:100]!r}: expected [A-Za-z0-9_-]{{1,64}}", file=sys.stderr)
        return EXIT_USAGE
    try:
        gates = _gates(args)
        canary = parse_canary(args.canary)
    except (ValueError, CommandError) as exc:
        print(f"edge: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(args.folder)
    name, version, problem = await asyncio.to_thread(check_model_folder, folder, args.name, args.version)
    if problem:
        print(f"edge: {problem}", file=sys.stderr)
        return EXIT_USAGE
    say = _sayer(args)
    async with _connected(args) as nc:
        records, _ = await read_rollouts(nc)
        for other, _signer in records:
            if other.state in UNFINISHED and (other.group, other.model) == (group, name):
                print(f"edge: rollout {other.id} of {name} to group {group} is {other.state}: continue it with "
                      f"`edge fleet rollout start --resume {other.id}` or roll it back with "
                      f"`edge fleet rollout abort {other.id}`", file=sys.stderr)
                return EXIT_USAGE
        state = await read_fleet(nc)
        now = time.time_ns()
        what = f"model.{name}"
        members = group_members(state.reports, group)
        pinned = sorted(d for d in members if any(v.scope == "device" and v.target == d and v.what == what
                                                  and v.value is not None for v in state.desired))
        online = [d for d in members if d not in pinned and not is_missing(*state.reports[d], now)]
        if not online:
            print(f"edge: no device of group {group} is online (reporting in EDGE_FLEET_STATUS)"
                  + (f"; pinned by their own desired {what}: {', '.join(pinned)}" if pinned else ""), file=sys.stderr)
            return EXIT_FAILURE
        group_value = next((v.value for v in state.desired if v.key == desired_key(f"group:{group}", what)), None)
        canaries = pick_canaries(online, canary)
        before_devices = {}
        for device in canaries:
            wanted = resolve(state.desired, device, state.reports[device][0].groups).get(what)
            before_devices[device] = wanted.value if wanted is not None and isinstance(wanted.value, ModelIntent) \
                else None
        obj, sha256 = await publish_model(nc, folder, bucket=args.bucket, name=name, version=version)
        artifact = ModelVersion(version=version, bucket=args.bucket, object=obj, sha256=sha256,
                                signature=sign_model(seed, sha256))
        rollout = Rollout(
            id=new_id(), group=group, model=name, artifact=artifact, gates=gates, canary=args.canary,
            canaries=canaries, devices=[d for d in members if d not in pinned], pinned=pinned,
            before=group_value if isinstance(group_value, ModelIntent) else None, before_devices=before_devices,
            started=now,
        )
        run = RolloutRun(nc, seed, rollout, timeout=args.timeout, say=say)
        await run.save(f"rollout {rollout.id}: {name} {version} to group {group} ({len(rollout.devices)} device(s), "
                       f"canaries {', '.join(canaries)}); uploaded {args.bucket}/{obj} (sha256 {sha256[:12]}…)"
                       + (f"; pinned by their own desired {what}, left out: {', '.join(pinned)}" if pinned else ""))
        await run.run()
        return await _report(args, nc, rollout)


async def _resume(args: argparse.Namespace, seed: bytes, rollout_id: str, *, abort: bool = False) -> int:
    async with _connected(args) as nc:
        rollout = await _load(nc, rollout_id)
        if rollout is None:
            return EXIT_USAGE
        if rollout.state not in UNFINISHED:
            print(f"edge: rollout {rollout_id} is {rollout.state.replace('_', ' ')}: nothing to "
                  f"{'abort' if abort else 'resume'}", file=sys.stderr)
            return EXIT_USAGE
        rollout.state = "running"
        run = RolloutRun(nc, seed, rollout, timeout=args.timeout, say=_sayer(args))
        if abort:
            await run.rollback(f"aborted by the operator at stage {rollout.stage}"
                               if rollout.stage != "rolling_back" else rollout.reason)
        else:
            await run.save(f"resumed at stage {rollout.stage}")
            await run.run()
        return await _report(args, nc, rollout)


async def _load(nc: NATS, rollout_id: str) -> Rollout | None:
    kv = await rollout_bucket(nc)
    try:
        entry = await kv.get(rollout_id)
    except nats.js.errors.KeyNotFoundError:
        print(f"edge: no rollout {rollout_id}", file=sys.stderr)
        return None
    rollout, _ = read_record(rollout_id, entry.value or b"")  # CommandError: refused, unsigned or forged
    return rollout


async def rollout_abort(args: argparse.Namespace) -> int:
    """`edge fleet rollout abort ID`: roll an unfinished rollout back."""
    seed = _seed(args)
    if seed is None:
        print("edge: a rollback writes desired state, which must be signed: give --sign-with", file=sys.stderr)
        return EXIT_USAGE
    return await _resume(args, seed, check_id(args.id), abort=True)


async def rollout_status(args: argparse.Namespace) -> int:
    """`edge fleet rollout status [ID]`: one rollout (the newest by default) and the history."""
    async with _connected(args) as nc:
        records, bad = await read_rollouts(nc)
        state = await read_fleet(nc)
    if args.id is not None:
        check_id(args.id)
        chosen = next((pair for pair in records if pair[0].id == args.id), None)
        if chosen is None:
            print(f"edge: no rollout {args.id}" + (f" ({bad[args.id]})" if args.id in bad else ""), file=sys.stderr)
            return EXIT_USAGE if args.id not in bad else EXIT_FAILURE
    else:
        chosen = records[0] if records else None
    now = time.time_ns()
    missing = [d for d, (report, seen) in state.reports.items() if is_missing(report, seen, now)]
    if args.json:
        print_json({
            "rollout": _as_json(chosen[0], chosen[1], progress(chosen[0], state.reports, missing))
            if chosen else None,
            "history": [_as_json(r, signer, progress(r, state.reports, missing)) for r, signer in records],
            "ignored": bad,
        })
    else:
        if chosen is None:
            print("no rollout yet")
        else:
            _print_rollout(chosen[0], chosen[1], progress(chosen[0], state.reports, missing))
        _print_history([r for r, _ in records], state.reports, missing)
        for key, why in sorted(bad.items()):
            print(f"rollout record {key} ignored: {why}")
    return EXIT_OK if chosen is None or chosen[0].state in ("done", "running") else EXIT_FAILURE


async def _report(args: argparse.Namespace, nc: NATS, rollout: Rollout) -> int:
    """What a rollout came to, as `rollout status ID` prints it."""
    state = await read_fleet(nc)
    now = time.time_ns()
    missing = [d for d, (report, seen) in state.reports.items() if is_missing(report, seen, now)]
    shown = progress(rollout, state.reports, missing)
    if args.json:
        print_json({"rollout": _as_json(rollout, "", shown)})
    else:
        _print_rollout(rollout, "", shown, events=False)  # they were printed as they happened
    return EXIT_OK if rollout.state == "done" else EXIT_FAILURE


# ---------------------------------------------------------------------------------------------
# Output


def _sayer(args: argparse.Namespace) -> Callable[[str], None]:
    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)
    return say


def _as_json(rollout: Rollout, signer: str, shown: Progress) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(rollout)
    data["signer"] = signer
    data["progress"] = {"text": shown.text(rollout.version), "on": shown.on, "off": shown.off,
                        "missing": shown.missing}
    return data


def _state_text(rollout: Rollout) -> str:
    match rollout.state:
        case "done":
            return "done"
        case "rolled_back":
            return f"rolled back at stage {rollout.failed_stage}"
        case "failed":
            return f"rollback incomplete (from stage {rollout.failed_stage})"
        case "interrupted":
            return f"interrupted at stage {rollout.stage}"
        case "running":
            return f"running, stage {rollout.stage} (last step {_ago(time.time_ns() - rollout.updated)})"


def _print_rollout(rollout: Rollout, signer: str, shown: Progress, *, events: bool = True) -> None:
    print(f"rollout {rollout.id}: {rollout.model} {rollout.version} to group {rollout.group}: {_state_text(rollout)}")
    print(f"  progress  {shown.text(rollout.version)}"
          + (f"; offline, they apply it when they return: {', '.join(shown.missing)}"
             if shown.missing and rollout.state == "done" else ""))
    print(f"  canaries  {', '.join(rollout.canaries) or '-'} (--canary {rollout.canary})")
    if rollout.pinned:
        print(f"  pinned    {', '.join(rollout.pinned)} (their own desired model.{rollout.model} wins: left out)")
    if rollout.reason:
        print(f"  why       {rollout.reason}")
    if rollout.incomplete:
        print(f"  left      rollback incomplete: {'; '.join(rollout.incomplete)} (`edge fleet rollout abort "
              f"{rollout.id}` tries again)")
    if rollout.state in ("running", "interrupted"):
        print(f"  continue  edge fleet rollout start --resume {rollout.id}   (or roll it back: "
              f"edge fleet rollout abort {rollout.id}); first make sure no other `rollout start` still runs it")
    gates = rollout.gates
    print(f"  gates     window {gates.window_s:g}s; decisions >= {gates.min_decisions}, agreement >= "
          f"{gates.min_agreement:.0%}, error rate <= {gates.max_error_rate:.0%}, fallback rate <= "
          f"{gates.max_fallback_rate:.0%}")
    for stage, measures in rollout.measures.items():
        if stage.endswith(".applied"):
            for m in measures:
                if not m.ok or m.note:
                    print(f"    {stage:<16} {m.device}: {'applied' if m.value else 'not applied'}"
                          + (f" ({m.note})" if m.note else ""))
            continue
        for device in sorted({m.device for m in measures}):
            cells = [f"{gate_text(m)}{'' if m.ok else ' FAILED'}" + (f" ({m.note})" if m.note else "")
                     for m in measures if m.device == device]
            print(f"    {stage:<16} {device}: {', '.join(cells)}")
    for event in rollout.events if events else ():
        print(f"  {time.strftime('%H:%M:%S', time.localtime(event.ts / 1e9))}  {event.text}")
    if signer:
        print(f"  signed by {signer[:12]}…")


def _print_history(records: list[Rollout], reports: Mapping[str, tuple[DeviceReport, int]],
                   missing: list[str]) -> None:
    if not records:
        return
    print("history (newest first):")
    for rollout in records:
        shown = progress(rollout, reports, missing)
        why = f": {rollout.reason[:160]}" if rollout.reason else ""
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(rollout.started / 1e9))
        print(f"  {rollout.id}  {started}  {rollout.model} {rollout.version} to {rollout.group}  "
              f"{rollout.state.replace('_', ' ')}  {shown.text(rollout.version)}{why}")


# ---------------------------------------------------------------------------------------------
# The CLI


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return parse_duration(text)


def _gates(args: argparse.Namespace) -> Gates:
    """The gates from the command line; ValueError names the one out of range."""
    gates = Gates(window_s=_seconds(args.window), min_agreement=args.min_agreement,
                  max_fallback_rate=args.max_fallback_rate, max_error_rate=args.max_error_rate,
                  min_decisions=args.min_decisions, apply_timeout_s=_seconds(args.apply_timeout))
    for name in ("min_agreement", "max_fallback_rate", "max_error_rate"):
        if not 0 <= getattr(gates, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a share between 0 and 1")
    if gates.window_s <= 0 or gates.apply_timeout_s <= 0 or gates.min_decisions < 0:
        raise ValueError("--window and --apply-timeout must be more than 0, --min-decisions at least 0")
    return gates


def cmd_rollout_start(args: argparse.Namespace) -> int:
    return _run(rollout_start(args))


def cmd_rollout_status(args: argparse.Namespace) -> int:
    return _run(rollout_status(args))


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    return _run(rollout_abort(args))


def register_rollout(fleet: Any, add: Add) -> None:
    """Add `rollout start|status|abort` under `edge fleet`."""
    rollout = fleet.add_parser("rollout", help="a model to a group in stages, gated, rolled back on failure") \
        .add_subparsers(dest="fleet_rollout_command", required=True)
    p = add("start", cmd_rollout_start, "upload a model and roll it out to a group: canaries as shadow, then "
            "everyone; rolled back when a gate fails", rollout)
    p.description = (
        "Uploads FOLDER, deploys it as a shadow on a canary share of GROUP's online devices, measures them "
        "over --window (shadow agreement, error and fallback rates, decisions), then promotes it on the "
        "canaries and makes it active for the whole group (devices offline now apply it when they return) "
        "and measures again. When a gate fails or a device cannot apply it, everything is rolled back. It "
        "runs in this process: if interrupted, continue with --resume ID or roll back with `abort ID`. "
        "Exit 0 when done, 1 when rolled back or failed, 2 bad usage.")
    _upstream_args(p, expect=False)
    p.add_argument("group", nargs="?", help="the group (`north` or `group:north`)")
    p.add_argument("folder", nargs="?", help="a model folder (model.onnx + manifest.toml)")
    p.add_argument("--resume", metavar="ID", help="continue an interrupted rollout from its stage")
    p.add_argument("--canary", default="0.2", help="a share of the online devices (0.2, 20%%) or a count (2); "
                                                   "default 0.2, at least one device")
    p.add_argument("--window", default="60s", help="how long each stage is measured (60s, 5m; default 60s)")
    p.add_argument("--min-agreement", type=float, default=0.9, help="the canaries' shadow agreement (default 0.9)")
    p.add_argument("--max-fallback-rate", type=float, default=0.2,
                   help="share of decisions where the model stepped aside (default 0.2)")
    p.add_argument("--max-error-rate", type=float, default=0.05,
                   help="share of decisions where the model failed or gave no answer (default 0.05)")
    p.add_argument("--min-decisions", type=int, default=50,
                   help="decisions each device must make in the window to be judged (default 50)")
    p.add_argument("--apply-timeout", default="120s",
                   help="for a device to apply a stage, fetch and warm-up included (default 120s)")
    p.add_argument("--name", help="model name (default: the manifest's)")
    p.add_argument("--version", help="model version (default: the manifest's)")
    p.add_argument("--bucket", default="models", help="JetStream Object Store bucket (created if missing)")
    p = add("status", cmd_rollout_status, "a rollout's progress, stage and gates, and the history", rollout)
    p.description = ("Exit 0 when the rollout is done (or running), 1 when it was rolled back, failed or was "
                     "interrupted.")
    _upstream_args(p, expect=False)
    p.add_argument("id", nargs="?", help="a rollout id (default: the newest)")
    p = add("abort", cmd_rollout_abort, "roll an unfinished rollout back", rollout)
    _upstream_args(p, expect=False)
    p.add_argument("id", help="the rollout id")

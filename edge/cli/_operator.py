"""The operator's side of the fleet (SPEC §3, §8): `edge fleet ...`, `edge status`, `edge approvals watch`.

Every command is a scatter-gather over upstream NATS: publish once with a reply inbox, collect
replies until the timeout (or until as many as expected have answered), and report who did not
answer. The devices expected are the ones that announce themselves: `$SRV.PING.edge` replies
(device id and groups in the service metadata) and heartbeats heard meanwhile.

`register(sub, add)` adds the subcommands to the CLI; each `cmd_*` takes the parsed arguments and
returns an exit code (0 ok, 1 a device failed or did not answer, 2 bad usage or input file); the
`async` functions beside them do the work and are what tests call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hashlib
import json
import logging
import os
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from models import ModelError, load_manifest

from .._config import DEVICE_ID, Auth, Tls, connect_options, decode_config, load_config, redact_url
from .._errors import CommandError, ConfigError
from .._messages import ApprovalRequest, Heartbeat
from .._natsutil import client_of, server_barrier
from ..fleet import (
    REPLY_DECODER,
    VERBS,
    ModelDeploy,
    Reply,
    load_seed,
    pack_model_folder,
    sign_approval,
    sign_command,
    sign_model,
)
from ..fleet._desired import (
    MISSING_AFTER_HEARTBEATS,
    ConfigIntent,
    DeviceView,
    Intent,
    ModelIntent,
    PausedIntent,
    decode_intent,
    desired_key,
    view_fleet,
)
from ._fleet_state import FleetState, Intended, read_fleet, states_intent, write_intent, write_value
from ._output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, exit_code_for, local_url, print_json, run_async
from ._provision import register_provision

log = logging.getLogger("edge.operator")

DEFAULT_SERVER = "nats://127.0.0.1:4222"
DEFAULT_TIMEOUT_S = 2.0
_JSON = msgspec.json.Encoder()
_HEARTBEAT = msgspec.json.Decoder(Heartbeat)
_APPROVAL = msgspec.json.Decoder(ApprovalRequest)


class _Ping(msgspec.Struct):
    """A `$SRV.PING` reply (only what discovery needs)."""

    name: str = ""
    metadata: dict[str, str] = {}


_PING = msgspec.json.Decoder(_Ping)


# ---------------------------------------------------------------------------------------------
# Scatter-gather


class Gathered(msgspec.Struct):
    """What a fleet command got back: every reply, who was expected and did not answer."""

    subject: str
    replies: list[Reply]
    did_not_answer: list[str]
    invalid: list[str]  # replies that are not Replies (first 200 bytes)
    no_responders: bool
    elapsed_s: float

    @property
    def all_ok(self) -> bool:
        return bool(self.replies) and all(r.ok for r in self.replies) and not self.did_not_answer \
            and not self.invalid

    def to_builtins(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(self)
        data["ok"] = self.all_ok
        return data


def command_subject(target: str, verb: str) -> str:
    """`edge.<device>.cmd.<verb>`, `edge.group.<group>.cmd.<verb>` (target `group:<name>`) or `edge.all.cmd.<verb>`."""
    if verb not in VERBS:
        raise CommandError("unknown_verb", f"unknown verb {verb!r}; expected one of {', '.join(sorted(VERBS))}")
    if target == "all":
        return f"edge.all.cmd.{verb}"
    if target.startswith("group:"):
        group = target.removeprefix("group:")
        if not DEVICE_ID.fullmatch(group):
            raise CommandError("bad_target", f"group {group!r}: expected [A-Za-z0-9_-]{{1,64}}")
        return f"edge.group.{group}.cmd.{verb}"
    if not DEVICE_ID.fullmatch(target) or target == "group":
        raise CommandError("bad_target", f"target {target!r}: expected a device id, group:<name> or all")
    return f"edge.{target}.cmd.{verb}"


async def gather(nc: NATS, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str] | None = None,  # noqa: ASYNC109
                 expect: int | None = None, stop: asyncio.Event | None = None) -> tuple[list[Msg], bool]:
    """Publish once and collect replies until `timeout`, `expect` replies, `stop`, or "no responders"."""
    inbox = nc.new_inbox()
    got: list[Msg] = []
    done = asyncio.Event()
    no_responders = False

    async def on_reply(msg: Msg) -> None:
        nonlocal no_responders
        if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
            no_responders = True  # the server says nobody subscribes: nothing to wait for
            done.set()
            return
        got.append(msg)
        if expect is not None and len(got) >= expect:
            done.set()

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, payload, reply=inbox, headers=headers)
        waiters = [asyncio.ensure_future(done.wait())]
        if stop is not None:
            waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return got, no_responders


class Discovery:
    """Devices that announce themselves while a command runs: `$SRV.PING.edge` replies and heartbeats."""

    def __init__(self) -> None:
        self.devices: dict[str, list[str]] = {}  # device -> groups

    async def run(self, nc: NATS, *, timeout: float, stop: asyncio.Event) -> None:  # noqa: ASYNC109
        async def on_heartbeat(msg: Msg) -> None:
            try:
                beat = _HEARTBEAT.decode(msg.data)
            except msgspec.DecodeError:
                return
            self.devices.setdefault(beat.device, list(beat.groups))

        heartbeats = await nc.subscribe("edge.*.heartbeat", cb=on_heartbeat)
        try:
            pings, _ = await gather(nc, "$SRV.PING.edge", b"", timeout=timeout, stop=stop)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await heartbeats.unsubscribe()
        for msg in pings:
            try:
                ping = _PING.decode(msg.data)
            except msgspec.DecodeError:
                continue
            device = ping.metadata.get("device_id", "")
            if ping.name == "edge" and device:
                groups = [g for g in ping.metadata.get("groups", "").split(",") if g]
                self.devices[device] = groups

    def members(self, target: str) -> set[str]:
        if target == "all":
            return set(self.devices)
        if target.startswith("group:"):
            group = target.removeprefix("group:")
            return {d for d, groups in self.devices.items() if group in groups}
        return {target}


async def send_command(nc: NATS, target: str, verb: str, body: dict[str, Any] | None = None, *,
                       timeout: float = DEFAULT_TIMEOUT_S, expect: int | None = None,  # noqa: ASYNC109
                       seed: bytes | None = None, discover: bool = True) -> Gathered:
    """Send one command to a device, a group or all, and gather the replies (see the module docstring)."""
    subject = command_subject(target, verb)
    payload = _JSON.encode(body or {})
    headers = sign_command(seed, subject, payload) if seed is not None else None
    single = target != "all" and not target.startswith("group:")
    if expect is None and single:
        expect = 1  # one device answers once: no need to wait for the timeout
    started = time.monotonic()
    stop = asyncio.Event()
    discovery = Discovery()
    finder = asyncio.ensure_future(discovery.run(nc, timeout=timeout, stop=stop)) if discover else None
    try:
        msgs, no_responders = await gather(nc, subject, payload, timeout=timeout, headers=headers, expect=expect)
    finally:
        stop.set()
        if finder is not None:
            await finder
    elapsed = time.monotonic() - started
    replies: list[Reply] = []
    invalid: list[str] = []
    for msg in msgs:
        try:
            replies.append(REPLY_DECODER.decode(msg.data))
        except msgspec.DecodeError:
            invalid.append(msg.data[:200].decode(errors="replace"))
    replies.sort(key=lambda r: r.device)
    answered = {r.device for r in replies}
    expected = discovery.members(target) if discover else {target} if single else set()
    return Gathered(subject=subject, replies=replies, did_not_answer=sorted(expected - answered), invalid=invalid,
                    no_responders=no_responders, elapsed_s=round(elapsed, 4))


async def publish_model(nc: NATS, folder: Path, *, bucket: str, name: str, version: str) -> tuple[str, str]:
    """Pack `folder` (deterministic .tar.gz) into the Object Store `bucket` (created if missing): (object, sha256)."""
    data = await asyncio.to_thread(pack_model_folder, folder)
    sha256 = hashlib.sha256(data).hexdigest()
    js = nc.jetstream()
    try:
        store = await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        store = await js.create_object_store(bucket)
    obj = f"{name}-{version}.tar.gz"
    await store.put(obj, data)
    return obj, sha256


def check_model_folder(folder: Path, name: str | None, version: str | None) -> tuple[str, str, str]:
    """(name, version, problem) of the model in `folder` as a deploy would send it: the manifest's
    name and version unless given (and then they must match), and what is wrong ("" when nothing):
    no manifest, or a model file whose sha256 is not the manifest's. Blocking."""
    try:
        manifest = load_manifest(folder)
    except ModelError as exc:
        return name or "", version or "", str(exc)
    name, version = name or manifest.name, version or manifest.version
    if (name, version) != (manifest.name, manifest.version):
        return name, version, (f"{folder}: the manifest says {manifest.name} version {manifest.version}, not {name} "
                               f"version {version}")
    model_file = folder / manifest.file
    try:
        actual = hashlib.sha256(model_file.read_bytes()).hexdigest()
    except OSError as exc:
        return name, version, f"{model_file}: {exc.strerror or exc}"
    if actual != manifest.sha256:
        return name, version, f"{model_file}: sha256 is {actual}, the manifest says {manifest.sha256}"
    return name, version, ""


# ---------------------------------------------------------------------------------------------
# Commands (async; the cmd_* wrappers below run them)


async def fleet_ls(args: argparse.Namespace) -> int:
    """`edge fleet ls`: every device that ever reported or answers now, who is missing, who did not
    answer, and how each differs from its desired state."""
    async with _connected(args) as nc:
        got = await send_command(nc, "all", "status", timeout=args.timeout, expect=args.expect, seed=_seed(args))
        try:
            state = await read_fleet(nc)
            unreadable = ""
        except (nats.errors.Error, TimeoutError) as exc:  # nats.js errors included: no JetStream, no permission
            state, unreadable = FleetState(reports={}, desired=[], bad={}), f"{type(exc).__name__}: {exc}"
            print(f"edge: the fleet's desired and reported state cannot be read ({unreadable}): missing devices "
                  "and divergence are unknown", file=sys.stderr)
    rows = [r.result for r in got.replies if r.ok and isinstance(r.result, dict)]
    live = {str(row.get("device")): row for row in rows}
    views = view_fleet(state.reports, state.desired, live, time.time_ns())
    missing = [v.device for v in views if v.state == "missing"]
    silent = [v.device for v in views if v.state == "silent" and v.device not in got.did_not_answer]
    diverged = [v.device for v in views if v.divergence]
    failed = [r for r in got.replies if not r.ok]
    short = args.expect is not None and len(got.replies) < args.expect
    if args.json:
        print_json({"devices": rows, "failed": [msgspec.to_builtins(r) for r in failed],
                     "did_not_answer": got.did_not_answer, "elapsed_s": got.elapsed_s,
                     "fleet": [msgspec.to_builtins(v) for v in views], "missing": missing, "silent": silent,
                     "diverged": diverged, "bad_desired": state.bad})
    else:
        _print_table(["DEVICE", "STATE", "GROUPS", "PAUSED", "MODELS", "SHADOW", "SEEN", "DECISIONS", "P99_MS",
                      "BACKLOG"], [_fleet_row(v, live.get(v.device)) for v in views])
        for view in views:
            for line in view.divergence:
                print(f"{view.device} diverges: {line}")
            if view.ignored:
                print(f"{view.device} ignored {view.ignored} desired value(s) not signed by a key it trusts")
        for reply in failed:
            print(f"{reply.device}: {_error_text(reply)}")
        if missing:
            print(f"missing (not seen for {MISSING_AFTER_HEARTBEATS} heartbeats): {', '.join(missing)}")
        if got.did_not_answer or silent:
            print(f"did not answer: {', '.join(sorted({*got.did_not_answer, *silent}))}")
        for key, why in sorted(state.bad.items()):
            print(f"desired state {key} is ignored by every device: {why}")
        print(f"{len(rows)} device(s) in {got.elapsed_s:.2f}s" + "".join(
            f", {len(names)} {what}" for what, names in (("missing", missing), ("diverging", diverged)) if names))
    return EXIT_FAILURE if failed or got.did_not_answer or silent or short or not got.replies or missing \
        or diverged or unreadable else EXIT_OK


async def fleet_status(args: argparse.Namespace) -> int:
    """`edge fleet status DEVICE`."""
    async with _connected(args) as nc:
        got = await send_command(nc, args.device, "status", timeout=args.timeout, seed=_seed(args), discover=False)
    return _report_status(args, got)


async def fleet_cmd(args: argparse.Namespace) -> int:
    """`edge fleet cmd TARGET VERB [--data JSON]`."""
    try:
        body = json.loads(args.data) if args.data else {}
    except json.JSONDecodeError as exc:
        print(f"edge: --data: not valid JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(body, dict):
        print("edge: --data: expected a JSON object", file=sys.stderr)
        return EXIT_USAGE
    seed = _seed(args)
    async with _connected(args) as nc:
        intended = await _intend(nc, args.target, args.verb, body, seed)
        got = await send_command(nc, args.target, args.verb, body, timeout=args.timeout, expect=args.expect,
                                 seed=seed)
    return _report(args, got, intended)


async def fleet_deploy_model(args: argparse.Namespace) -> int:
    """`edge fleet deploy-model TARGET FOLDER`: pack, upload, sign, send model.deploy, report per device."""
    folder = Path(args.folder)
    name, version, problem = await asyncio.to_thread(check_model_folder, folder, args.name, args.version)
    if problem:
        print(f"edge: {problem}", file=sys.stderr)
        return EXIT_USAGE
    seed = _seed(args)
    async with _connected(args) as nc:
        obj, sha256 = await publish_model(nc, folder, bucket=args.bucket, name=name, version=version)
        command = ModelDeploy(name=name, version=version, bucket=args.bucket, object=obj, sha256=sha256,
                              signature=sign_model(seed, sha256) if seed is not None else "",
                              mode="shadow" if args.shadow else "active")
        body = msgspec.to_builtins(command)
        intended = await _intend(nc, args.target, "model.deploy", body, seed)
        got = await send_command(nc, args.target, "model.deploy", body, timeout=args.timeout, expect=args.expect,
                                 seed=seed)
    if not args.json:
        print(f"uploaded {args.bucket}/{obj} (sha256 {sha256})")
    return _report(args, got, intended)


async def fleet_config_push(args: argparse.Namespace) -> int:
    """`edge fleet config push TARGET FILE`: validate the file here first, then send config.apply."""
    path = Path(args.file)
    data, problems = await asyncio.to_thread(read_push_file, path)
    if problems:
        for problem in problems:
            print(f"edge: {path}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    seed = _seed(args)
    async with _connected(args) as nc:
        intended = await _intend(nc, args.target, "config.apply", {"config": data}, seed)
        got = await send_command(nc, args.target, "config.apply", {"config": data}, timeout=args.timeout,
                                 expect=args.expect, seed=seed)
    return _report(args, got, intended)


async def _intend(nc: NATS, target: str, verb: str, body: dict[str, Any],
                  seed: bytes | None) -> Intended | CommandError | None:
    """For a group or `all`: write the command's intent as desired state first, so devices offline
    now apply it when they come back. What was written, or why it was not (the command goes anyway)."""
    if not states_intent(target, verb):
        return None
    if seed is None:
        return CommandError("unsigned", "the desired state was not written: it must be signed (--sign-with); "
                                        "devices offline now will not get this")
    try:
        return await write_intent(nc, target, verb, body, seed)
    except (nats.errors.Error, TimeoutError) as exc:  # nats.js errors included: no JetStream, no permission
        return CommandError("desired_state", f"the desired state was not written ({type(exc).__name__}: {exc}); "
                                             "devices offline now will not get this")


async def fleet_desired_ls(args: argparse.Namespace) -> int:
    """`edge fleet desired ls`: every desired value, who signed it and when; bad ones flagged."""
    async with _connected(args) as nc:
        state = await read_fleet(nc)
    if args.json:
        print_json({"desired": [msgspec.to_builtins(d) for d in state.desired], "bad": state.bad})
    else:
        _print_table(["KEY", "VALUE", "SIGNED", "SIGNER"],
                     [[d.key, _intent_text(d.value), _ago(time.time_ns() - d.timestamp), d.signer[:12] + "…"]
                      for d in sorted(state.desired, key=lambda d: d.key)])
        for key, why in sorted(state.bad.items()):
            print(f"{key}: ignored by every device: {why}")
    return EXIT_FAILURE if state.bad else EXIT_OK


async def fleet_desired_set(args: argparse.Namespace, *, clear: bool = False) -> int:
    """`edge fleet desired set TARGET WHAT JSON` / `clear TARGET WHAT`: one value, signed, as given."""
    seed = _seed(args)
    if seed is None:
        print("edge: desired state must be signed: give --sign-with", file=sys.stderr)
        return EXIT_USAGE
    key = desired_key(args.target, args.what)
    value = None if clear else decode_intent(args.what, args.value)
    async with _connected(args) as nc:
        await write_value(nc, key, value, seed)
    if args.json:
        print_json({"key": key, "value": msgspec.to_builtins(value)})
    else:
        print(f"{key} {'cleared: the less specific keys apply again' if clear else 'written'}")
    return EXIT_OK


def read_push_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A config file to push, and every problem found validating it here first (empty when it is good)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return {}, [f"cannot read the file: {exc.strerror or exc}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"not valid TOML: {exc}"]
    try:
        # As the device will see it, with paths relative to a config folder (here the file's).
        decode_config(data, source=str(path), base_dir=path.resolve().parent, env={})
    except ConfigError as exc:
        return data, [str(p) for p in exc.problems]
    return data, []


# `edge status --exit-code`: for HEALTHCHECK, probes and scripts.
HEALTH_EXIT = {"healthy": 0, "degraded": 1}
EXIT_DOWN = 2


async def device_status(args: argparse.Namespace) -> int:
    """`edge status [-c FILE]`: ask the device of this config, on its local bus, for its status."""
    health_exit = bool(getattr(args, "exit_code", False))  # callers building their own Namespace leave it out
    config = await asyncio.to_thread(load_config, Path(args.config) if args.config else None)
    args.server = await asyncio.to_thread(local_url, config)
    try:
        async with _connected(args, default=(config.nats.local_auth, Path(config.base_dir or "."))) as nc:
            got = await send_command(nc, config.device_id, "status", timeout=args.timeout, seed=_seed(args),
                                     discover=False)
    except CommandError as exc:
        if not health_exit or exc.code != "unreachable":
            raise
        print(f"edge: down: {exc.message}", file=sys.stderr)
        return EXIT_DOWN
    code = _report_status(args, got)
    if not health_exit:
        return code
    if code != EXIT_OK:
        return EXIT_DOWN  # no answer, or an error instead of a status: nothing says it runs
    status = got.replies[0].result if isinstance(got.replies[0].result, dict) else {}
    return _health_exit(status)


def _health_exit(status: dict[str, Any]) -> int:
    """0 healthy, 1 degraded (the reasons on stderr): the device's own verdict (`health` in its status)."""
    reported = status.get("health")
    health: dict[str, Any] = reported if isinstance(reported, dict) else {}
    verdict = str(health.get("verdict", "degraded"))
    reasons = health.get("reasons") or ([] if "verdict" in health else ["the device does not report its health"])
    for reason in reasons:
        print(f"edge: degraded: {reason}", file=sys.stderr)
    return HEALTH_EXIT.get(verdict, 1)


async def approvals_watch(args: argparse.Namespace, lines: asyncio.Queue[str | None] | None = None) -> int:
    """`edge approvals watch`: list approval requests; `a N` approves, `d N [reason]` denies (or `--auto`)."""
    by = args.by or getpass.getuser()
    seed = _seed(args)  # the approver's key: devices accept only answers it signs
    pending: dict[int, tuple[Msg, ApprovalRequest, float]] = {}
    numbers = iter(range(1, 1 << 62))
    answered = 0
    finished = asyncio.Event()

    async def answer(number: int, approved: bool, reason: str) -> None:
        nonlocal answered
        entry = pending.pop(number, None)
        if entry is None:
            print(f"no pending request #{number}")
            return
        msg, request, _ = entry
        body = _JSON.encode({"approved": approved, "by": by, "reason": reason})
        headers = sign_approval(seed, request.decision_id, body) if seed is not None else None
        await client_of(msg).publish(msg.reply, body, headers=headers)
        answered += 1
        verdict = "approved" if approved else "denied"
        print(f"#{number} {request.device}/{request.pipeline} {request.requested_action}: {verdict}", flush=True)
        if args.limit is not None and answered >= args.limit:
            finished.set()

    async def on_request(msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            request = _APPROVAL.decode(msg.data)
        except msgspec.DecodeError as exc:
            print(f"ignoring a malformed approval request on {msg.subject}: {exc}", file=sys.stderr)
            return
        number = next(numbers)
        pending[number] = (msg, request, time.monotonic() + request.timeout_ms / 1000)
        confidence = "-" if request.confidence is None else f"{request.confidence:.2f}"
        print(f"#{number} {request.device}/{request.pipeline}: {request.requested_action} (label {request.label}, "
              f"confidence {confidence}, tier {request.tier}) decision {request.decision_id}, "
              f"{request.timeout_ms / 1000:.0f}s to answer", flush=True)
        if args.auto:
            await answer(number, args.auto == "approve", f"auto-{args.auto}")

    async with _connected(args) as nc:
        sub = await nc.subscribe("edge.*.approval.*", cb=on_request)
        await server_barrier(nc)
        if lines is None and not args.auto:
            lines = _stdin_lines()
        print("watching edge.*.approval.* (a N: approve, d N [reason]: deny)", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        try:
            while not finished.is_set():
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                for number in [n for n, (_, _, until) in pending.items() if until < time.monotonic()]:
                    del pending[number]  # the device has decided without us
                if lines is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(finished.wait(), wait)
                    continue
                try:
                    line = await asyncio.wait_for(lines.get(), wait)
                except TimeoutError:
                    continue
                if line is None:  # end of input: nobody left to answer
                    break
                await _on_line(line, answer)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
    return EXIT_OK


async def _on_line(line: str, answer: Callable[[int, bool, str], Awaitable[None]]) -> None:
    parts = line.strip().split(maxsplit=2)
    if not parts:
        return
    if parts[0] in ("a", "d") and len(parts) >= 2 and parts[1].isdigit():
        await answer(int(parts[1]), parts[0] == "a", parts[2] if len(parts) > 2 else "")
    else:
        print("expected `a N` or `d N [reason]`", flush=True)


def _stdin_lines() -> asyncio.Queue[str | None]:
    # A daemon thread: a blocked readline() must not keep the process alive after the watch ends.
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="approvals-stdin", daemon=True).start()
    return queue


# ---------------------------------------------------------------------------------------------
# Output


def _report(args: argparse.Namespace, got: Gathered, intended: Intended | CommandError | None = None) -> int:
    if isinstance(intended, CommandError):
        print(f"edge: {intended.message}", file=sys.stderr)
    elif intended is not None and intended.overridden_by:
        print(f"edge: note: {', '.join(intended.overridden_by)} (more specific) still win(s) over {intended.key} "
              "for the devices they name; `edge fleet desired clear` them to follow it", file=sys.stderr)
    if args.json:
        data = got.to_builtins()
        if isinstance(intended, Intended):
            data["desired"] = msgspec.to_builtins(intended)
        print_json(data)
    else:
        if isinstance(intended, Intended):
            print(f"desired state {intended.key} written: devices offline now apply it when they reconnect")
        for reply in got.replies:
            if reply.ok:
                print(f"{reply.device}: ok {_JSON.encode(reply.result).decode()[:300]}")
            else:
                print(f"{reply.device}: FAILED {_error_text(reply)}")
        for text in got.invalid:
            print(f"invalid reply: {text}")
        if got.no_responders:
            print(f"no device subscribes to {got.subject}")
        if got.did_not_answer:
            print(f"did not answer: {', '.join(got.did_not_answer)}")
        oks = sum(r.ok for r in got.replies)
        print(f"{oks}/{len(got.replies)} ok in {got.elapsed_s:.2f}s")
    return EXIT_OK if got.all_ok and not isinstance(intended, CommandError) else EXIT_FAILURE


def _report_status(args: argparse.Namespace, got: Gathered) -> int:
    if not got.replies:
        print(f"edge: no answer on {got.subject}", file=sys.stderr)
        return EXIT_FAILURE
    reply = got.replies[0]
    if not reply.ok:
        print(f"edge: {reply.device}: {_error_text(reply)}", file=sys.stderr)
        return EXIT_FAILURE
    status = reply.result if isinstance(reply.result, dict) else {}
    if args.json:
        print_json(status)
        return EXIT_OK
    row = dict(zip(["device", "groups", "version", "link", "paused", "decisions", "p99_ms", "backlog", "models"],
                   _ls_row(status), strict=True))
    for key, value in row.items():
        print(f"{key:10} {value}")
    uptime = status.get("uptime_s")
    print(f"{'uptime':10} {'-' if uptime is None else f'{float(uptime):.0f}s'}")
    health = status.get("health")
    if isinstance(health, dict):
        reasons = "; ".join(str(r) for r in health.get("reasons") or [])
        print(f"{'health':10} {health.get('verdict', '?')}{f' ({reasons})' if reasons else ''}")
    for name, pipeline in (status.get("pipelines") or {}).items():
        print(f"pipeline {name}: {_pipeline_text(pipeline)}")
    return EXIT_OK


def _pipeline_text(pipeline: dict[str, Any]) -> str:
    """A pipeline's status in words: no raw Python values (`{}`, `None`) in text output."""
    by_tier = ", ".join(f"{tier} {n}" for tier, n in sorted((pipeline.get("by_tier") or {}).items()))
    parts = [f"{int(pipeline.get('decisions') or 0)} decisions" + (f" ({by_tier})" if by_tier else "")]
    latency = pipeline.get("latency_ms") or {}
    if latency.get("p50") is not None and latency.get("p99") is not None:
        parts.append(f"p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms")
    shadow = pipeline.get("shadow") or {}
    if shadow.get("compared") and shadow.get("agreement") is not None:
        parts.append(f"shadow agrees {shadow['agreement']:.0%} of {shadow['compared']}")
    return ", ".join(parts)


def _ls_row(status: dict[str, Any]) -> list[str]:
    pipelines = (status.get("pipelines") or {}).values()
    decisions = sum(int(p.get("decisions") or 0) for p in pipelines)
    p99s = [p["latency_ms"]["p99"] for p in pipelines if (p.get("latency_ms") or {}).get("p99") is not None]
    models = []
    for slot in status.get("models") or []:
        if slot.get("version") is not None:
            models.append(f"{slot.get('name')}={slot.get('version')}")
    return [
        str(status.get("device", "?")),
        ",".join(status.get("groups") or []) or "-",
        str(status.get("version", "?")),
        str((status.get("link") or {}).get("state", "?")),
        "yes" if status.get("paused") else "no",
        str(decisions),
        f"{max(p99s):.2f}" if p99s else "-",
        str((status.get("audit") or {}).get("backlog", "?")),
        " ".join(models) or "-",
    ]


def _fleet_row(view: DeviceView, status: dict[str, Any] | None) -> list[str]:
    live = _ls_row(status) if status is not None else None
    models = [f"{name}={m.active or '-'}" + (f" (shadow {m.shadow})" if m.shadow else "")
              for name, m in sorted(view.models.items())]
    shadow = [f"{pipeline} {share:.0%}" for pipeline, share in sorted(view.shadow_agreement.items())]
    return [
        view.device,
        view.state,
        ",".join(view.groups) or "-",
        "-" if view.paused is None else "yes" if view.paused else "no",
        " ".join(models) or "-",
        " ".join(shadow) or "-",
        "now" if view.state == "online" else _ago(view.seen_ago_s * 1e9) if view.seen_ago_s is not None else "-",
        *(live[5:8] if live is not None else ["-", "-", "-"]),  # decisions, p99, backlog
    ]


def _ago(ns: float) -> str:
    seconds = max(0.0, ns / 1e9)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago" if seconds < 172800 else f"{seconds / 86400:.0f}d ago"


def _intent_text(value: Intent | None) -> str:
    match value:
        case None:
            return "(cleared)"
        case PausedIntent(paused=paused, reason=reason):
            return ("paused" if paused else "not paused") + (f" ({reason[:60]})" if reason else "")
        case ConfigIntent(config=config):
            return f"config ({', '.join(sorted(config))[:80]})"
        case ModelIntent(active=active, shadow=shadow):
            return f"active {active.version if active else '-'}, shadow {shadow.version if shadow else '-'}"
        case _:
            return "?"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    for row in [header, *sorted(rows)]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _error_text(reply: Reply) -> str:
    return f"{reply.error.code}: {reply.error.message}" if reply.error is not None else "failed"


# ---------------------------------------------------------------------------------------------
# Connections, signing, the CLI


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace, default: tuple[Auth, Path] | None = None) -> AsyncIterator[NATS]:
    """A connection to `args.server` with the credentials of `--creds`, `--nkey` and `--tls-*`
    (or, when none is given, `default`: a config's auth and the folder its paths start from)."""

    async def quiet(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    auth, base = _auth_of(args), Path(".")
    if auth == Auth() and default is not None:
        auth, base = default
    try:
        options = connect_options(auth, base)
    except OSError as exc:  # a missing or unreadable file, a bad certificate or key (ssl.SSLError)
        raise CommandError("bad_credentials", f"cannot use the connection's credentials: {exc}") from None
    try:
        nc = await nats.connect(servers=[s.strip() for s in args.server.split(",")], name="edge-operator",
                                allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1,
                                connect_timeout=max(1.0, float(args.timeout)), error_cb=quiet,
                                inbox_prefix=getattr(args, "inbox_prefix", None) or "_INBOX", **options)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise CommandError("unreachable", f"cannot connect to {redact_url(args.server)}: "
                                          f"{exc or type(exc).__name__}") from None
    try:
        yield nc
    finally:
        await nc.close()


def _auth_of(args: argparse.Namespace) -> Auth:
    """The connection options of the command line, as a config's auth table would say them."""
    tls = Tls(ca=getattr(args, "tls_ca", None) or "", cert=getattr(args, "tls_cert", None) or "",
              key=getattr(args, "tls_key", None) or "")
    return Auth(creds=getattr(args, "creds", None) or "", nkey_seed=getattr(args, "nkey", None) or "",
                tls=tls if tls != Tls() else None)


def _seed(args: argparse.Namespace) -> bytes | None:
    path = getattr(args, "sign_with", None)
    return load_seed(Path(path)) if path else None


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command on uvloop where available; one line on stderr for an expected failure."""
    try:
        return run_async(coro)
    except (CommandError, ConfigError, ModelError) as exc:
        return exit_code_for(exc)


def cmd_fleet_ls(args: argparse.Namespace) -> int:
    return _run(fleet_ls(args))


def cmd_fleet_status(args: argparse.Namespace) -> int:
    return _run(fleet_status(args))


def cmd_fleet_cmd(args: argparse.Namespace) -> int:
    return _run(fleet_cmd(args))


def cmd_fleet_deploy_model(args: argparse.Namespace) -> int:
    return _run(fleet_deploy_model(args))


def cmd_fleet_config_push(args: argparse.Namespace) -> int:
    return _run(fleet_config_push(args))


def cmd_fleet_desired_ls(args: argparse.Namespace) -> int:
    return _run(fleet_desired_ls(args))


def cmd_fleet_desired_set(args: argparse.Namespace) -> int:
    return _run(fleet_desired_set(args))


def cmd_fleet_desired_clear(args: argparse.Namespace) -> int:
    return _run(fleet_desired_set(args, clear=True))


def cmd_status(args: argparse.Namespace) -> int:
    return _run(device_status(args))


def cmd_approvals_watch(args: argparse.Namespace) -> int:
    return _run(approvals_watch(args))


Add = Callable[..., argparse.ArgumentParser]
DESIRED_EPILOG = ("For group:<name> or all, pause, resume, config.apply and model.deploy/promote/rollback are "
                  "first written (signed: --sign-with) as the fleet's desired state, which devices offline now "
                  "apply when they reconnect; a device's own desired state (edge fleet desired set) wins over its "
                  "groups', a group's over all's. Exit 1 when a device failed or did not answer, or the desired "
                  "state could not be written.")


def _upstream_args(p: argparse.ArgumentParser, *, expect: bool = True) -> None:
    p.add_argument("--server", default=os.environ.get("EDGE_SERVER", DEFAULT_SERVER),
                   help="upstream NATS URL(s), comma-separated (env EDGE_SERVER)")
    _connection_args(p)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to gather replies")
    p.add_argument("--inbox-prefix", default="_INBOX",
                   help="reply subjects under this prefix (a provisioned approver uses _INBOX_<name>)")
    p.add_argument("--sign-with", metavar="SEED_FILE",
                   help="nkey seed file to sign with (operator: commands; approver: answers)")
    if expect:
        p.add_argument("--expect", type=int, help="stop gathering once this many devices have answered")


def _connection_args(p: argparse.ArgumentParser, default: str = "") -> None:
    """How to log in to the server; `default` says what applies when none is given."""
    p.add_argument("--creds", metavar="FILE", help=f"NATS credentials file for the connection{default}")
    p.add_argument("--nkey", metavar="SEED_FILE", help=f"nkey seed file: the connection's NATS identity{default}")
    p.add_argument("--tls-ca", metavar="FILE", help=f"CA certificate(s) that verify the server (PEM){default}")
    p.add_argument("--tls-cert", metavar="FILE", help=f"client certificate (PEM){default}")
    p.add_argument("--tls-key", metavar="FILE", help=f"the client certificate's private key (PEM){default}")


def register(sub: Any, add: Add) -> None:
    """Add `fleet ls|status|cmd|deploy-model|config push`, `status` and `approvals watch` to the CLI."""
    fleet = sub.add_parser("fleet", help="operate a fleet over upstream NATS").add_subparsers(
        dest="fleet_command", required=True)
    ls_help = (f"every device that ever reported: who is missing (not seen for {MISSING_AFTER_HEARTBEATS} "
               "heartbeats), who did not answer, how each differs from its desired state; exit 1 when any "
               "device is missing, diverges or did not answer")
    p = add("ls", cmd_fleet_ls, ls_help, fleet)
    p.description = ls_help[0].upper() + ls_help[1:] + "."
    _upstream_args(p)
    p = add("status", cmd_fleet_status, "one device's status", fleet)
    _upstream_args(p, expect=False)
    p.add_argument("device")
    p = add("cmd", cmd_fleet_cmd, "send a command to a device, group:<name> or all", fleet)
    p.epilog = DESIRED_EPILOG
    _upstream_args(p)
    p.add_argument("target", help="a device id, group:<name> or all")
    p.add_argument("verb", choices=sorted(VERBS))
    p.add_argument("--data", help="the command's fields as a JSON object")
    p = add("deploy-model", cmd_fleet_deploy_model, "upload a model folder and deploy it", fleet)
    p.epilog = DESIRED_EPILOG
    _upstream_args(p)
    p.add_argument("target", help="a device id, group:<name> or all")
    p.add_argument("folder", help="a model folder (model.onnx + manifest.toml)")
    p.add_argument("--name", help="model name (default: the manifest's)")
    p.add_argument("--version", help="model version (default: the manifest's)")
    p.add_argument("--shadow", action="store_true", help="run beside the active version, never acted on")
    p.add_argument("--bucket", default="models", help="JetStream Object Store bucket (created if missing)")
    config = fleet.add_parser("config", help="fleet configuration").add_subparsers(
        dest="fleet_config_command", required=True)
    p = add("push", cmd_fleet_config_push, "validate a config file, then apply it on a target", config)
    p.epilog = DESIRED_EPILOG
    _upstream_args(p)
    p.add_argument("target", help="a device id, group:<name> or all")
    p.add_argument("file")
    desired = fleet.add_parser("desired", help="the fleet's desired state (what devices offline apply when "
                                               "they come back)").add_subparsers(dest="fleet_desired_command",
                                                                                 required=True)
    p = add("ls", cmd_fleet_desired_ls, "every desired value, who signed it and when", desired)
    _upstream_args(p, expect=False)
    p = add("set", cmd_fleet_desired_set, "write one desired value (a device's own wins over its groups')",
            desired)
    _upstream_args(p, expect=False)
    p.add_argument("target", help="a device id, group:<name> or all")
    p.add_argument("what", help="paused, config or model.<name>")
    p.add_argument("value", help='the value as JSON, e.g. \'{"paused": false}\'')
    p = add("clear", cmd_fleet_desired_clear, "clear one desired value: the less specific ones apply again",
            desired)
    _upstream_args(p, expect=False)
    p.add_argument("target", help="a device id, group:<name> or all")
    p.add_argument("what", help="paused, config or model.<name>")
    from ._rollout import register_rollout  # here: _rollout builds on this module

    register_rollout(fleet, add)

    p = add("status", cmd_status, "ask the running device (of this config) for its status", sub)
    p.add_argument("-c", "--config", help="config file (default: the bundled example)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--sign-with", metavar="SEED_FILE", help="sign the request (when the local bus is upstream)")
    p.add_argument("--exit-code", action="store_true",
                   help="exit 0 healthy (running, the cloud link online or no upstream, the audit log writing), "
                        "1 degraded (the reasons on stderr), 2 down (no answer); for HEALTHCHECK and scripts")
    _connection_args(p, default="; without any of these: the config's nats.local_auth")

    approvals = sub.add_parser("approvals", help="human approvals").add_subparsers(
        dest="approvals_command", required=True)
    p = add("watch", cmd_approvals_watch, "list approval requests and answer them", approvals)
    _upstream_args(p, expect=False)
    p.add_argument("--auto", choices=["approve", "deny"], help="answer every request without asking")
    p.add_argument("--by", default="", help="who answers (default: the login name)")
    p.add_argument("--limit", type=int, help="stop after answering this many")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    register_provision(fleet, add)


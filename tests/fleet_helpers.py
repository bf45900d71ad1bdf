"""Helpers for the fleet tests: many runtimes on one server, operator arguments, model versions, keys."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import CommandError, Config, Heartbeat, Runtime, server_barrier
from edge.cli._operator import DEFAULT_TIMEOUT_S
from edge.fleet import Fleet
from models import bundled_model_path
from sync import Uploader
from tests.polling import wait_until
from tests.runtime_harness import APPROVER_SEED, NORMAL, OPERATOR_SEED, make_config

RULES_ONLY = {"ladder": ["rules"], "model": ""}


def figure(pytestconfig: pytest.Config, capsys: pytest.CaptureFixture[str], text: str) -> None:
    """A measured figure for the report: shown with `pytest -s`, silent otherwise (tests assert, never time)."""
    if pytestconfig.getoption("capture") == "no":
        with capsys.disabled():
            print(f"\n{text}")


def write_seed(tmp_path: Path, seed: bytes, name: str = "operator.nk") -> Path:
    path = tmp_path / name
    path.write_bytes(seed + b"\n")
    return path


def model_version(tmp_path: Path, version: str, *, corrupt: bool = False) -> Path:
    """A copy of the bundled pump model as `version` (the manifest's sha256 is of model.onnx, so it stays valid)."""
    folder = tmp_path / f"pump-anomaly-{version}{'-corrupt' if corrupt else ''}"
    shutil.copytree(bundled_model_path(), folder)
    manifest = folder / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('version = "1"', f'version = "{version}"'))
    if corrupt:
        data = bytearray((folder / "model.onnx").read_bytes())
        for i in range(100, 164):
            data[i] ^= 0xFF  # flipped bytes: the manifest's sha256 no longer holds
        (folder / "model.onnx").write_bytes(bytes(data))
    return folder


def seed_file(seed: bytes, name: str) -> Path:
    """A test key as a file, for --sign-with."""
    path = Path(tempfile.gettempdir()) / f"edge-tests-{os.getpid()}" / f"{name}.nk"
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_bytes(seed + b"\n")
    return path


def operator_seed_file() -> Path:
    """The test operator's seed (tests.runtime_harness.OPERATOR_SEED): what every test config trusts."""
    return seed_file(OPERATOR_SEED, "operator")


def approver_seed_file() -> Path:
    """The test approver's seed (tests.runtime_harness.APPROVER_SEED)."""
    return seed_file(APPROVER_SEED, "approver")


def ops(server: str, **kwargs: Any) -> argparse.Namespace:
    """Arguments for the operator functions, as the CLI would parse them (signed as the test operator)."""
    defaults: dict[str, Any] = {"server": server, "timeout": DEFAULT_TIMEOUT_S, "json": True, "expect": None,
                                "sign_with": str(operator_seed_file()), "creds": None, "nkey": None,
                                "tls_ca": None, "tls_cert": None, "tls_key": None}
    return argparse.Namespace(**{**defaults, **kwargs})




@asynccontextmanager
async def fleet_of(tmp_path: Path, url: str, count: int, *, groups: Callable[[int], list[str]] = lambda i: [],
                   prefix: str = "gw", pipeline: dict[str, Any] | None = None,
                   **top: Any) -> AsyncIterator[list[tuple[Runtime, Fleet]]]:
    """`count` runtimes (each with its Fleet) on one server: distinct device ids and data_dirs."""
    async with AsyncExitStack() as stack:
        members = []
        for i in range(count):
            config = make_config(tmp_path, url, device=f"{prefix}-{i:03d}", groups=groups(i),
                                 pipeline=pipeline, **top)
            runtime = await stack.enter_async_context(Runtime(config))
            assert runtime.fleet is not None  # every Runtime runs its Fleet
            members.append((runtime, runtime.fleet))
        yield members


class Decisions:
    """Every decision published on a bus, indexed by device and by input (its sha256)."""

    def __init__(self) -> None:
        self.all: list[dict[str, Any]] = []
        self.per_input: dict[str, Counter[str]] = defaultdict(Counter)  # device -> input sha -> count
        self._changed = asyncio.Event()

    async def start(self, nc: NATS, subject: str = "edge.*.decision.*") -> Decisions:
        async def on_message(msg: Msg) -> None:
            decision = msgspec.json.decode(msg.data)
            self.all.append(decision)
            self.per_input[decision["device"]][decision["input_sha256"]] += 1
            self._changed.set()

        await nc.subscribe(subject, cb=on_message, pending_msgs_limit=1_000_000)
        await nc.flush()
        return self

    async def wait_for(self, predicate: Callable[[], bool], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"condition not met within {within}s ({len(self.all)} decisions)")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue


async def every_decision_heard(fleet: list[tuple[Runtime, Fleet]], decisions: Decisions, *,
                               within: float = 10.0) -> None:
    """Until each device's pipeline has published nothing `decisions` has not heard (a doubled one included).

    A barrier on each device's own connection first: whatever the server delivered to it before now, it has read.
    """
    for runtime, _ in fleet:
        assert runtime.local is not None
        await server_barrier(runtime.local)

    def heard() -> bool:
        return all(runtime.pipelines["pump"].stats.decisions == sum(decisions.per_input[runtime.device].values())
                   for runtime, _ in fleet)

    await wait_until(heard, within=within, what="every decision the devices made")


class Inputs:
    """Publishes unique inputs at a steady pace; remembers each one's sha256 (decisions carry it)."""

    def __init__(self, nc: NATS, subject: str = "sensors.p1.pump", base: dict[str, Any] | None = None) -> None:
        self.nc = nc
        self.subject = subject
        self.base: dict[str, Any] = base or NORMAL
        self.sent: list[str] = []  # input sha256s, in order

    def payload(self, i: int) -> bytes:
        row = {**self.base, "rms": round(self.base["rms"] + (i % 7) * 0.05, 3), "asset": f"in-{i}"}
        return msgspec.json.encode(row)

    async def send(self, count: int, *, every: float = 0.0) -> None:
        for _ in range(count):
            data = self.payload(len(self.sent))
            self.sent.append(hashlib.sha256(data).hexdigest())
            await self.nc.publish(self.subject, data)
            if every:
                await asyncio.sleep(every)  # pace: a steady input rate
        await self.nc.flush()

    async def run(self, stop: asyncio.Event, *, every: float) -> None:
        while not stop.is_set():
            await self.send(1, every=every)


class _NoDeployments:
    """A device that serves no deployable model: every model verb is refused as the runtime would."""

    def store_dir(self, name: str, version: str) -> Path:
        return Path("/nonexistent") / name / version

    def serving(self, name: str) -> tuple[str | None, str | None]:
        return None, None

    async def load(self, name: str, folder: Path) -> Any:
        raise CommandError("unknown_model", f"no model {name!r}")

    async def deploy(self, name: str, folder: Path, mode: Literal["active", "shadow"] = "active", *,
                     by: str = "", model: Any = None) -> dict[str, Any]:
        raise CommandError("unknown_model", f"no model {name!r}")

    async def promote(self, name: str, *, by: str = "") -> dict[str, Any]:
        raise CommandError("no_shadow", f"model {name!r} has no shadow candidate to promote")

    async def rollback(self, name: str, *, by: str = "") -> dict[str, Any]:
        raise CommandError("nothing_to_roll_back", f"model {name!r} has no previous version on this device")


class StubDevice:
    """Just what a Fleet needs of a device (edge.fleet.Device): many lightweight devices on a real server."""

    def __init__(self, config: Config, upstream: NATS) -> None:
        self.config = config
        self.device = config.device_id
        self.data_dir = config.resolve(config.data_dir)
        self.local: NATS | None = upstream
        self.upstream: NATS | None = upstream
        self.link_epoch = 0
        self.uploader: Uploader | None = None
        self.started_at = time.monotonic()
        self.paused = False
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._deployments = _NoDeployments()

    @property
    def deployments(self) -> _NoDeployments:
        return self._deployments

    async def wait_upstream(self) -> NATS:
        assert self.upstream is not None
        return self.upstream

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(device=self.device, groups=list(self.config.groups), version="0.1.0", ts=time.time_ns(),
                         uptime_s=round(time.monotonic() - self.started_at, 3), link="online", paused=self.paused,
                         audit_backlog=0)

    def status(self) -> dict[str, Any]:
        return {"device": self.device, "groups": self.config.groups, "version": "0.1.0", "paused": self.paused,
                "link": {"state": "online"}, "pipelines": {}, "models": [], "audit": {"backlog": 0}}

    async def apply_config(self, new: Config, *, by: str = "") -> dict[str, Any]:
        self.config = new
        return {"by": by}

    async def rollback_config(self, *, by: str = "") -> dict[str, Any]:
        raise CommandError("nothing_to_roll_back", "no previous config is kept on this device")

    def pause(self, by: str = "", reason: str = "") -> None:
        self.paused = True

    def resume(self, by: str = "", reason: str = "") -> None:
        self.paused = False

    def record(self, kind: str, body: dict[str, Any]) -> None:
        self.records.append((kind, body))

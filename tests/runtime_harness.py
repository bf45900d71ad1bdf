"""Helpers to run a real Runtime (in-process or as a subprocess) against real nats-servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edge import BUNDLED_CONFIG, Config, config_to_toml, decode_config, server_barrier
from edge.fleet import new_seed, public_key_of
from models import bundled_model_path
from tests.polling import wait_until

PUMP_INPUT = {"rms": "float", "kurtosis": "float", "temp_c": "float", "rpm": "float", "asset": "str?"}
PUMP_RULES = [
    {"when": "temp_c > 95 or rms > 7.5", "action": "shutdown", "label": "critical"},
    {"when": "rms > 4.5 and kurtosis > 5", "action": "inspect", "label": "anomaly"},
    {"default": True, "action": "none", "label": "normal"},
]
NORMAL = {"rms": 1.2, "kurtosis": 3.0, "temp_c": 45.0, "rpm": 1480.0, "asset": "p1"}
ANOMALY = {"rms": 5.5, "kurtosis": 7.0, "temp_c": 60.0, "rpm": 1480.0, "asset": "p1"}
CRITICAL = {"rms": 9.0, "kurtosis": 4.0, "temp_c": 99.0, "rpm": 1480.0, "asset": "p1"}

# The secure path, with keys made for this test run: every test config trusts this operator for
# commands and this approver for approval answers (a test of `allow_unsigned` says so itself).
OPERATOR_SEED, APPROVER_SEED = new_seed(), new_seed()
OPERATOR, APPROVER = public_key_of(OPERATOR_SEED), public_key_of(APPROVER_SEED)


def config_data(tmp_path: Path, local_url: str, *, upstream_url: str = "", device: str = "gw-test",
                pipeline: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A pump config as plain data, pointing at the given servers; override any part."""
    p: dict[str, Any] = {
        "name": "pump",
        "subscribe": ["sensors.*.pump"],
        "input": PUMP_INPUT,
        "ladder": ["model", "rules"],
        "model": "pump-anomaly",
        "min_confidence": 0.8,
        "rules": PUMP_RULES,
        "labels": {"anomaly": "inspect", "critical": "shutdown", "normal": "none"},
    }
    p.update(pipeline or {})
    data: dict[str, Any] = {
        "device_id": device,
        "data_dir": str(tmp_path / f"var-{device}"),
        "nats": {"local": local_url, "upstream": upstream_url},
        "link": {"probe_interval_ms": 100, "probe_timeout_ms": 100, "breaker_failures": 3, "breaker_reset_ms": 500},
        "audit": {"create_stream": True},
        "models": [{"name": "pump-anomaly", "path": str(bundled_model_path())}],
        "fleet": {"trusted_keys": [OPERATOR], "approver_keys": [APPROVER]},
        "pipelines": [p],
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_config(tmp_path: Path, local_url: str, **kwargs: Any) -> Config:
    return decode_config(config_data(tmp_path, local_url, **kwargs), base_dir=tmp_path, env={})


def bundled_config_text(edits: dict[str, str] | None = None) -> str:
    """The bundled example config with the bundled model's absolute path, each `edits` old -> new
    applied (each must occur: an edit that misses would leave the test testing nothing)."""
    text = BUNDLED_CONFIG.read_text().replace("../../models/bundled/pump-anomaly/1", str(bundled_model_path()))
    for old, new in (edits or {}).items():
        assert old in text, f"{old!r} is not in the bundled config"
        text = text.replace(old, new)
    return text


def bundled_config_with(tmp_path: Path, edits: dict[str, str], name: str = "bad.toml") -> Path:
    """`bundled_config_text(edits)` written to a file."""
    path = tmp_path / name
    path.write_text(bundled_config_text(edits))
    return path


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(config_to_toml(data))
    return path


class Collector:
    """Subscribes to a subject and keeps every message; wait for counts with a deadline."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self._changed = asyncio.Event()

    async def start(self, nc: NATS, subject: str) -> Collector:
        async def on_message(msg: Msg) -> None:
            self.messages.append(msg)
            self._changed.set()

        await nc.subscribe(subject, cb=on_message)
        await server_barrier(nc)
        return self

    def decoded(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(m.data) for m in self.messages]

    async def wait_for(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while len(self.messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {count} messages, got {len(self.messages)} in {within}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return self.decoded()


async def wait_until_answering(nc: NATS, subject: str, payload: bytes, within: float = 20.0) -> Msg:
    """Request until someone answers (a runtime starting in another process), with a deadline."""
    reply: Msg | None = None

    async def answered() -> bool:
        nonlocal reply
        try:
            reply = await nc.request(subject, payload, timeout=0.5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return True

    await wait_until(answered, within=within, what=f"an answer on {subject}", interval=0.05)
    assert reply is not None
    return reply


async def connect(url: str, **options: Any) -> NATS:
    return await nats.connect(url, **options)


def start_runtime_process(config_path: Path, *extra: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """`edge run -c config_path` as a child process; its log goes to `log_path` (beside the config)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = log_path or config_path.with_suffix(".log")
    with log_path.open("ab") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "edge", "--log-format", "json", "run", "-c", str(config_path), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, env=env,
        )


def encode(data: dict[str, Any]) -> bytes:
    return msgspec.json.encode(data)

"""Staged rollouts (`edge fleet rollout`) on a real nats-server with real runtimes and ONNX models:
a canary whose shadow disagrees is rolled back and `rollout status` says why, a device that cannot
apply the candidate rolls it back too, a healthy rollout reaches the whole group (a device offline
meanwhile on its return), an interrupted one says where it stopped and `abort` undoes it; and the
pure part (canaries, gates, the signed record) without a network."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from edge import CommandError, Config, Runtime
from edge.cli._fleet_state import fleet_buckets, read_fleet
from edge.cli._rollout import rollout_abort, rollout_start, rollout_status
from edge.fleet import new_seed
from edge.fleet._desired import ModelVersion, is_missing
from edge.fleet._rollout import (
    MAX_PASSING_KEPT,
    Counts,
    Gates,
    Measure,
    Rollout,
    counts_of,
    encode_record,
    evaluate,
    failures,
    kept,
    parse_canary,
    pick_canaries,
    read_record,
)
from sync import iter_records
from tests.fleet_helpers import Inputs, model_version, ops
from tests.model_builders import matmul_model, write_model
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import OPERATOR_SEED, connect, make_config

HEARTBEAT_S = 0.4
FEATURES = ["rms", "kurtosis", "temp_c", "rpm"]
LABELS = ["normal", "anomaly", "critical"]


def device_config(tmp_path: Path, url: str, device: str) -> Config:
    return make_config(tmp_path, url, device=device, groups=["north"], fleet={"heartbeat_s": HEARTBEAT_S})


def always_anomaly(tmp_path: Path, version: str) -> Path:
    """A candidate that disagrees with the bundled model on normal readings: `anomaly`, whatever it reads."""
    weights = np.zeros((4, 3), dtype=np.float32)
    weights[3, 1] = 0.01  # rpm (~1480) makes the anomaly logit ~15, the others stay 0
    return write_model(tmp_path / f"always-anomaly-{version}", matmul_model(weights, softmax=True),
                       features=FEATURES, labels=LABELS, name="pump-anomaly", version=version)


def mismatched(tmp_path: Path, version: str) -> Path:
    """A candidate no device can take: it reads a feature the pipeline does not have."""
    model = matmul_model(np.ones((4, 3), dtype=np.float32), softmax=True)
    return write_model(tmp_path / f"mismatched-{version}", model, features=["rms", "kurtosis", "temp_c", "pressure"],
                       labels=LABELS, name="pump-anomaly", version=version)


def start_args(url: str, folder: Path, **kwargs: Any) -> Any:
    defaults: dict[str, Any] = {"group": "north", "folder": str(folder), "resume": None, "canary": "1",
                                "window": "1.5s", "min_agreement": 0.9, "max_fallback_rate": 0.2,
                                "max_error_rate": 0.05, "min_decisions": 15, "apply_timeout": "20s", "name": None,
                                "version": None, "bucket": "models", "timeout": 2.0}
    return ops(url, **{**defaults, **kwargs})


async def start(url: str, folder: Path, capsys: pytest.CaptureFixture[str],
                **kwargs: Any) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = await rollout_start(start_args(url, folder, **kwargs))
    return code, json.loads(capsys.readouterr().out)["rollout"]


async def status(url: str, capsys: pytest.CaptureFixture[str], rollout_id: str | None = None, *,
                 as_json: bool = True) -> tuple[int, Any]:
    capsys.readouterr()
    code = await rollout_status(ops(url, id=rollout_id, json=as_json))
    out = capsys.readouterr().out
    return code, json.loads(out) if as_json else out


def model_events(runtime: Runtime) -> list[str]:
    """What was done to the device's models (not the `in_use` records decisions refer to)."""
    assert runtime.audit is not None
    events = [msgspec.json.decode(r.body).get("event", "") for r in iter_records(runtime.audit.path, kinds=["model"])]
    return [event for event in events if event != "in_use"]


async def reporting(nc: NATS, devices: Iterable[str]) -> None:
    async def all_reporting() -> bool:
        return set(devices) <= set((await read_fleet(nc)).reports)

    await wait_until(all_reporting, within=10, what="every device reporting", interval=0.1)


@asynccontextmanager
async def north(tmp_path: Path, url: str, count: int, *,
                gone: tuple[str, ...] = ()) -> AsyncIterator[tuple[dict[str, Runtime], NATS]]:
    """`count` devices of group north, reporting, with readings flowing to all of them (50 a second);
    the `gone` ones (further ids) reported once and went offline."""
    nc = await connect(url)
    await fleet_buckets(nc)  # the operator makes the buckets devices report to
    async with AsyncExitStack() as stack:
        stack.push_async_callback(nc.close)
        for device in gone:
            async with Runtime(device_config(tmp_path, url, device)):
                await reporting(nc, [device])
        devices = {}
        for i in range(count):
            runtime = await stack.enter_async_context(Runtime(device_config(tmp_path, url, f"gw-{i:03d}")))
            devices[runtime.device] = runtime
        await reporting(nc, devices)
        stop = asyncio.Event()
        feeder = asyncio.create_task(Inputs(nc).run(stop, every=0.02))
        try:
            yield devices, nc
        finally:
            stop.set()
            await feeder


# ---------------------------------------------------------------------------------------------


async def test_a_canary_that_disagrees_is_rolled_back_and_status_says_why(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (await nats_servers("hub")).url
    async with north(tmp_path, url, 2) as (devices, nc):
        canary, other = devices["gw-000"], devices["gw-001"]
        code, rollout = await start(url, always_anomaly(tmp_path, "v2"), capsys)
        assert code == 1 and rollout["state"] == "rolled_back" and rollout["failed_stage"] == "canary"
        assert rollout["canaries"] == ["gw-000"]
        assert "canary gate failed: gw-000: agreement 0% (bar >= 90%)" in rollout["reason"]
        [agreement] = [m for m in rollout["measures"]["canary"] if m["gate"] == "agreement"]
        assert agreement["value"] == 0.0 and agreement["ok"] is False
        # The canary ran it as a shadow, and no more; the other device never saw it.
        assert canary.deployments.serving("pump-anomaly") == ("1", None)
        assert model_events(canary) == ["deploy", "shadow_dropped"]
        assert other.deployments.serving("pump-anomaly") == ("1", None) and model_events(other) == []
        state = await read_fleet(nc)
        assert [d.value for d in state.desired if d.what == "model.pump-anomaly"] == [None]  # the canary's, cleared

        code, text = await status(url, capsys, as_json=False)
        assert code == 1
        assert f"rollout {rollout['id']}: pump-anomaly v2 to group north: rolled back at stage canary" in text
        assert "why       canary gate failed: gw-000: agreement 0% (bar >= 90%)" in text
        assert "gw-000: decisions" in text and "agreement 0% (bar >= 90%) FAILED" in text
        assert "progress  0/2 devices on v2" in text

        # A candidate the canary cannot load: rolled back at once, with the device's reason.
        code, failed = await start(url, mismatched(tmp_path, "v3"), capsys)
        assert code == 1 and failed["failed_stage"] == "canary"
        assert "could not apply: gw-000: applied no (model_mismatch: " in failed["reason"]
        assert canary.deployments.serving("pump-anomaly") == ("1", None)

        # A good one goes through; the history keeps all three, newest first, with why.
        code, done = await start(url, model_version(tmp_path, "v4"), capsys)
        assert code == 0 and done["state"] == "done" and done["progress"]["text"] == "2/2 devices on v4"
        assert canary.deployments.serving("pump-anomaly") == other.deployments.serving("pump-anomaly") == ("v4", None)
        code, listing = await status(url, capsys)
        assert code == 0 and listing["rollout"]["id"] == done["id"]
        assert [(r["id"], r["state"]) for r in listing["history"]] == [
            (done["id"], "done"), (failed["id"], "rolled_back"), (rollout["id"], "rolled_back")]
        assert "agreement 0%" in listing["history"][2]["reason"] and listing["ignored"] == {}
        code, old = await status(url, capsys, rollout["id"])
        assert code == 1 and old["rollout"]["state"] == "rolled_back"


async def test_a_healthy_rollout_reaches_the_group_and_a_device_offline_gets_it_on_return(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (await nats_servers("hub")).url
    async with north(tmp_path, url, 2, gone=("gw-002",)) as (devices, nc):
        async def gw_002_missing() -> bool:  # reported once, then not seen for three heartbeats
            reports = (await read_fleet(nc)).reports
            return "gw-002" in reports and is_missing(*reports["gw-002"], time.time_ns())

        await wait_until(gw_002_missing, within=10, what="gw-002 missing", interval=0.2)
        code, rollout = await start(url, model_version(tmp_path, "v2"), capsys, canary="0.5")
        assert code == 0 and rollout["state"] == "done" and rollout["canaries"] == ["gw-000"]
        assert rollout["progress"]["text"] == "2/3 devices on v2" and rollout["pending"] == ["gw-002"]
        assert [m["gate"] for m in rollout["measures"]["canary"]] == ["decisions", "agreement", "error_rate",
                                                                      "fallback_rate"]
        assert all(m["ok"] for stage in ("canary", "rest") for m in rollout["measures"][stage])
        assert model_events(devices["gw-000"]) == ["deploy", "promote"]  # shadow, then promoted: loaded once
        assert model_events(devices["gw-001"]) == ["deploy"]
        code, text = await status(url, capsys, as_json=False)
        assert code == 0 and "progress  2/3 devices on v2; offline, they apply it when they return: gw-002" in text

        # gw-002 comes back and converges on the group's desired state.
        async with Runtime(device_config(tmp_path, url, "gw-002")) as gw_002:
            await wait_until(lambda: gw_002.deployments.serving("pump-anomaly") == ("v2", None), within=10,
                             what="gw-002 on v2")

            async def everyone_on_v2() -> bool:
                code, listing = await status(url, capsys)
                return code == 0 and listing["rollout"]["progress"]["text"] == "3/3 devices on v2"

            await wait_until(everyone_on_v2, within=5, what="3/3 devices on v2", interval=0.2)


async def test_an_interrupted_rollout_says_where_it_stopped_and_abort_rolls_it_back(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (await nats_servers("hub")).url
    async with north(tmp_path, url, 2) as (devices, _):
        canary = devices["gw-000"]
        running = asyncio.create_task(rollout_start(start_args(url, model_version(tmp_path, "v2"), window="60s")))
        await wait_until(lambda: canary.deployments.serving("pump-anomaly") == ("1", "v2"), within=10,
                         what="the canary shadowing v2")
        running.cancel()  # Ctrl-C in the operator's terminal, mid-window
        with pytest.raises(asyncio.CancelledError):
            await running
        code, listing = await status(url, capsys)
        stopped = listing["rollout"]
        assert code == 1 and (stopped["state"], stopped["stage"]) == ("interrupted", "canary")
        code, text = await status(url, capsys, as_json=False)
        assert "interrupted at stage canary" in text and f"edge fleet rollout start --resume {stopped['id']}" in text

        # A new rollout of the same model to the group waits for this one to be settled.
        capsys.readouterr()
        assert await rollout_start(start_args(url, model_version(tmp_path, "v3"))) == 2
        assert f"rollout {stopped['id']} of pump-anomaly to group north is interrupted" in capsys.readouterr().err

        assert await rollout_abort(ops(url, id=stopped["id"])) == 1  # rolled back: not a success
        assert canary.deployments.serving("pump-anomaly") == ("1", None)
        code, listing = await status(url, capsys, stopped["id"])
        assert code == 1 and listing["rollout"]["state"] == "rolled_back"
        assert listing["rollout"]["reason"] == "aborted by the operator at stage canary"


# ---------------------------------------------------------------------------------------------
# The pure part


def test_canaries_are_a_share_rounded_up_or_a_count() -> None:
    devices = [f"gw-{i}" for i in range(5, 0, -1)]
    assert pick_canaries(devices, parse_canary("0.2")) == ["gw-1"]
    assert pick_canaries(devices, parse_canary("0.3")) == ["gw-1", "gw-2"]
    assert pick_canaries(devices, parse_canary("40%")) == ["gw-1", "gw-2"]
    assert pick_canaries(devices, parse_canary("3")) == ["gw-1", "gw-2", "gw-3"]
    assert pick_canaries(devices, parse_canary("9")) == sorted(devices)
    assert pick_canaries([], 0.5) == []
    for bad in ("0", "1.5", "-1", "many", "0%"):
        with pytest.raises(CommandError):
            parse_canary(bad)


def test_gates_are_measured_over_the_window() -> None:
    def status(decisions: int, fallbacks: dict[str, int], compared: int, agreed: int) -> dict[str, Any]:
        return {"pipelines": {"pump": {"model": "pump", "decisions": decisions, "fallbacks": fallbacks,
                                       "shadow": {"compared": compared, "agreed": agreed}},
                              "other": {"model": "other", "decisions": 999}}}

    before = counts_of(status(100, {"model:low_confidence": 5}, 0, 0), "pump")
    after = counts_of(status(200, {"model:low_confidence": 15, "model:error": 4, "cloud:timeout": 50}, 96, 90),
                      "pump")
    assert before is not None and after is not None
    window = after.since(before)
    assert window == Counts(decisions=100, fallbacks=14, errors=4, compared=96, agreed=90)
    assert counts_of(status(1, {}, 0, 0), "nope") is None
    gates = Gates(min_decisions=50, min_agreement=0.95, max_error_rate=0.05, max_fallback_rate=0.1)
    canary = {m.gate: m for m in evaluate("canary", "gw-1", window, gates)}
    assert canary["decisions"].value == 96 and canary["decisions"].ok
    assert canary["agreement"].value == 0.9375 and not canary["agreement"].ok
    assert canary["error_rate"].value == 0.04 and canary["error_rate"].ok  # 4 decisions the candidate did not answer
    assert canary["fallback_rate"].value == 0.14 and not canary["fallback_rate"].ok
    assert failures(canary.values()) == ["gw-1: agreement 93.8% (bar >= 95%)", "gw-1: fallback rate 14% (bar <= 10%)"]
    rest = {m.gate: m for m in evaluate("rest", "gw-1", window, gates)}
    assert "agreement" not in rest and rest["error_rate"].value == 0.04 and rest["decisions"].value == 100
    # A counter that went back (a restart, a new shadow) counts from zero; no decisions judge nothing.
    assert Counts(decisions=10).since(Counts(decisions=500)).decisions == 10
    idle = {m.gate: m for m in evaluate("rest", "gw-1", Counts(), gates)}
    assert idle["error_rate"].value is None and not idle["error_rate"].ok


def test_a_record_keeps_every_failing_device_and_a_few_passing_ones() -> None:
    measures = [Measure(f"gw-{i:04d}", gate, 1.0, 0.0, i % 100 != 7 or gate == "decisions")
                for i in range(1000) for gate in ("decisions", "error_rate")]
    record = kept(measures)
    assert {m.device for m in record if not m.ok} == {f"gw-{i:04d}" for i in range(7, 1000, 100)}
    assert len({m.device for m in record}) == 10 + MAX_PASSING_KEPT and len(record) == 2 * (10 + MAX_PASSING_KEPT)


def test_a_rollout_record_is_signed_over_its_key() -> None:
    artifact = ModelVersion(version="2", bucket="models", object="pump-2.tar.gz", sha256="a" * 64)
    rollout = Rollout(id="r1", group="north", model="pump", artifact=artifact, gates=Gates(), canary="1")
    data = encode_record(OPERATOR_SEED, rollout)
    read, signer = read_record("r1", data)
    assert read.id == "r1" and read.version == "2" and signer.startswith("U")
    with pytest.raises(CommandError, match="does not verify") as moved:
        read_record("r2", data)  # the same record under another key
    assert moved.value.code == "bad_signature"
    tampered = data.replace(b'"north"', b'"south"')
    with pytest.raises(CommandError) as edited:
        read_record("r1", tampered)
    assert edited.value.code == "bad_signature"
    unsigned = msgspec.json.encode({"value": msgspec.to_builtins(rollout)})
    with pytest.raises(CommandError) as plain:
        read_record("r1", unsigned)
    assert plain.value.code == "unsigned"
    other = encode_record(new_seed(), rollout)
    assert read_record("r1", other)[1] != signer  # signed by whoever wrote it; the reader says who

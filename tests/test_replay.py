"""`edge replay`: recorded inputs decided again by a candidate, offline, never writing the log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import Runtime
from edge.cli import main
from models import bundled_model_path
from tests.nats_harness import ServerFactory
from tests.runtime_harness import ANOMALY, CRITICAL, NORMAL, config_data, connect, encode, write_config

INPUTS = [NORMAL] * 6 + [ANOMALY] * 3 + [CRITICAL]


async def record_decisions(nats_servers: ServerFactory, tmp_path: Path,
                           **audit: Any) -> tuple[Path, list[dict[str, Any]]]:
    path, decisions, _ = await record_on_a_bus(nats_servers, tmp_path, **audit)
    return path, decisions


async def record_on_a_bus(nats_servers: ServerFactory, tmp_path: Path,
                          **audit: Any) -> tuple[Path, list[dict[str, Any]], str]:
    """A device that decided INPUTS (model + rules), stopped; its config file and its decisions."""
    await asyncio.to_thread(tmp_path.mkdir, exist_ok=True)
    server = await nats_servers(f"local-{tmp_path.name}")
    data = config_data(tmp_path, server.url, pipeline={"ladder": ["model", "rules"]},
                       audit={"create_stream": True, **audit})
    path = write_config(tmp_path, data)
    from edge import load_config

    async with Runtime(load_config(path)) as runtime:
        nc = await connect(server.url)
        decisions = [msgspec.json.decode((await nc.request("sensors.p1.pump", encode(values), timeout=5)).data)
                     for values in INPUTS]
        await nc.close()
        assert runtime.audit is not None
    return path, decisions, server.url


def replay(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["replay", *args, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_the_model_that_decided_agrees_with_itself_and_nothing_is_written(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, decisions = await record_decisions(nats_servers, tmp_path)
    db = tmp_path / "var-gw-test" / "audit.db"
    before = digest(db)
    report = await asyncio.to_thread(replay, capsys, "-c", str(config), "--model", str(bundled_model_path()))
    assert digest(db) == before  # read only
    assert report["replayed"] == len(INPUTS) and report["skipped"] == {}
    assert (report["label_agreement"], report["action_agreement"], report["changed"]) == (1.0, 1.0, 0)
    recorded = [d["governance"]["requested_action"] for d in decisions]
    assert report["confusion"] == {a: {a: recorded.count(a)} for a in sorted(set(recorded))}
    assert report["candidate"]["name"] == "pump-anomaly" and report["model_us_per_input"] > 0
    assert report["model_runs"] == 1  # one batched run for every input


async def test_a_candidate_config_shows_what_would_change_and_an_export_replays_alike(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, decisions = await record_decisions(nats_servers, tmp_path)
    # The candidate: the model is trusted less (floor 0.999), and rules that hold everything.
    candidate = config_data(tmp_path, "nats://127.0.0.1:4222", pipeline={
        "ladder": ["model", "rules"], "min_confidence": 0.9999999,
        "rules": [{"when": "rms > 1", "action": "hold", "label": "careful"},
                  {"default": True, "action": "none", "label": "normal"}]})
    (tmp_path / "candidate").mkdir()
    candidate_path = write_config(tmp_path / "candidate", candidate)
    report = await asyncio.to_thread(replay, capsys, "-c", str(config), "--config", str(candidate_path),
                                     "--changes", "3")
    assert report["replayed"] == len(INPUTS) and report["changed"] > 0
    assert report["candidate"] == {} and report["model_runs"] >= 1
    assert len(report["changes"]) == min(3, report["changed"])
    seqs = {d["audit_seq"]: d for d in decisions}
    for change in report["changes"]:
        recorded = seqs[change["seq"]]
        assert change["recorded"]["action"] == recorded["governance"]["requested_action"]
        assert change["replayed"]["action"] != change["recorded"]["action"]
    assert any(key.endswith(":low_confidence") for key in report["fallbacks"])

    export = tmp_path / "export.jsonl"
    assert main(["audit", "export", "-c", str(config), "--out", str(export)]) == 0
    capsys.readouterr()
    from_export = await asyncio.to_thread(replay, capsys, "-c", str(config), "--config", str(candidate_path),
                                          "--changes", "3", "--from-export", str(export))
    assert {k: v for k, v in from_export.items() if k != "elapsed_s"} == {
        k: v for k, v in report.items() if k != "elapsed_s"}


async def test_a_narrower_model_falls_to_the_rules_and_hashed_inputs_are_skipped(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = tmp_path / "narrow"
    shutil.copytree(bundled_model_path(), narrow)
    manifest = narrow / "manifest.toml"
    text = manifest.read_text()
    start = text.index("[training_range]")
    manifest.write_text(text[:start] + '[training_range]\nrms = [0.0, 2.0]\n')  # only quiet pumps
    config, _ = await record_decisions(nats_servers, tmp_path)
    report = await asyncio.to_thread(replay, capsys, "-c", str(config), "--model", str(narrow))
    assert report["fallbacks"].get("model:pump-anomaly:out_of_range", 0) > 0
    assert report["by_tier"].get("rules:rules", 0) == report["fallbacks"]["model:pump-anomaly:out_of_range"]

    hashed, _ = await record_decisions(nats_servers, tmp_path / "h", inputs="hash")
    report = await asyncio.to_thread(replay, capsys, "-c", str(hashed), "--model", str(bundled_model_path()))
    assert report["replayed"] == 0 and report["skipped"] == {"hash_only": len(INPUTS)}


def test_replay_needs_a_candidate_and_a_readable_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--from-export", str(tmp_path / "none.jsonl"), "--model", str(bundled_model_path())]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 1}\n')
    assert main(["replay", "--from-export", str(bad), "--model", str(bundled_model_path())]) == 2
    assert "bad.jsonl:1: not an exported audit record" in capsys.readouterr().err
    assert main(["replay", "--from-export", str(bad)]) == 2
    assert "needs a candidate" in capsys.readouterr().err


def always_anomaly(folder: Path) -> Path:
    """A candidate built here that answers "anomaly" for every pump: logits rpm x (0, 1, 0), softmax."""
    import numpy as np

    from tests.model_builders import matmul_model, write_model

    weights = np.zeros((4, 3), dtype=np.float32)
    weights[3, 1] = 1.0  # rpm (900..3000) into the anomaly logit: probability ~1
    return write_model(folder, matmul_model(weights, softmax=True, output="probabilities"),
                       features=["rms", "kurtosis", "temp_c", "rpm"], labels=["normal", "anomaly", "critical"],
                       name="pump-anomaly", version="99", task="classifier", scores="probabilities")


async def test_a_candidate_that_always_says_anomaly_changes_exactly_the_decisions_predicted_and_publishes_nothing(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, decisions, bus = await record_on_a_bus(nats_servers, tmp_path)
    candidate = always_anomaly(tmp_path / "candidate")
    listener = await connect(bus)  # the device's bus: replay must stay off it
    heard: list[bytes] = []

    async def hear(msg: Any) -> None:
        heard.append(msg.data)

    await listener.subscribe(">", cb=hear)
    report = await asyncio.to_thread(replay, capsys, "-c", str(config), "--model", str(candidate),
                                     "--changes", "100")
    await listener.flush()
    await listener.close()
    assert heard == []
    # Every input reaches the model tier (no guard, no training range on the candidate) and gets
    # "anomaly" -> inspect: exactly the decisions that requested anything else change.
    expected = sorted(d["audit_seq"] for d in decisions if d["governance"]["requested_action"] != "inspect")
    assert report["changed"] == len(expected) > 0
    assert sorted(c["seq"] for c in report["changes"]) == expected
    assert all(c["replayed"] == {"tier": "model", "tier_name": "pump-anomaly", "label": "anomaly",
                                 "action": "inspect", "confidence": 1.0} for c in report["changes"])
    assert report["candidate"]["version"] == "99" and report["by_tier"] == {"model:pump-anomaly": len(INPUTS)}

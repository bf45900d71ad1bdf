"""The command line: exit codes, precise messages, and the audit commands on a real log."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edge import BUNDLED_CONFIG, Runtime
from edge.cli import main
from models import bundled_model_path
from sync._storage import unpack_body
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import ANOMALY, NORMAL, bundled_config_with, connect, encode, make_config


def test_check_accepts_the_bundled_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(BUNDLED_CONFIG)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_names_the_file_and_every_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = bundled_config_with(tmp_path, {"rms > 4.5 and kurtosis > 5": "rms > 4.5 and kurtosiz > 5",
                                         'ladder = ["model", "cloud", "rules"]': 'ladder = ["rules", "model"]'})
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "pipelines[0].rules[1].when" in err and "kurtosiz" in err
    assert "pipelines[0].ladder" in err


def test_check_of_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_models_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "inspect", str(bundled_model_path()), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256_matches"] is True
    assert info["manifest"]["features"] == ["rms", "kurtosis", "temp_c", "rpm"]


def test_python_dash_m_edge_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "edge", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "audit" in result.stdout and "check" in result.stdout


async def test_audit_commands_on_a_real_log(nats_servers: ServerFactory, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    server = await nats_servers("hub")
    config = make_config(tmp_path, server.url)
    async with Runtime(config) as runtime:
        nc = await connect(server.url)
        for row in (NORMAL, ANOMALY, NORMAL):
            await nc.request("sensors.p1.pump", encode(row), timeout=5)
        uploader = runtime.uploader
        assert uploader is not None
        await wait_until(
            lambda: runtime.audit is not None and uploader.status()["synced_seq"] == runtime.audit.last_seq,
            within=10, what="the uploader to sync the whole log")
        await nc.close()
    db = str(runtime.data_dir / "audit.db")

    assert main(["audit", "tail", "--db", db, "-n", "2", "--json"]) == 0
    tail = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in tail][-1] == "stop" and len(tail) == 2

    assert main(["audit", "query", "--db", db, "--kind", "decision", "--json"]) == 0
    decisions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["body"]["label"] for d in decisions] == ["normal", "anomaly", "normal"]
    # A record keeps what is specific to its decision; --decisions reads the full Decision back.
    assert all("device" not in d["body"] and isinstance(d["body"]["model"], int) for d in decisions)
    assert main(["audit", "query", "--db", db, "--decisions"]) == 0
    full = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["audit_seq"], d["device"], d["label"]) for d in full] == [
        (d["seq"], "gw-test", d["body"]["label"]) for d in decisions]
    assert all(d["model"]["name"] == "pump-anomaly" and len(d["model"]["sha256"]) == 64 for d in full)

    out = tmp_path / "export.jsonl"
    assert main(["audit", "export", "--db", db, "--out", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in exported] == list(range(1, len(exported) + 1))

    assert main(["audit", "verify", "--db", db]) == 0
    # The CLI runs its own event loop: call it from a thread, as a shell would from outside.
    upstream = ["audit", "verify", "--upstream", "--server", server.url, "--device", "gw-test"]
    assert await asyncio.to_thread(main, upstream) == 0
    capsys.readouterr()

    # Tamper with one decision: verify names its seq and fails.
    victim = decisions[1]["seq"]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT body FROM records WHERE seq = ?", (victim,)).fetchone()[0]
        # Whoever holds the file can unpack a stored body (the format is documented) and write it back changed.
        forged = unpack_body(stored).replace(b"inspect", b"none")
        assert forged != unpack_body(stored)
        conn.execute("UPDATE records SET body = ? WHERE seq = ?", (forged, victim))
    assert main(["audit", "verify", "--db", db, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["first_bad_seq"] == victim

"""`edge report` (and the fleet's `report`): what the AI was worth, from the audit log alone."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import Runtime, load_config
from edge.cli import main
from edge.cli._operator import send_command
from edge.tools.cloudsim import AutoApprover, CloudSimulator
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import (
    APPROVER_SEED,
    CRITICAL,
    NORMAL,
    OPERATOR_SEED,
    config_data,
    connect,
    encode,
    write_config,
)


async def test_the_report_counts_tiers_cloud_calls_avoided_approvals_overrides_and_time_offline(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    data = config_data(tmp_path, local.url, upstream_url=cloud.url, pipeline={
        "ladder": ["cloud", "model", "rules"], "cloud": {"subject": "cloud.infer.pump", "timeout_ms": 500},
        "actions": {"shutdown": {"approval": "required", "approval_timeout_ms": 3000, "instead": "hold"},
                    "hold": {}}},
        link={"probe_interval_ms": 100, "probe_timeout_ms": 500, "breaker_failures": 2, "breaker_reset_ms": 300})
    data["value"] = {"cloud_call_cost": 0.01, "currency": "EUR"}
    config_path = write_config(tmp_path, data)
    answers = itertools.cycle([True, False])  # the first shutdown approved, the second denied
    cloud_nc = await connect(cloud.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    async with CloudSimulator(cloud_nc) as _, AutoApprover(cloud_nc, delay_s=(0.01, 0.02), key=APPROVER_SEED,
                                                           policy=lambda request: next(answers)):
        async with Runtime(load_config(config_path)) as runtime:
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the link online")
            nc = await connect(local.url)

            async def decide(values: dict[str, Any]) -> dict[str, Any]:
                reply = await nc.request("sensors.p1.pump", encode(values), timeout=10)
                decoded: dict[str, Any] = msgspec.json.decode(reply.data)
                return decoded

            online = [await decide(NORMAL) for _ in range(5)] + [await decide(CRITICAL) for _ in range(2)]
            assert {d["tier"] for d in online} == {"cloud"}
            assert [d["governance"]["status"] for d in online[5:]] == ["approved", "denied"]
            await cloud.stop()  # the cloud is gone: the model decides, nobody asks the cloud
            await wait_until(lambda: runtime.link.state.value == "offline", within=10, what="the link offline")
            offline = [await decide(NORMAL) for _ in range(4)]
            assert {d["tier"] for d in offline} == {"model"}
            await cloud.start()
            await wait_until(lambda: runtime.link.state.value == "online", within=20, what="the link back")
            assert (await decide(NORMAL))["tier"] == "cloud"
            ops = await connect(cloud.url)
            got = await send_command(ops, "gw-test", "report", {"since": "1h"}, expect=1, seed=OPERATOR_SEED)
            await ops.close()
            await nc.close()
    await cloud_nc.close()
    assert got.all_ok
    over_the_fleet = got.replies[0].result
    assert over_the_fleet["decisions"] == 12 and over_the_fleet["cloud_calls_avoided"] == 4

    png = tmp_path / "report.png"
    assert await asyncio.to_thread(main, ["report", "-c", str(config_path), "--json", "--png", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decisions"] == 12
    assert report["by_tier"] == {"cloud": {"decisions": 8, "share": 0.6667}, "model": {"decisions": 4, "share": 0.3333}}
    assert report["by_tier_name"]["model:pump-anomaly"]["decisions"] == 4
    assert (report["cloud_calls"], report["cloud_calls_avoided"]) == (8, 4)
    assert report["cloud_cost_avoided"] == 0.04 and report["currency"] == "EUR"
    approvals = report["approvals"]
    assert (approvals["asked"], approvals["approved"], approvals["denied"], report["human_overrides"]) == (2, 1, 1, 1)
    assert 0 < approvals["latency_ms_p50"] <= approvals["latency_ms_p99"] < 3000
    assert report["offline_s"] > 0 and report["decisions_offline"] == 4
    assert report["fallbacks"]["cloud:unreachable"] + report["fallbacks"].get("cloud:breaker_open", 0) == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {k: v for k, v in over_the_fleet.items() if k not in ("since_ns", "last_ns", "timeline", "decisions",
                                                                  "by_tier", "by_tier_name", "cloud_calls",
                                                                  "governance", "offline_s")
            } == {k: v for k, v in report.items() if k not in ("since_ns", "last_ns", "timeline", "decisions",
                                                               "by_tier", "by_tier_name", "cloud_calls",
                                                               "governance", "offline_s")}

    # The same figures, counted here from the exported records themselves.
    export = tmp_path / "all.jsonl"
    assert main(["audit", "export", "-c", str(config_path), "--out", str(export)]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in export.read_text().splitlines()]
    bodies = [r["body"] for r in records if r["kind"] == "decision"]
    by_tier: dict[str, int] = {}
    for body in bodies:
        by_tier[body["tier"]] = by_tier.get(body["tier"], 0) + 1
    asked = [b for b in bodies if b["tier"] == "cloud" or any(
        f["tier"] == "cloud" and f["reason"] in ("timeout", "invalid_reply", "low_confidence", "error")
        for f in b.get("fallbacks", []))]
    outcomes = [r["body"]["status"] for r in records if r["kind"] == "approval"]
    assert {k: v["decisions"] for k, v in report["by_tier"].items()} == by_tier
    assert (report["cloud_calls"], report["cloud_calls_avoided"]) == (len(asked), len(bodies) - len(asked))
    assert (report["approvals"]["approved"], report["approvals"]["denied"]) == (
        outcomes.count("approved"), outcomes.count("denied"))
    from_export = await asyncio.to_thread(main, ["report", "--from-export", str(export), "--json", "--since", "1d"])
    assert from_export == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k not in ("since_ns", "currency",
                                                                                      "cloud_cost_avoided")
            } == {k: v for k, v in report.items() if k not in ("since_ns", "currency", "cloud_cost_avoided")}

    assert await asyncio.to_thread(main, ["report", "-c", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert "cloud calls avoided by the model and rules: 4 of 12, 0.04 EUR" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "1 denied (human overrides)" in text


def test_a_report_of_an_empty_period_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "empty.jsonl"
    export.write_text("")
    assert main(["report", "--from-export", str(export)]) == 0
    assert "no decision in the period" in capsys.readouterr().out

"""`edge demo` (SPEC §3, §11): the short mode CI runs, end to end, and the pieces it is made of."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import Fallback, Governance
from edge.tools.demo import (
    Clock,
    DemoOptions,
    Recorder,
    Sample,
    SeenDecision,
    SensorStory,
    plan_story,
    reading,
    render_line,
    render_view,
    run_demo,
)
from models import bundled_model_path, load_manifest


async def test_short_demo_keeps_deciding_through_the_outage_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4 s of outage: a second each for the primary blackholed and the backup slow, two with the link cut.
    code = await run_demo(DemoOptions(duration_s=10, outage_s=4, out_dir=tmp_path, live=False))

    summary: dict[str, Any] = msgspec.json.decode((tmp_path / "summary.json").read_bytes())
    verification = summary["verification"]
    assert code == 0, verification["problems"]
    assert summary["ok"] and verification["ok"]
    # The stream holds exactly the local log: seqs 1..last, once each, one chain.
    assert verification["gaps"] == 0 and verification["duplicates"] == 0 and verification["out_of_order"] == 0
    assert verification["chain_ok"] and verification["local_chain_ok"]
    assert verification["upstream_first_seq"] == 1
    assert verification["upstream_last_seq"] == verification["local_last_seq"] == verification["local_records"]
    # Every input got one decision, and every published decision is on record.
    assert verification["inputs_sent"] == verification["decisions_published"] == verification["decisions_in_log"]
    assert verification["inputs_sent"] == 10 * 20

    before, during, after = (summary["phases"][p] for p in ("before", "during", "after"))
    assert before["by_tier"]["cloud"] > 0
    # During the outage decisions kept flowing, each fallback saying why.
    assert during["decisions"] > 0
    assert during["by_tier"]["model"] > 0 and during["by_tier"]["rules"] > 0
    assert {"cloud:breaker_open", "cloud:unreachable"} & set(during["fallbacks"])
    # Once both providers' breakers were open, no decision waited on the cloud (SPEC §9).
    assert summary["outage_max_latency_after_breaker_ms"] < 200
    # The runtime went back to the cloud by itself.
    assert after["by_tier"]["cloud"] > 0

    # By named tier: the primary decides until it is blackholed, then the backup (only then),
    # then, the backup slow past its timeout, the models; the primary again after the outage.
    stages = {name: stage["by_tier_name"] for name, stage in summary["stages"].items()}
    assert stages["before"].get("cloud:primary", 0) > 0 and "cloud:backup" not in stages["before"]
    assert stages["primary_out"].get("cloud:backup", 0) > 0 and "cloud:primary" not in stages["primary_out"]
    for cut in ("backup_slow", "network_cut"):
        assert not any(name.startswith("cloud:") for name in stages[cut]), stages[cut]
    assert stages["backup_slow"].get("model:pump-anomaly", 0) + stages["network_cut"].get("model:pump-anomaly", 0) > 0
    assert stages["after"].get("cloud:primary", 0) > 0
    assert before["by_tier_name"] == stages["before"]
    # The runtime's own count by named tier is the published decisions'.
    totals: dict[str, int] = {}
    for counts in stages.values():
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + n
    assert summary["by_tier_name"] == totals and sum(totals.values()) == verification["inputs_sent"]
    assert {"cloud:primary", "cloud:backup", "model:pump-anomaly", "rules"} <= set(totals)
    # Each provider's link: offline soon after it failed (its own way), online again after.
    providers = {p["name"]: p for p in summary["providers"]}
    assert providers["primary"]["failure"] == "blackholed" and providers["backup"]["failure"].startswith("slow")
    for provider in providers.values():
        assert provider["offline_after_s"] is not None and provider["online_after_s"] is not None
        assert provider["final_state"] == "online"

    printed = capsys.readouterr().out
    assert "decided by" in printed and "cloud:backup" in printed and "model:pump-anomaly" in printed
    assert "status by_tier_name) agrees" in printed
    assert "cloud primary (cloud.infer.a, blackholed): offline" in printed
    assert "0 gaps, 0 duplicates" in printed
    # It ends with what the AI was worth, as `edge report` says it from the run's own log.
    worth = printed[printed.index("what the AI was worth"):]
    total = sum(summary["by_tier_name"].values())
    assert f"{total:,} decisions over" in worth and "cloud calls avoided by the model and rules" in worth
    assert max(len(line) for line in worth.splitlines() if "value.png" not in line) <= 100  # (a path may be long)
    assert summary["link"]["offline_after_s"] is not None and summary["link"]["online_after_s"] is not None

    backlog = summary["backlog"]
    assert backlog["peak"] > 0 and backlog["drained"] and backlog["final"] == 0
    assert backlog["drain_s"] is not None and backlog["drain_s"] < 10

    assert (tmp_path / "audit.db").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "timeline.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / "value.png").read_bytes().startswith(b"\x89PNG")


def test_the_sensor_story_is_seeded() -> None:
    def inputs(seed: int) -> list[tuple[float, str, dict[str, Any]]]:
        story = SensorStory(DemoOptions(duration_s=30, outage_s=10, seed=seed))
        return [story.at(k) for k in range(600)]

    assert inputs(7) == inputs(7)
    assert inputs(7) != inputs(8)
    # Any input can be replayed alone: its noise depends on its index, not on what came before.
    assert SensorStory(DemoOptions(seed=7)).at(321) == inputs(7)[321]


def test_the_sensor_story_is_mostly_normal_with_the_inputs_each_tier_exists_for() -> None:
    ranges = load_manifest(bundled_model_path()).training_range
    plans = plan_story(pumps=4, duration_s=30, seed=7)
    assert sorted(p.role for p in plans) == ["marginal", "steady", "vfd", "wearing"]
    rng = random.Random(1)
    rows = [reading(plan, k / 20, rng) for k in range(600) for plan in plans]

    def outside(row: dict[str, Any]) -> bool:
        return any(not lo <= row[name] <= hi for name, (lo, hi) in ranges.items())

    critical = [r for r in rows if r["temp_c"] > 95 or r["rms"] > 7.5]
    anomaly = [r for r in rows if r["rms"] > 4.5 and r["kurtosis"] > 5 and r not in critical]
    normal = len(rows) - len(critical) - len(anomaly)
    assert normal > len(rows) / 2
    assert anomaly, "no anomaly for the model and the cloud to find"
    assert 0 < len(critical) < len(rows) / 50, "a critical spike is rare, but it happens"
    assert any(outside(r) for r in rows), "nothing outside the model's training range for the cloud to decide"


def test_options_place_the_outage_inside_the_run() -> None:
    assert DemoOptions().outage_start_s == 10.0
    short = DemoOptions(duration_s=8, outage_s=3)
    # Early enough to leave time, after the outage, for the link to come back and the backlog to drain.
    assert short.outage_start_s + short.outage_s <= 8 - 3
    assert DemoOptions(duration_s=8, outage_s=3, outage_at_s=1.5).outage_start_s == 1.5
    with pytest.raises(ValueError, match="must end before"):
        DemoOptions(duration_s=8, outage_s=3, outage_at_s=6)
    with pytest.raises(ValueError):
        DemoOptions(rate_hz=0)


def test_the_live_view_fits_in_100_columns() -> None:
    clock = Clock()
    recorder = Recorder(clock)
    now = clock.t0_ns
    clock.outage_start_ns, clock.outage_start_s = now, 0.0
    reasons = ["low_confidence", "out_of_range", "breaker_open", "unreachable", "timeout"]
    for i in range(5000):
        recorder.add(SeenDecision(
            id=f"d{i}", received_at=now, decided_at=now + 201_000_000, tier=("model", "cloud", "rules")[i % 3],
            action="hold", fallbacks=[Fallback("cloud", reasons[i % 5]), Fallback("model", reasons[(i + 1) % 5])],
            governance=Governance(status=f"status_{i % 7}", requested_action="shutdown"), audit_seq=i + 1))
    sample = Sample(t=1.0, backlog=123456, link="degraded", breaker="half_open", approvals_pending=12)

    lines = render_view(DemoOptions(), clock, recorder, sample)

    assert all(len(line) < 100 for line in lines), lines
    text = "\n".join(lines)
    assert "OUTAGE" in text and "backlog 123456" in text and "half-open" in text and "pending 12" in text
    line = render_line(clock, recorder, sample)
    assert "OUTAGE" in line and "1667 model + 1667 cloud + 1666 rules /s" in line and "backlog 123456" in line

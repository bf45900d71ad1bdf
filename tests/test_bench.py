"""The benchmark (SPEC §10) in its smoke mode: every figure is produced, finite and positive.

Not a performance test: nothing here says how fast anything must be, only that the bench measures
what it promises (and writes it down) on real nats-servers, a real Runtime and `edge run`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import config_to_toml
from edge.tools.bench import SECTIONS, BenchOptions, BenchResult, format_table, percentile, pump_rows, run_bench
from edge.tools.bench._results import BatchSizes, BenchError

# Figures that are counts of bad things, or deltas, and so may rightly be zero or negative.
MAY_BE_ZERO = {"lost", "waited_on_dead_cloud", "unreachable", "runtime_sync_backlog", "server_us", "driver_us",
               "send_lag_p99_ms", "lag_p99_ms", "disk_wal_bytes", "sut_system_us",
               "answered_b", "race_records"}  # the fast provider B is never asked while A answers first
MAY_BE_NEGATIVE = {"rss_growth_mib", "rss_growth_per_100k_mib"}
# Batch counts by size (when the runtime reports them): most buckets are rightly empty in a run.
MAY_BE_ZERO_UNDER = "batches"


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in the result, with its key path (booleans and dict keys aside)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return []


@pytest.mark.timeout(200)
async def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    result = await run_bench(BenchOptions(quick=True, out=str(tmp_path), command="test_bench"))

    written = msgspec.json.decode((tmp_path / "bench.json").read_bytes(), type=BenchResult)
    assert written == result
    data = msgspec.to_builtins(result)
    for section in SECTIONS:
        assert data[section] is not None, section
    assert data["machine"]["nproc"] >= 1 and data["machine"]["cpu_model"] and data["machine"]["python"]
    assert data["date"] and data["command"] == "test_bench"

    numbers = _numbers({k: data[k] for k in SECTIONS})
    assert len(numbers) > 80
    for path, value in numbers:
        assert math.isfinite(value), path
        leaf = path.rsplit(".", 1)[-1].split("[")[0]
        if leaf in MAY_BE_NEGATIVE:
            continue
        if leaf in MAY_BE_ZERO or MAY_BE_ZERO_UNDER in path:
            assert value >= 0, path
        else:
            assert value > 0, path

    # Each section measured what it says, on the inputs it says.
    saturation = result.saturation
    assert saturation is not None and saturation.runtime.n == saturation.bare.n
    assert saturation.deferred.n == saturation.bare.n and saturation.deferred_ratio > 0
    assert saturation.fsync_always.n == saturation.bare_noop.n == saturation.bare.n
    approvals = result.approvals
    assert approvals is not None and approvals.pending == 100
    assert approvals.busy.count == approvals.idle.count > 0 and approvals.busy.p99_ms > 0
    assert sum(saturation.runtime_tiers.values()) >= saturation.runtime.n
    assert result.latency is not None and [run.why for run in result.latency] == ["50% of runtime saturation",
                                                                                     "fixed"]
    for run in result.latency:
        assert run.runtime.p50_ms <= run.runtime.p99_ms <= run.runtime.p999_ms <= run.runtime.max_ms
        assert run.runtime.count + run.runtime.lost == run.bare.count + run.bare.lost
    fixed = result.fixed_rate
    assert fixed is not None and fixed.rate_hz == 400
    for run_at_rate in (fixed.bare, fixed.runtime):
        assert run_at_rate.decisions == run_at_rate.latency.count > 0
        assert run_at_rate.decisions + run_at_rate.latency.lost == int(fixed.rate_hz * fixed.duration_s)
        assert 0 < run_at_rate.cpu.sut_cores <= result.machine.nproc
    footprint = fixed.footprint
    assert footprint.audit_records >= footprint.decisions > 0
    assert footprint.disk_db_bytes_per_decision <= footprint.disk_bytes_per_decision
    assert footprint.wire_bytes_per_decision == pytest.approx(
        footprint.wire_sent_per_decision + footprint.wire_received_per_decision, abs=0.2)
    assert result.audit is not None and set(result.audit.appends_per_s) == {"off", "batch", "always"}
    assert result.sync is not None and result.sync.records == 20_000
    blackhole = result.blackhole
    assert blackhole is not None and len(blackhole.runs) == result.sizes.blackhole_runs == 1
    for trial in blackhole.runs:
        assert "cloud" in trial.tiers and "model" in trial.tiers
        assert trial.breaker_open_ms <= trial.first_breaker_open_decision_ms
    assert blackhole.worst_open_over_steady_p99 == max(trial.open_over_steady_p99 for trial in blackhole.runs)
    backlog = result.backlog
    assert backlog is not None and backlog.backlog_at_return > 0 and backlog.uploading.count > 0
    assert (backlog.steady.count + backlog.offline.count + backlog.uploading.count + backlog.after.count
            == backlog.decisions)
    # Batches: reported when the runtime has them, and then consistent; absent is fine.
    latency_batches = [run.runtime_batches for run in result.latency]
    for batches in (saturation.runtime_batches, fixed.runtime_batches, *latency_batches):
        if batches is not None:
            assert sum(batches.sizes.values()) == batches.count
    race = result.race
    assert race is not None and race.sequential.race == [] and race.raced.race == ["cloud:a", "cloud:b"]
    # In ladder order the slow provider decides everything and B is never asked; raced, B (fast)
    # decides and A is asked as well, its answer recorded after the decision.
    assert race.sequential.by_tier_name == {"cloud:a": race.sequential.decisions}
    assert race.sequential.answered_a == race.sequential.decisions and race.sequential.answered_b == 0
    assert race.raced.by_tier_name == {"cloud:b": race.raced.decisions}
    assert race.raced.answered_a == race.raced.answered_b == race.raced.race_records == race.raced.decisions
    assert race.sequential.latency.p50_ms >= race.slow_ms > race.raced.latency.p99_ms
    assert race.extra_requests_per_decision == pytest.approx(1.0)
    memory = result.memory
    assert memory is not None and memory.rss_checkpoints_mib[-1][0] == memory.decisions == 20_000
    assert memory.startup_aenter_s < memory.startup_first_decision_s

    # The summary: every row, from the sections that ran.
    summary = msgspec.to_builtins(result.summary)
    assert set(summary) == {"decisions_per_s", "decisions_per_s_fsync_always", "sut_cpu_us_per_decision",
                            "half_saturation_hz", "p99_ms_at_half_saturation", "fixed_rate_hz",
                            "sut_cpu_us_at_fixed_rate", "sut_cores_at_fixed_rate", "race_p99_ms"}
    for path, value in _numbers(summary):
        assert math.isfinite(value) and value > 0, path
    assert result.summary.decisions_per_s is not None
    assert result.summary.decisions_per_s.runtime == saturation.runtime.decisions_per_s

    table = (tmp_path / "bench.txt").read_text()
    assert table == format_table(result)
    for heading in ("Summary: bare vs runtime", "1. Saturation", "2. Latency", "3. Fixed rate", "4. Audit", "5. Sync",
                    "6. Blackholed", "7. Backlog drain", "8. Memory", "9. Inputs that need no approval",
                    "10. Two cloud providers"):
        assert heading in table


def test_batch_sizes_absent_from_status_are_reported_as_none() -> None:
    status: dict[str, Any] = {"pipelines": {"pump": {"decisions": 3}}}
    assert BatchSizes.from_status(status, "pump") is None


def test_batch_sizes_since_an_earlier_reading_count_only_what_came_after() -> None:
    earlier = {"pipelines": {"pump": {"batches": {"count": 2, "mean": 3.0,
                                                  "sizes": {"1": 0, "2-4": 2, "5-16": 0, "17-64": 0, "65+": 0}}}}}
    later = {"pipelines": {"pump": {"batches": {"count": 4, "mean": 9.0,
                                                "sizes": {"1": 0, "2-4": 2, "5-16": 0, "17-64": 2, "65+": 0}}}}}
    before, after = BatchSizes.from_status(earlier, "pump"), BatchSizes.from_status(later, "pump")
    assert after is not None
    since = after.since(before)
    assert since.count == 2 and since.mean == 15.0  # (4 * 9 - 2 * 3) / 2 inputs per batch
    assert since.sizes == {"1": 0, "2-4": 0, "5-16": 0, "17-64": 2, "65+": 0}
    assert after.since(None) == after


def test_batch_sizes_of_an_unexpected_shape_are_a_bench_error() -> None:
    with pytest.raises(BenchError, match="batches"):
        BatchSizes.from_status({"pipelines": {"pump": {"batches": {"count": "many"}}}}, "pump")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.999) == 100.0
    assert percentile([], 0.5) == 0.0


def test_pump_rows_are_seeded_and_mostly_inside_the_training_range() -> None:
    rows = pump_rows(7, 2000)
    assert rows == pump_rows(7, 2000) and rows != pump_rows(8, 2000)
    inside = [r for r in rows if 0.5 <= r[0] <= 11.9 and 1.8 <= r[1] <= 10.5 and 29 <= r[2] <= 119
              and 880 <= r[3] <= 3010]
    assert len(inside) > 0.95 * len(rows)


def test_configs_written_for_edge_run_read_back() -> None:
    import tomllib

    data = {"device_id": "gw-1", "nats": {"local": "nats://127.0.0.1:1"}, "pipelines": [
        {"name": "pump", "rules": [{"default": True, "action": "none"}], "actions": {"hold": {}}}]}
    assert tomllib.loads(config_to_toml(data)) == data

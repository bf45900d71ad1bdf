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

# Figures that are counts of bad things, or deltas, and so may rightly be zero or negative.
MAY_BE_ZERO = {"lost", "waited_on_dead_cloud", "unreachable", "runtime_sync_backlog", "server_us", "driver_us",
               "send_lag_p99_ms", "lag_p99_ms"}
MAY_BE_NEGATIVE = {"rss_growth_mib", "rss_growth_per_100k_mib"}


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
        if leaf in MAY_BE_ZERO:
            assert value >= 0, path
        else:
            assert value > 0, path

    # Each section measured what it says, on the inputs it says.
    saturation = result.saturation
    assert saturation is not None and saturation.runtime.n == saturation.bare.n
    assert saturation.deferred.n == saturation.bare.n and saturation.deferred_ratio > 0
    approvals = result.approvals
    assert approvals is not None and approvals.pending == 100
    assert approvals.busy.count == approvals.idle.count > 0 and approvals.busy.p99_ms > 0
    assert sum(saturation.runtime_tiers.values()) >= saturation.runtime.n
    assert result.latency is not None and [run.why for run in result.latency] == ["50% of runtime saturation",
                                                                                     "fixed"]
    for run in result.latency:
        assert run.runtime.p50_ms <= run.runtime.p99_ms <= run.runtime.p999_ms <= run.runtime.max_ms
        assert run.runtime.count + run.runtime.lost == run.bare.count + run.bare.lost
    assert result.audit is not None and set(result.audit.appends_per_s) == {"off", "batch", "always"}
    assert result.sync is not None and result.sync.records == 20_000
    blackhole = result.blackhole
    assert blackhole is not None and "cloud" in blackhole.tiers and "model" in blackhole.tiers
    assert blackhole.breaker_open_ms <= blackhole.first_breaker_open_decision_ms
    memory = result.memory
    assert memory is not None and memory.rss_checkpoints_mib[-1][0] == memory.decisions == 20_000
    assert memory.startup_aenter_s < memory.startup_first_decision_s

    table = (tmp_path / "bench.txt").read_text()
    assert table == format_table(result)
    for heading in ("1. Saturation", "2. Latency", "3. Audit", "4. Sync", "5. Blackholed", "6. Memory"):
        assert heading in table


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

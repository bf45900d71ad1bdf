"""Retention that holds: can audit.max_bytes keep audit.keep_synced at the rate seen? Said at start and in status."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge import Runtime
from sync import AuditLog, retention_outlook
from tests.nats_harness import ServerFactory
from tests.runtime_harness import make_config

DAY = 86400.0


def test_the_outlook_says_how_long_max_bytes_holds_and_warns_when_it_is_shorter_than_keep_synced() -> None:
    # 100 decisions/s of 250 B for a day is 2.16 GB; 90 % of max_bytes is what retention keeps.
    holds = retention_outlook(3 << 30, DAY, 100.0, 250.0)
    assert holds.holds_s is not None and DAY < holds.holds_s < 1.5 * DAY and holds.warning == ""
    short = retention_outlook(1 << 30, 7 * DAY, 100.0, 250.0)
    assert short.holds_s is not None and short.holds_s < DAY
    assert "audit.max_bytes (1.0 GiB) holds about" in short.warning and "audit.keep_synced (7.0 d)" in short.warning
    assert "about 15.6 GiB would hold it" in short.warning
    assert retention_outlook(1 << 30, 7 * DAY, 0.0, 250.0).warning == ""  # no rate seen: nothing to say


async def _fill(path: Path, device: str, records: int) -> None:
    # A log that took `records` decisions in a few seconds: its own newest records give the rate.
    async with AuditLog(path, device) as log:
        for start in range(0, records, 500):
            chained = log.append_many("decision", [{"i": i, "pad": "p" * 40} for i in range(start, start + 500)])
            await chained[-1][1]


@pytest.mark.parametrize("max_bytes, keep_synced, warned", [("1MiB", "7d", True), ("4GiB", "60s", False)])
async def test_a_runtime_warns_at_start_and_in_status_when_max_bytes_cannot_hold_keep_synced(
    nats_servers: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, max_bytes: str,
    keep_synced: str, warned: bool
) -> None:
    server = await nats_servers("local")
    config = make_config(tmp_path, server.url, audit={"create_stream": True, "max_bytes": max_bytes,
                                                               "keep_synced": keep_synced})
    data_dir = tmp_path / "var-gw-test"
    data_dir.mkdir(mode=0o700)
    await _fill(data_dir / "audit.db", "gw-test", 5000)
    with caplog.at_level(logging.WARNING, logger="edge.runtime"):
        async with Runtime(config) as runtime:
            status = runtime.status()
    retention = status["audit"]["retention"]
    assert retention["records_per_s"] > 100
    said = [r.getMessage() for r in caplog.records if "audit.max_bytes" in r.getMessage()]
    if warned:
        assert retention["holds_s"] < 7 * DAY and "audit.keep_synced (7.0 d)" in retention["warning"]
        assert said and said[0].startswith("audit.max_bytes (1.0 MiB) holds about")
    else:
        assert retention["warning"] == "" and not said

"""Section 11: `edge replay` throughput: a log of 1M decision records (20k quick) decided again by
the bundled model, batched, as `edge replay` does it (read, decompress, decode, the ladder)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ._inputs import pump_rows
from ._results import ReplayFigures, Sizes


async def bench_replay(work: Path, sizes: Sizes, seed: int) -> ReplayFigures:
    from edge import Replayer, load_config
    from models import bundled_model_path, load_model
    from sync import AuditLog, iter_records

    records = sizes.replay_records
    db = work / "replay" / "audit.db"
    rows = pump_rows(seed, 4096)
    in_use = {"event": "in_use", "pipeline": "pump", "name": "pump-anomaly", "version": "1", "sha256": "0" * 64}
    started = time.perf_counter()
    async with AuditLog(db, "bench-replay", fsync="off") as log:
        (announced, _), = log.append_many("model", [in_use])
        for start in range(0, records, 4096):
            bodies = []
            for i in range(start, min(records, start + 4096)):
                rms, kurtosis, temp_c, rpm = rows[i % len(rows)]
                now = time.time_ns()
                # A decision's record as the runtime writes it (the README's "Light on flash").
                bodies.append({"id": f"{now:016x}{i:08x}", "pipeline": "pump", "subject": "sensors.p1.pump",
                               "received_at": now, "action": "none", "label": "normal", "confidence": 0.99,
                               "tier": "model", "model": announced.seq,
                               "governance": {"status": "auto", "requested_action": "none"},
                               "input": {"rms": rms, "kurtosis": kurtosis, "temp_c": temp_c, "rpm": rpm,
                                         "asset": f"p{i % 4}"}})
            chained = log.append_many("decision", bodies, ts=time.time_ns())
            await chained[-1][1]
    written_s = time.perf_counter() - started

    def replay() -> tuple[float, int, float | None]:
        config = load_config(None)  # the bundled example: pipeline "pump", ladder model, cloud, rules
        candidate = load_model(bundled_model_path())
        began = time.perf_counter()
        report = Replayer(config, candidate=candidate, changes=0).run(iter_records(db))
        return time.perf_counter() - began, report.replayed, report.model_us_per_input

    elapsed, replayed, model_us = await asyncio.to_thread(replay)
    return ReplayFigures(records=records, replayed=replayed, elapsed_s=round(elapsed, 2),
                         records_per_s=round(replayed / elapsed) if elapsed else 0.0,
                         model_us_per_input=model_us, log_written_s=round(written_s, 1))

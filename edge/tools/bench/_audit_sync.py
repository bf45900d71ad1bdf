"""Sections 4 and 5: the runtime per fsync mode and the raw AuditLog; a backlog synced: Uploader vs raw JetStream."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ._constants import FSYNC_MODES, INPUT_SUBJECT, PIPELINE, SYNC_WINDOW
from ._driver import Driver
from ._measure import percentile
from ._results import AuditFigures, BenchError, Sizes, SyncFigures
from ._runtime_side import device_name, saturate_runtime
from ._servers import connect, fresh_server

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS


def decision_body(i: int) -> dict[str, Any]:
    """A body shaped like a real Decision (what the runtime appends for every input)."""
    now = time.time_ns()
    return {
        "id": f"{now:016x}{i:08x}", "device": "bench", "pipeline": PIPELINE, "subject": INPUT_SUBJECT,
        "received_at": now - 250_000, "decided_at": now, "action": "none", "label": "normal",
        "confidence": 0.9731, "tier": "model", "fallbacks": [],
        "model": {"name": "pump-anomaly", "version": "1",
                  "sha256": "b3886a2dd60e9a3301a8e1c373998513969d3a37cf53c633e1062fa00b0731cb"},
        "shadow": None, "governance": {"status": "auto", "requested_action": "none"}, "audit_seq": None,
        "input_sha256": hashlib.sha256(b"%d" % i).hexdigest(),
    }


async def append_rate(path: Path, fsync: Literal["off", "batch", "always"], n: int, window: int = 256) -> float:
    """Raw AuditLog.append throughput with up to `window` appends awaiting at once."""
    from sync import AuditLog

    bodies = [decision_body(i) for i in range(min(n, 4096))]
    async with AuditLog(path, "bench", fsync=fsync) as audit:
        started = time.perf_counter()
        pending: deque[asyncio.Future[int]] = deque()
        for i in range(n):
            pending.append(audit.append("decision", bodies[i % len(bodies)]))
            if len(pending) >= window:
                await pending.popleft()
        await asyncio.gather(*pending)
        return n / (time.perf_counter() - started)


async def commit_latency(path: Path, fsync: Literal["off", "batch", "always"], n: int) -> list[float]:
    """append → committed, one record at a time (the latency a lone decision pays for durability)."""
    from sync import AuditLog

    body = decision_body(0)
    samples = []
    async with AuditLog(path, "bench", fsync=fsync) as audit:
        for _ in range(n):
            started = time.perf_counter()
            await audit.append("decision", body)
            samples.append(time.perf_counter() - started)
    return sorted(samples)


async def bench_audit(work: Path, driver: Driver, sizes: Sizes, seed: int) -> AuditFigures:
    runs: dict[str, list[float]] = {mode: [] for mode in FSYNC_MODES}
    for _ in range(sizes.repeats):  # rounds of off, batch, always: drift on the machine touches all alike
        for mode in FSYNC_MODES:
            run = await saturate_runtime(work, driver, sizes.audit_n, sizes.warmup, seed, fsync=mode)
            runs[mode].append(run.saturation.decisions_per_s)
    rates = {mode: statistics.median(values) for mode, values in runs.items()}
    appends: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for mode in FSYNC_MODES:
        folder = Path(tempfile.mkdtemp(prefix=f"audit-{mode}-", dir=work))
        appends[mode] = round(await append_rate(folder / "rate.db", mode, sizes.append_n), 1)
        samples = await commit_latency(folder / "latency.db", mode, sizes.sequential_n)
        p50[mode] = round(percentile(samples, 0.5) * 1e3, 3)
        p99[mode] = round(percentile(samples, 0.99) * 1e3, 3)
    return AuditFigures(runtime_decisions_per_s=rates, runtime_runs=runs,
                        batch_over_off=round(rates["batch"] / rates["off"], 3), appends_per_s=appends,
                        commit_p50_ms=p50, commit_p99_ms=p99)


async def bench_sync(work: Path, sizes: Sizes) -> SyncFigures:
    from nats.js.api import StorageType

    from sync import AuditLog, Uploader, connect_for_upload, encode_record, iter_records

    device = device_name("sync")
    path = work / f"{device}.db"
    n = sizes.sync_records
    # The backlog: written with no upstream at all (fsync off: building it is not what is measured).
    async with AuditLog(path, device, fsync="off") as audit:
        bodies = [decision_body(i) for i in range(4096)]
        pending: deque[asyncio.Future[int]] = deque()
        for i in range(n):
            pending.append(audit.append("decision", bodies[i % len(bodies)]))
            if len(pending) >= 4096:
                await pending.popleft()
        await asyncio.gather(*pending)
    # The same payloads and headers for the raw run, read before anything is timed.
    wire = [(r.seq, r.kind, encode_record(r)) for r in iter_records(path)]
    mean_bytes = statistics.fmean(len(p) for _, _, p in wire)

    async def make_stream(nc: NATS, name: str) -> None:
        await nc.jetstream().add_stream(name=name, subjects=["audit.>"], allow_direct=True, storage=StorageType.FILE,
                                        duplicate_window=120.0)

    async with fresh_server(work, "sync-up") as server:
        setup = await connect(server.url)
        await make_stream(setup, "EDGE_AUDIT")
        await setup.close()

        async def uploader_connection() -> NATS:
            return await connect_for_upload(server.url, name=f"{device}-audit")

        async with AuditLog(path, device, fsync="batch") as audit:
            if audit.backlog != n:
                raise BenchError(f"the backlog is {audit.backlog} records, expected {n}")
            started = time.perf_counter()
            async with Uploader(audit, uploader_connection, stream="EDGE_AUDIT") as uploader:
                left = await uploader.sync_now(timeout=60 + n / 500)
                uploader_s = time.perf_counter() - started
            if left:
                raise BenchError(f"the uploader left {left} of {n} records unsynced: {uploader.status()}")

    timings: dict[str, float] = {}
    for style in ("publish_async", "window"):
        async with fresh_server(work, f"sync-{style}") as server:
            nc = await connect(server.url)
            try:
                await make_stream(nc, "EDGE_AUDIT")
                started = time.perf_counter()
                async with asyncio.timeout(60 + n / 500):
                    if style == "publish_async":
                        failed = await publish_async_all(nc, device, wire)
                    else:
                        failed = await publish_window_all(nc, device, wire)
                timings[style] = time.perf_counter() - started
            finally:
                await nc.close()
        if failed:
            raise BenchError(f"raw JetStream publishing ({style}): {failed} of {n} publishes failed")
    up_rate = n / uploader_s
    async_rate, window_rate = n / timings["publish_async"], n / timings["window"]
    return SyncFigures(
        records=n, mean_record_bytes=round(mean_bytes, 1), uploader_records_per_s=round(up_rate, 1),
        uploader_s=round(uploader_s, 3), publish_async_records_per_s=round(async_rate, 1),
        publish_async_s=round(timings["publish_async"], 3), window_records_per_s=round(window_rate, 1),
        window_s=round(timings["window"], 3), ratio_vs_publish_async=round(up_rate / async_rate, 3),
        ratio_vs_window=round(up_rate / window_rate, 3),
    )


class _Ack(msgspec.Struct):
    error: dict[str, Any] | None = None


_ack_view = msgspec.json.Decoder(_Ack)


async def publish_async_all(nc: NATS, device: str, wire: Sequence[tuple[int, str, bytes]]) -> int:
    """Every record through js.publish_async, at most SYNC_WINDOW pending; returns how many failed."""
    js = nc.jetstream(publish_async_max_pending=SYNC_WINDOW)
    subject = f"audit.{device}"
    in_flight: deque[asyncio.Future[Any]] = deque()
    failed = 0
    for seq, kind, payload in wire:
        headers = {"Nats-Msg-Id": f"{device}:{seq}", "Edge-Kind": kind}
        in_flight.append(await js.publish_async(subject, payload, stream="EDGE_AUDIT", headers=headers))
        while in_flight and in_flight[0].done():
            failed += in_flight.popleft().exception() is not None
    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    return failed + sum(isinstance(outcome, BaseException) for outcome in outcomes)


async def publish_window_all(nc: NATS, device: str, wire: Sequence[tuple[int, str, bytes]]) -> int:
    """Every record by nc.publish with a reply inbox, at most SYNC_WINDOW unacknowledged; returns failures."""
    inbox = nc.new_inbox()
    subject = f"audit.{device}"
    acked = failed = 0
    progress = asyncio.Event()

    async def on_ack(msg: Any) -> None:
        nonlocal acked, failed
        acked += 1
        if (msg.headers and msg.headers.get("Status")) or _ack_view.decode(msg.data).error is not None:
            failed += 1
        progress.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    sent = 0
    headers = {"Nats-Expected-Stream": "EDGE_AUDIT", "Nats-Msg-Id": "", "Edge-Kind": ""}
    for seq, kind, payload in wire:
        while sent - acked >= SYNC_WINDOW:
            progress.clear()
            await progress.wait()
        headers["Nats-Msg-Id"] = f"{device}:{seq}"
        headers["Edge-Kind"] = kind
        await nc.publish(subject, payload, reply=f"{inbox}.{seq}", headers=headers)
        sent += 1
    while acked < sent:
        progress.clear()
        await progress.wait()
    await sub.unsubscribe()
    return failed

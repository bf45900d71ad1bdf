"""The runtime as the system under test: its config for the bench, and its saturation and latency runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ._constants import CLOUD_TIMEOUT_MS, PIPELINE
from ._driver import Driver, OpenLoopJob, latency_from_report, measured_open_loop, measured_saturation
from ._measure import poll_until
from ._results import BatchSizes, BenchError, FixedRateRun, Footprint, Latency, LoopLag, Saturation
from ._servers import fresh_server

if TYPE_CHECKING:
    from edge import Config


_counter = itertools.count(1)


def device_name(what: str) -> str:
    return f"bench-{what}-{next(_counter)}"


def runtime_config_data(work: Path, local_url: str, *, device: str, upstream_url: str = "",
                        ladder: Sequence[str] = ("model", "rules"), fsync: str = "batch") -> dict[str, Any]:
    """The bundled example config (its pipeline, rules, labels and actions) pointed at bench servers.

    `link` keeps SPEC §4's defaults (probe every 1 s, breaker after 3 failures, reset after 5 s).
    """
    from edge import BUNDLED_CONFIG
    from models import bundled_model_path

    data: dict[str, Any] = tomllib.loads(BUNDLED_CONFIG.read_text())
    data["device_id"] = device
    data["data_dir"] = str(work / f"var-{device}")
    data["nats"] = {"local": local_url, "upstream": upstream_url}
    data["audit"] = {"create_stream": True, "fsync": fsync}
    data["models"][0]["path"] = str(bundled_model_path())
    pipeline = data["pipelines"][0]
    pipeline["ladder"] = list(ladder)
    pipeline["cloud"] = {"subject": "cloud.infer.pump", "timeout_ms": CLOUD_TIMEOUT_MS}
    return data


def runtime_config(work: Path, local_url: str, **kwargs: Any) -> Config:
    from edge import decode_config

    return decode_config(runtime_config_data(work, local_url, **kwargs), source="bench", base_dir=work, env={})


def decisions_subject(device: str) -> str:
    return f"edge.{device}.decision.{PIPELINE}"


class RuntimeSaturation(msgspec.Struct, frozen=True):
    saturation: Saturation
    status: dict[str, Any]  # Runtime.status() once the last output arrived
    batches: BatchSizes | None  # the measured inputs' batches (None: the runtime does not report them)


async def saturate_runtime(work: Path, driver: Driver, n: int, warmup: int, seed: int, *, fsync: str = "batch",
                           sync: bool = True) -> RuntimeSaturation:
    from edge import Runtime

    device = device_name("sat")
    async with fresh_server(work, "runtime") as server:
        # Sync deferred: an upstream nobody listens on (port 1), as during an outage.
        upstream = "" if sync else "nats://127.0.0.1:1"
        async with Runtime(runtime_config(work, server.url, device=device, fsync=fsync, upstream_url=upstream)) as rt:
            before: list[BatchSizes | None] = []
            saturation = await measured_saturation(
                driver, server, decisions_subject(device), n, warmup=warmup, seed=seed,
                before_measuring=lambda: before.append(BatchSizes.from_status(rt.status(), PIPELINE)))
            status = rt.status()
    batches = BatchSizes.from_status(status, PIPELINE)
    return RuntimeSaturation(saturation, status, batches.since(before[0]) if batches is not None else None)


async def latency_runtime(work: Path, driver: Driver, rate: float, count: int,
                          seed: int) -> tuple[Latency, dict[str, Any]]:
    """End-to-end latency, and the runtime's `status()` at the end of the same run."""
    from edge import Runtime

    device = device_name("lat")
    async with (fresh_server(work, "runtime") as server,
                Runtime(runtime_config(work, server.url, device=device)) as rt):
        report = await driver.open_loop(OpenLoopJob(url=server.url, out_subject=decisions_subject(device),
                                                    rate_hz=rate, count=count, seed=seed, key="sha256"))
        status = rt.status()
    return latency_from_report(report), status


class FixedRateRuntime(msgspec.Struct, frozen=True):
    run: FixedRateRun
    loop_lag: LoopLag
    batches: BatchSizes | None  # of the measured inputs


async def fixed_rate_runtime(work: Path, driver: Driver, rate: float, count: int, seed: int,
                             warmup_s: float) -> FixedRateRuntime:
    """The runtime as in the saturation runs (model+rules, fsync batch, synced upstream) at a fixed offered rate."""
    from edge import Runtime

    device = device_name("rate")
    async with (fresh_server(work, "runtime") as server,
                Runtime(runtime_config(work, server.url, device=device)) as rt):
        job = OpenLoopJob(url=server.url, out_subject=decisions_subject(device), rate_hz=rate, count=count, seed=seed,
                          key="sha256")
        before: list[BatchSizes | None] = []
        report, cpu = await measured_open_loop(
            driver, server, job, warmup_s=warmup_s,
            before_measuring=lambda: before.append(BatchSizes.from_status(rt.status(), PIPELINE)))
        status = rt.status()
    batches = BatchSizes.from_status(status, PIPELINE)
    run = FixedRateRun(decisions=report.received, cpu=cpu, latency=latency_from_report(report))
    return FixedRateRuntime(run, LoopLag.from_status(status), batches.since(before[0]) if batches is not None else None)


async def runtime_footprint(work: Path, driver: Driver, rate: float, count: int, seed: int,
                            warmup_s: float, *, leaf: bool = False) -> Footprint:
    """Bytes per decision on disk (audit log), written to storage, and on the upstream wire, from a
    dedicated run at `rate`.

    A run of its own because the counting proxy runs on this process's event loop, which would
    add its own CPU to the runtime's in the CPU run. Client mode: the runtime's upstream
    connections go through the proxy to the server. Leaf mode: the runtime's embedded server joins
    a hub (JetStream domain "hub") as a leaf node through the proxy, both sides compressing
    (`s2_fast`, what a hub's `s2_auto` does over a WAN: on loopback it would not compress).
    """
    from edge import NatsServer, Runtime, decode_config
    from edge.tools.chaos import FaultProxy

    device = device_name("leaf" if leaf else "bytes")
    async with contextlib.AsyncExitStack() as stack:
        if leaf:
            store = Path(tempfile.mkdtemp(prefix="nats-hub-", dir=work))
            hub = await stack.enter_async_context(NatsServer(
                name="hub", store_dir=store, jetstream_domain="hub", leafnode_port=-1, leafnode_compression="s2_fast"))
            proxy = await stack.enter_async_context(FaultProxy("127.0.0.1", hub.leafnode_port or 0))
            data = runtime_config_data(work, "embedded", device=device)
            data["nats"] = {"local": "embedded", "embedded_port": -1, "upstream": f"nats-leaf://127.0.0.1:{proxy.port}",
                            "upstream_domain": "hub"}
            config = decode_config(data, source="bench", base_dir=work, env={})
        else:
            server = await stack.enter_async_context(fresh_server(work, "runtime"))
            proxy = await stack.enter_async_context(FaultProxy("127.0.0.1", server.port))
            config = runtime_config(work, server.url, device=device, upstream_url=proxy.url)
        rt = await stack.enter_async_context(Runtime(config))
        local = rt.server if leaf else server
        audit = rt.audit
        if audit is None or local is None:
            raise BenchError("the runtime has no audit log (or local server) to measure")
        await poll_until(lambda: rt.link.connected, 30, "the upstream link")
        job = OpenLoopJob(url=local.url, out_subject=decisions_subject(device), rate_hz=rate, count=count,
                          seed=seed, key="sha256")
        written_before = _storage_bytes_written()
        await measured_open_loop(driver, local, job, warmup_s=warmup_s)
        # Every record upstream, so the wire carried all it will for these decisions.
        await poll_until(lambda: audit.backlog == 0, 30, "the audit backlog to reach upstream")
        written = _storage_bytes_written() - written_before
        status = rt.status()
        db_bytes, wal_bytes = await asyncio.to_thread(_sqlite_file_bytes, Path(status["audit"]["path"]))
        sent, received = proxy.bytes_to_target, proxy.bytes_to_client
    decisions = int(status["pipelines"][PIPELINE]["decisions"])
    if decisions <= 0:
        raise BenchError("the footprint run made no decision")

    def per_decision(value: int) -> float:
        return round(value / decisions, 1)

    return Footprint(decisions=decisions, audit_records=int(status["audit"]["last_seq"]), disk_db_bytes=db_bytes,
                     disk_wal_bytes=wal_bytes, disk_bytes_per_decision=per_decision(db_bytes + wal_bytes),
                     disk_db_bytes_per_decision=per_decision(db_bytes),
                     wire_sent_bytes=sent, wire_received_bytes=received, wire_sent_per_decision=per_decision(sent),
                     wire_received_per_decision=per_decision(received),
                     wire_bytes_per_decision=per_decision(sent + received),
                     disk_written_bytes=written, disk_written_per_decision=per_decision(written),
                     mode="leaf" if leaf else "client")


def _storage_bytes_written() -> int:
    """Bytes this process sent to the storage layer (Linux /proc/self/io `write_bytes`): what the
    flash sees of the audit log (WAL frames, checkpoints), at the file system's block size. The
    runtime is the only writer in this process during the footprint run; 0 where not available."""
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            fields = dict(line.split(": ", 1) for line in io.read().splitlines() if ": " in line)
    except OSError:
        return 0
    return int(fields.get("write_bytes", "0"))


def _sqlite_file_bytes(db: Path) -> tuple[int, int]:
    """Sizes of a SQLite database file and of its write-ahead log (0 when there is none)."""
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size, wal.stat().st_size if wal.exists() else 0

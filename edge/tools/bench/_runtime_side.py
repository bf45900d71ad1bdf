"""The runtime as the system under test: its config for the bench, and its saturation and latency runs."""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._constants import CLOUD_TIMEOUT_MS, PIPELINE
from ._driver import Driver, OpenLoopJob, latency_from_report, saturation_from_report
from ._measure import CpuMeter
from ._results import Latency, Saturation
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


async def saturate_runtime(work: Path, driver: Driver, n: int, warmup: int, seed: int, *, fsync: str = "batch",
                           status: list[dict[str, Any]] | None = None, sync: bool = True) -> Saturation:
    from edge import Runtime

    device = device_name("sat")
    async with fresh_server(work, "runtime") as server:
        # Sync deferred: an upstream nobody listens on (port 1), as during an outage.
        upstream = "" if sync else "nats://127.0.0.1:1"
        async with Runtime(runtime_config(work, server.url, device=device, fsync=fsync, upstream_url=upstream)) as rt:
            meter = CpuMeter(server)
            report = await driver.saturate(server.url, decisions_subject(device), n, warmup=warmup, seed=seed)
            result = saturation_from_report(report, meter)
            if status is not None:
                status.append(rt.status())
        return result


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

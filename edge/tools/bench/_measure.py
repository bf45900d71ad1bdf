"""Small measuring tools: percentiles, CPU and memory of processes, contention on the machine, machine info."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge import NatsServer, nats_server_binary

from ._results import BenchError, Contention, CpuUse, Latency, Machine


def cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize(latencies_s: Sequence[float], *, lost: int = 0, send_lag_p99_s: float = 0.0) -> Latency:
    values = sorted(latencies_s)
    if not values:
        raise BenchError("no latency sample to summarize")
    return Latency(
        count=len(values), lost=lost,
        p50_ms=round(percentile(values, 0.50) * 1e3, 3), p99_ms=round(percentile(values, 0.99) * 1e3, 3),
        p999_ms=round(percentile(values, 0.999) * 1e3, 3), max_ms=round(values[-1] * 1e3, 3),
        mean_ms=round(statistics.fmean(values) * 1e3, 3), send_lag_p99_ms=round(send_lag_p99_s * 1e3, 3),
    )


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/<pid>/stat."""
    return sum(proc_cpu_split_s(pid))


def proc_cpu_split_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _self_cpu_split_s() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class CpuMeter:
    """CPU seconds used by the system under test (this process or a pid) and a nats-server, over a span."""

    def __init__(self, server: NatsServer, sut_pid: int | None = None) -> None:
        self._server_pid = server.pid
        self._sut_pid = sut_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        """(SUT CPU, of it in the kernel, nats-server CPU, now), seconds."""
        user, system = _self_cpu_split_s() if self._sut_pid is None else proc_cpu_split_s(self._sut_pid)
        server = proc_cpu_s(self._server_pid) if self._server_pid is not None else 0.0
        return user + system, system, server, time.monotonic()

    def per_decision(self, decisions: int, driver_cpu_s: float) -> CpuUse:
        sut, system, server, wall = (end - start for end, start in zip(self._read(), self._start, strict=True))
        return CpuUse(
            sut_us=round(sut / decisions * 1e6, 1), sut_system_us=round(system / decisions * 1e6, 1),
            driver_us=round(driver_cpu_s / decisions * 1e6, 1), server_us=round(server / decisions * 1e6, 1),
            cores_busy=round((sut + server + driver_cpu_s) / wall, 2) if wall > 0 else 0.0,
            sut_cores=round(sut / wall, 3) if wall > 0 else 0.0,
        )


def _machine_busy_s() -> float:
    """CPU seconds all processes spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Machine-wide busy time against the bench's own, over one section."""

    def __init__(self, driver_pid: int) -> None:
        self._driver_pid = driver_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = cpu_self_s() + children.ru_utime + children.ru_stime + proc_cpu_s(self._driver_pid)
        return time.monotonic(), _machine_busy_s(), ours

    def stop(self) -> Contention:
        now, busy, ours = self._read()
        wall = now - self._start[0]
        busy_cores = (busy - self._start[1]) / wall
        ours_cores = (ours - self._start[2]) / wall
        return Contention(wall_s=round(wall, 1), machine_busy_cores=round(busy_cores, 2),
                          bench_cores=round(ours_cores, 2), other_cores=round(max(0.0, busy_cores - ours_cores), 2),
                          loadavg_1m=round(os.getloadavg()[0], 2))


async def poll_until(predicate: Callable[[], bool], within: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)  # poll with a deadline


def machine_info(work: Path) -> Machine:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    packages = {}
    for name in ("nats-py", "msgspec", "onnxruntime", "numpy", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    server = "unknown"
    with contextlib.suppress(OSError):
        import subprocess

        server = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    return Machine(nproc=os.cpu_count() or 0, cpu_model=cpu, python=platform.python_version(),
                   platform=platform.platform(), event_loop=loop, nats_server=server, packages=packages,
                   filesystem=_filesystem(work))


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    return kind

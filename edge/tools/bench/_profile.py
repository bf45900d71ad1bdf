"""`--profile`: cProfile of the event-loop thread at saturation, top functions and share by component."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Any

from ._driver import Driver
from ._results import ProfileEntry, ProfileFigures, Sizes
from ._runtime_side import decisions_subject, device_name, runtime_config
from ._servers import fresh_server


async def profile_runtime(work: Path, driver: Driver, sizes: Sizes, seed: int, top: int = 15) -> ProfileFigures:
    """cProfile of the event-loop thread while the runtime runs at saturation (after an unprofiled warm-up)."""
    from edge import Runtime

    device = device_name("prof")
    profiler = cProfile.Profile()
    async with fresh_server(work, "profile") as server, Runtime(runtime_config(work, server.url, device=device)):
        await driver.saturate(server.url, decisions_subject(device), sizes.warmup, warmup=0, seed=seed)
        profiler.enable()
        try:
            report = await driver.saturate(server.url, decisions_subject(device), sizes.profile_n, warmup=0,
                                           seed=seed)
        finally:
            profiler.disable()
    stats = pstats.Stats(profiler)
    entries = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in sorted(
            raw.items(), key=lambda item: item[1][2], reverse=True)[:top]:
        entries.append(ProfileEntry(function=_where(file, line, func), ncalls=ncalls, tottime_s=round(tottime, 4),
                                    cumtime_s=round(cumtime, 4), percall_us=round(tottime / ncalls * 1e6, 2)))
    components: dict[str, float] = {}
    for (file, _line, func), value in raw.items():
        component = _component(file, func)
        components[component] = components.get(component, 0.0) + value[2]
    by_component = {k: round(v / total, 3) for k, v in sorted(components.items(), key=lambda kv: -kv[1])}
    elapsed = report.finished_at - report.started_at
    return ProfileFigures(decisions=report.n, decisions_per_s=round(report.n / elapsed, 1),
                          total_tottime_s=round(total, 3), top=entries, by_component=by_component)


def _component(file: str, func: str) -> str:
    if file == "~":  # C functions: name them by what they belong to
        for marker, name in (("msgspec", "msgspec"), ("sqlite", "sqlite3"), ("numpy", "numpy"),
                             ("hashlib", "hashlib"), ("_hashlib", "hashlib"), ("onnxruntime", "onnxruntime")):
            if marker in func:
                return name
        return "builtins"
    for marker, name in (("/nats/", "nats-py"), ("/edge/", "edge"), ("/models/", "models"), ("/sync/", "sync"),
                         ("/asyncio/", "asyncio"), ("/uvloop/", "asyncio"), ("/msgspec/", "msgspec"),
                         ("/numpy/", "numpy")):
        if marker in file:
            return name
    return "other"


def _where(file: str, line: int, func: str) -> str:
    if file == "~":
        return func
    path = file
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{line}({func})"

"""The installed version, read from the package metadata (pyproject.toml is the one source)."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    import importlib.metadata  # here: 30 ms at import, and only a status or heartbeat needs it

    try:
        return importlib.metadata.version("edge-orchestrator")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"

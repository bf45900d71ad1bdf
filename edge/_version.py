"""The installed version, read once from the package metadata (pyproject.toml is the one source)."""

from __future__ import annotations

import importlib.metadata

try:
    VERSION = importlib.metadata.version("edge-orchestrator")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"

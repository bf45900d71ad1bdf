"""Shared fixtures: real nats-server processes on free ports (see tests/nats_harness.py).

Runtime tests of the core paths run under both asyncio and uvloop (what `edge run` uses), via
pytest-asyncio's loop-factory hook; the rest under asyncio alone, to keep the suite short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

pytest_plugins = ["tests.nats_harness"]

# The core integration modules: a Runtime, a Fleet or the sync Uploader against real nats-servers.
BOTH_LOOPS = {
    "test_pipeline", "test_audit_runtime", "test_local_bus", "test_cloud_link", "test_approvals", "test_fleet",
    "test_sync_log", "test_sync_uploader", "test_sync_crash",
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS:
        try:
            import uvloop
        except ImportError:  # uvloop is not on Windows
            return factories
        factories["uvloop"] = uvloop.new_event_loop
    return factories

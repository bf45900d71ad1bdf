"""Helpers for the sync tests: polling with a deadline, and a subprocess driver (writer.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(predicate: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)  # poll with a deadline

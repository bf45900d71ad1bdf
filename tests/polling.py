"""The tests' one way to wait for a condition nothing signals: poll it, with a deadline.

Where a helper can wait on an event (an asyncio.Event set by a subscriber, say) it does so;
this is for everything else: a counter in another object, a file, a server's answer.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], *, within: float, what: str,
                     interval: float = 0.01) -> None:
    """Return once `predicate()` holds; fail the test after `within` seconds, naming `what`.

    The predicate may be a plain function or a coroutine function (awaited on each try); it is
    tried at once, then every `interval` seconds (0: every turn of the event loop).
    """
    started = time.monotonic()
    deadline = started + within
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {time.monotonic() - started:.2f}s (within={within}s) "
                                 f"waiting for {what}")
        await asyncio.sleep(interval)  # poll with a deadline

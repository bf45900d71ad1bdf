"""`edge ...` with two test-only fault hooks, for the systemd watchdog tests (tests/test_service.py).

The hooks live here, never in the runtime: production code has no switch that breaks it on purpose.
Once the runtime is ready (after READY=1), this installs:

- SIGUSR1: block the event loop for EDGE_TEST_BLOCK_S seconds (a synchronous sleep in a loop
  callback, as a CPU-bound or blocking call in the loop would);
- SIGUSR2: make the audit writer thread die, as an unexpected exception in it would (its next
  commit raises out of the thread; the log stays "open" but nothing will ever commit again);

then sends `TEST_HOOKS=1` to $NOTIFY_SOCKET, so the test signals only once they are in place.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import edge._runtime as runtime_module
from edge._sdnotify import Notifier, notify_address
from edge.cli import main

_real_run = runtime_module.run


def _block_the_loop() -> None:
    time.sleep(float(os.environ.get("EDGE_TEST_BLOCK_S", "2")))  # the fault itself: the loop cannot run


def _kill_the_audit_writer(runtime: runtime_module.Runtime) -> None:
    audit = runtime.audit
    assert audit is not None

    def crash(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("test fault: the audit writer crashed")

    audit._commit = crash  # type: ignore[method-assign]
    runtime.record("test_fault", {"fault": "audit writer"})  # wakes the writer: its commit raises


async def _run_with_faults(config: Any, **kwargs: Any) -> None:
    async def install(runtime: runtime_module.Runtime) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, _block_the_loop)
        loop.add_signal_handler(signal.SIGUSR2, _kill_the_audit_writer, runtime)
        address = notify_address(os.environ)
        if address is not None:
            notifier = Notifier(address)
            notifier.send(TEST_HOOKS=1)
            notifier.close()

    await _real_run(config, ready=install, **kwargs)


runtime_module.run = _run_with_faults  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fixtures that start real `nats-server` processes: JetStream on, a temp store dir, a free port.

`nats_server` is one running server; `nats_servers` is a factory for as many as a test needs
(local bus + upstream, a fleet's hub...), each optionally reading a config file as well (a hub
whose config includes the permissions `edge fleet provision` wrote). Each can be stopped, killed
and restarted on the same port and store dir; all are stopped when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from edge import NatsServer

ServerFactory = Callable[..., Awaitable[NatsServer]]


@pytest.fixture
async def nats_servers(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    async with AsyncExitStack() as stack:
        count = 0

        async def start(name: str | None = None, jetstream: bool = True, config_file: Path | None = None) -> NatsServer:
            nonlocal count
            count += 1
            label = name or f"s{count}"
            server = NatsServer(name=label, store_dir=tmp_path / f"nats-{label}", jetstream=jetstream,
                                config_file=config_file)
            return await stack.enter_async_context(server)

        yield start


@pytest.fixture
async def nats_server(nats_servers: ServerFactory) -> NatsServer:
    return await nats_servers("hub")

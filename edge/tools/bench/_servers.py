"""Fresh nats-servers, one per measurement, and the bench's plain connections to them."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import nats

from edge import NatsServer

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS


@contextlib.asynccontextmanager
async def fresh_server(work: Path, name: str) -> AsyncIterator[NatsServer]:
    """A new nats-server (JetStream on) with its own store dir under `work`."""
    store = Path(tempfile.mkdtemp(prefix=f"nats-{name}-", dir=work))
    async with NatsServer(name=name, store_dir=store) as server:
        yield server


async def connect(url: str) -> NATS:
    return await nats.connect(url, name="bench", allow_reconnect=False, connect_timeout=5)

"""Small nats-py helpers that work around nats-py 2.16 behaviour, each saying why."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NATS
from nats.nuid import NUID

_nuid = NUID()


async def server_barrier(nc: NATS, within_s: float = 5.0) -> None:
    """Return once the server has processed every command this client sent before the call.

    A request to a subject nobody serves: the server's "no responders" answer comes after it has
    handled our earlier SUBs and PUBs, in order. Not flush(): in nats-py 2.16 flush() writes its
    PING ahead of commands still pending, and a flush that times out leaves a cancelled future in
    the PONG queue that kills the connection's read loop when the next PONG arrives.
    """
    try:
        await nc.request(f"_edge.barrier.{_nuid.next().decode()}", b"", timeout=within_s)
    except nats.errors.NoRespondersError:
        return

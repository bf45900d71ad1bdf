"""Small nats-py helpers that work around nats-py 2.16 behaviour, each saying why."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NATS
from nats.nuid import NUID

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.micro.service import Service

log = logging.getLogger("edge.nats")

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


def client_of(msg: Msg) -> NATS:
    """The connection a message arrived on (to answer on the same one)."""
    return msg._client  # nats-py 2.16 has no public accessor


async def stop_service_quietly(service: Service) -> None:
    """Stop a `nats.micro` service by unsubscribing its endpoints, without `Service.stop()`.

    Service.stop() drains each of its nine subscriptions with a flush(): up to 10 s apiece on a
    dead link, and a timed-out flush breaks the connection (see `server_barrier`). Unsubscribing
    is all a stop needs from the server.
    """
    subs = [*service._subscriptions.values(), *(e._subscription for e in service._endpoints)]
    for sub in subs:
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:  # the connection is closing or gone: nothing left to undo
                log.debug("unsubscribe %s: %s", sub.subject, exc)
    service._subscriptions, service._endpoints = {}, []
    service.stopped.set()

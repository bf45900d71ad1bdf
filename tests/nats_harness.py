"""Fixtures that start real `nats-server` processes: JetStream on, a temp store dir, a free port.

`nats_server` is one running server; `nats_servers` is a factory for as many as a test needs
(local bus + upstream, a fleet's hub...), each optionally reading a config file as well (a hub
whose config includes the permissions `edge fleet provision` wrote). Each can be stopped, killed
and restarted on the same port and store dir; all are stopped when the test ends.

A hub for leaf nodes is `nats_servers("hub", jetstream_domain="hub", leafnode_port=-1)` (any
NatsServer keyword passes through); `leaf_hub` is one, and `leaf_upstream` the `[nats]` table of a
device in leaf mode that joins it.

`nats_cluster` starts a JetStream cluster of N nodes on loopback (route ports bound beforehand,
see `edge._nats_server.free_ports`), the clustered hub a fleet grows into; `Cluster.leader_of`
names the node that leads a stream, so a test can kill exactly that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest

from edge import NatsServer
from edge._nats_server import free_ports

ServerFactory = Callable[..., Awaitable[NatsServer]]


class Cluster:
    """N nats-server nodes routed to each other, JetStream on each (a clustered hub)."""

    def __init__(self, nodes: list[NatsServer]) -> None:
        self.nodes = nodes

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsServer:
        return next(node for node in self.nodes if node.name == name)

    async def leader_of(self, stream: str, within: float = 20.0) -> NatsServer:
        """The node leading `stream` (waits through an election)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        nc = await nats.connect(self.urls, max_reconnect_attempts=2, error_cb=_quiet)
        try:
            while True:
                try:
                    info = await nc.jetstream().stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        return self.node(info.cluster.leader)
                except (nats.errors.Error, TimeoutError):
                    pass  # no leader yet: ask again
                if loop.time() > deadline:
                    raise AssertionError(f"no leader for stream {stream} after {within}s")
                await asyncio.sleep(0.1)  # poll with deadline: an election takes a few hundred ms
        finally:
            await nc.close()

    async def wait_for_jetstream(self, within: float = 20.0) -> None:
        """Until the cluster's JetStream answers (a meta leader was elected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        nc = await nats.connect(self.urls, max_reconnect_attempts=2, error_cb=_quiet)
        try:
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except (nats.errors.Error, TimeoutError):
                    if loop.time() > deadline:
                        raise
                await asyncio.sleep(0.1)  # poll with deadline: the meta group elects its leader
        finally:
            await nc.close()


ClusterFactory = Callable[[int], Awaitable[Cluster]]


async def _quiet(exc: Exception) -> None:
    """nats-py's default error callback prints tracebacks for a node that is down on purpose."""


@pytest.fixture
async def nats_servers(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    async with AsyncExitStack() as stack:
        count = 0

        async def start(name: str | None = None, jetstream: bool = True, config_file: Path | None = None,
                        **options: Any) -> NatsServer:
            nonlocal count
            count += 1
            label = name or f"s{count}"
            server = NatsServer(name=label, store_dir=tmp_path / f"nats-{label}", jetstream=jetstream,
                                config_file=config_file, **options)
            return await stack.enter_async_context(server)

        yield start


HUB_DOMAIN = "hub"


async def leaf_hub(nats_servers: ServerFactory, name: str = "hub", **options: Any) -> NatsServer:
    """A hub with a leafnode listener (any free port) and the JetStream domain HUB_DOMAIN.

    Its side of the link is compressed (`s2_fast`) as a real hub's `s2_auto` is over any WAN: on
    loopback `s2_auto` measures a round trip under 10 ms and sends uncompressed."""
    return await nats_servers(name, jetstream_domain=HUB_DOMAIN, leafnode_port=-1, leafnode_compression="s2_fast",
                              **options)


def leaf_upstream(leaf_url: str, **more: Any) -> dict[str, Any]:
    """The `[nats]` table of a device whose embedded server joins `leaf_url` (nats-leaf://) as a leaf node."""
    return {"local": "embedded", "embedded_port": -1, "upstream": leaf_url, "upstream_domain": HUB_DOMAIN, **more}


@pytest.fixture
async def nats_server(nats_servers: ServerFactory) -> NatsServer:
    return await nats_servers("hub")


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[ClusterFactory]:
    async with AsyncExitStack() as stack:

        async def start(size: int = 3) -> Cluster:
            routes = free_ports(size)
            nodes = [
                NatsServer(name=f"n{i}", store_dir=tmp_path / f"nats-n{i}", cluster_name="hub", cluster_port=port,
                           routes=[f"nats://127.0.0.1:{p}" for p in routes if p != port])
                for i, port in enumerate(routes)
            ]
            # All at once: each node waits for its routes before its JetStream is of any use.
            await asyncio.gather(*(stack.enter_async_context(node) for node in nodes))
            cluster = Cluster(nodes)
            await cluster.wait_for_jetstream()
            return cluster

        yield start

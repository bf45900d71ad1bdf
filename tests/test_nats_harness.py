"""The harness itself: servers start on free ports, restart on the same port and keep JetStream state."""

from __future__ import annotations

import nats

from tests.nats_harness import ServerFactory


async def test_two_servers_get_distinct_ports_and_accept_clients(nats_servers: ServerFactory) -> None:
    a = await nats_servers("a")
    b = await nats_servers("b")
    assert a.port != b.port
    for server in (a, b):
        nc = await nats.connect(server.url)
        assert nc.is_connected
        await nc.close()


async def test_kill_and_restart_keeps_port_and_stream(nats_servers: ServerFactory) -> None:
    server = await nats_servers("hub")
    port = server.port
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.1", b"hello")
    assert ack.seq == 1
    await nc.close()

    await server.kill()
    await server.start()
    assert server.port == port

    nc = await nats.connect(server.url)
    msg = await nc.jetstream().get_last_msg("T", "t.1")
    assert msg.data == b"hello"
    await nc.close()

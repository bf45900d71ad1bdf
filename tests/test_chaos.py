"""FaultProxy: raw TCP semantics against an echo server, then real nats-py clients through a real nats-server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from edge import NatsServer
from edge.tools.chaos import Fault, FaultKind, FaultProxy
from tests.polling import wait_until

# --- raw TCP against an echo server --------------------------------------------------------------


class EchoServer:
    """Echoes every chunk; on the client's FIN writes b"bye" and closes (a half-close round trip)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            await writer.drain()
        except OSError:
            pass  # the proxy reset us on purpose: the test looks at the client's side
        finally:
            writer.close()

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


async def open_client(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def connect_and_read(proxy: FaultProxy) -> bytes:
    reader, writer = await open_client(proxy)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes = b"ping") -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data


def test_refuses_to_listen_beyond_loopback() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy("127.0.0.1", 4222, listen_host=host)
    FaultProxy("127.0.0.1", 4222, listen_host="::1")  # loopback in IPv6 is fine
    with pytest.raises(ValueError):
        Fault(FaultKind.THROTTLE, bytes_per_s=0)


async def test_forwards_bytes_and_half_close(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.url == f"nats://127.0.0.1:{proxy.port}"
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer, b"hello")
        writer.write_eof()  # our FIN must reach the server, whose reply must still reach us
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        writer.close()
        await wait_until(lambda: proxy.active == 0, within=5, what="the connection to end")
        assert proxy.accepted == 1
        assert proxy.bytes_to_target == 5
        assert proxy.bytes_to_client == 8


async def test_close_sends_fin_and_refuses_new_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer)
        proxy.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # EOF, not a reset
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await open_client(proxy)
        proxy.pass_through()  # listening again on the same port before it returns
        reader3, writer3 = await open_client(proxy)
        await round_trip(reader3, writer3)
        writer3.close()
        assert proxy.accepted == 2


async def test_reset_sends_rst_and_resets_new_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer)
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        with pytest.raises(ConnectionResetError):
            await connect_and_read(proxy)  # the RST may beat the handshake's last step, or not
        await wait_until(lambda: proxy.active == 0, within=5, what="every connection to end")


async def test_blackhole_discards_without_blocking_and_resets_every_connection_when_lifted(
    echo: EchoServer,
) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer)
        proxy.blackhole()
        burst = b"x" * 4_000_000  # far beyond every buffer: the proxy must read and discard
        writer.write(burst)
        await asyncio.wait_for(writer.drain(), 10)
        await wait_until(lambda: proxy.bytes_dropped >= len(burst), within=5, what="the burst to be discarded")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        assert not reader.at_eof()

        late_reader, late_writer = await open_client(proxy)  # accepted, but it never reaches the echo
        late_writer.write(b"lost")
        await late_writer.drain()
        await wait_until(lambda: proxy.accepted == 2, within=5, what="the proxy to accept it during the blackhole")
        proxy.pass_through()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(late_reader.read(), 5)
        late_writer.close()
        # The old connection lost bytes in the drop: it is reset too, never resumed with a hole.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        fresh_reader, fresh_writer = await open_client(proxy)
        await round_trip(fresh_reader, fresh_writer, b"back")  # new connections pass again
        fresh_writer.close()


async def test_latency_delays_each_direction(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await open_client(proxy)
        proxy.latency(50)
        start = time.monotonic()
        await round_trip(reader, writer, b"a" * 200_000)  # several chunks, in order
        assert time.monotonic() - start >= 0.099
        writer.close()


async def test_target_down_resets_the_client() -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as proxy:
        with pytest.raises(ConnectionResetError):
            await connect_and_read(proxy)


async def test_aclose_is_idempotent_and_drops_every_connection(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    async with proxy:
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer)
        proxy.flap(1.0, 1.0, mode="blackhole")
        assert proxy.flapping
    assert not proxy.flapping
    assert proxy.active == 0
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await proxy.aclose()
    with pytest.raises(ConnectionRefusedError):
        await open_client(proxy)


async def test_flap_runs_its_cycles_then_forwards_again(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        with pytest.raises(ValueError):
            proxy.flap(0.0, 0.1)
        with pytest.raises(ValueError):
            proxy.flap(0.1, 0.1, mode="pass")
        proxy.flap(0.02, 0.02, mode="close", cycles=2)
        assert proxy.fault.kind is FaultKind.CLOSE  # the link starts down
        await wait_until(lambda: not proxy.flapping, within=5, what="the schedule to end")
        assert proxy.flaps == 2
        assert proxy.fault == Fault(FaultKind.PASS)
        reader, writer = await open_client(proxy)
        await round_trip(reader, writer)
        writer.close()


# --- nats-py through a real nats-server -----------------------------------------------------------


class Watch:
    """Counts a client's disconnects and reconnects (nats-py callbacks)."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.reconnects = 0
        self.errors: list[Exception] = []

    async def disconnected(self) -> None:
        self.disconnects += 1

    async def reconnected(self) -> None:
        self.reconnects += 1

    async def error(self, error: Exception) -> None:
        self.errors.append(error)  # expected while the proxy breaks things; kept for debugging


Connect = Callable[..., Awaitable[tuple[Client, Watch]]]


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", nats_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def connect(proxy: FaultProxy) -> AsyncIterator[Connect]:
    """nats-py clients through the proxy with fast reconnects; closed before the proxy goes."""
    clients: list[Client] = []

    async def _connect(**options: Any) -> tuple[Client, Watch]:
        watch = Watch()
        settings: dict[str, Any] = {
            "reconnect_time_wait": 0.05,
            "max_reconnect_attempts": -1,
            "connect_timeout": 0.5,
            "disconnected_cb": watch.disconnected,
            "reconnected_cb": watch.reconnected,
            "error_cb": watch.error,
        }
        settings.update(options)
        nc = await nats.connect(proxy.url, **settings)
        clients.append(nc)
        return nc, watch

    yield _connect
    for nc in clients:
        await nc.close()


@pytest.fixture
async def responder(nats_server: NatsServer) -> AsyncIterator[Client]:
    """Answers `echo` on the server directly, never through the proxy."""
    nc = await nats.connect(nats_server.url)

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("echo", cb=answer)
    await settle(nc)
    yield nc
    await nc.close()


async def settle(nc: Client) -> None:
    """Return once the server has every SUB and PUB sent so far.

    One flush is not enough with nats-py 2.16: flush() writes its PING straight to the socket, ahead
    of commands still pending for the flusher task, so its PONG can come back before the server has
    seen a SUB. By the time that PONG arrives the flusher has written them, so a second PING follows.
    """
    await nc.flush()
    await nc.flush()


async def rtt(nc: Client) -> float:
    start = time.monotonic()
    reply = await nc.request("echo", b"ping", timeout=5)
    assert reply.data == b"ping"
    return time.monotonic() - start


async def test_nats_pass_through_pub_sub_and_request(proxy: FaultProxy, connect: Connect, responder: Client) -> None:
    nc, _ = await connect()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await got.put(msg.data)

    await nc.subscribe("t.up", cb=on_msg)
    await settle(nc)
    await responder.publish("t.up", b"hello")  # server -> proxy -> client
    assert await asyncio.wait_for(got.get(), 5) == b"hello"
    await rtt(nc)  # client -> proxy -> server -> responder and back
    assert proxy.accepted == 1
    assert proxy.bytes_to_target > 0 and proxy.bytes_to_client > 0


async def test_nats_reset_disconnects_and_resets_reconnects_then_recovers(
    proxy: FaultProxy, connect: Connect, responder: Client
) -> None:
    nc, watch = await connect()
    await rtt(nc)
    proxy.reset()
    await wait_until(lambda: watch.disconnects == 1, within=5, what="the disconnect")
    await wait_until(lambda: proxy.accepted >= 3, within=5, what="reconnect attempts to be reset")
    assert not nc.is_connected
    proxy.pass_through()
    await wait_until(lambda: watch.reconnects == 1, within=5, what="the reconnect")
    await rtt(nc)


async def test_nats_close_disconnects_then_recovers(proxy: FaultProxy, connect: Connect, responder: Client) -> None:
    nc, watch = await connect()
    await rtt(nc)
    proxy.close()
    await wait_until(lambda: watch.disconnects == 1, within=5, what="the disconnect")
    assert any(isinstance(e, nats.errors.UnexpectedEOF) for e in watch.errors)  # a FIN, not a reset
    await wait_until(lambda: len(watch.errors) >= 3, within=5, what="reconnect attempts to be refused")
    assert proxy.accepted == 1
    proxy.pass_through()
    await wait_until(lambda: watch.reconnects == 1, within=5, what="the reconnect")
    await rtt(nc)
    assert proxy.accepted == 2


async def test_nats_blackhole_times_out_then_stale_detection_recovers(
    proxy: FaultProxy, connect: Connect, responder: Client
) -> None:
    patient, _ = await connect()  # default 2 min pings: it cannot notice the drop in this test
    watchful, watch = await connect(ping_interval=0.1, max_outstanding_pings=2)
    await rtt(patient)
    await rtt(watchful)
    proxy.blackhole()
    with pytest.raises(nats.errors.TimeoutError):
        await patient.request("echo", b"ping", timeout=0.3)
    assert patient.is_connected  # to the client the socket still looks fine
    assert proxy.active >= 2  # the watchful client may already be trying a new connection
    assert proxy.bytes_dropped > 0
    await wait_until(lambda: watch.disconnects == 1, within=5, what="the stale connection to be noticed")
    proxy.pass_through()
    await wait_until(lambda: watch.reconnects == 1, within=5, what="the reconnect after the blackhole")
    await rtt(watchful)


async def test_nats_latency_adds_to_the_round_trip(proxy: FaultProxy, connect: Connect, responder: Client) -> None:
    nc, _ = await connect()
    baseline = min([await rtt(nc) for _ in range(3)])
    assert baseline < 0.1
    proxy.latency(100)
    assert await rtt(nc) >= 0.195  # 100 ms each way
    proxy.pass_through()
    assert min([await rtt(nc) for _ in range(3)]) < 0.1


async def test_nats_throttle_caps_throughput(proxy: FaultProxy, connect: Connect, nats_server: NatsServer) -> None:
    nc, _ = await connect()
    sink = await nats.connect(nats_server.url)
    received = 0

    async def count(msg: Msg) -> None:
        nonlocal received
        received += 1

    await sink.subscribe("bulk", cb=count)
    await settle(sink)
    payload = b"x" * 1000

    async def burst(expected: int) -> float:
        # Timed until the subscriber has every message: nats-py's flush() is no barrier here, its
        # PING is written straight to the socket and can overtake publishes still pending.
        start = time.monotonic()
        for _ in range(150):
            await nc.publish("bulk", payload)
        await wait_until(lambda: received == expected, within=10, what=f"{expected} messages")
        return time.monotonic() - start

    try:
        fast = await burst(150)
        proxy.throttle(100_000)
        sent_before = proxy.bytes_to_target
        slow = await burst(300)
        assert proxy.bytes_to_target - sent_before >= 150_000
        assert slow >= 1.2  # ~153 kB at 100 kB/s is ~1.5 s
        assert slow > 3 * fast
    finally:
        await sink.close()


async def test_nats_flapping_link_disconnects_repeatedly_then_settles(
    proxy: FaultProxy, connect: Connect, responder: Client
) -> None:
    nc, watch = await connect()
    proxy.flap(up_s=0.4, down_s=0.2, mode="reset")
    await wait_until(lambda: watch.disconnects >= 2, within=8, what="two disconnects")
    assert proxy.flaps >= 2
    proxy.stop_flapping()
    assert not proxy.flapping
    await wait_until(lambda: nc.is_connected, within=5, what="the client to settle")
    await rtt(nc)

"""A fault-injecting TCP proxy on loopback: put it between a client and a server and break the link.

    async with FaultProxy("127.0.0.1", server.port) as proxy:
        nc = await nats.connect(proxy.url)
        proxy.blackhole()        # bytes vanish, sockets stay open
        proxy.pass_through()     # back to normal

Faults (`Fault`, changed at any time with `set_mode` or the shorthand methods):

    pass_through   forward every byte
    close          FIN-close every connection and stop listening: new connections are refused, as
                   when the server itself goes away (the listener comes back on the same port)
    reset          RST every connection (SO_LINGER 0), and each new one as soon as it is accepted
    blackhole      read both sides and discard everything; new connections are accepted and sink
    latency        deliver each chunk `latency_s` after it arrived, in order, both directions
    throttle       at most `bytes_per_s` per direction of each connection
    flap           alternate a fault and pass-through on a schedule (a task the proxy owns)

The proxy owns its listening socket and accepts from a reader callback, so every mode change is
synchronous and complete when the method returns. Each connection is one task that owns its four
pumps (read and write, each direction) in a TaskGroup; the proxy owns those tasks and the flap
task, and cancels and awaits them on exit. Buffers are bounded: each direction holds at most
`_QUEUE_CHUNKS` chunks of `_CHUNK` bytes, then reading stops until the writer catches up.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import struct
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 16
_BACKLOG = 128
_CONNECT_TIMEOUT_S = 5.0
# Throttled writes go out in slices of this many seconds' worth of bytes, so a 64 KiB chunk at a
# low rate trickles out instead of leaving in one burst after a long sleep.
_THROTTLE_SLICE_S = 0.02


class FaultKind(enum.Enum):
    PASS = "pass"
    CLOSE = "close"
    RESET = "reset"
    BLACKHOLE = "blackhole"
    LATENCY = "latency"
    THROTTLE = "throttle"


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault mode; `latency_s` applies to LATENCY (one way), `bytes_per_s` to THROTTLE."""

    kind: FaultKind
    latency_s: float = 0.0
    bytes_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind is FaultKind.LATENCY and self.latency_s < 0:
            raise ValueError(f"latency must not be negative, got {self.latency_s}s")
        if self.kind is FaultKind.THROTTLE and self.bytes_per_s <= 0:
            raise ValueError(f"throttle needs a positive rate, got {self.bytes_per_s} bytes/s")


PASS = Fault(FaultKind.PASS)

# (arrival time, bytes) per chunk; None is the sender's FIN.
_ChunkQueue: TypeAlias = "asyncio.Queue[tuple[float, bytes] | None]"


class _End(enum.Enum):
    FIN = "fin"  # close our sockets; the kernel sends FIN
    RESET = "reset"  # SO_LINGER 0 then close: the kernel sends RST


def _linger0(sock: Any) -> None:
    # `sock` is a socket.socket or asyncio's TransportSocket; both take setsockopt.
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # the socket is already gone: there is nothing left to reset


def _shut(writer: asyncio.StreamWriter, how: _End) -> None:
    if how is _End.RESET:
        _linger0(writer.get_extra_info("socket"))
    # abort, not close: a peer that stopped reading must not keep our socket open to flush a buffer.
    writer.transport.abort()


class _Connection:
    """One proxied connection: the accepted socket, its stream once wrapped, the target's, the task."""

    def __init__(self, raw: socket.socket, *, sink: bool) -> None:
        self.raw = raw
        self.sink = sink  # accepted while blackholed: no target, reads and discards
        self.client: asyncio.StreamWriter | None = None
        self.target: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        # Once the task starts wrapping `raw` in a transport, asyncio closes it (even when the
        # wrapping is cancelled); before that, closing it is ours to do.
        self.wrapping = False
        self.ended: _End | None = None

    def attach(self, writer: asyncio.StreamWriter, *, target: bool) -> None:
        if target:
            self.target = writer
        else:
            self.client = writer
        if self.ended is not None:  # a fault ended us while we were connecting
            _shut(writer, self.ended)

    def end(self, how: _End) -> None:
        """Close both sockets now (idempotent) and stop the pumps; queued bytes are dropped."""
        if self.ended is not None:
            return
        self.ended = how
        if how is _End.RESET:
            _linger0(self.raw)  # also right while asyncio is wrapping it: the close then resets
        for writer in (self.client, self.target):
            if writer is not None:
                _shut(writer, how)
        if self.task is not None:
            self.task.cancel()

    def release(self) -> None:
        """The task is done (or was cancelled before it ran): nothing of ours may stay open."""
        self.end(_End.FIN)
        if not self.wrapping:
            self.raw.close()


def _listen_address(host: str) -> tuple[socket.AddressFamily, str]:
    if host == "localhost":
        return socket.AF_INET, "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"FaultProxy listens on loopback only, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"FaultProxy listens on loopback only, not {host!r}")
    return (socket.AF_INET6 if address.version == 6 else socket.AF_INET), host


class FaultProxy:
    """A TCP proxy on loopback that forwards to `target_host:target_port` and injects faults.

    Use as an async context manager; `port` and `url` are valid inside it. The fault methods
    (`pass_through`, `close`, `reset`, `blackhole`, `latency`, `throttle`, `flap`) take effect at
    once on current and new connections; `aclose()` (or leaving the block) shuts the proxy itself.
    Counters: `accepted`, `active`, `bytes_to_target`, `bytes_to_client`, `bytes_dropped`, `flaps`.
    """

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self._family, self.listen_host = _listen_address(listen_host)
        self.target_host = target_host
        self.target_port = target_port
        self._port = listen_port
        self._fault = PASS
        self._fault_changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flap_task: asyncio.Task[None] | None = None
        self._errors: list[BaseException] = []
        self._closed = False
        self.accepted = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.bytes_dropped = 0
        self.flaps = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        if self._loop is not None:
            raise RuntimeError("a FaultProxy can be entered only once")
        self._loop = asyncio.get_running_loop()
        self._listen()  # even when closed from the start: binding is how port 0 becomes a port
        if self._fault.kind is FaultKind.CLOSE:
            self._unlisten()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, drop every connection, cancel and await every task (idempotent).

        Raises the first unexpected error a task hit, so a bug in the proxy fails the test.
        """
        if self._closed:
            return
        self._closed = True
        self._unlisten()
        for conn in list(self._conns):
            conn.end(_End.FIN)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._errors:
            raise self._errors[0]

    @property
    def port(self) -> int:
        """The port the proxy listens on (kept while `close` has the listener down)."""
        if self._loop is None:
            raise RuntimeError("the FaultProxy is not listening yet")
        return self._port

    @property
    def url(self) -> str:
        """`nats://HOST:PORT` for nats-py clients."""
        host = f"[{self.listen_host}]" if self._family is socket.AF_INET6 else self.listen_host
        return f"nats://{host}:{self.port}"

    @property
    def active(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._conns)

    @property
    def fault(self) -> Fault:
        """The fault in force now."""
        return self._fault

    @property
    def flapping(self) -> bool:
        """Whether a `flap` schedule is running."""
        return self._flap_task is not None and not self._flap_task.done()

    # --- faults ------------------------------------------------------------------------------

    def set_mode(self, fault: Fault) -> None:
        """Apply `fault` now to every connection and to new ones; stops a running flap schedule."""
        self._cancel_flap()
        self._apply(fault)

    def pass_through(self) -> None:
        """Forward normally."""
        self.set_mode(PASS)

    def close(self) -> None:
        """FIN-close every connection and refuse new ones until the mode changes (not `aclose`)."""
        self.set_mode(Fault(FaultKind.CLOSE))

    def reset(self) -> None:
        """RST every connection; new ones are reset as soon as they are accepted."""
        self.set_mode(Fault(FaultKind.RESET))

    def blackhole(self) -> None:
        """Keep sockets open but deliver nothing either way, like a silent network drop."""
        self.set_mode(Fault(FaultKind.BLACKHOLE))

    def latency(self, ms: float) -> None:
        """Delay every chunk by `ms` milliseconds each way (a round trip gains 2 × ms)."""
        self.set_mode(Fault(FaultKind.LATENCY, latency_s=ms / 1000))

    def throttle(self, bytes_per_s: float) -> None:
        """Cap each direction of each connection at `bytes_per_s`."""
        self.set_mode(Fault(FaultKind.THROTTLE, bytes_per_s=bytes_per_s))

    def flap(self, up_s: float, down_s: float, mode: str | Fault = "reset", cycles: int | None = None) -> None:
        """Alternate: `mode` for `down_s`, then pass-through for `up_s`; `cycles` times or until stopped.

        `mode` is a fault's name (`close`, `reset`, `blackhole`) or a `Fault`. The link starts down.
        """
        fault = mode if isinstance(mode, Fault) else Fault(FaultKind(mode))
        if fault.kind is FaultKind.PASS:
            raise ValueError("flapping to pass-through is no fault")
        if up_s <= 0 or down_s <= 0:
            raise ValueError(f"up_s and down_s must be positive, got {up_s}, {down_s}")
        if cycles is not None and cycles < 1:
            raise ValueError(f"cycles must be at least 1, got {cycles}")
        if self._loop is None or self._closed:
            raise RuntimeError("flap needs a running FaultProxy")
        self._cancel_flap()
        self._apply(fault)  # down at once, so the caller can rely on it when flap() returns
        self.flaps += 1
        self._flap_task = self._spawn(self._flap(up_s, down_s, fault, cycles), "fault-proxy-flap")

    def stop_flapping(self) -> None:
        """Stop a flap schedule and forward normally again."""
        self.set_mode(PASS)

    def _cancel_flap(self) -> None:
        # A synchronous cancel is enough: the flap task is parked in a sleep and never runs another
        # step that could change the mode.
        if self._flap_task is not None:
            self._flap_task.cancel()
            self._flap_task = None

    async def _flap(self, up_s: float, down_s: float, fault: Fault, cycles: int | None) -> None:
        # flap() has applied the first fault; the sleeps are the schedule itself.
        done = 0
        while True:
            await asyncio.sleep(down_s)
            self._apply(PASS)
            done += 1
            if cycles is not None and done >= cycles:
                return
            await asyncio.sleep(up_s)
            self._apply(fault)
            self.flaps += 1

    def _apply(self, fault: Fault) -> None:
        if self._closed:
            return
        old, self._fault = self._fault, fault
        # Wake writers waiting for the blackhole to lift, then arm a fresh event for the next change.
        self._fault_changed.set()
        self._fault_changed = asyncio.Event()
        if fault.kind is FaultKind.CLOSE:
            self._unlisten()
            self._end_all(_End.FIN)
        elif self._loop is not None and self._listener is None:
            self._listen()
        if fault.kind is FaultKind.RESET:
            self._end_all(_End.RESET)
        elif old.kind is FaultKind.BLACKHOLE and fault.kind is not FaultKind.BLACKHOLE:
            # TCP never delivers a stream with a hole in it, but the blackhole discarded bytes of
            # every connection that lived through it. Resuming them would hand the peers a
            # corrupted stream no real network produces; a real one ends them (retransmissions give
            # up, the NAT forgot them, the peer answers an unknown connection with a reset). So
            # every connection that saw the drop is reset when it lifts.
            self._end_all(_End.RESET)

    def _end_all(self, how: _End) -> None:
        for conn in list(self._conns):
            conn.end(how)

    # --- listening ---------------------------------------------------------------------------

    def _listen(self) -> None:
        # Synchronous, so that `pass_through()` after `close()` listens again before it returns.
        # SO_REUSEADDR lets us bind the same port again while old connections sit in TIME_WAIT.
        assert self._loop is not None
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self._port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._port = sock.getsockname()[1]

    def _unlisten(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept_ready(self, listener: socket.socket) -> None:
        for _ in range(_BACKLOG):
            try:
                raw, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # drained the backlog
            except OSError:
                # The client gave up before we accepted (ECONNABORTED) or we are out of file
                # descriptors: the next readiness tries again.
                return
            self._admit(raw)

    def _admit(self, raw: socket.socket) -> None:
        self.accepted += 1
        kind = self._fault.kind
        if kind is FaultKind.RESET or kind is FaultKind.CLOSE:
            # CLOSE does not listen; a connection that raced into the backlog is reset.
            _linger0(raw)
            raw.close()
            return
        conn = _Connection(raw, sink=kind is FaultKind.BLACKHOLE)
        self._conns.add(conn)
        conn.task = self._spawn(self._serve(conn), f"fault-proxy-conn-{self.accepted}")

        def finished(_: asyncio.Task[None]) -> None:
            # Runs even when the task was cancelled before it started, so no socket is left open.
            self._conns.discard(conn)
            conn.release()

        conn.task.add_done_callback(finished)

    # --- connections -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._errors.append(error)

    async def _serve(self, conn: _Connection) -> None:
        conn.wrapping = True
        try:
            client, client_writer = await asyncio.open_connection(sock=conn.raw)
        except OSError:
            return  # the client reset before we got to it; asyncio closed the socket
        conn.attach(client_writer, target=False)
        if conn.sink:
            await self._discard(client)
            return
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                target, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except (OSError, TimeoutError):
            # The target is down: the client learns it the way it would without us, by a reset.
            conn.end(_End.RESET)
            return
        conn.attach(target_writer, target=True)
        up: _ChunkQueue = asyncio.Queue(_QUEUE_CHUNKS)
        down: _ChunkQueue = asyncio.Queue(_QUEUE_CHUNKS)
        broken = False
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(client, up))
                tg.create_task(self._write(up, target_writer, to_target=True))
                tg.create_task(self._read(target, down))
                tg.create_task(self._write(down, client_writer, to_target=False))
        except* OSError:
            # One side reset or vanished (ConnectionResetError, BrokenPipeError...): pass the reset
            # on to the other side, as the network would.
            broken = True
        if broken:
            conn.end(_End.RESET)
            return
        # Both sides sent FIN and every byte was handed to a transport: close gracefully, so the
        # bytes still buffered go out (the done callback's abort is then a no-op).
        for writer in (client_writer, target_writer):
            writer.close()
        for writer in (client_writer, target_writer):
            try:
                await writer.wait_closed()
            except OSError:
                pass  # a peer that resets after both FINs loses nothing it asked for

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                return  # the client gave up on the silent connection; nothing to tell anyone
            if not data:
                return
            self.bytes_dropped += len(data)

    async def _read(self, reader: asyncio.StreamReader, queue: _ChunkQueue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_CHUNK)
            # A full queue stops this loop, so the kernel's window closes on a fast sender.
            await queue.put((loop.time(), data) if data else None)
            if not data:
                return

    async def _write(self, queue: _ChunkQueue, writer: asyncio.StreamWriter, *, to_target: bool) -> None:
        loop = asyncio.get_running_loop()
        next_slot = 0.0  # throttle: when the next slice may leave
        while True:
            item = await queue.get()
            if item is None:
                # A FIN is held back while blackholed and delivered when the network returns, as a
                # retransmitted FIN would be.
                while self._fault.kind is FaultKind.BLACKHOLE:
                    await self._fault_changed.wait()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            arrived, data = item
            fault = self._fault
            if fault.kind is FaultKind.LATENCY:
                delay = arrived + fault.latency_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                fault = self._fault
            if fault.kind is FaultKind.BLACKHOLE:
                self.bytes_dropped += len(data)
                continue
            if fault.kind is FaultKind.THROTTLE:
                rate = fault.bytes_per_s
                step = max(1, int(rate * _THROTTLE_SLICE_S))
                for start in range(0, len(data), step):
                    if self._fault is not fault:  # the mode changed mid-chunk: stop pacing
                        await self._deliver(writer, data[start:], to_target)
                        break
                    piece = data[start : start + step]
                    now = loop.time()
                    next_slot = max(next_slot, now)
                    if next_slot > now:
                        await asyncio.sleep(next_slot - now)
                    await self._deliver(writer, piece, to_target)
                    next_slot += len(piece) / rate
            else:
                await self._deliver(writer, data, to_target)

    async def _deliver(self, writer: asyncio.StreamWriter, data: bytes, to_target: bool) -> None:
        writer.write(data)
        if to_target:
            self.bytes_to_target += len(data)
        else:
            self.bytes_to_client += len(data)
        await writer.drain()

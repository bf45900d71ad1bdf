"""The systemd notify protocol, spoken by `edge run` itself (no dependency: a datagram per message).

systemd (Type=notify) passes `NOTIFY_SOCKET`, a unix datagram socket (a path, or an abstract name
written with a leading `@`), and with `WatchdogSec=` also `WATCHDOG_USEC` (and `WATCHDOG_PID`).
Each message is newline-separated `KEY=VALUE` lines: `READY=1` once the pipelines are subscribed,
`STATUS=...` (one line, shown by `systemctl status`), `WATCHDOG=1` pings, `RELOADING=1` with
`MONOTONIC_USEC=` around a SIGHUP reload, `STOPPING=1` on SIGTERM.

Without `NOTIFY_SOCKET` nothing is sent, and nothing here ever blocks the event loop: the socket
is non-blocking and a message that cannot go now (the manager gone: ENOENT, ECONNREFUSED; its
queue full: EAGAIN) is dropped with a debug line. A lost STATUS is replaced by the next one; a
lost ping is what the watchdog is for.

The watchdog pings at half of `WATCHDOG_USEC` only while the device is healthy, judged at each
ping (`watchdog_problem`): the ping task itself woke on time (a loop that stalls for longer than
the ping interval skips that ping; a loop blocked for good never pings again, it cannot run the
task), and the runtime's own check (`health`: the audit writer thread alive and not failing for
longer than the watchdog period). An unhealthy device keeps running and says why in STATUS and
the log; systemd restarts it when `WatchdogSec` passes without a ping.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType

from ._link import Clock

log = logging.getLogger("edge.sdnotify")

STATUS_EVERY_S = 5.0  # how often STATUS= is refreshed (link state, decisions/s)
_QUIET_ERRNOS = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN, errno.EAGAIN, errno.ENOBUFS)

Health = Callable[[], str | None]  # why the device is unhealthy now, or None
StatusLine = Callable[[], str]


# -- the pure parts --------------------------------------------------------------------------------


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address `NOTIFY_SOCKET` names (an abstract name's `@` becomes a NUL), or None."""
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds are not for a gateway service: not spoken


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of `WATCHDOG_USEC`), or None: no watchdog, or it is another
    process's (`WATCHDOG_PID` names that process when the variable is inherited)."""
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


def message(**fields: str | int) -> bytes:
    """`KEY=VALUE` lines; a value is one line (a newline would start a field of its own)."""
    return "\n".join(f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items()).encode()


def watchdog_problem(late_s: float, interval_s: float, device_problem: str | None) -> str | None:
    """Why this ping is withheld, or None: send it."""
    if late_s > interval_s:
        return f"the event loop stalled: the watchdog woke {late_s:.2f}s late"
    return device_problem


def status_line(link: str, decisions_per_s: float, problem: str | None = None) -> str:
    text = f"link {link}, {decisions_per_s:.1f} decisions/s"
    return f"{text}; unhealthy: {problem}" if problem else text


class DecisionRate:
    """Decisions/s between two readings of a running total (a restart of the total counts as 0)."""

    def __init__(self, total: int, now: float) -> None:
        self._total, self._at = total, now

    def update(self, total: int, now: float) -> float:
        elapsed = now - self._at
        rate = max(0, total - self._total) / elapsed if elapsed > 0 else 0.0
        self._total, self._at = total, now
        return rate


# -- the socket and the tasks ---------------------------------------------------------------------


class Notifier:
    """One non-blocking datagram socket to the service manager; `send` never raises for it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sent = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def send(self, **fields: str | int) -> bool:
        data = message(**fields)
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if exc.errno not in _QUIET_ERRNOS:
                log.warning("sd_notify: %s not sent: %s", data.split(b"\n", 1)[0].decode(), exc)
            else:
                log.debug("sd_notify: %s not sent: %s", data.split(b"\n", 1)[0].decode(), exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()


class ServiceNotifier:
    """What `edge run` tells systemd: an async context manager owning the ping and status tasks.

    Does nothing without `NOTIFY_SOCKET`. `ready()` starts the watchdog pings and STATUS updates;
    `health` and `status` are the runtime's, given at `ready()` (before it, there is no runtime).
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, clock: Clock = time.monotonic) -> None:
        env = os.environ if env is None else env
        address = notify_address(env)
        self.notifier = Notifier(address) if address is not None else None
        self.watchdog_s = watchdog_interval(env, os.getpid()) if self.notifier is not None else None
        self.pings = 0
        self.withheld = 0  # pings not sent because the device was unhealthy
        self._clock = clock
        self._stack = AsyncExitStack()
        self._tasks: asyncio.TaskGroup | None = None
        self._background: list[asyncio.Task[None]] = []
        self._health: Health = lambda: None
        self._status: StatusLine = lambda: ""
        self._stopping = False
        self._last_problem: str | None = None

    @property
    def enabled(self) -> bool:
        return self.notifier is not None

    async def __aenter__(self) -> ServiceNotifier:
        if self.notifier is not None:
            self._stack.callback(self.notifier.close)
            self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._background:
            task.cancel()
        await self._stack.aclose()  # the task group awaits the cancelled tasks, then the socket closes

    def ready(self, *, health: Health, status: StatusLine) -> None:
        """READY=1 (the pipelines are subscribed), then pings and STATUS updates until closed."""
        self._health, self._status = health, status
        self._send(READY=1, STATUS=status())
        if self._tasks is None:
            return
        self._background.append(self._tasks.create_task(self._status_forever(), name="sd-status"))
        if self.watchdog_s is not None:
            self._background.append(self._tasks.create_task(self._watchdog_forever(self.watchdog_s),
                                                            name="sd-watchdog"))

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd (Type=notify-reload) matches the reload to this moment.
        self._send(RELOADING=1, STATUS="reloading the config", MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def reloaded(self, outcome: str) -> None:
        self._send(READY=1, STATUS=f"{self._status()}; {outcome}")

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._send(STOPPING=1, STATUS="stopping: draining in-flight decisions")

    def _send(self, **fields: str | int) -> None:
        if self.notifier is not None:
            self.notifier.send(**fields)

    async def _status_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STATUS_EVERY_S)  # pace: STATUS is for a human's `systemctl status`
            if not self._stopping:
                self._send(STATUS=self._status())

    async def _watchdog_forever(self, interval_s: float) -> None:
        while True:
            due = self._clock() + interval_s
            await asyncio.sleep(interval_s)  # pace: half of WATCHDOG_USEC, as systemd asks
            problem = watchdog_problem(self._clock() - due, interval_s, self._health())
            if problem != self._last_problem:
                if problem is None:
                    log.warning("watchdog: healthy again, pinging")
                else:
                    log.error("watchdog: not pinging systemd (it restarts the service after WatchdogSec): %s",
                              problem)
                self._last_problem = problem
            if problem is None:
                if self.notifier is not None and self.notifier.send(WATCHDOG=1):
                    self.pings += 1
            else:
                self.withheld += 1

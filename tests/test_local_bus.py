"""The local bus: an embedded, supervised nats-server, and a local bus that restarts (SPEC §9)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import msgspec

from edge import Runtime
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, connect, encode, make_config, wait_until_answering


async def test_embedded_server_is_started_supervised_and_restarted(tmp_path: Path) -> None:
    config = make_config(tmp_path, "embedded", nats={"local": "embedded", "embedded_port": -1})
    async with Runtime(config) as runtime:
        assert runtime.server is not None
        url = (runtime.data_dir / "local.url").read_text()
        assert url == runtime.server.url
        nc = await connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        reply = await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        assert msgspec.json.decode(reply.data)["label"] == "normal"

        first_pid = runtime.server.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)  # the child dies under us
        await wait_until(lambda: runtime.server is not None and runtime.server.pid not in (None, first_pid), within=15,
                         what="a new nats-server")
        # Same port, subscriptions back: the runtime answers again without a restart of its own.
        reply = await wait_until_answering(nc, "sensors.p1.pump", encode(NORMAL), within=20)
        assert msgspec.json.decode(reply.data)["label"] == "normal"
        assert runtime.server.url == url
        await nc.close()


async def test_local_bus_restart_brings_subscriptions_back(nats_servers: ServerFactory, tmp_path: Path) -> None:
    local = await nats_servers("local")
    async with Runtime(make_config(tmp_path, local.url)) as runtime:
        nc = await connect(local.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        await local.stop()
        await local.start()
        reply = await wait_until_answering(nc, "sensors.p1.pump", encode(NORMAL), within=20)
        assert msgspec.json.decode(reply.data)["label"] == "normal"
        assert runtime.state.value == "running"
        await nc.close()


async def test_pause_survives_a_restart(nats_servers: ServerFactory, tmp_path: Path) -> None:
    """The kill switch is not undone by a reboot: only a resume lifts it."""
    local = await nats_servers("local")
    config = make_config(tmp_path, local.url, pipeline={"ladder": ["rules"], "actions": {
        "shutdown": {"instead": "hold", "rate_limit": "100/s"}, "hold": {}}})
    critical = {"rms": 9.0, "kurtosis": 4.0, "temp_c": 99.0, "rpm": 1480.0}
    async with Runtime(config) as runtime:
        runtime.pause(by="ops", reason="storm")
    async with Runtime(config) as runtime:
        assert runtime.paused
        nc = await connect(local.url)
        decision = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(critical), timeout=5)).data)
        assert decision["action"] == "hold" and decision["governance"]["status"] == "paused"
        runtime.resume(by="ops")
        decision = msgspec.json.decode((await nc.request("sensors.p1.pump", encode(critical), timeout=5)).data)
        assert decision["action"] == "shutdown"
        await nc.close()
    async with Runtime(config) as runtime:
        assert not runtime.paused

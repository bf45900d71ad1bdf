"""MQTT sensors: the embedded server's MQTT listener (`nats.mqtt_port`), against real nats-server
processes and a real MQTT client (aiomqtt, MQTT 3.1.1 as nats-server speaks it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest

from edge import NatsServer, Runtime
from edge._nats_server import render_server_config
from tests.runtime_harness import ANOMALY, CRITICAL, NORMAL, config_data, make_config
from tests.test_config import problems

# `_` and `-` are the only non-alphanumerics a device id or pipeline name may hold; neither is
# converted between MQTT topics and NATS subjects, so decision topics are the subjects' tokens.
DEVICE = "gw_mqtt-1"


async def _next_messages(client: aiomqtt.Client, count: int, within: float = 10.0) -> list[aiomqtt.Message]:
    received: list[aiomqtt.Message] = []

    async def collect() -> None:
        async for message in client.messages:
            received.append(message)
            if len(received) == count:
                return

    try:
        await asyncio.wait_for(collect(), within)
    except TimeoutError:
        raise AssertionError(f"expected {count} MQTT messages within {within}s, got {len(received)}") from None
    return received


async def test_mqtt_sensor_readings_are_decided_and_decisions_read_over_mqtt(tmp_path: Path) -> None:
    config = make_config(tmp_path, "embedded", device=DEVICE, pipeline={"ladder": ["rules"]},
                         nats={"embedded_port": -1, "mqtt_port": -1})
    async with Runtime(config) as runtime:
        assert runtime.server is not None and runtime.server.mqtt_port
        host, port = runtime.server.host, runtime.server.mqtt_port
        assert (runtime.data_dir / "mqtt.url").read_text() == f"mqtt://{host}:{port}"
        async with aiomqtt.Client(host, port, identifier="dashboard") as dashboard, \
                aiomqtt.Client(host, port, identifier="pump-sensor") as sensor:
            # QoS 1 asked: what a NATS publisher sends arrives at QoS 0 (a NATS message has no QoS).
            await dashboard.subscribe(f"edge/{DEVICE}/decision/#", qos=1)
            await sensor.publish("sensors/p1/pump", msgspec.json.encode(NORMAL), qos=0)
            await sensor.publish("sensors/p2/pump", msgspec.json.encode(CRITICAL), qos=1)
            # A `.` in a topic level becomes `//` in the subject: still one token for `sensors.*.pump`.
            await sensor.publish("sensors/p.3/pump", msgspec.json.encode(ANOMALY), qos=1)
            messages = await _next_messages(dashboard, 3)
    assert {str(m.topic) for m in messages} == {f"edge/{DEVICE}/decision/pump"}
    assert all(m.qos == 0 and not m.retain for m in messages)
    decisions = [msgspec.json.decode(m.payload) for m in messages if isinstance(m.payload, bytes)]
    by_subject = {d["subject"]: d["label"] for d in decisions}
    assert by_subject == {"sensors.p1.pump": "normal", "sensors.p2.pump": "critical", "sensors.p//3.pump": "anomaly"}


async def test_mqtt_listener_binds_the_client_host_and_uses_the_servers_authorization(tmp_path: Path) -> None:
    """No wider door than the NATS port: the same host, and the server's own users for MQTT too."""
    auth = tmp_path / "auth.conf"
    auth.write_text('authorization { user: "sensor", password: "s3cret" }\n')
    rendered = render_server_config(name="edge-x", mqtt_host="127.0.0.1", mqtt_port=-1)
    assert 'mqtt { host: "127.0.0.1", port: -1 }' in rendered and "no_auth_user" not in rendered

    async with NatsServer(name="edge-x", store_dir=tmp_path / "nats", config_file=auth, mqtt_port=-1) as server:
        first_port = server.mqtt_port
        assert server.mqtt_url == f"mqtt://127.0.0.1:{first_port}"
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with aiomqtt.Client(server.host, server.mqtt_port or 0, identifier="anonymous"):
                pass
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with aiomqtt.Client(server.host, server.mqtt_port or 0, identifier="wrong", username="sensor",
                                      password="guess"):
                pass
        await server.restart()
        assert server.mqtt_port == first_port  # sensors keep their broker address across restarts
        async with aiomqtt.Client(server.host, first_port or 0, identifier="ok", username="sensor",
                                  password="s3cret") as client:
            await client.publish("sensors/p1/pump", b"{}", qos=1)  # acked: logged in and allowed


def test_an_mqtt_listener_needs_jetstream() -> None:
    with pytest.raises(Exception, match="needs JetStream"):
        NatsServer(name="x", jetstream=False, mqtt_port=-1)


def _nats(tmp_path: Path, **nats: Any) -> dict[str, Any]:
    return config_data(tmp_path, "embedded", nats={"embedded_port": 4222, **nats})


@pytest.mark.parametrize(("nats", "expected"), [
    ({"mqtt_port": 70000}, "expected a port 1..65535, -1 for any free port, or 0 for no MQTT listener"),
    ({"mqtt_port": -2}, "expected a port 1..65535, -1 for any free port, or 0 for no MQTT listener"),
    ({"mqtt_port": 4222}, "the embedded server's NATS port is 4222 too: expected another port"),
    ({"mqtt_port": 1883, "local": "nats://127.0.0.1:4222"}, 'expected nats.local = "embedded"'),
])
def test_mqtt_port_is_checked(tmp_path: Path, nats: dict[str, Any], expected: str) -> None:
    found = problems(_nats(tmp_path, **nats))
    assert list(found) == ["nats.mqtt_port"] and expected in found["nats.mqtt_port"]


@pytest.mark.parametrize("port", [0, -1, 1883])
def test_mqtt_port_values_accepted(tmp_path: Path, port: int) -> None:
    config = make_config(tmp_path, "embedded", nats={"embedded_port": 4222, "mqtt_port": port})
    assert config.nats.mqtt_port == port

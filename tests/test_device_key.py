"""The device key (SPEC §12): made on first start (0600) or read from `fleet.device_key`, shown in
`status` and every heartbeat, and the key the audit stream's signatures verify with."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import msgspec
import pytest

from edge import ConfigError, Heartbeat, Runtime
from edge.cli import main
from edge.fleet import new_seed, public_key_of
from sync import verify_upstream
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, config_data, connect, encode, make_config, write_config


async def test_the_device_key_is_made_once_shown_and_signs_the_audit(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    hub = await nats_servers("hub")
    config = make_config(tmp_path, hub.url, fleet={"heartbeat_s": 0.2}, pipeline={"ladder": ["rules"]})
    nc = await connect(hub.url)
    heartbeats = await nc.subscribe("edge.gw-test.heartbeat")
    async with Runtime(config) as runtime:
        key_file = runtime.data_dir / "device.nk"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = public_key_of(key_file.read_text().strip().encode())
        assert runtime.status()["device_key"] == key and runtime.heartbeat().device_key == key
        heard = msgspec.json.decode((await heartbeats.next_msg(timeout=5)).data)
        assert heard["device_key"] == key
        for i in range(20):
            await nc.request("sensors.p1.pump", encode({**NORMAL, "asset": f"a{i}"}), timeout=5)
        assert runtime.uploader is not None
        await wait_until(lambda: runtime.uploader is not None and runtime.uploader.log.backlog == 0,
                         within=10, what="the audit synced")
    # The same key on the next start: the file is the device's identity.
    async with Runtime(config) as runtime:
        assert runtime.status()["device_key"] == key
    report = (await verify_upstream(nc.jetstream(), device="gw-test", key=key))["gw-test"]
    assert report.ok and report.signed >= 2, report.summary()  # a caught-up stream ends on a signed record
    await nc.close()


async def test_fleet_device_key_names_the_seed_file(nats_servers: ServerFactory, tmp_path: Path) -> None:
    hub = await nats_servers("hub")
    seed = new_seed()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gw.nk").write_bytes(seed + b"\n")
    config = make_config(tmp_path, hub.url, fleet={"device_key": "keys/gw.nk"}, pipeline={"ladder": ["rules"]})
    async with Runtime(config) as runtime:
        assert runtime.status()["device_key"] == public_key_of(seed)
        assert not (runtime.data_dir / "device.nk").exists()

    creds = tmp_path / "keys" / "hub.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n")
    config = make_config(tmp_path, hub.url, fleet={"device_key": "keys/hub.creds"}, pipeline={"ladder": ["rules"]})
    with pytest.raises(ConfigError, match="fleet.device_key"):
        async with Runtime(config):
            pass


def test_an_older_heartbeat_without_the_key_still_decodes() -> None:
    old = {"device": "gw-1", "groups": [], "version": "0.1", "ts": 1, "uptime_s": 1.0, "link": "online",
           "paused": False, "audit_backlog": 0}
    assert msgspec.json.decode(msgspec.json.encode(old), type=Heartbeat).device_key == ""


async def test_audit_verify_upstream_from_a_config_with_a_url_list_checks_the_device_key(
    nats_servers: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge audit verify --upstream -c cfg` with the comma-separated upstream list the runtime
    accepts (it crashed on it), the device key read from the config's data_dir, or `--key`."""
    hub = await nats_servers("hub")
    data = config_data(tmp_path, hub.url, upstream_url=f"{hub.url}, nats://127.0.0.1:1", pipeline={"ladder": ["rules"]})
    cfg = write_config(tmp_path, data)
    async with Runtime(make_config(tmp_path, hub.url, upstream_url=data["nats"]["upstream"],
                                   pipeline={"ladder": ["rules"]})) as runtime:
        key = runtime.status()["device_key"]
        nc = await connect(hub.url)
        await nc.request("sensors.p1.pump", encode(NORMAL), timeout=5)
        await nc.close()
    # The CLI runs its own event loop: call it from a thread, as a shell would from outside.
    assert await asyncio.to_thread(main, ["audit", "verify", "--upstream", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "gw-test: OK" in out and f"signed by {key[:12]}" in out

    other = public_key_of(new_seed())
    assert await asyncio.to_thread(main, ["audit", "verify", "--upstream", "-c", str(cfg), "--key", other]) == 1
    assert "first bad seq" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["audit", "verify", "--upstream", "-c", str(cfg), "--key", "nope"])
    assert usage.value.code == 2 and "expected the device's public nkey" in capsys.readouterr().err

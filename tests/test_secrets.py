"""Secrets and trust roots: nothing secret is shown, hashed, logged or kept; trust comes from the file.

Servers here want credentials (or TLS client certificates), so they are started from a config
file of the test's own (`ConfiguredServer`): the harness's servers take anyone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from edge import (
    CommandError,
    ConfigError,
    Runtime,
    config_to_toml,
    decode_config,
    encode_config,
    load_config,
    nats_server_binary,
    run,
)
from edge._config import config_sha256, redact_url
from edge._files import write_atomically
from edge.cli import build_parser, main
from edge.cli._operator import device_status, fleet_status, send_command
from edge.fleet import new_seed, public_key_of, pushed_config
from tests.fleet_helpers import RULES_ONLY, ops
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, config_data, connect, encode

SEED = new_seed()
OPERATOR = public_key_of(SEED)
REVOKED_SEED = new_seed()
REVOKED = public_key_of(REVOKED_SEED)
APPROVER = public_key_of(new_seed())

# ---------------------------------------------------------------------------------------------
# Servers that want credentials


class ConfiguredServer:
    """A nats-server on loopback from a config of our own (`settings`: auth, TLS, JetStream).

    The port is chosen by the server on the first start and kept on a restart; readiness is read
    from its log, never slept for.
    """

    def __init__(self, folder: Path, settings: str) -> None:
        self.folder = folder
        self.settings = settings
        self.port = -1
        self._process: asyncio.subprocess.Process | None = None
        self._starts = 0
        folder.mkdir(parents=True, exist_ok=True)

    def url(self, userinfo: str = "", scheme: str = "nats") -> str:
        return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._starts += 1
        conf, log_file = self.folder / "server.conf", self.folder / f"server-{self._starts}.log"
        conf.write_text(f"host: 127.0.0.1\nport: {self.port}\n{self.settings}\n")
        process = self._process = await asyncio.create_subprocess_exec(
            nats_server_binary(), "-c", str(conf), "--log", str(log_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        def log_text() -> bytes:
            return log_file.read_bytes() if log_file.exists() else b""

        await wait_until(lambda: b"Server is ready" in log_text() or process.returncode is not None, within=10,
                         what="nats-server ready")
        assert process.returncode is None, log_text()[-2000:]
        listening = re.search(rb"Listening for client connections on [^\s]*:(\d+)", log_text())
        assert listening is not None
        self.port = int(listening.group(1))

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()


ServerMaker = Callable[[str, str], Awaitable[ConfiguredServer]]


@pytest.fixture
async def configured_servers(tmp_path: Path) -> AsyncIterator[ServerMaker]:
    async with AsyncExitStack() as stack:

        async def make(name: str, settings: str) -> ConfiguredServer:
            server = ConfiguredServer(tmp_path / f"nats-{name}", settings)
            stack.push_async_callback(server.stop)
            await server.start()
            return server

        yield make


@pytest.fixture
def loose_umask() -> Any:
    """The usual umask (022): files are world-readable unless the code says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def jetstream(folder: Path) -> str:
    return f'jetstream {{ store_dir: "{folder / "js"}" }}\n'


# ---------------------------------------------------------------------------------------------
# Unit: redaction, digests, the TLS rule, pushed trust roots (no network)


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://user:pass@hub:4222", "nats://hub:4222"),
    ("tls://s3cr3t-token@hub.example:4222", "tls://hub.example:4222"),
    ("nats://u:p@a:1, nats://v:q@b:2", "nats://a:1, nats://b:2"),
    ("nats://u:p@ss/w@rd@hub:4222", "nats://hub:4222"),  # an unencoded "@" or "/" in the password
    ("u:p@hub:4222", "hub:4222"),
    ("nats://hub:4222", "nats://hub:4222"),
    ("embedded", "embedded"),
    ("", ""),
])
def test_urls_are_shown_without_user_info(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def _secret_config(tmp_path: Path, password: str, token: str, *, url_password: str = "") -> dict[str, Any]:
    return config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-sec", pipeline=RULES_ONLY, models=[],
                       nats={"upstream": f"nats://alice:{url_password or password}@127.0.0.1:4223",
                             "upstream_auth": {"user": "bob", "password": password},
                             "local_auth": {"token": token}})


def test_the_digest_and_the_redacted_config_hold_no_secret(tmp_path: Path) -> None:
    one = decode_config(_secret_config(tmp_path, "pw-one-7c1f", "tok-one-9e2a"), env={})
    two = decode_config(_secret_config(tmp_path, "pw-two-44d0", "tok-two-0b7d"), env={})
    assert config_sha256(one) == config_sha256(two)  # nothing secret is hashed into the digest
    shown = encode_config(one, redact=True)
    text = json.dumps(shown)
    assert "pw-one-7c1f" not in text and "tok-one-9e2a" not in text
    assert shown["nats"]["upstream"] == "nats://127.0.0.1:4223"
    assert shown["nats"]["upstream_auth"]["password"] == "***" and shown["nats"]["local_auth"]["token"] == "***"
    # What differs outside the secrets still changes the digest.
    other = decode_config({**_secret_config(tmp_path, "pw-one-7c1f", "tok-one-9e2a"), "groups": ["x"]}, env={})
    assert config_sha256(other) != config_sha256(one)


def _write(tmp_path: Path, nats: dict[str, Any], name: str = "edge.toml") -> Path:
    data = config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-sec", pipeline=RULES_ONLY, models=[])
    data["nats"] = nats
    path = tmp_path / name
    path.write_text(config_to_toml(data))
    return path


def test_a_secret_sent_in_the_clear_is_refused_unless_allowed(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    secret = "clear-text-pw-5a9d"
    hub = f"nats://ops:{secret}@hub.example.com:4222"
    refused = [
        {"local": "nats://127.0.0.1:4222", "upstream": hub},
        {"local": "nats://127.0.0.1:4222", "upstream": "nats://hub.example.com:4222",
         "upstream_auth": {"token": secret}},
        {"local": "nats://127.0.0.1:4222", "upstream": "nats://10.0.0.7:4222",
         "upstream_auth": {"user": "ops", "password": secret}},
        {"local": "nats://127.0.0.1:4222", "upstream": f"nats://127.0.0.1:4223,nats://{secret}@10.0.0.8:4222"},
    ]
    for i, nats in enumerate(refused):
        with pytest.raises(ConfigError) as caught:
            load_config(_write(tmp_path, nats, f"refused-{i}.toml"))
        assert [p.path for p in caught.value.problems] == ["nats.upstream"], nats
        assert secret not in str(caught.value)
    # The same rule for a local bus given as a URL.
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, {"local": f"nats://{secret}@192.168.1.20:4222"}, "local.toml"))
    assert [p.path for p in caught.value.problems] == ["nats.local"]

    accepted = [
        {"local": "nats://127.0.0.1:4222", "upstream": hub, "allow_insecure": True},
        {"local": "nats://127.0.0.1:4222", "upstream": f"tls://ops:{secret}@hub.example.com:4222"},
        {"local": "nats://127.0.0.1:4222", "upstream": hub, "upstream_auth": {"tls": {"ca": "ca.pem"}}},
        {"local": "nats://127.0.0.1:4222", "upstream": f"nats://ops:{secret}@localhost:4222"},
        {"local": "nats://127.0.0.1:4222", "upstream": f"nats://ops:{secret}@[::1]:4222"},
        {"local": "nats://127.0.0.1:4222", "upstream": f"nats://ops:{secret}@127.8.0.1:4222"},
        {"local": "nats://127.0.0.1:4222", "upstream": "nats://hub.example.com:4222",
         "upstream_auth": {"nkey_seed": "device.nk"}},  # an nkey answers a challenge: nothing reusable is sent
    ]
    for i, nats in enumerate(accepted):
        assert load_config(_write(tmp_path, nats, f"accepted-{i}.toml")).nats.upstream == nats["upstream"]

    path = _write(tmp_path, refused[0], "check.toml")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nats.upstream" in err and str(path) in err and "allow_insecure" in err
    assert secret not in err


def test_a_push_keeps_the_trust_roots_it_leaves_out(tmp_path: Path) -> None:
    running = decode_config(config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-sec", pipeline=RULES_ONLY,
                                        models=[], fleet={"trusted_keys": [OPERATOR], "approver_keys": [APPROVER],
                                                          "allow_unsigned": True, "device_key": "device.nk"}),
                            base_dir=tmp_path, env={})
    pipelines = encode_config(running)["pipelines"]
    for fleet in (None, {"heartbeat_s": 3.0}):
        push: dict[str, Any] = {"pipelines": pipelines, **({"fleet": fleet} if fleet is not None else {})}
        config = pushed_config(push, running)
        assert (config.fleet.trusted_keys, config.fleet.approver_keys, config.fleet.allow_unsigned,
                config.fleet.device_key) == ([OPERATOR], [APPROVER], True, "device.nk")
    # Named explicitly, they are what the push says (and applying it is refused: see below).
    assert pushed_config({"pipelines": pipelines, "fleet": {"trusted_keys": []}}, running).fleet.trusted_keys == []
    # A config.get (redacted), pushed back unchanged, stands for the running connections.
    shown = encode_config(running, redact=True)
    assert pushed_config({**shown, "pipelines": pipelines}, running).nats == running.nats


def test_an_atomic_write_is_0600_even_over_a_stale_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    stale = tmp_path / ".state.json.tmp"
    stale.write_bytes(b"left by a crash")
    stale.chmod(0o644)
    write_atomically(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"{}"


# ---------------------------------------------------------------------------------------------
# A device with secrets in its config, on servers that want them


def _assert_private(data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o077, f"{path} is mode {mode:o}"


def _files_holding(data_dir: Path, needles: list[str]) -> list[str]:
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path.relative_to(data_dir)}: {n}" for n in needles if n.encode() in content]
    return found


async def test_no_secret_is_returned_logged_or_kept(configured_servers: ServerMaker, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture[str], loose_umask: None) -> None:
    url_password, auth_password, token = (f"{kind}-{secrets.token_hex(8)}" for kind in ("urlpw", "authpw", "tok"))
    needles = [url_password, auth_password, token]
    hub = await configured_servers("hub", jetstream(tmp_path / "nats-hub") + (
        f'authorization {{ users = [{{user: alice, password: "{url_password}"}}, '
        f'{{user: bob, password: "{auth_password}"}}] }}'))
    local = await configured_servers("local", f'authorization {{ token: "{token}" }}')
    caplog.set_level(logging.DEBUG)

    # An old data_dir, open to everyone: tightened at start.
    data_dir = tmp_path / "var-gw-sec"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    data = config_data(tmp_path, local.url(), device="gw-sec", pipeline=RULES_ONLY, models=[],
                       nats={"upstream": hub.url(f"alice:{url_password}"),
                             "upstream_auth": {"user": "bob", "password": auth_password},
                             "local_auth": {"token": token}},
                       fleet={"trusted_keys": [OPERATOR], "heartbeat_s": 0.2})
    path = tmp_path / "edge.toml"
    path.write_text(config_to_toml(data))
    config = load_config(path)
    probes: list[str] = []

    async def on_probe(msg: Msg) -> None:
        probes.append(msg.reply)
        await msg.respond(b"")

    async with AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(Runtime(config))
        assert runtime.fleet is not None
        await asyncio.wait_for(runtime.fleet.wait_attached(), 20)
        ops_nc = await connect(hub.url(f"bob:{auth_password}"))
        stack.push_async_callback(ops_nc.close)
        await ops_nc.subscribe("_edge.probe.gw-sec", cb=on_probe)

        got = await send_command(ops_nc, "gw-sec", "config.get", seed=SEED)
        assert got.all_ok, got
        shown = msgspec.json.encode(got.replies[0].result).decode()
        assert not [n for n in needles if n in shown]
        assert got.replies[0].result["config"]["nats"]["upstream"] == hub.url()

        got = await send_command(ops_nc, "gw-sec", "status", seed=SEED)
        assert got.all_ok, got
        status = got.replies[0].result
        assert status["local"] == local.url()
        assert not [n for n in needles if n in msgspec.json.encode(status).decode()]

        # `edge status` on the device: local.url holds no token, the CLI takes it from the config.
        assert (runtime.data_dir / "local.url").read_text() == local.url()
        capsys.readouterr()
        assert await device_status(build_parser().parse_args(["status", "-c", str(path), "--json"])) == 0
        out = capsys.readouterr().out
        assert json.loads(out)["device"] == "gw-sec" and not [n for n in needles if n in out]

        # A config.apply over NATS that leaves trust alone is applied; what is kept holds no secret.
        push = {"pipelines": [{**data["pipelines"][0], "min_confidence": 0.9}], "fleet": {"heartbeat_s": 0.3}}
        got = await send_command(ops_nc, "gw-sec", "config.apply", {"config": push}, seed=SEED)
        assert got.all_ok, got
        assert runtime.config.fleet.heartbeat_s == 0.3 and runtime.config.fleet.trusted_keys == [OPERATOR]
        assert (await send_command(ops_nc, "gw-sec", "pause", {"reason": "drill"}, seed=SEED)).all_ok
        for name in ("applied.json", "previous.json"):
            kept = json.loads((runtime.data_dir / "config" / name).read_text())["config"]
            assert "nats" not in kept and "trusted_keys" not in kept["fleet"]

        # Requests go out from this device's own inboxes, and their answers come back.
        await wait_until(lambda: len(probes) >= 2, within=5, what="link probes")
        assert all(reply.startswith("_INBOX_gw-sec.") for reply in probes), probes
        assert runtime.link.state.value == "online"
        sensors = await connect(local.url(token))
        stack.push_async_callback(sensors.close)
        assert msgspec.json.decode((await sensors.request("sensors.p1.pump", encode(NORMAL), timeout=5)).data)

    assert (data_dir / "paused.json").exists() and (data_dir / "audit.db").exists()
    assert (data_dir / "config" / "applied.json").exists() and (data_dir / "config" / "previous.json").exists()
    assert any(p.is_file() for p in (data_dir / "fleet").rglob("*"))  # the replay state (nonces)
    _assert_private(data_dir)
    assert f"{data_dir} was mode 755" in caplog.text
    assert not _files_holding(data_dir, needles)
    assert not [n for n in needles if n in caplog.text]

    # Again as `edge run` runs it, with the token in the local URL itself: the log names the
    # local bus without it, and local.url holds none.
    caplog.clear()
    data["nats"] = {**data["nats"], "local": local.url(token), "local_auth": {}}
    path.write_text(config_to_toml(data))
    statuses: list[int] = []

    async def ready(runtime: Runtime) -> None:
        assert (runtime.data_dir / "local.url").read_text() == local.url()
        assert runtime.status()["local"] == local.url()
        capsys.readouterr()
        statuses.append(await device_status(build_parser().parse_args(["status", "-c", str(path), "--json"])))
        assert token not in capsys.readouterr().out
        runtime.request_stop()

    await asyncio.wait_for(run(load_config(path), ready=ready), 30)
    assert statuses == [0]
    assert f"local bus {local.url()}" in caplog.text
    assert not _files_holding(data_dir, needles)
    assert not [n for n in needles if n in caplog.text]
    _assert_private(data_dir)


# ---------------------------------------------------------------------------------------------
# Trust roots come from the file only


async def test_trust_roots_change_only_with_the_file(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    data = config_data(tmp_path, server.url, device="gw-t", pipeline=RULES_ONLY, models=[],
                       fleet={"trusted_keys": [OPERATOR, REVOKED]})
    path = tmp_path / "edge.toml"
    path.write_text(config_to_toml(data))

    def error_of(got: Any) -> tuple[str, str]:
        assert len(got.replies) == 1 and not got.replies[0].ok, got
        return got.replies[0].error.code, got.replies[0].error.message

    pipeline = data["pipelines"][0]
    async with Runtime(load_config(path)) as runtime:
        # No command changes who is trusted, or switches signatures off.
        for fleet, key in [({"trusted_keys": []}, "fleet.trusted_keys"),
                           ({"trusted_keys": [OPERATOR, REVOKED, public_key_of(new_seed())]}, "fleet.trusted_keys"),
                           ({"allow_unsigned": True}, "fleet.allow_unsigned"),
                           ({"approver_keys": [APPROVER]}, "fleet.approver_keys"),
                           ({"device_key": "elsewhere.nk"}, "fleet.device_key")]:
            push = {"pipelines": [pipeline], "fleet": fleet}
            code, message = error_of(await send_command(nc, "gw-t", "config.apply", {"config": push}, seed=SEED))
            assert code == "restart_required" and key in message, (fleet, message)
        assert runtime.config.fleet.trusted_keys == [OPERATOR, REVOKED] and not runtime.config.fleet.allow_unsigned
        assert error_of(await send_command(nc, "gw-t", "pause"))[0] == "unauthorized"

        # A push that names the running trust roots, or leaves them out, is applied (by either key).
        push = {"pipelines": [{**pipeline, "min_confidence": 0.9}],
                "fleet": {"trusted_keys": [OPERATOR, REVOKED], "heartbeat_s": 5.0}}
        assert (await send_command(nc, "gw-t", "config.apply", {"config": push}, seed=REVOKED_SEED)).all_ok
        push = {"pipelines": [{**pipeline, "min_confidence": 0.95}]}
        assert (await send_command(nc, "gw-t", "config.apply", {"config": push}, seed=SEED)).all_ok
        assert runtime.config.pipelines[0].min_confidence == 0.95

    # The revoked key leaves the file. An applied config kept by an older version still names it:
    # the file wins anyway.
    applied = runtime.data_dir / "config" / "applied.json"
    kept = json.loads(applied.read_text())
    kept["config"]["fleet"].update(trusted_keys=[OPERATOR, REVOKED], allow_unsigned=True)
    write_atomically(applied, json.dumps(kept).encode())
    data["fleet"] = {"trusted_keys": [OPERATOR]}
    path.write_text(config_to_toml(data))
    async with Runtime(load_config(path)) as runtime:
        assert runtime.config.pipelines[0].min_confidence == 0.95  # the applied config is in force...
        assert runtime.config.fleet.trusted_keys == [OPERATOR] and not runtime.config.fleet.allow_unsigned
        code, message = error_of(await send_command(nc, "gw-t", "pause", seed=REVOKED_SEED))
        assert code == "unauthorized" and not runtime.paused  # ... but not its trust roots
        assert error_of(await send_command(nc, "gw-t", "pause"))[0] == "unauthorized"
        assert (await send_command(nc, "gw-t", "pause", seed=SEED)).all_ok and runtime.paused
        # config.rollback keeps the file's trust roots too.
        assert (await send_command(nc, "gw-t", "config.rollback", seed=SEED)).all_ok
        assert runtime.config.pipelines[0].min_confidence == 0.9 and runtime.config.fleet.trusted_keys == [OPERATOR]
    await nc.close()


# ---------------------------------------------------------------------------------------------
# TLS on the operator's side


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder: Path) -> None:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (ECDSA P-256)."""
    folder.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=edge test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (folder / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=edge test {name}",
                 cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_operator_and_device_connect_over_tls_with_client_certificates(
        configured_servers: ServerMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = tmp_path / "certs"
    _make_certificates(certs)
    hub = await configured_servers("hub", jetstream(tmp_path / "nats-hub") + (
        f'tls {{ cert_file: "{certs / "server.pem"}", key_file: "{certs / "server.key"}", '
        f'ca_file: "{certs / "ca.pem"}", verify: true }}'))
    local = await configured_servers("local", "")
    tls = {"ca": "certs/ca.pem", "cert": "certs/client.pem", "key": "certs/client.key"}  # relative to the config
    config = decode_config(config_data(tmp_path, local.url(), device="gw-tls", pipeline=RULES_ONLY, models=[],
                                       nats={"upstream": hub.url(scheme="tls"), "upstream_auth": {"tls": tls}}),
                           base_dir=tmp_path, env={})
    async with Runtime(config) as runtime:
        assert runtime.fleet is not None
        await asyncio.wait_for(runtime.fleet.wait_attached(), 20)
        flags = {"tls_ca": str(certs / "ca.pem"), "tls_cert": str(certs / "client.pem"),
                 "tls_key": str(certs / "client.key")}
        capsys.readouterr()
        assert await fleet_status(ops(hub.url(scheme="tls"), device="gw-tls", **flags)) == 0
        assert json.loads(capsys.readouterr().out)["device"] == "gw-tls"
        # The CLI's own parser knows the options.
        args = build_parser().parse_args(["fleet", "status", "gw-tls", "--server", hub.url(scheme="tls"), "--json",
                                          "--tls-ca", flags["tls_ca"], "--tls-cert", flags["tls_cert"],
                                          "--tls-key", flags["tls_key"]])
        assert await fleet_status(args) == 0
        # Without a client certificate the hub refuses; an unreadable file is the operator's mistake.
        with pytest.raises(CommandError) as caught:
            await fleet_status(ops(hub.url(scheme="tls"), device="gw-tls", tls_ca=flags["tls_ca"]))
        assert caught.value.code == "unreachable"
        with pytest.raises(CommandError) as caught:
            await fleet_status(ops(hub.url(scheme="tls"), device="gw-tls", tls_ca=str(certs / "missing.pem")))
        assert caught.value.code == "bad_credentials"


"""scripts/container, checked without a container engine: what the Containerfile copies exists and
is sent to the build, its HEALTHCHECK and CMD are real `edge` command lines on the config it
copies, the configs the image and the compose example run are valid, and so is the hub's."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from edge import decode_config, nats_server_binary
from edge.cli._main import build_parser

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "scripts" / "container"
CONTAINERFILE = HERE / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in CONTAINERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    found = []
    for line in text.splitlines():
        if line.strip():
            name, _, rest = line.strip().partition(" ")
            found.append((name.upper(), rest.strip()))
    return found


def copied_sources() -> list[str]:
    sources = []
    for name, rest in instructions():
        if name == "COPY" and "--from=" not in rest:
            sources += shlex.split(rest)[:-1]
    return sources


def test_every_copied_path_exists_and_is_sent_to_the_build() -> None:
    allowed = [line[1:] for line in (HERE / "Containerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    sources = copied_sources()
    assert "scripts/container/edge.toml" in sources and "scripts/bundle.py" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == entry or source.startswith(entry + "/") for entry in allowed), source


def _edge_args(healthcheck: str) -> list[str]:
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert exec_form[:2] == ["sh", "-c"]
    command = shlex.split(exec_form[2].split(";")[0].split(">")[0])
    assert command[0] == "edge"
    return command[1:]


def test_healthcheck_asks_edge_status_with_exit_code_on_the_image_config() -> None:
    found = dict(instructions())
    args = build_parser().parse_args(_edge_args(found["HEALTHCHECK"]))
    assert args.command == "status" and args.exit_code
    assert args.config == "/etc/edge/edge.toml"
    # Healthy unless down: the shell maps status 2 to failure, anything else to success.
    assert "test $? -ne 2" in found["HEALTHCHECK"]

    entrypoint, command = json.loads(found["ENTRYPOINT"]), json.loads(found["CMD"])
    assert entrypoint == ["edge"]
    run, rest = build_parser().parse_known_args(command)
    assert run.command == "run" and run.config == args.config and rest == []
    assert "COPY scripts/container/edge.toml /etc/edge/edge.toml" in CONTAINERFILE.read_text()


@pytest.mark.parametrize("name", ["edge.toml", "edge-leaf.toml"])
def test_the_image_and_compose_configs_are_valid(tmp_path: Path, name: str) -> None:
    # As in the image: the config in /etc/edge, the bundled model copied beside it.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pump-anomaly").symlink_to(ROOT / "models" / "bundled" / "pump-anomaly")
    config = decode_config(tomllib.loads((HERE / name).read_text()), base_dir=tmp_path, env={})
    assert config.nats.local == "embedded" and config.nats.mqtt_port == 1883
    assert config.data_dir == "/var/lib/edge"
    assert all("cloud" not in p.ladder for p in config.pipelines)  # nothing answers one: the link stays up


def test_compose_mounts_exist_and_the_hub_config_is_valid() -> None:
    compose = (HERE / "compose.yaml").read_text()
    mounted = re.findall(r"- \./([^:\s]+):", compose)
    assert set(mounted) == {"hub.conf", "edge-leaf.toml"}
    assert all((HERE / path).exists() for path in mounted)
    assert "dockerfile: scripts/container/Containerfile" in compose
    result = subprocess.run([nats_server_binary(), "-t", "-c", str(HERE / "hub.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    leaf = tomllib.loads((HERE / "edge-leaf.toml").read_text())["nats"]
    hub = (HERE / "hub.conf").read_text()
    assert f"domain: {leaf['upstream_domain']}" in hub and "port: 7422" in hub and leaf["upstream"].endswith(":7422")

"""`edge init DIR`: a starter config for this device, and what to do next.

The config is the bundled example's pipeline and model on an embedded local bus, with this
machine's name as the device id and the upstream section written out in comments; `edge check`
passes on it as written. The bundled model is named by its absolute path in the installed package.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from .._config import BUNDLED_CONFIG, DEFAULT_DATA_DIR, decode_config, default_device_id
from .._errors import EdgeError
from ._output import EXIT_OK

CONFIG_NAME = "edge.toml"
UNIT = Path(__file__).parent.parent / "bundled" / "edge.service"
# Where the example pipeline starts in the bundled config: everything from here on is copied.
_PIPELINE_PART = "[[models]]"
_BUNDLED_MODEL_PATH = "../../models/bundled/pump-anomaly/1"


def starter_config(device_id: str, data_dir: str) -> str:
    """The text of a starter config (see the module docstring)."""
    from models import bundled_model_path

    bundled = BUNDLED_CONFIG.read_text(encoding="utf-8")
    pipeline = bundled[bundled.index(_PIPELINE_PART):]
    if _BUNDLED_MODEL_PATH not in pipeline:
        raise AssertionError(f"the bundled config no longer names {_BUNDLED_MODEL_PATH}")  # a packaging bug
    pipeline = pipeline.replace(_BUNDLED_MODEL_PATH, str(bundled_model_path()))
    data_line = (f'data_dir = "{data_dir}"' if data_dir != DEFAULT_DATA_DIR else
                 f'data_dir = "{DEFAULT_DATA_DIR}"           # under systemd: $STATE_DIRECTORY (/var/lib/edge)')
    return f"""\
# The config of device {device_id}, written by `edge init` (check it with `edge check FILE`).
# Every key not set here has its default: `edge config reference` lists each key and its meaning.

device_id = "{device_id}"
groups = []                       # the fleet groups whose commands this device receives
{data_line}

[nats]
local = "embedded"                # start and supervise a nats-server child: the bus sensors use
embedded_port = 4222              # the port sensors connect to
# The hub this device reports to (`edge fleet provision --device {device_id}` on the operator's side
# writes the device's seed; copy it here, mode 0640, group of the service):
# upstream = "tls://hub.example.com:4222"        # or nats-leaf://HOST:7422 (then upstream_domain)
# upstream_auth = {{ nkey_seed = "{device_id}.nk", tls = {{ ca = "hub-ca.pem" }} }}

[audit]
create_stream = true              # the local bus is upstream until one is set; with a hub, set false
                                  # (the hub's operator creates EDGE_AUDIT)

# The bundled example pipeline: pump vibration, a model first, then the cloud, then rules.
{pipeline}"""


def next_steps(config_path: Path, device_id: str) -> list[str]:
    return [
        f"1. Check it: edge check {config_path}",
        f"2. Provision keys (on the operator's machine): edge fleet provision --out keys --device {device_id} "
        "--operator ops; give this device its seed, then trust the operator's key here (fleet.trusted_keys)",
        f"3. Point it at the hub: uncomment nats.upstream and nats.upstream_auth in {config_path}",
        f"4. Start the service: install {UNIT} as /etc/systemd/system/edge.service, then "
        "systemctl enable --now edge (after a config edit: systemctl reload edge)",
        f"5. Watch it: edge status -c {config_path} --exit-code (0 healthy, 1 degraded, 2 down)",
    ]


def cmd_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    path = folder / CONFIG_NAME
    if path.exists() and not args.force:
        raise EdgeError(f"{path} exists: edit it, or --force to write a new one")
    device_id = args.device_id or default_device_id()
    text = starter_config(device_id, args.data_dir)
    # Checked before it is written (a --device-id that is no device id fails here, and no file is left).
    config = decode_config(tomllib.loads(text), source=str(path), base_dir=folder.resolve(), env={})
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if args.json:
        from ._output import print_json

        print_json({"file": str(path), "device_id": config.device_id, "unit": str(UNIT),
                    "next_steps": next_steps(path, device_id)})
        return EXIT_OK
    print(f"wrote {path} (device {config.device_id}, {len(config.pipelines)} pipeline(s), embedded local bus)")
    print("Next steps:")
    for step in next_steps(path, device_id):
        print(f"  {step}")
    return EXIT_OK


def register_init(sub: Any, add: Any) -> None:
    p = add("init", cmd_init, "write a starter config for this device (DIR/edge.toml) and print the next steps", sub)
    p.add_argument("dir", help="the folder for edge.toml (for the service: /etc/edge)")
    p.add_argument("--device-id", help="default: this machine's hostname")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="audit log, keys, model store (default ./var beside the config; under systemd "
                        "$STATE_DIRECTORY, /var/lib/edge, replaces it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DIR/edge.toml")

"""`edge fleet provision`: the hub's permissions and an nkey for every device, operator, approver and cloud service.

Offline: it writes files and talks to no server. The work is `edge.fleet._provision`'s; this
module parses the options and prints what was written.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from .._errors import CommandError, ConfigError
from ..fleet._provision import (
    DEFAULT_BUCKETS,
    DEFAULT_HUB_DOMAIN,
    DEFAULT_STREAM,
    FRAGMENT,
    Identity,
    Provisioning,
    parse_device,
    provision,
)
from ._output import EXIT_OK, exit_code_for, print_json

Add = Callable[..., argparse.ArgumentParser]


def cmd_fleet_provision(args: argparse.Namespace) -> int:
    identities = [
        *(parse_device(spec) for spec in args.device),
        *(Identity(role="operator", name=name) for name in args.operator),
        *(Identity(role="approver", name=name) for name in args.approver),
        *(Identity(role="cloud", name=name) for name in args.cloud),
    ]
    try:
        result = provision(Path(args.out), identities, stream=args.audit_stream,
                           buckets=args.bucket or DEFAULT_BUCKETS, force=args.force,
                           hub_domain=args.hub_domain)
    except (ConfigError, CommandError, OSError) as exc:
        return exit_code_for(exc)
    if args.json:
        print_json(msgspec.to_builtins(result))
    else:
        _print(result)
    return EXIT_OK


def _print(result: Provisioning) -> None:
    made = sum(1 for i in result.identities if i.seed == "new")
    print(f"wrote {result.fragment} for {len(result.identities)} identities; seeds in {result.out}: "
          f"{made} new, {len(result.identities) - made} kept")
    width = max(len(i.name) for i in result.identities)
    for i in result.identities:
        groups = f"  groups {','.join(i.groups)}" if i.groups else ""
        print(f"  {i.role:<8}  {i.name:<{width}}  {i.public_key}  {Path(i.seed_file).name} ({i.seed}){groups}")
    if result.unlisted:
        print(f"not in {FRAGMENT} (no longer let in): {', '.join(f'{name}.nk' for name in result.unlisted)}")
    print(f'Include it from the hub\'s config (include "{FRAGMENT}", with JetStream on); a running hub '
          "reads it again on `nats-server --signal reload`.")
    print("Give each seed only to its owner: a device's goes in its config as nats.upstream_auth.nkey_seed.")


def register_provision(fleet: Any, add: Add) -> None:
    """Add `provision` under `edge fleet`."""
    p = add("provision", cmd_fleet_provision,
            "write hub permissions (a nats-server config fragment) and an nkey seed per identity", fleet)
    p.description = (
        f"Writes DIR/{FRAGMENT}, an authorization block for the hub's config to include, and DIR/NAME.nk "
        "(the identity's nkey seed, mode 0600) for every identity. List every identity each time: the "
        "fragment holds exactly those listed.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the fragment and the seeds (made 0700)")
    p.add_argument("--device", action="append", default=[], metavar="ID[:GROUP,...]",
                   help="a device and the groups whose commands it receives (repeatable)")
    p.add_argument("--operator", action="append", default=[], metavar="NAME",
                   help="commands devices, writes model buckets, configures and reads the audit stream")
    p.add_argument("--approver", action="append", default=[], metavar="NAME",
                   help="receives approval requests and answers them")
    p.add_argument("--cloud", action="append", default=[], metavar="NAME",
                   help="a cloud inference service: receives cloud.infer.> requests and answers them")
    p.add_argument("--audit-stream", default=DEFAULT_STREAM, metavar="NAME",
                   help=f"the devices' audit stream (default {DEFAULT_STREAM})")
    p.add_argument("--bucket", action="append", default=[], metavar="NAME",
                   help="a model bucket devices read and operators write: 'models' or 'models-<name>' "
                        "(repeatable; default models)")
    p.add_argument("--hub-domain", default=DEFAULT_HUB_DOMAIN, metavar="DOMAIN",
                   help="the hub's JetStream domain: devices may also join as leaf nodes and reach JetStream "
                        f"through it (default {DEFAULT_HUB_DOMAIN}; '' for client connections only)")
    p.add_argument("--force", action="store_true",
                   help="write into a DIR that already holds seeds of identities listed: those seeds are kept "
                        "(their keys stay valid), missing ones are made, and the fragment is written anew")

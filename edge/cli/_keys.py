"""`edge keys new operator|approver|device --out FILE`: a signing key, without reading any code.

The file holds a bare user nkey seed ("SU...", mode 0600), what `--sign-with` and
`fleet.device_key` read; the public key ("U...") goes on stdout alone, so a script can take it,
and what to do with it goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._files import write_atomically
from ..fleet import new_seed, public_key_of
from ._output import EXIT_OK, EXIT_USAGE, print_json

Add = Callable[..., argparse.ArgumentParser]

# What each role's key is for, said once: printed after the key is written.
NEXT_STEP = {
    "operator": "add the public key to each device's fleet.trusted_keys; sign commands with --sign-with {file}",
    "approver": "add the public key to each device's fleet.approver_keys; answer with "
                "`edge approvals watch --sign-with {file}`",
    "device": 'set fleet.device_key = "{file}" in the device\'s config',
}


def new_key_file(path: Path, *, force: bool = False) -> str:
    """Write a fresh user nkey seed to `path` (0600) and return its public key.

    An existing file is refused (FileExistsError) unless `force`: it may be a key devices trust.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --out names the seed file to write")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; --force replaces it (its old key then signs nothing anyone trusts)")
    seed = new_seed()
    write_atomically(path, seed + b"\n", mode=0o600)
    return public_key_of(seed)


def cmd_keys_new(args: argparse.Namespace) -> int:
    path = Path(args.out)
    try:
        public_key = new_key_file(path, force=args.force)
    except OSError as exc:
        print(f"edge: {f'{path}: {exc.strerror}' if exc.strerror else exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print_json({"role": args.role, "file": str(path), "public_key": public_key})
        return EXIT_OK
    print(public_key)
    print(f"wrote {path} ({args.role} seed, mode 0600; keep it secret); "
          + NEXT_STEP[args.role].format(file=path), file=sys.stderr)
    return EXIT_OK


def register_keys(sub: Any, add: Add) -> None:
    """Add `keys new` to the CLI."""
    keys = sub.add_parser("keys", help="signing keys (nkeys)").add_subparsers(dest="keys_command", required=True)
    p = add("new", cmd_keys_new, "write a new nkey seed (0600) and print its public key", keys)
    p.add_argument("role", choices=sorted(NEXT_STEP), help="operator: signs commands; approver: signs "
                   "approval answers; device: the device's own key (fleet.device_key)")
    p.add_argument("--out", required=True, metavar="FILE", help="the seed file to write")
    p.add_argument("--force", action="store_true", help="replace an existing file")

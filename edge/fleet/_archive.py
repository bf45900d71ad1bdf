"""Pushed configs and model archives: pure transformations and file work, no network.

`model.deploy` fetches an object from a JetStream Object Store bucket: the model folder packed as
a .tar.gz (`model.onnx` + `manifest.toml` at the top, as `edge fleet deploy-model` writes it). The
folder is unpacked (regular files only, no path escapes, size-bounded) into the model store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .._config import TRUST_ROOTS, Config, decode_config, encode_config
from .._errors import CommandError, ConfigError

if TYPE_CHECKING:
    pass



log = logging.getLogger("edge.fleet")

MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 256
OBJECT_MARKER = ".edge-object.sha256"  # inside a deployed folder: the sha256 of the object it came from




# ---------------------------------------------------------------------------------------------
# Pushed configs and model archives (no I/O on the network)


def pushed_config(data: Mapping[str, Any], running: Config) -> Config:
    """A config pushed with `config.apply`, completed from the running one, decoded and checked.

    One file can be pushed to a whole group: what it leaves out of device_id, groups, data_dir,
    nats, audit and the fleet's trust roots (trusted_keys, approver_keys, allow_unsigned,
    device_key) is the device's own, so a push that forgets `[fleet]` cannot switch command
    signatures off; one that names different trust roots or connections is refused when applied
    (`restart_required`): those come from the config file only. A `nats` table exactly as
    `config.get` shows it (redacted) stands for the running one. Relative paths resolve against
    the device's config folder. Raises CommandError `bad_config` listing every problem as "path: message".
    """
    data = dict(data)
    device = data.get("device_id")
    if device not in (None, "", running.device_id):
        raise CommandError("bad_config", f"device_id: this config is for {device!r}, this device is "
                                         f"{running.device_id!r}")
    if "base_dir" in data:
        raise CommandError("bad_config", "base_dir: unknown key")
    current = encode_config(running, redact=False)
    for key in ("device_id", "groups", "data_dir", "nats", "audit"):
        if data.get(key) in (None, ""):
            data[key] = current[key]
    if data["nats"] == encode_config(running, redact=True)["nats"]:
        data["nats"] = current["nats"]  # a config.get, edited and pushed back
    fleet = data.get("fleet", {})
    if isinstance(fleet, Mapping):
        data["fleet"] = {**{key: current["fleet"][key] for key in TRUST_ROOTS}, **fleet}
    try:
        return decode_config(data, source="config.apply",
                             base_dir=Path(running.base_dir) if running.base_dir else None, env={})
    except ConfigError as exc:
        raise CommandError("bad_config", "; ".join(str(p) for p in exc.problems)) from None


def unpack_model_archive(data: bytes | memoryview, folder: Path, *, max_bytes: int = MAX_UNPACKED_BYTES,
                         max_members: int = MAX_ARCHIVE_MEMBERS) -> None:
    """Unpack a model folder packed as .tar.gz into `folder` (which must not exist); blocking.

    Only regular files and folders, every path inside the archive, at most `max_members` entries
    and `max_bytes` unpacked. Nothing is left behind on error (CommandError `bad_archive` / `too_large`).
    """
    staging = folder.parent / f".unpack-{folder.name}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        total = 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for count, member in enumerate(archive, start=1):
                if count > max_members:
                    raise CommandError("bad_archive", f"more than {max_members} entries in the archive")
                parts = PurePosixPath(member.name).parts
                if not parts or member.name.startswith("/") or ".." in parts or parts[-1] == OBJECT_MARKER:
                    raise CommandError("bad_archive", f"unsafe path in the archive: {member.name!r}")
                target = staging.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise CommandError("bad_archive", f"{member.name!r}: only regular files and folders are "
                                                      "allowed (no links or devices)")
                total += member.size
                if total > max_bytes:
                    raise CommandError("too_large", f"the archive unpacks to more than {max_bytes} bytes")
                source = archive.extractfile(member)
                assert source is not None  # a regular file always has content
                target.parent.mkdir(parents=True, exist_ok=True)
                with source, target.open("xb") as out:
                    shutil.copyfileobj(source, out)
        if not (staging / "manifest.toml").is_file():
            raise CommandError("bad_archive", "no manifest.toml at the top of the archive")
        os.replace(staging, folder)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CommandError("bad_archive", f"not a readable .tar.gz: {exc}") from None
    except FileExistsError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CommandError("bad_archive", f"a path appears twice in the archive: {exc.filename}") from None
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CommandError("store_failed", f"cannot write the model store: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pack_model_folder(folder: Path) -> bytes:
    """A model folder as a deterministic .tar.gz (sorted, no times or owners): same folder, same sha256."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != OBJECT_MARKER):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            content = path.read_bytes()
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def write_object_marker(folder: Path, sha256: str) -> None:
    (folder / OBJECT_MARKER).write_text(sha256)


def read_object_marker(folder: Path) -> str:
    try:
        return (folder / OBJECT_MARKER).read_text().strip()
    except OSError:
        return ""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()



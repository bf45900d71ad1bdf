"""Fleet management on the device (SPEC §8): commands, heartbeat and `$SRV` registration.

Commands are requests on the upstream connection, with no queue group (a group or `all` command
is answered by every device that holds it):

    edge.<device>.cmd.<verb>    edge.group.<group>.cmd.<verb>    edge.all.cmd.<verb>

The verb is everything after `.cmd.` (verbs contain dots: `config.apply`). The body is a JSON
object (msgpack with `Content-Type: application/msgpack`) decoded into the verb's Struct; it may
repeat the verb as `"verb"`, and unknown fields are refused (a mistyped field in a command that
changes a fleet must not be ignored). The reply, in the request's encoding, is
`{ok: true, device, verb, result}` or `{ok: false, device, verb, error: {code, message}}`.

Signed commands. When `fleet.trusted_keys` is set every command carries four headers (headers,
not an envelope, so the body stays the plain command and unsigned tooling reads it as is):

    Edge-Signer      the operator's public nkey ("U...", one of fleet.trusted_keys)
    Edge-Timestamp   unix time in ns at signing; accepted within ±5 min of the device's clock
    Edge-Nonce       a random token, accepted once (nonces are kept for the window and on disk)
    Edge-Signature   base64 Ed25519 signature over  subject "\\n" timestamp "\\n" nonce "\\n" body

The subject is signed so that a command signed for one device cannot be replayed to `all`.
The one exception is `edge.<device>.cmd.status` on the *local* bus (when it is not the upstream
one): a read-only probe for `edge status` on the gateway itself, never a command that changes
anything.

`model.deploy` fetches an object from a JetStream Object Store bucket: the model folder packed as
a .tar.gz (`model.onnx` + `manifest.toml` at the top, as `edge fleet deploy-model` writes it). The
sha256 of the object's bytes is checked against the command's before anything is unpacked; with
trusted keys, `signature` is a base64 Ed25519 signature over that sha256's hex string. The folder
is unpacked (regular files only, no path escapes, size-bounded) into the model store and deployed
by `ModelManager.deploy`; any failure leaves the serving model untouched.

Error codes: bad_command, unknown_verb, unauthorized, replayed, busy, bad_config, unknown_model,
unreachable, not_found, too_large, fetch_failed, checksum_mismatch, unsigned, bad_signature,
bad_archive, store_failed, manifest_mismatch, version_exists, unavailable, internal — and the runtime's own
(restart_required, nothing_to_roll_back, no_shadow, bad_model, model_mismatch).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Literal, assert_never

import msgspec
import msgspec.inspect
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from models import ModelError, load_manifest

from ._config import Config, config_sha256, decode_config, encode_config
from ._errors import CommandError, ConfigError
from ._messages import Heartbeat
from ._natsutil import server_barrier

if TYPE_CHECKING:
    from nats.micro.request import Request
    from nats.micro.service import Service

    from ._runtime import Runtime

log = logging.getLogger("edge.fleet")

MSGPACK = "application/msgpack"
SIGNATURE_WINDOW_NS = 5 * 60 * 1_000_000_000
MAX_NONCES = 65_536
MAX_IN_FLIGHT = 32  # commands being handled at once; more get `busy` (memory stays bounded)
MAX_OBJECT_BYTES = 512 * 1024 * 1024
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
MAX_ARCHIVE_MEMBERS = 256
FETCH_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
OBJECT_MARKER = ".edge-object.sha256"  # inside a deployed folder: the sha256 of the object it came from

H_SIGNER, H_SIGNATURE, H_TIMESTAMP, H_NONCE = "Edge-Signer", "Edge-Signature", "Edge-Timestamp", "Edge-Nonce"

_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")]  # a folder name: no "..", no "/"
_Bucket = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


# ---------------------------------------------------------------------------------------------
# Commands: one Struct per verb, a tagged union dispatched with `match`


class _Command(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="verb"):
    by: str = ""  # who asks (free text, audited); a signed command's signer is audited beside it


class Status(_Command, tag="status"):
    pass


class ConfigGet(_Command, tag="config.get"):
    pass


class ConfigApply(_Command, tag="config.apply"):
    config: dict[str, Any]  # the same shape as the TOML file


class ConfigRollback(_Command, tag="config.rollback"):
    pass


class ModelDeploy(_Command, tag="model.deploy"):
    name: _Name
    version: _Name
    bucket: _Bucket
    object: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    sha256: _Sha256  # of the object's bytes (the .tar.gz)
    signature: str = ""  # base64 Ed25519 over the sha256 hex string; required with trusted keys
    mode: Literal["active", "shadow"] = "active"


class ModelPromote(_Command, tag="model.promote"):
    name: _Name


class ModelRollback(_Command, tag="model.rollback"):
    name: _Name


class Pause(_Command, tag="pause"):
    reason: str = ""


class Resume(_Command, tag="resume"):
    reason: str = ""


class SyncNow(_Command, tag="sync.now"):
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0


class AuditResend(_Command, tag="audit.resend"):
    from_seq: Annotated[int, msgspec.Meta(ge=1)]
    to_seq: Annotated[int, msgspec.Meta(ge=1)] | None = None


Command = (Status | ConfigGet | ConfigApply | ConfigRollback | ModelDeploy | ModelPromote | ModelRollback | Pause
           | Resume | SyncNow | AuditResend)
_COMMAND_TYPES: tuple[type[_Command], ...] = (Status, ConfigGet, ConfigApply, ConfigRollback, ModelDeploy,
                                              ModelPromote, ModelRollback, Pause, Resume, SyncNow, AuditResend)
VERBS: dict[str, type[_Command]] = {str(t.__struct_config__.tag): t for t in _COMMAND_TYPES}
_JSON_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {verb: msgspec.json.Decoder(t) for verb, t in VERBS.items()}
_MSGPACK_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {verb: msgspec.msgpack.Decoder(t)
                                                             for verb, t in VERBS.items()}


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """A command's answer: `result` when ok, `error` when not (SPEC §8)."""

    ok: bool
    device: str
    verb: str
    result: Any = None
    error: ErrorInfo | None = None


# Replies carry runtime snapshots; a stray non-JSON value (a Path) must not cost the reply.
_JSON = msgspec.json.Encoder(enc_hook=str)
_MSGPACK = msgspec.msgpack.Encoder(enc_hook=str)
REPLY_DECODER = msgspec.json.Decoder(Reply)


def verb_of(subject: str) -> str:
    """The verb of a command subject: everything after `.cmd.` (empty when there is none)."""
    _, sep, verb = subject.partition(".cmd.")
    return verb if sep else ""


def decode_command(verb: str, body: bytes, content_type: str = "") -> Command:
    """The command in `body` for `verb`; CommandError (`unknown_verb`, `bad_command`) names what is wrong."""
    kind = VERBS.get(verb)
    if kind is None:
        raise _unknown_verb(verb)
    msgpack = content_type == MSGPACK
    try:
        if msgpack:
            command: Command = _MSGPACK_DECODERS[verb].decode(body or b"\x80")
        else:
            command = _JSON_DECODERS[verb].decode(body if body.strip() else b"{}")
    except msgspec.ValidationError as exc:
        raise CommandError("bad_command", _explain(verb, kind, str(exc))) from None
    except msgspec.DecodeError as exc:
        raise CommandError("bad_command", f"{verb}: the body is not valid {'msgpack' if msgpack else 'JSON'}: {exc}"
                           ) from None
    return command


def _unknown_verb(verb: str) -> CommandError:
    return CommandError("unknown_verb", f"unknown verb {verb!r}; expected one of {', '.join(sorted(VERBS))}")


def _explain(verb: str, kind: type[_Command], text: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.from_seq`"; say it with the field's name.
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, ""
    path = where.rstrip("`").removeprefix("$").removeprefix(".")
    fields = [f"{f.name}{'' if f.required else '?'}" for f in msgspec.structs.fields(kind)]
    if message.startswith("Object contains unknown field"):
        field = message.split("`")[1] if "`" in message else "?"
        return f"{verb}: unknown field {field!r} (expected fields: {', '.join(fields) or 'none'})"
    if message.startswith("Object missing required field"):
        field = message.split("`")[1] if "`" in message else "?"
        return f"{verb}: field {field!r} is required"
    if not path:
        return f"{verb}: the body must be an object with fields {', '.join(fields) or '(none)'}: {message}"
    if path == "verb":
        return f"{verb}: field 'verb' must be {verb!r} (the subject's verb) when given"
    detail = f"{verb}: field {path!r}: {message[:1].lower()}{message[1:]}"
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for spec in info.fields:
        if spec.name == path and isinstance(spec.type, msgspec.inspect.LiteralType):
            detail += f" (expected one of {', '.join(repr(v) for v in spec.type.values)})"
    return detail


def encode_reply(reply: Reply, content_type: str = "") -> bytes:
    return _MSGPACK.encode(reply) if content_type == MSGPACK else _JSON.encode(reply)


# ---------------------------------------------------------------------------------------------
# Signatures (nkeys: Ed25519 keys in NATS's encoding)


def signed_bytes(subject: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What a command's Edge-Signature covers."""
    return b"\n".join((subject.encode(), timestamp.encode(), nonce.encode(), body))


def load_seed(path: Path) -> bytes:
    """An nkey seed ("SU...") from a file: the first line that holds one (bare seed files and creds files)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("SU"):
            return line.encode()
    raise CommandError("bad_seed", f"{path}: no user nkey seed ('SU...') found")


def public_key_of(seed: bytes) -> str:
    import nkeys  # type: ignore[import-untyped]  # only where signatures are used

    return str(nkeys.from_seed(seed).public_key.decode())


def sign(seed: bytes, data: bytes) -> str:
    """Base64 Ed25519 signature of `data` with an nkey seed."""
    import nkeys

    return base64.b64encode(nkeys.from_seed(seed).sign(data)).decode()


def sign_command(seed: bytes, subject: str, body: bytes, *, timestamp_ns: int | None = None,
                 nonce: str | None = None) -> dict[str, str]:
    """The four Edge-* headers that make `body` on `subject` a signed command."""
    timestamp = str(time.time_ns() if timestamp_ns is None else timestamp_ns)
    nonce = nonce or secrets.token_urlsafe(18)
    return {
        H_SIGNER: public_key_of(seed),
        H_TIMESTAMP: timestamp,
        H_NONCE: nonce,
        H_SIGNATURE: sign(seed, signed_bytes(subject, timestamp, nonce, body)),
    }


_VERIFY_KEYS: dict[str, Any] = {}


def verify_signature(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `data` (False for a malformed key)."""
    # nkeys can only verify with a seed in hand; verification with a public key goes to PyNaCl
    # (nkeys' own dependency) after decoding the key as nkeys encodes it.
    import nacl.exceptions
    import nacl.signing

    key = _VERIFY_KEYS.get(public_key)
    if key is None:
        raw = _decode_public_key(public_key)
        if raw is None:
            return False
        key = _VERIFY_KEYS.setdefault(public_key, nacl.signing.VerifyKey(raw))
    try:
        key.verify(data, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def _decode_public_key(public_key: str) -> bytes | None:
    import nkeys

    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        return None
    if int.from_bytes(raw[-2:], "little") != nkeys.crc16(bytearray(raw[:-2])):
        return None
    return raw[1:-2]


class CommandVerifier:
    """Checks a signed command's headers: trusted signer, valid signature, fresh timestamp, unused nonce.

    Nonces are remembered for the window (plus the skew allowed), at most `max_nonces` of them;
    `export()`/`load()` let the device keep them across a restart.
    """

    def __init__(self, *, window_ns: int = SIGNATURE_WINDOW_NS, max_nonces: int = MAX_NONCES,
                 clock: Any = time.time_ns) -> None:
        self.window_ns = window_ns
        self.max_nonces = max_nonces
        self.clock = clock
        self._nonces: dict[str, int] = {}  # nonce -> when it may be forgotten (ns)

    def verify(self, subject: str, body: bytes, headers: Mapping[str, str] | None, trusted: Sequence[str]) -> str:
        """The signer's public key; CommandError `unauthorized` or `replayed` otherwise."""
        headers = headers or {}
        signer, signature = headers.get(H_SIGNER, ""), headers.get(H_SIGNATURE, "")
        timestamp, nonce = headers.get(H_TIMESTAMP, ""), headers.get(H_NONCE, "")
        if not (signer and signature and timestamp and nonce):
            missing = [h for h in (H_SIGNER, H_SIGNATURE, H_TIMESTAMP, H_NONCE) if not headers.get(h)]
            raise CommandError("unauthorized", f"unsigned command: this device requires signed commands "
                                               f"(fleet.trusted_keys is set); missing {', '.join(missing)}")
        if signer not in trusted:
            raise CommandError("unauthorized", f"signer {signer} is not one of this device's trusted keys")
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError("unauthorized", f"{H_SIGNATURE} is not base64") from None
        if not verify_signature(signer, signed_bytes(subject, timestamp, nonce, body), raw_signature):
            raise CommandError("unauthorized", f"bad signature: it does not verify with {signer} for this subject "
                                               "and body")
        if not timestamp.isdigit() or not 8 <= len(nonce) <= 128:
            raise CommandError("unauthorized", f"{H_TIMESTAMP} must be unix ns and {H_NONCE} 8..128 characters")
        now = self.clock()
        skew = int(timestamp) - now
        if abs(skew) > self.window_ns:
            raise CommandError("unauthorized", f"timestamp is {skew / 1e9:+.0f}s from this device's clock "
                                               f"(allowed: ±{self.window_ns // 1_000_000_000}s)")
        self._forget_expired(now)
        if nonce in self._nonces:
            raise CommandError("replayed", f"nonce {nonce!r} was already used")
        if len(self._nonces) >= self.max_nonces:
            raise CommandError("busy", "too many signed commands within the replay window; try again later")
        self._nonces[nonce] = int(timestamp) + 2 * self.window_ns
        return signer

    def _forget_expired(self, now: int) -> None:
        if self._nonces and min(self._nonces.values()) < now:
            self._nonces = {n: until for n, until in self._nonces.items() if until >= now}

    def export(self) -> bytes:
        return msgspec.json.encode(self._nonces)

    def load(self, data: bytes) -> None:
        try:
            nonces = msgspec.json.decode(data, type=dict[str, int])
        except msgspec.DecodeError as exc:
            log.error("ignoring the unreadable nonce file: %s", exc)
            return
        now = self.clock()
        self._nonces = dict(list({n: u for n, u in nonces.items() if u >= now}.items())[-self.max_nonces:])

    def __len__(self) -> int:
        return len(self._nonces)


def verify_artifact(sha256: str, signature: str, trusted: Sequence[str]) -> str:
    """The trusted key that signed an artefact's sha256 hex; CommandError `unsigned` / `bad_signature`."""
    if not signature:
        raise CommandError("unsigned", "model.deploy: this device requires signed models (fleet.trusted_keys is "
                                       "set); `signature` is missing")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_signature", "model.deploy: `signature` is not base64") from None
    for key in trusted:
        if verify_signature(key, sha256.encode(), raw):
            return key
    raise CommandError("bad_signature", f"model.deploy: the signature over sha256 {sha256} does not verify with "
                                        f"any of the {len(trusted)} trusted key(s)")


# ---------------------------------------------------------------------------------------------
# Pushed configs and model archives (no I/O on the network)


def pushed_config(data: Mapping[str, Any], running: Config) -> Config:
    """A config pushed with `config.apply`, completed from the running one, decoded and checked.

    One file can be pushed to a whole group: what it leaves out of device_id, groups, data_dir,
    nats, audit and fleet.trusted_keys is the device's own (so a push that forgets `[fleet]` cannot
    switch command signatures off). Relative paths resolve against the device's config folder.
    Raises CommandError `bad_config` listing every problem as "path: message".
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
    fleet = data.get("fleet", {})
    if isinstance(fleet, Mapping) and "trusted_keys" not in fleet:
        data["fleet"] = {**fleet, "trusted_keys": current["fleet"]["trusted_keys"]}
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


def _write_marker(folder: Path, sha256: str) -> None:
    (folder / OBJECT_MARKER).write_text(sha256)


def _read_marker(folder: Path) -> str:
    try:
        return (folder / OBJECT_MARKER).read_text().strip()
    except OSError:
        return ""


def _hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The device's side


class FleetState(enum.Enum):
    NEW = "new"
    WAITING = "waiting"  # for the upstream connection
    RUNNING = "running"
    STOPPED = "stopped"


class Fleet:
    """Command handlers, heartbeat and `$SRV` registration of one runtime; `async with Fleet(runtime)`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.state = FleetState.NEW
        self.verifier = CommandVerifier()
        self.counts: Counter[str] = Counter()  # "ok" or the error code
        self.heartbeats = 0
        self._nc: NATS | None = None
        self._subs: dict[str, Subscription] = {}
        self._local_sub: Subscription | None = None
        self._service: Service | None = None
        self._service_groups: list[str] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._mutating = asyncio.Lock()  # one change of config or models at a time
        self._attached = asyncio.Event()
        self._stop = asyncio.Event()

    @property
    def nonce_file(self) -> Path:
        return self.runtime.data_dir / "fleet" / "nonces.json"

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        self.state = FleetState.WAITING
        with contextlib.suppress(FileNotFoundError):
            self.verifier.load(await asyncio.to_thread(self.nonce_file.read_bytes))
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        runtime = self.runtime
        try:
            if runtime.local is not None and runtime.config.nats.upstream:
                # The local bus is a separate connection: answer only the read-only status probe there.
                self._local_sub = await runtime.local.subscribe(f"edge.{self.device}.cmd.status",
                                                                cb=self._on_local_status)
            if runtime.upstream is not None and runtime.upstream.is_connected:
                try:
                    await self._attach(runtime.upstream)  # ready as soon as `async with` returns
                except nats.errors.Error as exc:  # (nats' TimeoutError included) retried by _follow_upstream
                    log.warning("fleet: cannot subscribe upstream yet: %s", exc)
                    await self._detach()
        except BaseException:
            self._stop.set()
            await self._tasks.__aexit__(None, None, None)
            raise
        self._tasks.create_task(self._follow_upstream(), name=f"fleet-upstream-{self.device}")
        self._tasks.create_task(self._heartbeat_forever(), name=f"fleet-heartbeat-{self.device}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.state is FleetState.STOPPED:
            return
        self.state = FleetState.STOPPED
        self._stop.set()
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        await self._detach()
        if self._local_sub is not None:
            await _unsubscribe(self._local_sub)
            self._local_sub = None
        # Commands in progress finish (bounded): a deploy half done is cancelled, which leaves the old model.
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
        if self._tasks is not None:
            await self._tasks.__aexit__(None, None, None)
            self._tasks = None

    async def wait_attached(self) -> None:
        """Until the command subscriptions are live on an upstream connection."""
        await self._attached.wait()

    async def _follow_upstream(self) -> None:
        # The runtime connects upstream in the background and signals nothing: look for it (often
        # while waiting, rarely once attached) and follow it if it is ever replaced by a new one.
        while not self._stop.is_set():
            upstream = self.runtime.upstream
            if upstream is not None and upstream is not self._nc and upstream.is_connected:
                await self._detach()
                try:
                    await self._attach(upstream)
                except nats.errors.Error as exc:
                    log.warning("fleet: cannot subscribe upstream yet: %s", exc)
                    await self._detach()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.1 if self._nc is None else 1.0)

    async def _attach(self, nc: NATS) -> None:
        self._nc = nc
        for subject in self._wanted_subjects():
            self._subs[subject] = await nc.subscribe(subject, cb=self._on_command)
        await server_barrier(nc)  # the server has our SUBs: commands sent from now on reach us
        await self._register_service(nc)
        self.state = FleetState.RUNNING
        self._attached.set()
        log.info("fleet: device %s answering %s", self.device, ", ".join(self._subs))
        self._publish_heartbeat()

    async def _detach(self) -> None:
        self._attached.clear()
        for sub in self._subs.values():
            await _unsubscribe(sub)
        self._subs.clear()
        await self._stop_service()
        self._nc = None
        if self.state is FleetState.RUNNING:
            self.state = FleetState.WAITING

    def _wanted_subjects(self) -> list[str]:
        groups = self.runtime.config.groups
        return [f"edge.{self.device}.cmd.>", *(f"edge.group.{g}.cmd.>" for g in groups), "edge.all.cmd.>"]

    async def _sync_subscriptions(self) -> None:
        """After a config change: follow the device's groups (subscriptions and `$SRV` metadata)."""
        nc = self._nc
        if nc is None:
            return
        wanted = self._wanted_subjects()
        for subject in [s for s in self._subs if s not in wanted]:
            await _unsubscribe(self._subs.pop(subject))
        for subject in [s for s in wanted if s not in self._subs]:
            self._subs[subject] = await nc.subscribe(subject, cb=self._on_command)
        await server_barrier(nc)
        if self._service_groups != list(self.runtime.config.groups):
            await self._stop_service()
            await self._register_service(nc)

    async def _register_service(self, nc: NATS) -> None:
        from nats.micro import add_service

        from ._runtime import VERSION

        groups = list(self.runtime.config.groups)
        # add_service() ends with a flush(); run it only right after a barrier has proven the link
        # answers, as a flush that times out breaks nats-py 2.16's connection (see _natsutil).
        service = await add_service(nc, name="edge", version=VERSION, description="edge orchestrator runtime",
                                    metadata={"device_id": self.device, "groups": ",".join(groups)})
        # A cheap summary (what heartbeats say) for `$SRV.INFO` discovery; commands stay on `.cmd.`.
        await service.add_endpoint(name="status", subject=f"edge.{self.device}.svc.status",
                                   handler=self._on_service_status)
        self._service, self._service_groups = service, groups

    async def _stop_service(self) -> None:
        # Not Service.stop(): it drains each of its nine subscriptions with a flush() — up to 10 s
        # apiece on a dead link, and a timed-out flush breaks the connection (see _natsutil).
        # Unsubscribing is all a stop needs from the server.
        service, self._service = self._service, None
        if service is None:
            return
        subs = [*service._subscriptions.values(), *(e._subscription for e in service._endpoints)]
        for sub in subs:
            if sub is not None:
                await _unsubscribe(sub)
        service._subscriptions, service._endpoints = {}, []
        service.stopped.set()

    # -- heartbeat -------------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        from ._runtime import VERSION

        runtime = self.runtime
        return Heartbeat(
            device=self.device, groups=list(runtime.config.groups), version=VERSION, ts=time.time_ns(),
            uptime_s=round(time.monotonic() - runtime.started_at, 3) if runtime.started_at else 0.0,
            link=runtime.link.state.value, paused=runtime.paused,
            audit_backlog=runtime.audit.backlog if runtime.audit is not None else 0,
        )

    async def _heartbeat_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.runtime.config.fleet.heartbeat_s)
            if not self._stop.is_set():
                self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # never buffered: a heartbeat replayed after an outage would say the wrong thing
        payload = _JSON.encode(self.heartbeat())
        assert self._tasks is not None
        self._tasks.create_task(self._publish(nc, f"edge.{self.device}.heartbeat", payload))
        self.heartbeats += 1

    @staticmethod
    async def _publish(nc: NATS, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            await nc.publish(subject, payload, headers=headers)
        except nats.errors.Error as exc:
            log.debug("fleet: publish to %s failed: %s", subject, exc)

    # -- commands --------------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        # nats-py runs one subscription's callbacks one after another: hand each command to a task,
        # so a slow deploy does not hold up a status request.
        await self._start_handler(msg, local=False)

    async def _on_local_status(self, msg: Msg) -> None:
        await self._start_handler(msg, local=True)

    async def _start_handler(self, msg: Msg, *, local: bool) -> None:
        if self._tasks is None or self._stop.is_set():
            return
        if len(self._handlers) >= MAX_IN_FLIGHT:
            verb = verb_of(msg.subject)
            error = CommandError("busy", f"{len(self._handlers)} commands already in progress; try again")
            reply = self._failed(verb, msg.subject, error, by="", signer="")
            await self._answer(msg, reply)
            return
        task = self._tasks.create_task(self._serve(msg, local=local))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, msg: Msg, *, local: bool) -> None:
        reply = await self.execute(msg.subject, msg.data, msg.headers, unsigned_ok=local)
        await self._answer(msg, reply)

    async def _answer(self, msg: Msg, reply: Reply) -> None:
        if not msg.reply:
            return
        content_type = msg.headers.get("Content-Type", "") if msg.headers else ""
        headers = {"Content-Type": MSGPACK} if content_type == MSGPACK else None
        await self._publish(msg._client, msg.reply, encode_reply(reply, content_type), headers)

    async def execute(self, subject: str, body: bytes, headers: Mapping[str, str] | None = None, *,
                      unsigned_ok: bool = False) -> Reply:
        """Authenticate, decode, run and audit one command; never raises (the reply says what went wrong)."""
        verb = verb_of(subject)
        signer, by = "", ""
        try:
            if verb not in VERBS:
                raise _unknown_verb(verb)
            trusted = self.runtime.config.fleet.trusted_keys
            if trusted and not unsigned_ok:
                signer = self.verifier.verify(subject, body, headers, trusted)
                await self._save_nonces()
            content_type = headers.get("Content-Type", "") if headers else ""
            command = decode_command(verb, body, content_type)
            by = command.by or signer
            if unsigned_ok and not isinstance(command, Status):
                raise CommandError("unauthorized", "only `status` is answered on the local bus")
            result = await self._dispatch(command, by, signer)
        except CommandError as error:
            return self._failed(verb, subject, error, by=by, signer=signer)
        except Exception as exc:  # a bug must cost one command, never the subscription: log it, say so
            log.exception("fleet: %s failed unexpectedly", verb)
            return self._failed(verb, subject, CommandError("internal", f"{type(exc).__name__}: {exc}"),
                                by=by, signer=signer)
        self.counts["ok"] += 1
        self._audit(verb, subject, ok=True, by=by, signer=signer)
        return Reply(ok=True, device=self.device, verb=verb, result=result)

    def _failed(self, verb: str, subject: str, error: CommandError, *, by: str, signer: str) -> Reply:
        self.counts[error.code] += 1
        self._audit(verb, subject, ok=False, by=by, signer=signer, code=error.code, message=error.message)
        log.info("fleet: %s refused: %s", verb or subject, error)
        return Reply(ok=False, device=self.device, verb=verb, error=ErrorInfo(error.code, error.message))

    def _audit(self, verb: str, subject: str, *, ok: bool, by: str, signer: str, code: str = "",
               message: str = "") -> None:
        body: dict[str, Any] = {"verb": verb, "subject": subject, "ok": ok}
        for key, value in (("by", by), ("signer", signer), ("code", code), ("message", message[:512])):
            if value:
                body[key] = value
        self.runtime._record("command", body)

    async def _save_nonces(self) -> None:
        # Before the command runs: a restart must not make a captured command replayable.
        data = self.verifier.export()
        path = self.nonce_file

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

        await asyncio.to_thread(write)

    async def _dispatch(self, command: Command, by: str, signer: str) -> dict[str, Any]:
        runtime = self.runtime
        match command:
            case Status():
                return self.status_result()
            case ConfigGet():
                return {"config": encode_config(runtime.config, redact=True), "sha256": config_sha256(runtime.config)}
            case ConfigApply(config=data):
                async with self._mutating:
                    result = await runtime.apply_config(pushed_config(data, runtime.config), by=by)
                    await self._sync_subscriptions()
                return result
            case ConfigRollback():
                async with self._mutating:
                    result = await runtime.rollback_config(by=by)
                    await self._sync_subscriptions()
                return result
            case ModelDeploy():
                async with self._mutating:
                    return await self._deploy(command, by)
            case ModelPromote(name=name):
                async with self._mutating:
                    return await runtime.models.promote(name, by=by)
            case ModelRollback(name=name):
                async with self._mutating:
                    return await runtime.models.rollback(name, by=by)
            case Pause(reason=reason):
                runtime.pause(by=by, reason=reason)
                return {"paused": runtime.paused}
            case Resume(reason=reason):
                runtime.resume(by=by, reason=reason)
                return {"paused": runtime.paused}
            case SyncNow(timeout_s=timeout_s):
                uploader = self._uploader()
                backlog = await uploader.sync_now(timeout_s)
                return {"backlog": backlog, "synced_seq": uploader.log.synced_seq, "last_seq": uploader.log.last_seq}
            case AuditResend(from_seq=from_seq, to_seq=to_seq):
                queued = self._uploader().resend(from_seq, to_seq)
                return {"queued": queued}
            case _:
                assert_never(command)

    def _uploader(self) -> Any:
        uploader = self.runtime.uploader
        if uploader is None:
            raise CommandError("unavailable", "the audit uploader is not running")
        return uploader

    def status_result(self) -> dict[str, Any]:
        """The `status` verb's result: the runtime's status, model deployments and this fleet endpoint's."""
        runtime = self.runtime
        return {**runtime.status(), "deployments": runtime.models.status(),
                "config_sha256": config_sha256(runtime.config), "fleet": self.status()}

    def status(self) -> dict[str, Any]:
        return {"state": self.state.value, "subjects": sorted(self._subs), "commands": dict(self.counts),
                "in_progress": len(self._handlers), "heartbeats": self.heartbeats,
                "signed": bool(self.runtime.config.fleet.trusted_keys), "nonces": len(self.verifier),
                "service_id": self._service.id if self._service is not None else None}

    async def _on_service_status(self, request: Request) -> None:
        await request.respond(_JSON.encode(self.heartbeat()))

    # -- model.deploy ----------------------------------------------------------------------------

    async def _deploy(self, command: ModelDeploy, by: str) -> dict[str, Any]:
        runtime = self.runtime
        name = command.name
        known = {m.name for m in runtime.config.models} | {p.model for p in runtime.config.pipelines if p.model}
        if name not in known:
            raise CommandError("unknown_model", f"model.deploy: this device has no model {name!r} "
                                                f"(known: {', '.join(sorted(known)) or 'none'})")
        trusted = runtime.config.fleet.trusted_keys
        if trusted:
            verify_artifact(command.sha256, command.signature, trusted)  # before fetching anything
        folder = runtime.models.store_dir(name, command.version)
        created = False
        if folder.exists():
            kept = await asyncio.to_thread(_read_marker, folder)
            if kept != command.sha256:
                raise CommandError("version_exists", f"model.deploy: {name} version {command.version} is already on "
                                                     "this device with other content; deploy it under a new version")
        else:
            data = await self._fetch(command)
            actual = await asyncio.to_thread(_hash, data)
            if actual != command.sha256:
                raise CommandError("checksum_mismatch", f"model.deploy: {command.bucket}/{command.object} has "
                                                        f"sha256 {actual}, the command says {command.sha256}")
            await asyncio.to_thread(unpack_model_archive, data, folder)
            created = True
        try:
            await self._check_manifest(command, folder)
            if created:
                await asyncio.to_thread(_write_marker, folder, command.sha256)
            return await runtime.models.deploy(name, folder, command.mode, by=by)
        except CommandError:
            if created:
                await asyncio.to_thread(shutil.rmtree, folder, True)
            raise

    async def _check_manifest(self, command: ModelDeploy, folder: Path) -> None:
        try:
            manifest = await asyncio.to_thread(load_manifest, folder)
        except ModelError as exc:
            raise CommandError("bad_model", f"model.deploy: {exc}") from None
        if (manifest.name, manifest.version) != (command.name, command.version):
            raise CommandError("manifest_mismatch", f"model.deploy: the archive holds {manifest.name} version "
                                                    f"{manifest.version}, the command says {command.name} "
                                                    f"version {command.version}")

    async def _fetch(self, command: ModelDeploy) -> memoryview:
        nc = self._nc or self.runtime.upstream
        if nc is None or not nc.is_connected:
            raise CommandError("unreachable", "model.deploy: the upstream connection is down")
        where = f"{command.bucket}/{command.object}"
        buffer = io.BytesIO()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                store = await nc.jetstream().object_store(command.bucket)
                info = await store.get_info(command.object)
                if (info.size or 0) > MAX_OBJECT_BYTES:
                    raise CommandError("too_large", f"model.deploy: {where} is {info.size} bytes "
                                                    f"(at most {MAX_OBJECT_BYTES})")
                # Into a buffer: nats-py's in-memory result grows by concatenation, quadratic for big models.
                await store.get(command.object, writeinto=buffer)
        except nats.js.errors.BucketNotFoundError:
            raise CommandError("not_found", f"model.deploy: no object store bucket {command.bucket!r}") from None
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            raise CommandError("not_found", f"model.deploy: no object {command.object!r} in {command.bucket!r}"
                               ) from None
        except nats.js.errors.DigestMismatchError:
            raise CommandError("checksum_mismatch", f"model.deploy: {where} does not match the digest the object "
                                                    "store recorded (corrupted in storage)") from None
        except TimeoutError:
            raise CommandError("fetch_failed", f"model.deploy: fetching {where} took over {FETCH_TIMEOUT_S}s"
                               ) from None
        except nats.errors.Error as exc:
            raise CommandError("fetch_failed", f"model.deploy: fetching {where}: {type(exc).__name__}: {exc}"
                               ) from None
        return buffer.getbuffer()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except nats.errors.Error as exc:  # the connection is closing or gone: nothing left to undo
        log.debug("fleet: unsubscribe %s: %s", sub.subject, exc)

"""The fleet's wire protocol (SPEC §8): one Struct per verb, a tagged union, and the Reply.

Commands are requests on the upstream connection, with no queue group (a group or `all` command
is answered by every device that holds it):

    edge.<device>.cmd.<verb>    edge.group.<group>.cmd.<verb>    edge.all.cmd.<verb>

The verb is everything after `.cmd.` (verbs contain dots: `config.apply`). The body is a JSON
object (msgpack with `Content-Type: application/msgpack`) decoded into the verb's Struct; it may
repeat the verb as `"verb"`, and unknown fields are refused (a mistyped field in a command that
changes a fleet must not be ignored). The reply, in the request's encoding, is
`{ok: true, device, verb, result}` or `{ok: false, device, verb, error: {code, message}}`.

Error codes: bad_command, unknown_verb, unauthorized, replayed, busy, bad_config, unknown_model,
unreachable, not_found, too_large, fetch_failed, checksum_mismatch, unsigned, bad_signature,
bad_archive, store_failed, manifest_mismatch, version_exists, unavailable, internal — and the
runtime's own (restart_required, nothing_to_roll_back, no_shadow, bad_model, model_mismatch).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import msgspec.inspect

from .._codec import MSGPACK, validation_issue
from .._errors import CommandError, quoted

if TYPE_CHECKING:
    pass



log = logging.getLogger("edge.fleet")



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


class Report(_Command, tag="report"):
    """What the AI was worth over the last `since` (a duration: "7d", "24h"), from the device's log."""

    since: str = "7d"


Command = (Status | ConfigGet | ConfigApply | ConfigRollback | ModelDeploy | ModelPromote | ModelRollback | Pause
           | Resume | SyncNow | AuditResend | Report)
_COMMAND_TYPES: tuple[type[_Command], ...] = (Status, ConfigGet, ConfigApply, ConfigRollback, ModelDeploy,
                                              ModelPromote, ModelRollback, Pause, Resume, SyncNow, AuditResend,
                                              Report)
VERBS: dict[str, type[_Command]] = {str(t.__struct_config__.tag): t for t in _COMMAND_TYPES}
_JSON_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {verb: msgspec.json.Decoder(t) for verb, t in VERBS.items()}
_MSGPACK_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {verb: msgspec.msgpack.Decoder(t)
                                                             for verb, t in VERBS.items()}


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """A command's answer: `result` when ok, `error` when not."""

    ok: bool
    device: str
    verb: str
    result: Any = None
    error: ErrorInfo | None = None


# Replies carry runtime snapshots; a stray non-JSON value (a Path) must not cost the reply.
WIRE_JSON = msgspec.json.Encoder(enc_hook=str)
WIRE_MSGPACK = msgspec.msgpack.Encoder(enc_hook=str)
REPLY_DECODER = msgspec.json.Decoder(Reply)


def verb_of(subject: str) -> str:
    """The verb of a command subject: everything after `.cmd.` (empty when there is none)."""
    _, sep, verb = subject.partition(".cmd.")
    return verb if sep else ""


def decode_command(verb: str, body: bytes, content_type: str = "") -> Command:
    """The command in `body` for `verb`; CommandError (`unknown_verb`, `bad_command`) names what is wrong."""
    kind = VERBS.get(verb)
    if kind is None:
        raise unknown_verb(verb)
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


def unknown_verb(verb: str) -> CommandError:
    return CommandError("unknown_verb", f"unknown verb {quoted(verb)}; expected one of {', '.join(sorted(VERBS))}")


def _explain(verb: str, kind: type[_Command], text: str) -> str:
    issue = validation_issue(text)
    fields = [f"{f.name}{'' if f.required else '?'}" for f in msgspec.structs.fields(kind)]
    if issue.unknown:
        return f"{verb}: unknown field {quoted(issue.unknown)} (expected fields: {', '.join(fields) or 'none'})"
    if issue.missing:
        return f"{verb}: field {quoted(issue.missing)} is required"
    if not issue.path:
        return f"{verb}: the body must be an object with fields {', '.join(fields) or '(none)'}: {issue.message}"
    if issue.path == "verb":
        return f"{verb}: field 'verb' must be {verb!r} (the subject's verb) when given"
    path = issue.path
    detail = f"{verb}: field {quoted(path)}: {issue.message}"
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for spec in info.fields:
        if spec.name == path and isinstance(spec.type, msgspec.inspect.LiteralType):
            detail += f" (expected one of {', '.join(repr(v) for v in spec.type.values)})"
    return detail


def encode_reply(reply: Reply, content_type: str = "") -> bytes:
    return WIRE_MSGPACK.encode(reply) if content_type == MSGPACK else WIRE_JSON.encode(reply)


# ---------------------------------------------------------------------------------------------
# Signatures (nkeys: Ed25519 keys in NATS's encoding)

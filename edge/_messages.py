"""Everything the runtime puts on the wire or reads from it (SPEC §5), as Structs.

Wire messages tolerate unknown fields (a newer peer may add some); decoders and encoders are built
once here and reused on the hot path.
"""

from __future__ import annotations

import msgspec


class Fallback(msgspec.Struct, frozen=True):
    """A tier tried or skipped before the one that decided, and why (`tier`: its kind; `tier_name`:
    which one, e.g. the model's name or the cloud provider's)."""

    tier: str
    reason: str
    tier_name: str = ""


class CrossCheck(msgspec.Struct, frozen=True):
    """The second opinion a pipeline's `cross_check` tier gave on a decision."""

    tier: str
    tier_name: str
    action: str
    agreed: bool


class ModelRef(msgspec.Struct, frozen=True):
    name: str
    version: str
    sha256: str


class ShadowResult(msgspec.Struct, frozen=True):
    """A candidate model's answer, recorded beside the decision and never acted on."""

    label: str
    confidence: float | None
    version: str = ""


class Governance(msgspec.Struct, frozen=True, omit_defaults=True):
    """What governance did: `status` is auto|approved|denied|timeout|rate_limited|paused|threshold|..."""

    status: str
    requested_action: str
    by: str | None = None  # an approval's signer (public key)
    reason: str | None = None
    by_name: str | None = None  # the name that signer gave


class Decision(msgspec.Struct, frozen=True):
    """One input's decision; also the body of its audit record."""

    id: str
    device: str
    pipeline: str
    subject: str
    received_at: int
    decided_at: int
    action: str
    label: str
    confidence: float | None
    tier: str
    fallbacks: list[Fallback]
    model: ModelRef | None
    shadow: ShadowResult | None
    governance: Governance
    audit_seq: int | None
    input_sha256: str
    tier_name: str = ""  # which tier of its kind decided: the model's or the cloud provider's name
    cross_check: CrossCheck | None = None


class Rejected(msgspec.Struct, frozen=True):
    """An input that could not be decoded or validated, and exactly why."""

    pipeline: str
    subject: str
    reason: str
    detail: str
    size: int
    sample: str  # the first 256 bytes, base64


class CloudReply(msgspec.Struct, frozen=True):
    """The cloud tier's answer; anything else is `invalid_reply`."""

    label: str
    confidence: float
    scores: dict[str, float] | list[float] | None = None


class ApprovalRequest(msgspec.Struct, frozen=True):
    decision_id: str
    device: str
    pipeline: str
    requested_action: str
    label: str
    confidence: float | None
    tier: str
    input: dict[str, object]
    fallbacks: list[Fallback]
    timeout_ms: int


class ApprovalReply(msgspec.Struct, frozen=True):
    approved: bool
    by: str = ""
    reason: str = ""


class Heartbeat(msgspec.Struct, frozen=True):
    device: str
    groups: list[str]
    version: str
    ts: int
    uptime_s: float
    link: str
    paused: bool
    audit_backlog: int
    device_key: str = ""  # the public key that signs this device's audit records (older devices: "")


JSON_ENCODER = msgspec.json.Encoder()
MSGPACK_ENCODER = msgspec.msgpack.Encoder()
CLOUD_REPLY_DECODER = msgspec.json.Decoder(CloudReply)
APPROVAL_REPLY_DECODER = msgspec.json.Decoder(ApprovalReply)

"""Signatures (nkeys: Ed25519 keys in NATS's encoding) over domain-separated bytes.

Every signature the product makes or checks covers

    0xFF  tag  "\\n"  field "\\n"  field "\\n" ...  last   (the last item unterminated)

with one tag per purpose: `edge-command-v1` (subject, timestamp, nonce, body), `edge-model-v1`
(the archive's sha256 hex), `edge-approval-v1` (decision_id, timestamp, nonce, body) and
`edge-audit-v1` (device, seq, record hash). 0xFF never begins a UTF-8 string, so no text a key
signs elsewhere — above all the server nonce nats-py signs when it logs in with the same nkey —
can ever be one of these; and the tag keeps a signature for one purpose from counting for another.

A signed message carries four headers (headers, not an envelope, so the body stays the plain
command or answer and unsigned tooling reads it as is):

    Edge-Signer      the signer's public nkey ("U...")
    Edge-Timestamp   unix time in ns at signing; accepted within ±5 min of the device's clock
    Edge-Nonce       a random token, accepted once
    Edge-Signature   base64 Ed25519 signature over the domain-separated bytes above

The subject is signed so that a command signed for one device cannot be replayed to `all`.

Replay. A verifier remembers, per signer, the newest timestamp it accepted (the high-water mark)
and every nonce newer than that mark minus the window. A message older than its signer's mark
minus the window is refused whatever the device's clock says, and nonces are forgotten by that
mark, never by the clock: a device whose clock is rolled back (no RTC, spoofed NTP) cannot be
made to accept a captured command again. Both survive a restart (`export`/`load`, written with
fsync by the caller).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

# The pure primitives (domain-separated bytes, sign, verify) live in `sync`, which signs audit
# records and never imports `edge`: one implementation, re-exported here for the fleet.
# (`X as X`: re-exported, for the modules of edge.fleet that take them from here.)
from sync import H_SIGNATURE as H_SIGNATURE
from sync import H_SIGNER as H_SIGNER
from sync import audit_bytes as audit_bytes
from sync import public_key_of as public_key_of
from sync import sign as sign
from sync import signed_bytes as signed_bytes
from sync import verify_signature as verify_signature

from .._errors import CommandError

log = logging.getLogger("edge.fleet")

SIGNATURE_WINDOW_NS = 5 * 60 * 1_000_000_000
MAX_NONCES = 65_536

H_TIMESTAMP, H_NONCE = "Edge-Timestamp", "Edge-Nonce"
SIGNATURE_HEADERS = (H_SIGNER, H_SIGNATURE, H_TIMESTAMP, H_NONCE)

TAG_COMMAND = "edge-command-v1"
TAG_MODEL = "edge-model-v1"
TAG_APPROVAL = "edge-approval-v1"


def command_bytes(subject: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return signed_bytes(TAG_COMMAND, subject, timestamp, nonce, body)


def approval_bytes(decision_id: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return signed_bytes(TAG_APPROVAL, decision_id, timestamp, nonce, body)


def model_bytes(sha256_hex: str) -> bytes:
    return signed_bytes(TAG_MODEL, sha256_hex)


def load_seed(path: Path) -> bytes:
    """A bare user nkey seed ("SU...") from a file.

    A `.creds` file is refused: it is a login credential for the hub, and a key that signs fleet
    commands should be one that nothing else handles (least of all a NATS client at login).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError("bad_seed", f"{path}: cannot read the signing key: {exc}") from None
    if path.suffix == ".creds" or "BEGIN NATS USER JWT" in text:
        raise CommandError("bad_seed", f"{path}: a .creds file is a hub login, not a signing key; "
                                       "give a file holding only an nkey seed ('SU...')")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1 or not lines[0].startswith("SU"):
        raise CommandError("bad_seed", f"{path}: expected one user nkey seed ('SU...') and nothing else")
    return lines[0].encode()


def new_seed() -> bytes:
    """A fresh user nkey seed."""
    import nkeys  # type: ignore[import-untyped]  # only where signatures are used

    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def _signature_headers(seed: bytes, covered: Callable[[str, str], bytes], timestamp_ns: int | None,
                       nonce: str | None) -> dict[str, str]:
    timestamp = str(time.time_ns() if timestamp_ns is None else timestamp_ns)
    nonce = nonce or secrets.token_urlsafe(18)
    return {
        H_SIGNER: public_key_of(seed),
        H_TIMESTAMP: timestamp,
        H_NONCE: nonce,
        H_SIGNATURE: sign(seed, covered(timestamp, nonce)),
    }


def sign_command(seed: bytes, subject: str, body: bytes, *, timestamp_ns: int | None = None,
                 nonce: str | None = None) -> dict[str, str]:
    """The four Edge-* headers that make `body` on `subject` a signed command."""
    return _signature_headers(seed, lambda ts, n: command_bytes(subject, ts, n, body), timestamp_ns, nonce)


def sign_approval(seed: bytes, decision_id: str, body: bytes, *, timestamp_ns: int | None = None,
                  nonce: str | None = None) -> dict[str, str]:
    """The four Edge-* headers that make `body` a signed answer to the approval of `decision_id`."""
    return _signature_headers(seed, lambda ts, n: approval_bytes(decision_id, ts, n, body), timestamp_ns, nonce)


def sign_model(seed: bytes, sha256_hex: str) -> str:
    """The `signature` of a `model.deploy` for an archive with this sha256."""
    return sign(seed, model_bytes(sha256_hex))


def is_signed(headers: Mapping[str, str] | None) -> bool:
    """Whether a message carries any of the Edge-* signature headers."""
    return bool(headers) and any(h in headers for h in SIGNATURE_HEADERS)  # type: ignore[operator]


class _Replay(msgspec.Struct):
    """What a verifier keeps across restarts."""

    high_water: dict[str, int] = {}  # signer -> newest timestamp accepted (ns)
    nonces: dict[str, tuple[str, int]] = {}  # nonce -> (signer, timestamp)


class SignatureVerifier:
    """Checks a signed message's headers: trusted signer, valid signature, fresh timestamp, unused nonce.

    One verifier per purpose (commands, approvals); `covered(timestamp, nonce)` gives the bytes the
    signature must cover. See the module docstring for the replay rules.
    """

    def __init__(self, *, what: str = "command", window_ns: int = SIGNATURE_WINDOW_NS,
                 max_nonces: int = MAX_NONCES, clock: Callable[[], int] = time.time_ns) -> None:
        self.what = what
        self.window_ns = window_ns
        self.max_nonces = max_nonces
        self.clock = clock
        self._state = _Replay()

    def verify(self, headers: Mapping[str, str] | None, trusted: Sequence[str],
               covered: Callable[[str, str], bytes]) -> str:
        """The signer's public key; CommandError `unauthorized` or `replayed` otherwise.

        The signature is checked before anything else is done with the message."""
        headers = headers or {}
        signer, signature = headers.get(H_SIGNER, ""), headers.get(H_SIGNATURE, "")
        timestamp, nonce = headers.get(H_TIMESTAMP, ""), headers.get(H_NONCE, "")
        if not (signer and signature and timestamp and nonce):
            missing = [h for h in SIGNATURE_HEADERS if not headers.get(h)]
            raise CommandError("unauthorized", f"unsigned {self.what}: missing {', '.join(missing)}")
        if signer not in trusted:
            raise CommandError("unauthorized", f"signer {signer[:60]} is not one of this device's trusted keys "
                                               f"for a {self.what}")
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError("unauthorized", f"{H_SIGNATURE} is not base64") from None
        if not timestamp.isdigit() or len(timestamp) > 20 or not 8 <= len(nonce) <= 128:
            raise CommandError("unauthorized", f"{H_TIMESTAMP} must be unix ns and {H_NONCE} 8..128 characters")
        if not verify_signature(signer, covered(timestamp, nonce), raw_signature):
            raise CommandError("unauthorized", f"bad signature: it does not verify with {signer} over this "
                                               f"{self.what}")
        stamp = int(timestamp)
        skew = stamp - self.clock()
        if abs(skew) > self.window_ns:
            raise CommandError("unauthorized", f"timestamp is {skew / 1e9:+.0f}s from this device's clock "
                                               f"(allowed: ±{self.window_ns // 1_000_000_000}s)")
        state = self._state
        mark = state.high_water.get(signer, 0)
        if stamp < mark - self.window_ns:
            raise CommandError("replayed", f"this {self.what} is {(mark - stamp) / 1e9:.0f}s older than the newest "
                                           f"one accepted from {signer[:12]}…; a clock rollback cannot make it new")
        if nonce in state.nonces:
            raise CommandError("replayed", f"nonce {nonce[:40]!r} was already used")
        if len(state.nonces) >= self.max_nonces:
            raise CommandError("busy", f"too many signed {self.what}s within the replay window; try again later")
        state.nonces[nonce] = (signer, stamp)
        if stamp > mark:
            state.high_water[signer] = stamp
            self._forget_old(signer)
        return signer

    def _forget_old(self, signer: str) -> None:
        # By the signer's high-water mark, never by the clock: what is forgotten is refused anyway.
        floor = self._state.high_water[signer] - self.window_ns
        nonces = self._state.nonces
        old = [n for n, (s, stamp) in nonces.items() if s == signer and stamp < floor]
        for nonce in old:
            del nonces[nonce]

    def export(self) -> bytes:
        return msgspec.json.encode(self._state)

    def load(self, data: bytes) -> None:
        try:
            state = msgspec.json.decode(data, type=_Replay)
        except msgspec.DecodeError:
            # An older device kept only {nonce: expiry}: start from an empty state (nothing to migrate).
            log.error("ignoring the unreadable replay state of %ss", self.what)
            return
        self._state = state
        for signer in list(state.high_water):
            self._forget_old(signer)

    def high_water(self, signer: str) -> int:
        return self._state.high_water.get(signer, 0)

    def __len__(self) -> int:
        return len(self._state.nonces)


class CommandVerifier(SignatureVerifier):
    """The verifier of fleet commands (`edge-command-v1` over subject, timestamp, nonce, body)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(what="command", **options)

    def verify_command(self, subject: str, body: bytes, headers: Mapping[str, str] | None,
                       trusted: Sequence[str]) -> str:
        return self.verify(headers, trusted, lambda ts, nonce: command_bytes(subject, ts, nonce, body))


def verify_artifact(sha256: str, signature: str, trusted: Sequence[str]) -> str:
    """The trusted key that signed an artefact's sha256 hex (`edge-model-v1`); CommandError
    `unsigned` / `bad_signature`."""
    if not signature:
        raise CommandError("unsigned", "model.deploy: this device requires signed models; `signature` is missing")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_signature", "model.deploy: `signature` is not base64") from None
    data = model_bytes(sha256)
    for key in trusted:
        if verify_signature(key, data, raw):
            return key
    raise CommandError("bad_signature", f"model.deploy: the signature over sha256 {sha256} does not verify with "
                                        f"any of the {len(trusted)} trusted key(s)")


class Envelope(msgspec.Struct, frozen=True):
    """A value kept where anyone with write access could change it (a KV entry), with the signature
    that says who wrote it: the value's JSON bytes exactly as signed, and the signature's fields."""

    value: msgspec.Raw
    signer: str = ""
    timestamp: str = ""  # unix ns, decimal
    nonce: str = ""
    signature: str = ""  # base64 Ed25519 over signed_bytes(tag, where, timestamp, nonce, value)


_ENVELOPE_JSON = msgspec.json.Encoder()
_ENVELOPE = msgspec.json.Decoder(Envelope)


def seal(seed: bytes, tag: str, where: str, body: bytes, *, timestamp_ns: int | None = None,
         nonce: str | None = None) -> bytes:
    """`body` in an envelope signed with `seed` over `tag`, `where` (the key it is stored under, so
    it cannot be moved), a timestamp and a nonce."""
    timestamp = str(time.time_ns() if timestamp_ns is None else timestamp_ns)
    nonce = nonce or secrets.token_urlsafe(18)
    signature = sign(seed, signed_bytes(tag, where, timestamp, nonce, body))
    return _ENVELOPE_JSON.encode(Envelope(value=msgspec.Raw(body), signer=public_key_of(seed), timestamp=timestamp,
                                          nonce=nonce, signature=signature))


def unseal(tag: str, where: str, data: bytes, *, label: str, max_bytes: int,
           trusted: Sequence[str] | None = None) -> Envelope:
    """The envelope in `data` once its signature over `tag` and `where` verifies (by one of `trusted`,
    when given), checked before its value is decoded. CommandError codes: too_large, bad_value,
    unsigned, unauthorized, bad_signature; messages start with `label`."""
    if len(data) > max_bytes:
        raise CommandError("too_large", f"{label}: {len(data)} bytes (at most {max_bytes})")
    try:
        envelope = _ENVELOPE.decode(data)
    except msgspec.DecodeError as exc:
        raise CommandError("bad_value", f"{label}: not a signed value: {str(exc)[:200]}") from None
    if not (envelope.signer and envelope.signature and envelope.timestamp and envelope.nonce):
        raise CommandError("unsigned", f"{label}: the value is not signed")
    if trusted is not None and envelope.signer not in trusted:
        raise CommandError("unauthorized", f"{label}: signer {envelope.signer[:60]} is not one of this device's "
                                           "trusted keys")
    if not envelope.timestamp.isdigit() or len(envelope.timestamp) > 20 or not 8 <= len(envelope.nonce) <= 128:
        raise CommandError("bad_signature", f"{label}: timestamp must be unix ns and nonce 8..128 characters")
    try:
        raw_signature = base64.b64decode(envelope.signature, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_signature", f"{label}: the signature is not base64") from None
    covered = signed_bytes(tag, where, envelope.timestamp, envelope.nonce, bytes(envelope.value))
    if not verify_signature(envelope.signer, covered, raw_signature):
        raise CommandError("bad_signature", f"{label}: the signature does not verify with {envelope.signer[:60]} "
                                            "over this key and value")
    return envelope

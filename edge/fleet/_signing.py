"""Signatures (nkeys: Ed25519 keys in NATS's encoding) for commands and model artefacts.

A signed command carries four headers (headers, not an envelope, so the body stays the plain
command and unsigned tooling reads it as is):

    Edge-Signer      the operator's public nkey ("U...", one of fleet.trusted_keys)
    Edge-Timestamp   unix time in ns at signing; accepted within ±5 min of the device's clock
    Edge-Nonce       a random token, accepted once (nonces are kept for the window and on disk)
    Edge-Signature   base64 Ed25519 signature over  subject "\\n" timestamp "\\n" nonce "\\n" body

The subject is signed so that a command signed for one device cannot be replayed to `all`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect

from .._errors import CommandError

if TYPE_CHECKING:
    pass



log = logging.getLogger("edge.fleet")

SIGNATURE_WINDOW_NS = 5 * 60 * 1_000_000_000
MAX_NONCES = 65_536

H_SIGNER, H_SIGNATURE, H_TIMESTAMP, H_NONCE = "Edge-Signer", "Edge-Signature", "Edge-Timestamp", "Edge-Nonce"




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


"""Ed25519 signatures in nkey form over domain-separated bytes: the pure primitives, no I/O.

Every signature the product makes or checks covers

    0xFF  tag  "\\n"  field "\\n"  field "\\n" ...  last   (the last item unterminated)

0xFF never begins a UTF-8 string, so no text a key signs elsewhere (a NATS login nonce above all)
can be one of these, and the tag keeps a signature for one purpose from counting for another.
The audit uses `edge-audit-v1` over (device, seq in decimal, record hash in hex); the fleet's
command, model and approval signatures (edge.fleet) are built from the same primitives, which
live here because `sync` signs and verifies audit records and never imports `edge`.

nkeys and PyNaCl are imported on first use: reading or writing an unsigned log never loads them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ._errors import SyncError

DOMAIN = b"\xff"  # never the first byte of UTF-8 text
TAG_AUDIT = "edge-audit-v1"
H_SIGNER, H_SIGNATURE = "Edge-Signer", "Edge-Signature"

_PREFIX_USER = 20 << 3  # nkeys' PREFIX_BYTE_USER: public user keys begin with "U"


def signed_bytes(tag: str, *items: str | bytes) -> bytes:
    """The bytes a signature covers: 0xFF, the tag, then the items, each but the last followed by "\\n"."""
    parts = [item.encode() if isinstance(item, str) else item for item in items]
    return DOMAIN + tag.encode() + b"\n" + b"\n".join(parts)


def audit_bytes(device: str, seq: int, record_hash: str) -> bytes:
    """What an audit signature covers: `edge-audit-v1`, the device, the seq in decimal, the record's hash."""
    return signed_bytes(TAG_AUDIT, device, str(seq), record_hash)


def public_key_of(seed: bytes) -> str:
    """The public nkey ("U...") of a user nkey seed."""
    import nkeys  # type: ignore[import-untyped]  # only where signatures are used

    return str(nkeys.from_seed(seed).public_key.decode())


def sign(seed: bytes, data: bytes) -> str:
    """Base64 Ed25519 signature of `data` with an nkey seed (build `data` with a `*_bytes` helper)."""
    import nkeys

    return base64.b64encode(nkeys.from_seed(seed).sign(data)).decode()


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


def is_public_key(text: str) -> bool:
    """Whether `text` is a well-formed public user nkey ("U..." with a valid checksum)."""
    return _decode_public_key(text) is not None


def _decode_public_key(public_key: str) -> bytes | None:
    import nkeys

    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 35 or raw[0] != _PREFIX_USER:
        return None
    if int.from_bytes(raw[-2:], "little") != nkeys.crc16(bytearray(raw[:-2])):
        return None
    return raw[1:-2]


class AuditSigner:
    """Signs audit records with a device's nkey seed; `public_key` is what verifiers are given."""

    __slots__ = ("_keypair", "public_key")

    def __init__(self, seed: bytes) -> None:
        import nkeys

        try:
            # Decoded once: signing with a kept key pair costs half of decoding the seed each time.
            self._keypair = nkeys.from_seed(seed)
            self.public_key = str(self._keypair.public_key.decode())
        except (nkeys.NkeysError, binascii.Error, ValueError) as exc:
            raise SyncError(f"not a usable nkey seed for signing audit records: {type(exc).__name__}") from None
        if not self.public_key.startswith("U"):
            raise SyncError("the audit signing key must be a user nkey seed ('SU...')")

    def sign(self, device: str, seq: int, record_hash: str) -> str:
        """The base64 `Edge-Signature` of one record."""
        return base64.b64encode(self._keypair.sign(audit_bytes(device, seq, record_hash))).decode()

    def __repr__(self) -> str:  # never the seed
        return f"AuditSigner({self.public_key})"


def audit_signature_ok(public_key: str, device: str, seq: int, record_hash: str, signature: str) -> bool:
    """Whether `signature` (base64) is `public_key`'s `edge-audit-v1` signature of this record."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return verify_signature(public_key, audit_bytes(device, seq, record_hash), raw)

"""The durable audit log, its upstream replication and verification.

The uploader and the upstream verification speak NATS; they are imported on first use, so what
needs only the log, the chain or the signatures (the fleet's signing, provisioning) never loads nats.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import AuditConflict, AuditFull, AuditUnavailable, ChainBroken, StreamMissing, SyncError
from ._log import (
    AuditLog,
    FsyncMode,
    LogState,
    LogSummary,
    OnFull,
    RetentionOutlook,
    iter_records,
    read_summary,
    retention_outlook,
)
from ._record import (
    GAP_KIND,
    GENESIS,
    AuditRecord,
    Chain,
    GapBody,
    canonical_bytes,
    decode_record,
    encode_body,
    encode_record,
    hash_ok,
    record_hash,
)
from ._signing import (
    H_SIGNATURE,
    H_SIGNER,
    AuditSigner,
    audit_bytes,
    audit_signature_ok,
    is_public_key,
    public_key_of,
    sign,
    signed_bytes,
    verify_signature,
)

if TYPE_CHECKING:
    from ._uploader import Uploader, UploaderState, connect_for_upload
    from ._verify import ChainReport, UpstreamReport, verify_chain, verify_upstream

_LAZY = {
    "Uploader": "._uploader", "UploaderState": "._uploader", "connect_for_upload": "._uploader",
    "ChainReport": "._verify", "UpstreamReport": "._verify", "verify_chain": "._verify", "verify_upstream": "._verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AuditConflict",
    "AuditFull",
    "AuditLog",
    "AuditRecord",
    "AuditSigner",
    "AuditUnavailable",
    "Chain",
    "ChainBroken",
    "ChainReport",
    "FsyncMode",
    "GAP_KIND",
    "GENESIS",
    "GapBody",
    "H_SIGNATURE",
    "H_SIGNER",
    "LogState",
    "LogSummary",
    "OnFull",
    "RetentionOutlook",
    "StreamMissing",
    "SyncError",
    "Uploader",
    "UploaderState",
    "UpstreamReport",
    "audit_bytes",
    "audit_signature_ok",
    "canonical_bytes",
    "connect_for_upload",
    "decode_record",
    "encode_body",
    "encode_record",
    "hash_ok",
    "is_public_key",
    "iter_records",
    "public_key_of",
    "read_summary",
    "record_hash",
    "retention_outlook",
    "sign",
    "signed_bytes",
    "verify_chain",
    "verify_signature",
    "verify_upstream",
]

"""The durable audit log, its upstream replication and verification."""

from ._errors import AuditFull, AuditUnavailable, ChainBroken, StreamMissing, SyncError
from ._log import AuditLog, FsyncMode, LogState, LogSummary, OnFull, iter_records, read_summary
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
from ._uploader import Uploader, UploaderState, connect_for_upload
from ._verify import ChainReport, UpstreamReport, verify_chain, verify_upstream

__all__ = [
    "AuditFull",
    "AuditLog",
    "AuditRecord",
    "AuditUnavailable",
    "Chain",
    "ChainBroken",
    "ChainReport",
    "FsyncMode",
    "GAP_KIND",
    "GENESIS",
    "GapBody",
    "LogState",
    "LogSummary",
    "OnFull",
    "StreamMissing",
    "SyncError",
    "Uploader",
    "UploaderState",
    "UpstreamReport",
    "canonical_bytes",
    "connect_for_upload",
    "decode_record",
    "encode_body",
    "encode_record",
    "hash_ok",
    "iter_records",
    "read_summary",
    "record_hash",
    "verify_chain",
    "verify_upstream",
]

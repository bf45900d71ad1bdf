"""The sync package's exceptions, one tree.

    SyncError              root: every error the audit log, the uploader and verification raise on purpose
    ├── AuditConflict      something on `audit.<device>` the device did not publish; sync stops until resolved
    ├── AuditFull          the store is over `max_bytes`, nothing synced is left to delete, on_full="block"
    ├── AuditUnavailable   SQLite is failing (disk full, read-only, locked, corrupt); `cause` is the error
    ├── ChainBroken        the hash chain does not hold at `seq` (tampering or corruption); `problem` says how
    └── StreamMissing      the upstream stream does not exist and create_stream is false

The CLI turns any of them into one line and an exit code.
"""

from __future__ import annotations


class SyncError(Exception):
    """Root of every error the sync package raises on purpose."""


class AuditConflict(SyncError):
    """The stream holds, on this device's subject, a message the device did not publish.

    `stream_seq` is where it is in the stream; `seq` the record seq it concerns (the seq whose
    Msg-Id it took, or the seq it claims), None when it is not a record at all.
    """

    def __init__(self, subject: str, stream_seq: int, seq: int | None, detail: str) -> None:
        self.subject = subject
        self.stream_seq = stream_seq
        self.seq = seq
        self.detail = detail
        super().__init__(f"audit_conflict on {subject} at stream seq {stream_seq}: {detail}")


class AuditFull(SyncError):
    """The audit store is full and configured to block: nothing may be appended until space is freed."""

    def __init__(self, used_bytes: int, max_bytes: int) -> None:
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes
        super().__init__(
            f"audit log full: {used_bytes} bytes used of max_bytes={max_bytes} and no synced record left "
            "to delete (on_full='block'); appends resume once the uploader catches up"
        )


class AuditUnavailable(SyncError):
    """The SQLite store cannot be written or read; `cause` is the underlying error."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        self.cause = cause
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(f"{message}{detail}")


class ChainBroken(SyncError):
    """The hash chain breaks at `seq`; `problem` says what does not match."""

    def __init__(self, seq: int, problem: str) -> None:
        self.seq = seq
        self.problem = problem
        super().__init__(f"audit chain broken at seq {seq}: {problem}")


class StreamMissing(SyncError):
    """The upstream JetStream stream does not exist and the uploader may not create it."""

    def __init__(self, stream: str, subject: str) -> None:
        self.stream = stream
        self.subject = subject
        super().__init__(
            f"JetStream stream {stream!r} (for subject {subject!r}) does not exist: create it with "
            f"`nats stream add {stream} --subjects 'audit.>' --storage file --dupe-window 2m "
            "--allow-direct --deny-delete --deny-purge` "
            "or set [audit] create_stream = true"
        )

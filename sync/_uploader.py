"""Replicates the audit log to a JetStream stream: every record exactly once, in seq order.

One background task loops: connect → make sure the stream exists → ask the stream for the last
message on `audit.<device>` and resume after it → publish unsynced records in seq order with up
to `window` publishes in flight → on any error drop the connection, back off (with jitter,
growing to a cap) and start again. Each message carries `Nats-Msg-Id: <device>:<seq>`,
`Edge-Kind: <kind>` and `Nats-Expected-Stream`; the body is the record's wire JSON. A record
counts as synced when its PubAck arrives; acks are taken strictly in send order, so synced_seq
only ever advances over a contiguous prefix.

Why order holds with many publishes in flight
---------------------------------------------
The danger is a *suffix without its prefix*: record k written to a socket that dies, k+1 kept in
the client's reconnect buffer and flushed on the next connection; the stream then holds k+1
without k, and "resume after the last message" would skip k forever. Hence:

1. The uploader owns its connection, made by `connect()` with `allow_reconnect=False` and
   `pending_size=0`: nothing is buffered across connections, a dead connection's unsent publishes
   die with it, and publishing while disconnected fails at once instead of queueing.
2. Within one connection, TCP delivers the publishes in order and the server stores them in that
   order, so whatever of a connection's publishes reached the stream is a contiguous run
   k, k+1, ..., j (unless the server *rejects* one, see 4).
3. Every new connection starts by asking the stream for the last message on `audit.<device>`
   and resumes after what it holds, never after what this process believes. Publishes of the
   dead connection that the server is still processing while the new one starts are contiguous
   runs too, and both runs carry the same Msg-Ids, so the duplicate window (2 min) stores each
   seq once and in order. Past the window, the query is what prevents duplicates after a crash
   between publish and bookkeeping: the stream is the truth, the local synced_seq only an
   optimisation. The query is a direct get of the last message *on this device's subject*
   (`$JS.API.DIRECT.GET.<stream>.audit.<device>`), not a stream-wide message get, so that hub
   permissions can let a device read its own records and nobody else's; the stream must allow
   direct gets (`allow_direct`), and one that does not is reported as such, never worked around.
   On a replicated stream any replica may answer a direct get, and a lagging one answers with
   an older record: the uploader then re-sends records the stream holds, under their Msg-Ids,
   which the duplicate window absorbs.
4. A server-side error ack for k while k+1 succeeds (k too large for the stream's max_msg_size,
   a limit hit and lifted...) would leave a hole. The uploader checks every ack in record order:
   after an error it stops sending, settles what is in flight, and if a later record got in, the
   hole cannot be closed in order any more: it is reported in `status()["holes"]` and logged,
   never skipped silently (`resend(k, k)` repairs it out of order). If nothing later got in, the
   record is retried on the next connection (and stays blocking, in `last_error`, until the
   stream accepts it: a record is never skipped on purpose). The stream sequences of successive
   acks must increase; anything else is reported as an anomaly and the connection is dropped.
   Acks come back on an inbox of the uploader's own, not through `js.publish_async`: in nats-py
   2.16 an error ack raises inside publish_async's reply handler and its future never resolves,
   which would turn "the stream refused k" into a timeout, a reconnect and a silent skip. A head
   record whose ack never comes while later ones are acked is treated as refused, for the same
   reason.

When the stream holds *less* than synced_seq (stream deleted and recreated, purged, restored from
an older snapshot), the uploader moves synced_seq back and re-sends every record it still keeps
after the stream's last; records it no longer keeps are reported in `status()["upstream_lost"]`.
When the stream holds a seq *beyond* the local log, or a different record under the same seq,
the local log was reset or replaced: the uploader refuses to publish and says so in `last_error`.

Bound to the device: signatures, expectations, conflicts
---------------------------------------------------------
Anyone who may publish `audit.<device>` could put messages there: a record under the device's
next Msg-Id (JetStream would then drop the real one as a duplicate, and its ack would read like
success), or anything at all. The uploader therefore trusts nothing on its subject it cannot
tie to itself:

- Signatures. With a signer (the device key), records whose seq is a multiple of `sign_every`
  and the last record of every burst (a read that reaches the log's newest record) carry
  `Edge-Signer` and `Edge-Signature` (`edge-audit-v1` over device, seq, hash). A stream the device
  has caught up on ends on a signed record, and a signed record vouches, through the hash chain,
  for every record before it: `verify_upstream(key=...)` checks that.
- Expectations. A publish made while nothing is in flight carries
  `Nats-Expected-Last-Subject-Sequence`: the stream seq of the last message on the subject as the
  uploader knows it (from the resume read, or from its own last ack), and nothing else is sent
  until its ack is in, so a refusal can never leave a later record stored before it. "wrong last
  sequence: N" means something landed on the subject since: the session ends, and the next resume
  read (which must reach stream seq N; a lagging replica is asked again) says whether it was the
  device's own record (a publish whose ack was lost) or not.
- Duplicates. A duplicate ack for a record this uploader never published before (its seq is above
  everything sent in earlier sessions) means someone else holds the Msg-Id: never booked as
  synced. (A standalone server checks the expectation before the duplicate window, a clustered
  one after it: either way the attempt is caught.) The one duplicate that cannot be told apart is
  a Msg-Id taken while this very record was in flight on a connection that then died; the
  stream still shows it (an unsigned or unlinked record), and `verify_upstream` names it.
- The resume read accepts the last message on the subject only if it is this device's record:
  same device, a valid hash, and either the same hash as the local record of that seq or, for a
  record no longer kept, a valid signature by the device key.

Anything else is an *audit conflict*: the uploader stops (state `audit_conflict`), names the
foreign message's stream seq in `status()["conflict"]` and `last_error`, appends an
`audit_conflict` record, and keeps the conflict in the log file so a restart does not forget it;
nothing is booked as synced past it. An operator resolves it with `resend(from_seq)` (the
`audit.resend` command): the foreign message stays in the stream as evidence and is accepted as
the subject's last message, and the device publishes its own records again from `from_seq` (at
most synced_seq + 1) after it. A record whose Msg-Id the foreign message holds is retried until
the stream's duplicate window (2 min) has passed, then stored.

Assumptions: the stream keeps messages by limits (not interest/work-queue retention), any
`max_age` is longer than the device's longest offline period plus `keep_synced`, and one
uploader at a time publishes for a device.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType

from ._errors import AuditConflict, StreamMissing, SyncError
from ._log import AuditLog
from ._record import AuditRecord, decode_record, hash_ok
from ._signing import H_SIGNATURE, H_SIGNER, AuditSigner, audit_signature_ok

log = logging.getLogger("sync.uploader")

_STREAM_NAME_IN_USE = 10058  # JetStream err_code: stream name already in use (created concurrently)
_WRONG_LAST_SEQUENCE = 10071  # JetStream err_code: Nats-Expected-Last-Subject-Sequence did not hold
_LAST_SEQUENCE = re.compile(r"wrong last sequence: (\d+)")
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_CONFLICT_NOTE = "uploader.conflict"
_ACCEPTED_NOTE = "uploader.accepted_foreign"
_REPLAY_NOTE = "uploader.replay_from"
_STALE_READ_S = 2.0  # how long a resume read waits for a lagging replica to reach a known stream seq
_DUPLICATE_WINDOW_S = 120.0
_READ_CHUNK = 512
_MAX_REPORTED = 100  # holes / lost ranges kept for status()
STREAM_MAX_MSG_SIZE = 1 << 20
"""The largest message a stream the uploader creates accepts (a record is usually well under 2 KiB)."""
STREAM_MAX_BYTES = 1 << 30
"""The byte limit of a stream the uploader creates (past it, new records are refused and kept locally)."""


async def connect_for_upload(servers: str | list[str], *, connect_timeout: float = 2.0,
                             **options: Any) -> Client:
    """A connection fit for an Uploader: no reconnect, no reconnect buffer, one connect attempt.

    A dead connection's unsent publishes must die with it (see the ordering hazard above), and
    nats-py's connect() would otherwise retry a refused server ~60 times, 2 s apart. `options`
    (credentials, name, ...) are passed through to nats.connect.
    """

    async def quiet(exc: Exception) -> None:
        log.debug("audit upload connection: %s", exc)  # the Uploader reports failures itself

    options.setdefault("error_cb", quiet)
    return await nats.connect(
        servers, allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.01,
        pending_size=0, connect_timeout=connect_timeout, ping_interval=2, max_outstanding_pings=2, **options,
    )


_YIELD_EVERY = 16  # publishes between two yields to the event loop
_LINGER_BELOW = 64  # fewer unsent records than this at the start of a burst: wait linger_s for more


class UploaderState(enum.Enum):
    """Where an Uploader is: NEW → CONNECTING → SYNCING ⇄ BACKOFF → CLOSED; AUDIT_CONFLICT until resolved."""

    NEW = "new"
    CONNECTING = "connecting"
    SYNCING = "syncing"
    BACKOFF = "backoff"
    AUDIT_CONFLICT = "audit_conflict"
    CLOSED = "closed"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)
_NO_RESPONDERS = "no responders"


class _InFlight(msgspec.Struct):
    seq: int
    sent_at: float
    resend: bool
    fresh: bool  # never published before this session: a duplicate ack means someone else holds its Msg-Id
    expected: int | None  # the Nats-Expected-Last-Subject-Sequence it carried
    done: bool = False
    ack: _PubAck | None = None
    problem: str = ""


class _Rejected(SyncError):
    """The stream refused a record (error ack); retried on the next connection."""


class _Moved(SyncError):
    """Something landed on the subject since the uploader last knew it: re-read, then go on or stop."""


class _Conflict(msgspec.Struct):
    """What the status and the log file keep of an unresolved conflict."""

    subject: str
    stream_seq: int
    seq: int | None
    detail: str
    sent_through: int = 0  # the highest seq published before it: a replay's duplicates up to it are ours


_conflict_decoder = msgspec.json.Decoder(_Conflict)


class Uploader:
    """Publishes the log's unsynced records to `audit.<device>` in `stream`, exactly once, in order.

    `async with Uploader(log, connect):` starts the background task; leaving the block stops it and
    closes its connection. `connect()` must return a *new* connection made with
    `allow_reconnect=False, pending_size=0` (see the module docstring for why); pass also
    `max_reconnect_attempts=1` and a short `reconnect_time_wait`, or nats-py's connect retries a
    refused server for minutes before giving up (it does so even with allow_reconnect=False).
    """

    def __init__(
        self,
        log: AuditLog,
        connect: Callable[[], Awaitable[Client]],
        *,
        stream: str = "EDGE_AUDIT",
        create_stream: bool = False,
        window: int = 256,
        max_bytes_per_s: int | None = None,
        retry_s: float = 0.5,
        retry_max_s: float = 5.0,
        ack_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        signer: AuditSigner | None = None,
        sign_every: int = 64,
        stream_max_msg_size: int = STREAM_MAX_MSG_SIZE,
        stream_max_bytes: int = STREAM_MAX_BYTES,
        stream_replicas: int = 1,
        linger_s: float = 0.02,
        catch_up_share: float = 1.0,
        domain: str | None = None,
        wait_for_burst: bool = False,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if sign_every < 1:
            raise ValueError("sign_every must be at least 1")
        self.log = log
        self.stream = stream
        self.subject = f"audit.{log.device}"
        self.create_stream = create_stream
        self.window = window
        self.max_bytes_per_s = max_bytes_per_s
        self.retry_s = retry_s
        self.retry_max_s = max(retry_s, retry_max_s)
        self.ack_timeout_s = ack_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.signer = signer
        self.sign_every = sign_every
        # The limits of a stream this uploader creates (one it finds is the operator's business).
        self.stream_max_msg_size = stream_max_msg_size
        self.stream_max_bytes = stream_max_bytes
        self.stream_replicas = stream_replicas
        self.linger_s = max(0.0, linger_s)
        self.catch_up_share = min(1.0, max(0.05, catch_up_share))
        # The JetStream domain of the stream's server (`$JS.<domain>.API`): a leaf node that has
        # its own JetStream reaches the hub's this way. Records themselves go to `audit.<device>`
        # in any case; only API requests (stream info, direct gets) carry the domain.
        self.domain = domain
        # A connection that stays up while a link beyond it drops and comes back (a leaf node's own
        # server): records in flight at the drop are lost, later ones land, and a sliding window
        # would put them upstream after a hole. Waiting for every ack of a burst before the next
        # means nothing is in flight when a burst starts: a loss ends the session (ack timeout, or
        # "no responders" while the link is down) and the next one resumes from the stream.
        self.wait_for_burst = wait_for_burst
        self.state = UploaderState.NEW
        self.last_error: str | None = None
        self._connect = connect
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()  # owns the task group the upload loop runs in
        self._remove_listener: Callable[[], None] | None = None
        self._progress = asyncio.Event()  # an ack arrived, a record was committed, or a kick
        self._kick = asyncio.Event()  # skip the current back-off (sync_now, resend)
        self._synced_changed = asyncio.Event()
        self._stream_missing = False
        self._in_flight = 0
        self._published = 0
        self._acked = 0
        self._duplicates = 0
        self._reconnects = 0
        self._anomalies = 0
        self._holes: list[tuple[int, int]] = []
        self._upstream_lost: list[tuple[int, int]] = []
        self._last_stream_seq = 0
        self._resend: tuple[int, int] | None = None  # (next seq not yet acked, last seq) of a repair
        self._resend_epoch = 0
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._signed = 0
        self._conflict: _Conflict | None = None
        self._accepted: list[int] = []  # stream seqs of foreign messages an operator accepted (newest last)
        self._replay_from = 0  # after a resolution: publish from here whatever the stream's last record says
        self._resolved = asyncio.Event()
        self._resolution: int | None = None  # from_seq of a resolution waiting for the task
        self._sent_high = 0  # the highest seq published (not as a resend) before the current session
        self._session_high = 0  # ... and during it
        self._subject_last: int | None = None  # stream seq of the subject's last message, when known exactly
        self._expect_at_least = 0  # a "wrong last sequence" named this: the next resume read must reach it
        self._dup_probe: tuple[int, int] | None = None  # (seq, stream seq) of a first publish answered "duplicate"

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Uploader:
        if self.state is not UploaderState.NEW:
            raise SyncError(f"an Uploader can be started once (state {self.state.value})")
        self._remove_listener = self.log.add_listener(self.wake)
        self._sent_high = self.log.synced_seq
        self._accepted = [int(s) for s in (self.log.note(_ACCEPTED_NOTE) or "").split(",") if s.isdigit()]
        self._replay_from = int(self.log.note(_REPLAY_NOTE) or 0)
        kept = self.log.note(_CONFLICT_NOTE)
        if kept:
            try:
                self._conflict = _conflict_decoder.decode(kept)
                self._sent_high = max(self._sent_high, self._conflict.sent_through)
            except msgspec.DecodeError:
                log.error("audit upload: ignoring an unreadable kept conflict")
        self.state = UploaderState.CONNECTING if self._conflict is None else UploaderState.AUDIT_CONFLICT
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = tasks.create_task(self._run(), name=f"audit-uploader-{self.log.device}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the task and close the connection. Idempotent."""
        if self.state is UploaderState.CLOSED:
            return
        self.state = UploaderState.CLOSED
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        await self._stack.aclose()  # the task group awaits the cancelled loop; a failure in it propagates
        self._synced_changed.set()

    # ------------------------------------------------------------------ public controls

    def wake(self) -> None:
        """New records were committed: publish them promptly (the log calls this after each commit)."""
        self._progress.set()

    def retry_now(self) -> None:
        """The link is back (the runtime saw it): cut a back-off short and reconnect at once."""
        self._progress.set()
        if self.state is UploaderState.BACKOFF:
            self._kick.set()

    # A timeout parameter on purpose: the `sync.now` command replies with the backlog left after it.
    async def sync_now(self, timeout: float) -> int:  # noqa: ASYNC109
        """Try to sync everything at once (skipping any back-off); returns the backlog after `timeout` at most."""
        self._kick.set()
        self._progress.set()
        deadline = time.monotonic() + timeout
        while self.log.backlog > 0 and self.state is not UploaderState.CLOSED and (
                self._conflict is None or self._resolution is not None):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._synced_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._synced_changed.wait()
        return self.log.backlog

    def resend(self, from_seq: int, to_seq: int | None = None) -> int:
        """Re-send kept records from_seq..to_seq (default: up to synced_seq) to repair an upstream loss.

        They go out with their original Msg-Ids, after everything the stream already holds (out of
        order, unavoidably). Within the stream's duplicate window (2 min) the server drops them as
        duplicates; records the stream still holds are stored a second time once past the window,
        so pick the range `verify_upstream` reports missing. Returns how many seqs are queued.

        In state `audit_conflict` this is the resolution instead (see the module docstring): the
        foreign message is accepted as the subject's last, and every record from `from_seq` (at
        most synced_seq + 1) to the newest is published again after it; `to_seq` is not used.
        """
        if self._conflict is not None:
            start = max(1, self.log.oldest_seq, min(from_seq, self.log.synced_seq + 1))
            self._resolution = start
            self._resolved.set()
            return max(0, self.log.last_seq - start + 1)
        end = self.log.synced_seq if to_seq is None else min(to_seq, self.log.synced_seq)
        start = max(from_seq, self.log.oldest_seq, 1)
        if end < start:
            return 0
        self._resend = (start, end)
        self._resend_epoch += 1
        self._kick.set()
        self._progress.set()
        return end - start + 1

    @property
    def connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot: connection, progress, and anything the stream refused or lost."""
        return {
            "state": self.state.value,
            "connected": self.connected,
            "stream": self.stream,
            "subject": self.subject,
            "synced_seq": self.log.synced_seq,
            "backlog": self.log.backlog,
            "in_flight": self._in_flight,
            "published": self._published,
            "acked": self._acked,
            "duplicates": self._duplicates,
            "reconnects": self._reconnects,
            "anomalies": self._anomalies,
            "last_stream_seq": self._last_stream_seq,
            "stream_missing": self._stream_missing,
            "holes": [list(r) for r in self._holes],
            "upstream_lost": [list(r) for r in self._upstream_lost],
            "resend": list(self._resend) if self._resend is not None else None,
            "device_key": self.signer.public_key if self.signer is not None else None,
            "signed": self._signed,
            "conflict": msgspec.to_builtins(self._conflict) if self._conflict is not None else None,
            "accepted_foreign": list(self._accepted),
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        delay = self.retry_s
        while True:
            if self._conflict is not None:
                await self._wait_for_resolution()
            self._kick.clear()
            self.state = UploaderState.CONNECTING
            acked_before = self._acked
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    nc = await self._connect()
            except Exception as exc:  # any failure to connect is reported and retried
                self._report(exc)
            else:
                self._nc = nc
                try:
                    await self._session(nc)
                except AuditConflict as exc:
                    await self._enter_conflict(exc)
                except _Moved as exc:
                    self._report(exc)
                    self._kick.set()  # not a failure: read the subject again at once
                except Exception as exc:  # the session ends on any error; reported, then reconnect
                    self._report(exc)
                finally:
                    self._nc = None
                    self._in_flight = 0
                    self._sent_high = max(self._sent_high, self._session_high)
                    await self._close_connection(nc)
                    await self._forget_replay()
            if self._conflict is not None:
                continue
            if self._acked > acked_before:
                delay = self.retry_s
            self.state = UploaderState.BACKOFF
            self._synced_changed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * random.uniform(0.8, 1.2)):
                    await self._kick.wait()
            delay = min(self.retry_max_s, delay * 2)
            self._reconnects += 1

    async def _enter_conflict(self, exc: AuditConflict) -> None:
        self._sent_high = max(self._sent_high, self._session_high)
        self._conflict = _Conflict(subject=exc.subject, stream_seq=exc.stream_seq, seq=exc.seq, detail=exc.detail,
                                   sent_through=self._sent_high)
        self.last_error = str(exc)
        log.error("audit upload stopped: %s; resolve with audit.resend (see `edge audit`)", exc)
        body = {"subject": exc.subject, "stream_seq": exc.stream_seq, "seq": exc.seq, "detail": exc.detail[:300]}
        try:
            # Kept in the log file first, so a restart cannot forget it, then said (state) and recorded.
            await self.log.set_note(_CONFLICT_NOTE, msgspec.json.encode(self._conflict).decode())
            self.log.append("audit_conflict", body)
        except SyncError as write_exc:
            log.warning("audit upload: the conflict could not be recorded in the log: %s", write_exc)
        self.state = UploaderState.AUDIT_CONFLICT
        self._synced_changed.set()

    async def _wait_for_resolution(self) -> None:
        """Stay stopped until `resend()` resolves the conflict; then accept it and replay from there."""
        conflict = self._conflict
        assert conflict is not None
        self.state = UploaderState.AUDIT_CONFLICT
        self.last_error = f"audit_conflict on {conflict.subject} at stream seq {conflict.stream_seq}: {conflict.detail}"
        self._synced_changed.set()
        while self._resolution is None:
            self._resolved.clear()
            await self._resolved.wait()
        start, self._resolution = self._resolution, None
        self._accepted = [*self._accepted, conflict.stream_seq][-_MAX_REPORTED:]
        self._replay_from = start
        self.log.rewind_synced(start - 1)
        try:
            await self.log.set_note(_ACCEPTED_NOTE, ",".join(map(str, self._accepted)))
            await self.log.set_note(_REPLAY_NOTE, str(start))
            await self.log.set_note(_CONFLICT_NOTE, None)
            self.log.append("audit_resolved", {"subject": conflict.subject, "stream_seq": conflict.stream_seq,
                                               "replay_from": start})
        except SyncError as exc:
            log.warning("audit upload: the resolution could not be recorded in the log: %s", exc)
        log.warning("audit upload: conflict at stream seq %d accepted; publishing again from seq %d",
                    conflict.stream_seq, start)
        self._conflict = None
        self.last_error = None

    async def _forget_replay(self) -> None:
        if self._replay_from == 0 and self.log.note(_REPLAY_NOTE) is not None:
            try:
                await self.log.set_note(_REPLAY_NOTE, None)
            except SyncError as exc:
                log.warning("audit upload: %s", exc)

    def _report(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        expected = (nats.errors.Error, OSError, TimeoutError, SyncError)
        if isinstance(exc, expected):
            log.warning("audit upload: %s", self.last_error)
        else:
            log.error("audit upload: unexpected error", exc_info=exc)

    async def _close_connection(self, nc: Client) -> None:
        if nc.is_closed:
            return
        try:
            async with asyncio.timeout(2.0):
                await nc.close()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("audit upload: closing the connection failed: %s", exc)

    async def _session(self, nc: Client) -> None:
        js = nc.jetstream(domain=self.domain)
        self._session_high = self._sent_high
        self._subject_last = None
        await self._ensure_stream(js)
        next_seq = await self._resume(js)
        self.state = UploaderState.SYNCING
        self.last_error = None
        if self._resend is not None:
            log.info("audit upload: re-sending seqs %d..%d", *self._resend)
        await self._pump(nc, next_seq)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not self.create_stream:
                self._stream_missing = True
                raise StreamMissing(self.stream, self.subject) from None
            try:
                # Direct gets let a device read its own last record (see _resume); nobody may
                # delete or purge records (deleting the stream itself is a hub permission).
                # Bounded: a record larger than max_msg_size, or one past max_bytes, is refused (and
                # reported, kept locally), never stored by evicting older records (discard "new").
                await js.add_stream(
                    name=self.stream,
                    subjects=["audit.>"],
                    storage=StorageType.FILE,
                    duplicate_window=_DUPLICATE_WINDOW_S,
                    allow_direct=True,
                    deny_delete=True,
                    deny_purge=True,
                    max_msg_size=self.stream_max_msg_size,
                    max_bytes=self.stream_max_bytes,
                    discard=DiscardPolicy.NEW,
                    num_replicas=self.stream_replicas,
                )
                log.info("audit upload: created stream %s", self.stream)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
            info = await js.stream_info(self.stream)
        self._stream_missing = False
        if not info.config.allow_direct:
            raise SyncError(self._no_direct_get())

    def _no_direct_get(self) -> str:
        return (f"JetStream stream {self.stream!r} does not allow direct gets: the uploader reads the last "
                f"record on {self.subject!r} with one; enable them with `nats stream edit {self.stream} "
                "--allow-direct`")

    async def _read_last(self, js: JetStreamContext) -> tuple[int, bytes, dict[str, str]] | None:
        """(stream seq, data, headers) of the last message on our subject, None if there is none.

        When a "wrong last sequence" named a stream seq, a replica that has not reached it yet is
        asked again (on a replicated stream any replica answers direct gets).
        """
        deadline = time.monotonic() + _STALE_READ_S
        while True:
            try:
                # A direct get of the last message on our own subject: $JS.API.DIRECT.GET.<stream>.<subject>.
                raw = await js.get_last_msg(self.stream, self.subject, direct=True)
            except nats.js.errors.NotFoundError:
                found = None  # 404: nothing on this subject yet
            except nats.errors.NoRespondersError:
                # Nothing answers direct gets: the stream went away since _ensure_stream, or it no
                # longer allows them. The next connection's stream check tells which.
                raise SyncError(f"no answer to a direct get of the last record on {self.subject!r} in "
                                f"{self.stream!r}: the stream is gone or no longer allows direct gets") from None
            else:
                headers = {k: str(v) for k, v in (raw.headers or {}).items()}
                found = (int(raw.seq or 0), bytes(raw.data or b""), headers)
            seen = found[0] if found is not None else 0
            if seen >= self._expect_at_least:
                self._expect_at_least = 0
                return found
            if time.monotonic() > deadline:
                raise SyncError(f"the stream's answer for {self.subject} is at stream seq {seen}, behind the "
                                f"{self._expect_at_least} it reported: a replica is lagging; retrying")
            await asyncio.sleep(0.05)  # pace: a lagging replica catches up

    async def _foreign(self, record: AuditRecord | None, headers: dict[str, str]) -> str:
        """Why the last message on our subject is not this device's record ("" when it is)."""
        if record is None:
            return "a message that is not an audit record"
        if record.device != self.log.device:
            return f"a record of device {record.device[:64]!r}"
        if not hash_ok(record):
            return f"a record (seq {record.seq}) whose hash does not match its contents"
        if record.seq > self.log.last_seq:
            return (f"a record with seq {record.seq}, beyond the local log's end ({self.log.last_seq}): one this "
                    "device never wrote, or the local log was reset or replaced")
        local = await self.log.read(record.seq, 1)
        if local and local[0].seq == record.seq:
            if local[0].hash != record.hash:
                return (f"a different record under seq {record.seq} than the local log's (a foreign record, or the "
                        "local log was reset or replaced)")
            return ""
        if self.signer is None:
            return ""  # no longer kept and nothing to check it with: taken as the stream says
        if audit_signature_ok(self.signer.public_key, record.device, record.seq, record.hash,
                              headers.get(H_SIGNATURE, "")):
            return ""
        return f"a record with seq {record.seq} that is no longer kept locally and not signed by this device's key"

    async def _resume(self, js: JetStreamContext) -> int:
        """Ask the stream what it holds for this device; return the first seq to publish."""
        probe, self._dup_probe = self._dup_probe, None
        last = await self._read_last(js)
        if last is None:
            upstream = 0
            self._subject_last = 0
        else:
            stream_seq, data, headers = last
            try:
                record: AuditRecord | None = decode_record(data)
            except SyncError:
                record = None
            why = await self._foreign(record, headers)
            self._subject_last = stream_seq
            if why and stream_seq not in self._accepted:
                raise AuditConflict(self.subject, stream_seq, record.seq if record is not None else None,
                                    f"the last message on the subject is {why}")
            if why or record is None:
                # The foreign message an operator accepted: our records go on after it.
                start = self._replay_from or self.log.synced_seq + 1
                self.log.rewind_synced(start - 1)
                return start
            upstream = record.seq
        if probe is not None and upstream < probe[0]:
            raise AuditConflict(self.subject, probe[1], probe[0],
                                f"the stream already held a message under Msg-Id {self.log.device}:{probe[0]}, "
                                f"which this device had never published (its own records end at seq {upstream})")
        if self._replay_from:
            # After a resolution the stream's last record may be ours while one before it is not.
            self.log.rewind_synced(self._replay_from - 1)
            return self._replay_from
        synced = self.log.synced_seq
        if upstream >= synced:
            # The stream is the truth: what it holds was published, whatever we had noted.
            self.log.mark_synced(upstream)
            self._synced_changed.set()
            return upstream + 1
        # The stream lost records we had synced: send again what we still keep.
        restart = max(upstream + 1, self.log.oldest_seq)
        if restart > upstream + 1:
            self._note(self._upstream_lost, (upstream + 1, restart - 1))
            log.error(
                "audit upload: %s lost seqs %d..%d of %s and they are no longer kept locally",
                self.stream,
                upstream + 1,
                restart - 1,
                self.log.device,
            )
        log.warning(
            "audit upload: %s holds up to seq %d but %d were synced; re-sending from %d",
            self.stream,
            upstream,
            synced,
            restart,
        )
        self.log.rewind_synced(restart - 1)
        return restart

    async def _pump(self, nc: Client, next_seq: int) -> None:
        # Acks come back on an inbox of our own rather than through js.publish_async: nats-py 2.16's
        # publish_async never resolves the future of an error ack (its reply handler raises
        # instead), which would turn "the stream refused k" into a timeout and a silent skip.
        inbox = nc.new_inbox()
        waiting: dict[str, _InFlight] = {}
        prefix_len = len(inbox) + 1

        async def on_reply(msg: Msg) -> None:
            entry = waiting.pop(msg.subject[prefix_len:], None)
            if entry is None:
                return
            if msg.headers and msg.headers.get("Status") == "503":
                entry.problem = _NO_RESPONDERS
            else:
                try:
                    entry.ack = _ack_decoder.decode(msg.data)
                except msgspec.DecodeError as exc:
                    entry.problem = f"undecodable publish ack: {exc}"
            entry.done = True
            self._progress.set()

        sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
        in_flight: collections.deque[_InFlight] = collections.deque()
        self._last_stream_seq = 0
        rejected: list[tuple[int, str]] = []
        resend_next = 0
        resend_epoch = -1
        token = 0
        last_burst_at = 0.0  # perf_counter when the last burst began
        base = {"Nats-Expected-Stream": self.stream}
        device = self.log.device
        signer = self.signer
        idle = True  # nothing sent since the pump last had nothing to do: the next publish opens a burst
        share, last_behind = self.catch_up_share, 0  # catching up: the share of the loop it takes now
        try:
            while True:
                self._progress.clear()
                if nc.is_closed:
                    raise nats.errors.ConnectionClosedError
                self._check_ack_timeout(in_flight)
                self._settle(in_flight, rejected)
                self._in_flight = len(in_flight)
                if rejected and not in_flight:
                    seq, reason = rejected[0]
                    raise _Rejected(f"{self.stream} rejected seq {seq}: {reason}")
                # A publish that carries an expectation goes alone: nothing is sent after it until its
                # ack says the subject was as we knew it (see the module docstring).
                gated = bool(in_flight) and in_flight[-1].expected is not None
                expected = self._subject_last if idle and not in_flight else None
                room = 1 if expected is not None else self.window - len(in_flight)
                if self.wait_for_burst and in_flight:
                    room = 0
                rows: list[tuple[int, str, str, bytes]] = []
                resend = False
                newest = self.log.last_seq
                if room > 0 and not rejected and not gated:
                    if self._resend is not None:
                        if resend_epoch != self._resend_epoch:
                            # A new repair, or this connection's first look at one: start at the
                            # first record not yet acked.
                            resend_epoch = self._resend_epoch
                            resend_next = self._resend[0]
                        end = self._resend[1]
                        if resend_next <= end:
                            limit = min(room, _READ_CHUNK, end - resend_next + 1)
                            rows = [r for r in await self.log.read_wire(resend_next, limit) if r[0] <= end]
                            resend_next = rows[-1][0] + 1 if rows else end + 1
                            resend = True
                            newest = end
                    elif next_seq <= newest:
                        gather = self.linger_s if idle else self.linger_s - (time.perf_counter() - last_burst_at)
                        if newest - next_seq + 1 < _LINGER_BELOW and gather > 0:
                            # Each burst costs the shared event loop a few wake-ups, and a burst that
                            # opens idle goes alone first (the expectation above); on a compressed
                            # link each burst is compressed on its own. At a gateway's steady trickle,
                            # bursts are therefore at least linger_s apart, so a burst carries many
                            # records. Up to linger_s more before a record is upstream.
                            await asyncio.sleep(gather)
                            newest = self.log.last_seq
                            idle = False  # the wait is over; the expectation below still applies
                        rows = await self.log.read_wire(next_seq, min(room, _READ_CHUNK))
                        if rows:
                            next_seq = rows[-1][0] + 1
                burst_started = time.perf_counter()
                for i, (seq, kind, digest, payload) in enumerate(rows):
                    if self.max_bytes_per_s:
                        await self._throttle(len(payload))
                    elif i and i % _YIELD_EVERY == 0:
                        # Share the event loop: a burst of a whole window would hold back the
                        # decisions waiting behind it (the runtime's loop is ours too).
                        await asyncio.sleep(0)
                    token += 1
                    fresh = not resend and seq > self._sent_high
                    entry = _InFlight(seq=seq, sent_at=time.monotonic(), resend=resend, fresh=fresh,
                                      expected=expected if i == 0 else None)
                    waiting[str(token)] = entry
                    in_flight.append(entry)
                    headers = {**base, "Nats-Msg-Id": f"{device}:{seq}", "Edge-Kind": kind}
                    if entry.expected is not None:
                        headers[_EXPECTED_LAST] = str(entry.expected)
                    if signer is not None and (seq % self.sign_every == 0 or seq >= newest):
                        # Every sign_every-th record, and the newest of a burst: a caught-up stream
                        # ends on a signed record.
                        headers[H_SIGNER] = signer.public_key
                        headers[H_SIGNATURE] = signer.sign(device, seq, digest)
                        self._signed += 1
                    await nc.publish(self.subject, payload, reply=f"{inbox}.{token}", headers=headers)
                    self._published += 1
                    if not resend:
                        self._session_high = max(self._session_high, seq)
                if rows:
                    idle = False
                    last_burst_at = burst_started
                    behind = newest - rows[-1][0]
                    if self.catch_up_share < 1.0 and behind > self.window:
                        # Far behind (after an outage): rest in proportion to the work just done, so
                        # catching up takes only a share of the loop and of the cores, which the
                        # decisions still being made need too. The share doubles while the backlog
                        # still grows (the uploader must at least keep up) and falls back to
                        # catch_up_share while it shrinks.
                        if behind >= last_behind:
                            share = min(1.0, share * 2)
                        else:
                            share = max(self.catch_up_share, share * 0.9)
                        last_behind = behind
                        if share < 1.0:
                            worked = time.perf_counter() - burst_started
                            await asyncio.sleep(worked * (1.0 / share - 1.0))
                    continue
                if not in_flight and not gated:
                    idle = True
                tick = 0.25 if in_flight else 1.0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._progress.wait()
        finally:
            waiting.clear()
            if not nc.is_closed:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    def _check_ack_timeout(self, in_flight: collections.deque[_InFlight]) -> None:
        if not in_flight or time.monotonic() - in_flight[0].sent_at <= self.ack_timeout_s:
            return
        head = in_flight[0]
        if any(e.done and e.ack is not None and e.ack.error is None for e in in_flight):
            # The server answered later records but never this one: treat it as refused, so a
            # later record that got in makes it a reported hole rather than a silent skip.
            head.problem = f"no publish ack in {self.ack_timeout_s}s while later records were acked"
            head.done = True
            return
        raise TimeoutError(f"no publish ack for seq {head.seq} in {self.ack_timeout_s}s")

    def _settle(self, in_flight: collections.deque[_InFlight], rejected: list[tuple[int, str]]) -> None:
        """Take the acks that arrived, in send order; advance synced_seq over the contiguous prefix."""
        synced_to = 0
        try:
            while in_flight and in_flight[0].done:
                entry = in_flight[0]
                if not self._take(entry, rejected):
                    in_flight.popleft()
                    continue
                in_flight.popleft()
                if not entry.resend:
                    synced_to = entry.seq
        finally:
            # What was taken before a conflict or a move is booked; nothing after it.
            if synced_to:
                self.log.mark_synced(synced_to)
                self._synced_changed.set()

    def _take(self, entry: _InFlight, rejected: list[tuple[int, str]]) -> bool:
        """Check one ack; True if the record is in the stream and counts (raises to end the session)."""
        if entry.problem == _NO_RESPONDERS:
            # Nothing answered on the subject: the stream was deleted, or JetStream is shutting
            # down or not up yet. The next connection's stream check tells which.
            raise SyncError(f"no JetStream responder for {self.subject} (seq {entry.seq})")
        ack = entry.ack
        if ack is not None and ack.error is not None and ack.error.err_code == _WRONG_LAST_SEQUENCE:
            found = _LAST_SEQUENCE.search(ack.error.description)
            self._expect_at_least = int(found.group(1)) if found else (entry.expected or 0) + 1
            self._subject_last = None
            raise _Moved(f"something landed on {self.subject} at stream seq {self._expect_at_least} before seq "
                         f"{entry.seq}; reading the subject again")
        if ack is None or ack.error is not None:
            # The server refused this record. Keep settling: if a later one gets in, this one
            # is a hole in the stream.
            if ack is not None and ack.error is not None:
                reason = f"{ack.error.description} (err_code {ack.error.err_code})"
            else:
                reason = entry.problem
            log.error("audit upload: %s refused seq %d: %s", self.stream, entry.seq, reason)
            rejected.append((entry.seq, reason))
            self._subject_last = None  # a later record may or may not have landed: the next burst re-reads
            return False
        if ack.duplicate and not entry.resend and ack.seq in self._accepted:
            self._subject_last = None
            raise SyncError(f"Msg-Id {self.log.device}:{entry.seq} is held by the accepted foreign message at "
                            f"stream seq {ack.seq} until the stream's duplicate window has passed; retrying")
        if ack.duplicate:
            if entry.fresh and entry.expected is not None:
                # The first publish after a resume read: the read may have come from a lagging
                # replica (the record is ours, stored by a session whose ack was lost), or someone
                # took the Msg-Id. The next read, from at least that stream seq, tells which.
                self._dup_probe = (entry.seq, ack.seq)
                self._expect_at_least = ack.seq
                self._subject_last = None
                raise _Moved(f"seq {entry.seq} is already in the stream at stream seq {ack.seq}; reading the "
                             "subject again")
            if entry.fresh:
                raise AuditConflict(self.subject, ack.seq, entry.seq,
                                    f"the stream already held a message under Msg-Id {self.log.device}:{entry.seq}, "
                                    "which this device had never published (published by someone else first)")
            self._acked += 1
            self._duplicates += 1
            self._subject_last = max(self._subject_last or 0, ack.seq)  # our earlier copy; a header checks the rest
        elif ack.seq <= self._last_stream_seq or ack.stream != self.stream:
            self._anomalies += 1
            raise SyncError(
                f"unexpected ack for seq {entry.seq}: stored in {ack.stream!r} at {ack.seq} "
                f"after {self._last_stream_seq}"
            )
        else:
            self._acked += 1
            self._last_stream_seq = ack.seq
            self._subject_last = ack.seq
        if self._replay_from and entry.seq >= self._replay_from and not entry.resend:
            self._replay_from = 0  # the replay after a resolution reached the stream (the note stays harmless)
        if entry.resend:
            if self._resend is not None:
                self._resend = None if entry.seq >= self._resend[1] else (entry.seq + 1, self._resend[1])
            return True
        if rejected:
            # A later record got in after a refused one: the refused ones can no longer go in order.
            for seq, reason in rejected:
                self._note(self._holes, (seq, seq))
                self.last_error = f"{self.stream} rejected seq {seq} and later records got in: {reason}"
                log.error("audit upload: %s", self.last_error)
            rejected.clear()
        return True

    async def _throttle(self, size: int) -> None:
        rate = float(self.max_bytes_per_s or 0)
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= size
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / rate)  # rate limiting: pay the debt in time

    @staticmethod
    def _note(ranges: list[tuple[int, int]], span: tuple[int, int]) -> None:
        if ranges and ranges[-1][1] + 1 == span[0]:
            ranges[-1] = (ranges[-1][0], span[1])
        elif len(ranges) < _MAX_REPORTED:
            ranges.append(span)

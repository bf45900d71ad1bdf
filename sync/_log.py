"""The durable audit log: one SQLite file in WAL mode, a writer thread, group commit.

`append` runs on the event loop and never touches SQLite: it assigns the next seq, builds the
record (canonical body, hash chained onto the previous record) under a small lock and queues it.
A writer thread takes everything queued, inserts it in one transaction and commits, then resolves
the batch's futures with one `call_soon_threadsafe`. Reads use a second connection on a thread of
their own, so neither side ever blocks the loop.

Durability of a resolved `append` future, by `fsync` mode (WAL journal in every mode):

- `"always"`: synchronous=FULL: the writer commits whatever is queued at once (under load, what
  queued during the previous commit forms the next group) and SQLite fsyncs the WAL on every
  commit, so a resolved record survives a process crash *and* a power loss or OS crash.
- `"batch"` (default): group fsync. synchronous=NORMAL: the writer commits at once, as above, but
  a commit resolves once it is in the OS; a thread of its own fdatasyncs the WAL file at most
  every `commit_interval_ms` (the writer once more on close) while there are commits not yet on
  disk, so one fsync covers every commit of the interval and no commit waits behind one. A
  resolved record survives `kill -9` of the process; a power loss or OS crash can lose the records
  of the last `commit_interval_ms` (plus one fsync), never corrupt the file (WAL with NORMAL is
  safe). On this machine an fsync costs 0.3-1 ms with spikes to tens of ms; taking it off the
  decision's path is what keeps decision latency low.
- `"off"`: synchronous=OFF and never fsynced: commits are written to the OS, so they survive
  `kill -9` of the process, but a power loss or OS crash can lose recent commits and, as SQLite
  documents, may corrupt the file. For throwaway devices and benchmarks.

A failed commit (disk full, read-only, locked, corrupt) fails the futures of that batch *and of
every record queued after it* with AuditUnavailable, and rewinds the chain to the last committed
record: those later records were chained onto records that do not exist, so keeping them would
break the chain. Their seqs are reused by later appends, so the log stays gap-free. The writer
backs off (50 ms doubling to 1 s) between failing attempts; `state` is FAILING and `last_error`
says why until a commit succeeds again.

Back-pressure: `append` does not block and never raises for a slow disk; `pending` counts records
appended but not yet committed, for the runtime to throttle on. (The runtime awaits each future
before publishing, so its own concurrency bounds `pending`.)

Retention (checked after every commit, and every minute when idle): synced records older than
`keep_synced_s` are deleted whatever the size. When the used size (pages in use, excluding the
WAL) exceeds `max_bytes`, the oldest synced records go next, down to 90% of `max_bytes`. When
only unsynced records remain, `on_full="drop_oldest"` deletes the oldest and, in the same
transaction, appends a `gap` record `{from_seq, to_seq, reason}` naming the range lost;
`on_full="block"` makes `append` raise AuditFull (and `full` is true) until the uploader's
progress lets synced records be deleted. The newest record is never deleted, so the chain can
always continue after a restart.

What `drop_oldest` deletes: every synced record goes first; then the oldest unsynced records
the uploader has not yet read to publish (`read_wire` reserves what it reads: a published record
may be in the stream before its ack arrives, and a gap must never name a record the stream holds),
except those of `protected_kinds` (command, config and model records by default: who changed
the device is the last thing to lose) while anything else can go. Each contiguous run it
deletes gets a gap record naming the run and the two hashes around it (see `_record`), so the
chain is still checked across it; a gap record that is itself deleted is written again (merged
with an adjacent run). At most `_MAX_GAPS_PER_DROP` runs go per drop; when the only progress
left would be rewriting gap records (a log of protected records only), the oldest records go
whatever their kind, as one run.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import msgspec

from ._errors import AuditFull, AuditUnavailable, ChainBroken, SyncError
from ._record import GAP_KIND, GENESIS, AuditRecord, Chain, GapBody, check_device, encode_record, gap_body
from ._storage import pack_row, unpack_body, unpack_digest, unpack_row

log = logging.getLogger("sync.audit")

FsyncMode = Literal["always", "batch", "off"]
OnFull = Literal["drop_oldest", "block"]

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records ("
    " seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, kind TEXT NOT NULL,"
    " body BLOB NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_INSERT = "INSERT INTO records (seq, ts, kind, body, prev, hash) VALUES (?, ?, ?, ?, ?, ?)"
_SET_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
_SELECT = "SELECT seq, ts, kind, body, prev, hash FROM records"

_MAX_BATCH = 8192  # records per transaction: bounds a transaction's size and the writer's latency
_TAIL_CHECK = 64  # records re-verified on open
_SYNCED_PERSIST_S = 0.05  # synced_seq is persisted at most this often on its own (free with a batch)
_HOUSEKEEPING_S = 60.0  # an idle log still sweeps expired synced records this often
_RETENTION_CHECK_S = 1.0  # a busy log measures itself at least this often
_ROW_OVERHEAD_BYTES = 90  # per record beyond its stored body: seq, ts, kind, prev, hash, b-tree cells
_TAIL_RECORDS = 4096  # committed, not yet synced records kept in memory for the uploader (~4 MB)
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 1.0
_BUSY_TIMEOUT_MS = 2000
# Every commit writes each page it changed to the WAL whole; at a gateway's steady rate a commit
# holds one or two records, so the page is what costs flash, not the record.
_PAGE_SIZE = 1024
_RETENTION_TARGET = 0.9  # delete down to this fraction of max_bytes so retention does not run every commit
_COMPRESS_UP_TO = 16  # records in a commit whose bodies are still compressed
_RATE_WINDOW_S = 300.0  # the record rate retention_outlook is given: over the last five minutes ...
_RATE_SAMPLE_S = 1.0
_RATE_MIN_SPAN_S = 10.0  # ... once this much has been seen (before: the rate of the file's own newest records)
_HISTORY_RECORDS = 10_000  # the newest records the file's own rate is read from, on open
_NOMINAL_RECORD_BYTES = 300.0  # a decision record on disk, until the file holds enough to measure
_MEASURED_FROM_RECORDS = 1000
_MAX_GAPS_PER_DROP = 8  # gap records one drop may write (runs of deleted records between protected ones)
PROTECTED_KINDS = ("command", "config", "model")
"""Record kinds `drop_oldest` deletes last: who changed the device, and how."""
_NOTE_PREFIX = "note."


_SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}
# The WAL's data is what must reach the disk; its size and times need not (SQLite reuses the file,
# so its size rarely changes): fdatasync skips the inode write that fsync adds to every call.
_sync_data: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class RetentionOutlook(msgspec.Struct, frozen=True):
    """How long `max_bytes` holds records at the rate the log sees: `holds_s` (None while no rate
    is known) is both how long synced records are kept and the longest outage the log can ride
    out without dropping unsynced ones. `warning` is empty, or says what will not hold."""

    records_per_s: float
    bytes_per_record: float
    holds_s: float | None
    keep_synced_s: float
    warning: str = ""


def retention_outlook(max_bytes: int, keep_synced_s: float, records_per_s: float,
                      bytes_per_record: float) -> RetentionOutlook:
    """Pure: whether `max_bytes` can keep `keep_synced_s` of records at `records_per_s`."""
    if records_per_s <= 0:
        return RetentionOutlook(records_per_s, bytes_per_record, None, keep_synced_s)
    # Retention deletes down to _RETENTION_TARGET of max_bytes: that is what is reliably kept.
    holds = _RETENTION_TARGET * max_bytes / (records_per_s * bytes_per_record)
    warning = ""
    if holds < keep_synced_s:
        needed = keep_synced_s * records_per_s * bytes_per_record / _RETENTION_TARGET
        warning = (f"audit.max_bytes ({_size_text(max_bytes)}) holds about {_duration_text(holds)} of records at "
                   f"the {records_per_s:.1f} records/s seen (~{bytes_per_record:.0f} B each), less than "
                   f"audit.keep_synced ({_duration_text(keep_synced_s)}): synced records will go after about "
                   f"{_duration_text(holds)}, and an outage longer than that drops unsynced ones; "
                   f"about {_size_text(int(needed))} would hold it")
    return RetentionOutlook(records_per_s, bytes_per_record, holds, keep_synced_s, warning)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class LogState(enum.Enum):
    """Where an AuditLog is in its life."""

    NEW = "new"
    OPEN = "open"
    FAILING = "failing"  # the last commit failed; the writer keeps retrying with later batches
    CLOSED = "closed"


class LogSummary(msgspec.Struct, frozen=True):
    """What a log file holds, read without the writer (for the CLI)."""

    path: str
    device: str
    records: int
    first_seq: int
    last_seq: int
    synced_seq: int
    deleted_through: int


_Queued = tuple[AuditRecord, "asyncio.Future[int] | None"]


class _DropPlan(msgspec.Struct, frozen=True):
    """What one drop deletes (inclusive seq ranges) and the gap records it writes for them."""

    delete: list[tuple[int, int]]
    gaps: list[GapBody]
    records: int  # records deleted that are not gap records (progress beyond rewriting gaps)


def _meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _connect_readonly(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise AuditUnavailable(f"audit log {str(path)!r} does not exist")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 2000")
        conn.execute("SELECT 1 FROM meta LIMIT 1")
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {str(path)!r}", exc) from exc
    return conn


class AuditLog:
    """The device's durable, hash-chained audit log (see the module docstring for the guarantees).

    `async with AuditLog(path, device) as log:` opens (or creates) the file, recovers the chain's
    head and re-verifies its tail; leaving the block commits what is queued and closes.
    """

    def __init__(
        self,
        path: Path,
        device: str,
        *,
        fsync: FsyncMode = "batch",
        commit_interval_ms: float = 2,
        max_bytes: int = 3 << 30,
        on_full: OnFull = "drop_oldest",
        keep_synced_s: float = 7 * 86400,
        protected_kinds: Iterable[str] = PROTECTED_KINDS,
    ) -> None:
        if fsync not in ("always", "batch", "off"):
            raise ValueError(f"fsync must be 'always', 'batch' or 'off', not {fsync!r}")
        if on_full not in ("drop_oldest", "block"):
            raise ValueError(f"on_full must be 'drop_oldest' or 'block', not {on_full!r}")
        self.path = Path(path)
        self.device = check_device(device)
        self.fsync: FsyncMode = fsync
        self.commit_interval_s = max(0.0, commit_interval_ms / 1000)
        self.max_bytes = max_bytes
        self.on_full: OnFull = on_full
        self.keep_synced_s = keep_synced_s
        self.protected_kinds = tuple(sorted(set(protected_kinds)))
        self.state = LogState.NEW
        self.last_error: str | None = None
        # When the current run of failed commits began (monotonic); None while commits succeed.
        self.failing_since: float | None = None

        # Shared between the loop and the writer thread, guarded by _cond.
        self._cond = threading.Condition()
        self._chain = Chain(self.device)
        self._queue: list[_Queued] = []
        # "batch": the first commit not yet fsynced; the WAL syncer thread fsyncs, guarded by _wal_cond
        # (its own condition: a notify() on _cond must only ever wake the writer).
        self._wal_dirty_since: float | None = None
        self._wal_cond = threading.Condition()
        self._wal_syncer: threading.Thread | None = None
        self._wal_stop = False
        self.wal_fsyncs = 0  # "batch": group fsyncs of the WAL done so far
        self._durable_seq = 0  # newest seq known to be on stable storage (writer thread writes it)
        self._stopping = False
        self._synced_target = 0  # the newest synced_seq the loop has been told about
        self._calls: list[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any]]] = []

        # Written by the writer thread, read anywhere (single values; no invariant spans two of them).
        self._oldest = 0
        self._used_bytes = 0
        self._full = False
        self._commits = 0
        self._deleted_through = 0

        # Loop-side state.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_seq = 0
        self._synced = 0
        self._unresolved = 0
        self._listeners: list[Callable[[], None]] = []
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=int(_RATE_WINDOW_S / _RATE_SAMPLE_S))
        self._history_rate = 0.0  # records/s of the file's newest records, read on open

        # Writer-thread state.
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._thread_done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._w_last_seq = 0
        self._w_last_hash = GENESIS
        self._synced_written = 0
        # The newest seq the uploader has read (or is reading) to publish, guarded by _cond: a record
        # published may be in the stream before its ack says so, and drop_oldest never takes it.
        self._sent_through = 0
        self._drops_taken = 0  # drops the writer has begun (under _cond) ...
        self._drops_done = 0  # ... and finished, committed or not
        self._synced_written_at = 0.0
        self._drop: _DropPlan | None = None
        self._notes: dict[str, str] = {}  # small persisted values (the uploader's conflict), read at open
        self._next_housekeeping = 0.0
        self._next_retention = 0.0
        # Committed records the uploader will want next, so it need not read them back from disk.
        # Each with its wire JSON, encoded on the writer thread so the uploader publishes it as is.
        self._tail: collections.deque[tuple[AuditRecord, bytes]] = collections.deque(maxlen=_TAIL_RECORDS)
        self._tail_lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0

        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> AuditLog:
        if self.state is not LogState.NEW:
            raise SyncError(f"audit log {str(self.path)!r} can be opened once (state {self.state.value})")
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._writer_main, args=(ready,), name=f"audit-writer-{self.device}", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self.state = LogState.CLOSED
            await asyncio.shield(asyncio.wrap_future(self._thread_done))
            raise
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read")
        self._last_seq = self._w_last_seq
        self._synced = self._synced_written
        self.state = LogState.OPEN
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit everything queued, persist synced_seq and close. Idempotent."""
        if self.state in (LogState.NEW, LogState.CLOSED):
            self.state = LogState.CLOSED
            return
        self.state = LogState.CLOSED
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # Shielded: a cancelled caller must not leave the writer's last batch unresolved.
        await asyncio.shield(asyncio.wrap_future(self._thread_done))
        reader = self._reader
        if reader is not None:
            self._reader = None
            await asyncio.shield(asyncio.wrap_future(reader.submit(self._close_reader)))
            reader.shutdown(wait=False)

    # ------------------------------------------------------------------ writing

    def append(self, kind: str, body: object | Callable[[int], object]) -> asyncio.Future[int]:
        """Queue the next record; the future resolves with its seq once it is committed.

        The seq is assigned now, in call order, gap-free; `body(seq)` is called first when body is
        callable. Raises AuditFull when the store is full and `on_full="block"`, AuditUnavailable
        when the log is not open. A failed commit fails the future with AuditUnavailable, and that
        seq is given to a later record (the record it named was never written).
        """
        ((_, future),) = self.append_many(kind, (body,))
        return future

    def append_many(
        self, kind: str, bodies: Sequence[object | Callable[[int], object]], *, ts: int | None = None
    ) -> list[tuple[AuditRecord, asyncio.Future[int]]]:
        """`append` for a batch: one lock, one chain pass, one wake-up of the writer. `ts` (ns since
        the epoch) is the records' time when the caller has one for them (default: now).

        Returns each record as chained (its `body` is the canonical JSON, for the caller to reuse)
        with its future. Records commit in order, so once the last future is done every earlier one
        is too; a failed commit fails its record's future and every later one's. If building a
        body raises, nothing of the batch is appended and the chain is left as it was.
        """
        if self.state not in (LogState.OPEN, LogState.FAILING):
            raise AuditUnavailable(f"audit log is not open (state {self.state.value})")
        if self._full and self.on_full == "block":
            raise AuditFull(self._used_bytes, self.max_bytes)
        loop = self._loop
        assert loop is not None
        if ts is None:
            ts = time.time_ns()
        made: list[tuple[AuditRecord, asyncio.Future[int]]] = []
        with self._cond:
            chain = self._chain
            head = (chain.next_seq, chain.last_hash)
            try:
                for body in bodies:
                    made.append((chain.make(kind, body, ts), loop.create_future()))
            except BaseException:
                chain.rewind(*head)
                raise
            if not self._queue or len(self._queue) + len(made) >= _MAX_BATCH:
                self._cond.notify()
            self._queue.extend(made)
        self._unresolved += len(made)
        return made

    def mark_synced(self, seq: int) -> None:
        """Record that every record up to `seq` is upstream (monotonic; persisted shortly after)."""
        seq = min(seq, self._last_seq)
        if seq <= self._synced:
            return
        self._synced = seq
        with self._cond:
            self._synced_target = seq
            self._cond.notify()
        with self._tail_lock:
            while self._tail and self._tail[0][0].seq <= seq:
                self._tail.popleft()  # synced: the uploader will not ask for it again (resend reads disk)

    def rewind_synced(self, seq: int) -> None:
        """Move synced_seq back to `seq`: upstream lost records after it and they must be re-sent."""
        seq = max(0, min(seq, self._last_seq))
        if seq >= self._synced:
            return
        self._synced = seq
        with self._cond:
            self._synced_target = seq
            self._cond.notify()

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` on the loop after every commit; returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    # ------------------------------------------------------------------ reading

    @property
    def writer_alive(self) -> bool:
        """Whether the writer thread runs (from open to close). False while open means it died: nothing
        queued will ever commit, which a service watchdog must see (appends alone would only pile up)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def last_seq(self) -> int:
        """The newest committed seq (0 when empty)."""
        return self._last_seq

    @property
    def synced_seq(self) -> int:
        """Every record up to this seq is upstream."""
        return self._synced

    @property
    def backlog(self) -> int:
        """Committed records not yet upstream."""
        return max(0, self._last_seq - self._synced)

    @property
    def oldest_seq(self) -> int:
        """The oldest seq still kept (0 when empty)."""
        return self._oldest

    @property
    def pending(self) -> int:
        """Records appended but not yet committed (or failed): the runtime's back-pressure signal."""
        return self._unresolved

    @property
    def durable_seq(self) -> int:
        """The newest seq known to be on stable storage (fsynced), so it survives a power loss.

        "always": every commit; "batch": advanced by the group fsync, at most `commit_interval_ms`
        behind `last_seq`; "off": never (0), since that mode makes no such promise.
        """
        return self._durable_seq

    @property
    def commits(self) -> int:
        """Transactions committed since open (group commit: usually far fewer than records)."""
        return self._commits

    @property
    def full(self) -> bool:
        """True while the store is over `max_bytes` with nothing synced to delete."""
        return self._full

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def retention(self) -> RetentionOutlook:
        """How long `max_bytes` holds records at the rate seen lately (see `retention_outlook`)."""
        rate = self._history_rate
        samples = self._rate_samples
        if samples:
            first_at, first_seq = samples[0]
            span = time.monotonic() - first_at
            if span >= _RATE_MIN_SPAN_S:
                rate = max(0, self._last_seq - first_seq) / span
        kept = self._last_seq - self._oldest + 1 if self._oldest else 0
        per_record = self._used_bytes / kept if kept >= _MEASURED_FROM_RECORDS else _NOMINAL_RECORD_BYTES
        return retention_outlook(self.max_bytes, self.keep_synced_s, rate, per_record)

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot for `status` replies and the CLI."""
        outlook = self.retention()
        return {
            "state": self.state.value,
            "path": str(self.path),
            "device": self.device,
            "fsync": self.fsync,
            "durable_seq": self._durable_seq,
            "last_seq": self._last_seq,
            "synced_seq": self._synced,
            "backlog": self.backlog,
            "oldest_seq": self._oldest,
            "pending": self._unresolved,
            "commits": self._commits,
            "used_bytes": self._used_bytes,
            "max_bytes": self.max_bytes,
            "full": self._full,
            "last_error": self.last_error,
            "writer_alive": self.writer_alive,
            "retention": {"records_per_s": round(outlook.records_per_s, 2),
                          "bytes_per_record": round(outlook.bytes_per_record),
                          "holds_s": None if outlook.holds_s is None else round(outlook.holds_s),
                          "keep_synced_s": outlook.keep_synced_s, "warning": outlook.warning},
        }

    async def read(self, from_seq: int, limit: int) -> list[AuditRecord]:
        """Up to `limit` committed records with seq >= from_seq, in seq order."""
        rows = await self._read_rows(from_seq, limit)
        return [unpack_row(self.device, row) for row in rows]

    async def _read_rows(self, from_seq: int, limit: int) -> list[tuple[Any, ...]]:
        reader = self._reader
        if reader is None:
            raise AuditUnavailable(f"audit log is not open (state {self.state.value})")
        return await asyncio.wrap_future(reader.submit(self._read_in_thread, from_seq, limit))

    def _read_in_thread(self, from_seq: int, limit: int) -> list[tuple[Any, ...]]:
        try:
            if self._reader_conn is None:
                self._reader_conn = sqlite3.connect(self.path, check_same_thread=False)
                self._reader_conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            cursor = self._reader_conn.execute(f"{_SELECT} WHERE seq >= ? ORDER BY seq LIMIT ?", (from_seq, limit))
            return cursor.fetchall()
        except sqlite3.Error as exc:
            raise AuditUnavailable("cannot read the audit log", exc) from exc

    async def read_wire(self, from_seq: int, limit: int) -> list[tuple[int, str, str, bytes]]:
        """Like `read`, as (seq, kind, hash, wire JSON), for the uploader: from the in-memory tail of
        recent commits when it holds `from_seq` (the steady state), else from disk on the reader thread.

        What it returns is about to be published, and may reach the stream before its ack does: the
        range is reserved from `drop_oldest` first (a drop planned before the reservation is dropped
        itself if it overlaps it), and a drop already committing is let finish before the read, so
        a gap record never names a record the stream may hold.
        """
        while True:
            with self._cond:
                # Only what exists: reserving seqs not yet written would keep them from any later drop.
                self._sent_through = max(self._sent_through, min(from_seq + limit - 1, self._w_last_seq))
                settled = self._drops_taken == self._drops_done
            if settled:
                break
            await asyncio.sleep(0.001)  # poll: a drop taken before the reservation is committing
        with self._tail_lock:
            first = self._tail[0][0].seq if self._tail else 0
            if first and first <= from_seq <= self._tail[-1][0].seq:
                start = from_seq - first
                tail = self._tail
                rows = [(r.seq, r.kind, r.hash, wire)
                        for r, wire in (tail[i] for i in range(start, min(start + limit, len(tail))))]
            else:
                rows = []
        if not rows:
            reader = self._reader
            if reader is None:
                raise AuditUnavailable(f"audit log is not open (state {self.state.value})")
            rows = await asyncio.wrap_future(reader.submit(self._read_wire_in_thread, from_seq, limit))
        if rows:
            self.note_sent(rows[-1][0])  # committed while we read: reserved as well
        return rows

    def _read_wire_in_thread(self, from_seq: int, limit: int) -> list[tuple[int, str, str, bytes]]:
        device = self.device
        records = [unpack_row(device, row) for row in self._read_in_thread(from_seq, limit)]
        return [(record.seq, record.kind, record.hash, encode_record(record)) for record in records]

    def _close_reader(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()
            self._reader_conn = None

    async def _run_in_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the writer thread between transactions (a seam for tests and repair)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise AuditUnavailable("audit log is not open")
            self._calls.append((fn, done))
            self._cond.notify()
        return await asyncio.wrap_future(done)

    # ------------------------------------------------------------------ loop-side callbacks

    def _on_committed(self, done: list[tuple[asyncio.Future[int], int]], last_seq: int) -> None:
        for future, seq in done:
            if not future.done():
                future.set_result(seq)
        self._unresolved -= len(done)
        self._last_seq = max(self._last_seq, last_seq)
        now = time.monotonic()
        if not self._rate_samples or now - self._rate_samples[-1][0] >= _RATE_SAMPLE_S:
            self._rate_samples.append((now, self._last_seq))
        if self.state is LogState.FAILING:
            self.state = LogState.OPEN
            self.failing_since = None
        for listener in list(self._listeners):
            listener()

    def _on_failed(
        self,
        done: list[tuple[asyncio.Future[int], int]],
        failed: list[asyncio.Future[int]],
        exc: AuditUnavailable,
        last_seq: int,
    ) -> None:
        self._on_committed(done, last_seq)
        for future in failed:
            if not future.done():
                future.set_exception(exc)
                # The runtime may drop a future it stopped waiting for; do not warn about it.
                future.exception()
        self._unresolved -= len(failed)
        self.last_error = str(exc)
        if self.state is LogState.OPEN:
            self.state = LogState.FAILING
            self.failing_since = time.monotonic()

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop is closed: nobody is left to await these futures.
            log.warning("audit log: event loop closed before a batch could be resolved")

    # ------------------------------------------------------------------ the writer thread

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            try:
                self._open()
            except BaseException as exc:
                ready.set_exception(exc)
                return
            if self.fsync == "batch":
                # Off the writer's path: a commit never waits behind an fsync (0.3-1 ms here, spikes
                # to tens of ms), which it did when the writer fsynced between two commits.
                self._wal_syncer = threading.Thread(target=self._wal_syncer_main, name=f"audit-fsync-{self.device}",
                                                    daemon=True)
                self._wal_syncer.start()
            ready.set_result(None)
            self._writer_loop()
            self._stop_wal_syncer()
            self._fsync_wal_if_due(force=True)
        finally:
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error as exc:
                    log.warning("audit log: closing the writer connection failed: %s", exc)
                self._conn = None
            self._thread_done.set_result(None)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise AuditUnavailable(f"cannot open audit log {str(self.path)!r}", exc) from exc
        self._conn = conn
        try:
            # A new file only (an existing one keeps its size): see _PAGE_SIZE. Before WAL mode,
            # which fixes it.
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise AuditUnavailable(f"audit log {str(self.path)!r} cannot use WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self.fsync]}")
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            device = _meta(conn, "device")
            if device is None:
                conn.execute(_SET_META, ("device", self.device))
                conn.execute(_SET_META, ("format", "1"))
            conn.execute("COMMIT")
            if device is not None and device != self.device:
                raise SyncError(f"audit log {str(self.path)!r} belongs to device {device!r}, not {self.device!r}")
            synced = int(_meta(conn, "synced_seq") or 0)
            self._deleted_through = int(_meta(conn, "deleted_through") or 0)
            tail = conn.execute(f"{_SELECT} ORDER BY seq DESC LIMIT {_TAIL_CHECK}").fetchall()
            oldest = conn.execute("SELECT MIN(seq) FROM records").fetchone()[0]
            history = conn.execute("SELECT ts FROM records WHERE seq >= ? ORDER BY seq LIMIT 1",
                                   (max(int(oldest or 0), int(tail[0][0]) - _HISTORY_RECORDS) if tail else 0,)
                                   ).fetchone()
            notes = conn.execute("SELECT key, value FROM meta WHERE key LIKE ?", (_NOTE_PREFIX + "%",)).fetchall()
            self._used_bytes = self._measure(conn)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"cannot open audit log {str(self.path)!r}", exc) from exc
        self._notes = {str(key)[len(_NOTE_PREFIX):]: str(value) for key, value in notes}
        records = [unpack_row(self.device, row) for row in reversed(tail)]
        self._check_tail(records)
        if records and history is not None:
            span_s = (records[-1].ts - int(history[0])) / 1e9
            count = records[-1].seq - int(oldest or 0)
            if span_s > 0:
                self._history_rate = min(count, _HISTORY_RECORDS) / span_s
        if records:
            self._w_last_seq, self._w_last_hash = records[-1].seq, records[-1].hash
        else:
            self._w_last_seq = self._deleted_through
        self._oldest = int(oldest or 0)
        # synced_seq can be ahead of the file only if a power loss under fsync="off" lost the tail.
        self._synced_written = min(synced, self._w_last_seq)
        self._synced_target = self._synced_written
        self._chain.rewind(self._w_last_seq + 1, self._w_last_hash)
        self._next_housekeeping = time.monotonic()

    def _check_tail(self, records: list[AuditRecord]) -> None:
        # The newest run of consecutive seqs: a drop that kept protected records can leave holes
        # further back (verify_chain checks those, across their gap records).
        start = len(records) - 1
        while start > 0 and records[start - 1].seq + 1 == records[start].seq:
            start -= 1
        records = records[start:]
        if not records:
            return
        chain = Chain(self.device, records[0].seq, records[0].prev)
        for record in records:
            chain.accept(record, allow_gap=False)
        if records[0].seq == 1 and records[0].prev != GENESIS:
            raise ChainBroken(1, "the first record's prev is not the genesis hash")

    def _writer_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        final_done = False
        while True:
            with self._cond:
                calls: list[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any]]] = []
                while True:
                    calls, self._calls = self._calls, []
                    if calls:
                        break
                    now = time.monotonic()
                    dirty = self._synced_target != self._synced_written
                    if self._stopping:
                        # One last transaction for what is queued and the latest synced_seq, then stop.
                        if (self._queue or dirty) and not final_done:
                            final_done = True
                            break
                        return
                    work = bool(self._queue) or self._drop is not None or dirty
                    if work and now < self._retry_at:
                        # A commit failed recently: let appends gather instead of hammering a sick disk.
                        self._cond.wait(self._retry_at - now)
                        continue
                    if self._queue:
                        break  # at once: what queues during this commit forms the next group
                    if self._drop is not None:
                        break
                    if dirty and now - self._synced_written_at >= _SYNCED_PERSIST_S:
                        break
                    timeouts = [self._next_housekeeping - now]
                    if dirty:
                        timeouts.append(self._synced_written_at + _SYNCED_PERSIST_S - now)
                    wait = min(timeouts)
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                batch: list[_Queued] = []
                drop = None if self._stopping else self._drop
                if drop is not None and min(lo for lo, _ in drop.delete) <= self._sent_through:
                    # Planned before the uploader reserved some of it: plan again after this commit.
                    self._drop = drop = None
                if drop is not None:
                    self._drops_taken += 1
                if not calls:
                    if drop is None and len(self._queue) > _MAX_BATCH:
                        # Bound a transaction's size; the rest goes in the next one at once.
                        batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                    else:
                        # With a drop planned, the gap record must come after everything queued.
                        batch, self._queue = self._queue, []
                    if drop is not None:
                        now_ns = time.time_ns()
                        batch.extend((self._chain.make(GAP_KIND, gap, now_ns), None) for gap in drop.gaps)
                synced = self._synced_target
            if calls:
                self._run_calls(conn, calls)
                continue
            if not batch and drop is None and synced == self._synced_written:
                self._housekeeping(conn)
                continue
            committed = self._commit(conn, batch, synced, drop)
            if drop is not None:
                with self._cond:
                    self._drops_done += 1
            if committed:
                self._backoff = 0.0
                if not self._stopping and self._housekeeping_due(batch, drop):
                    self._housekeeping(conn)

    def _run_calls(
        self,
        conn: sqlite3.Connection,
        calls: list[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any]]],
    ) -> None:
        for fn, done in calls:
            if not done.set_running_or_notify_cancel():
                continue  # the caller stopped waiting (cancelled): nothing to run, nobody to tell
            try:
                done.set_result(fn(conn))
            except BaseException as exc:  # handed to the awaiting caller, not swallowed
                done.set_exception(exc)

    def _commit(
        self, conn: sqlite3.Connection, batch: list[_Queued], synced: int, drop: _DropPlan | None
    ) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
            if drop is not None:
                conn.executemany("DELETE FROM records WHERE seq BETWEEN ? AND ?", drop.delete)
            if batch:
                # Compressed while the writer keeps up; a big commit means a burst, and then ~9 µs a
                # body holding the GIL would slow the decisions themselves (see _storage).
                compress = len(batch) <= _COMPRESS_UP_TO
                rows = [pack_row(record, compress=compress) for record, _ in batch]
                conn.executemany(_INSERT, rows)
                # Between measures of the file, the size is estimated from what was written.
                self._used_bytes += sum(len(row[3]) + _ROW_OVERHEAD_BYTES for row in rows)
            if synced != self._synced_written:
                conn.execute(_SET_META, ("synced_seq", str(synced)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._commit_failed(conn, batch, exc)
            return False
        self._commits += 1
        if self.fsync == "always" and batch:
            self._durable_seq = batch[-1][0].seq
        if synced != self._synced_written:
            self._synced_written = synced
            self._synced_written_at = time.monotonic()
        if drop is not None:
            self._drop = None
            self._oldest = self._min_seq(conn)
            dropped_to = max(hi for _, hi in drop.delete)
            with self._tail_lock:
                # Deleted records must not be served from memory either; what stays is contiguous.
                while self._tail and self._tail[0][0].seq <= dropped_to:
                    self._tail.popleft()
        if batch:
            wires = [(record, encode_record(record)) for record, _ in batch]  # off the loop, once
            with self._tail_lock:
                self._tail.extend(wires)
        if batch:
            self._w_last_seq, self._w_last_hash = batch[-1][0].seq, batch[-1][0].hash
            if self._oldest == 0:
                self._oldest = batch[0][0].seq
        if self.fsync == "batch":
            # After _w_last_seq, and under the lock the syncer takes its `covered` under: either
            # the fsync under way covers this commit, or this marks the WAL dirty for the next one.
            with self._wal_cond:
                if self._wal_dirty_since is None:
                    self._wal_dirty_since = time.monotonic()
                    self._wal_cond.notify()
        if batch:
            done = [(future, record.seq) for record, future in batch if future is not None]
            self._to_loop(self._on_committed, done, self._w_last_seq)
        return True

    def _wal_syncer_main(self) -> None:
        """"batch" mode, its own thread: one fsync of the WAL per `commit_interval_s` while commits wait for one.

        (Checkpoints stay SQLite's, in the commit that crosses its threshold: moved to this thread on a
        connection of their own, as passive checkpoints, they made decision p99 worse, not better.)
        """
        while self._wal_sync_once():
            pass

    def _wal_sync_once(self) -> bool:
        """Wait until an fsync of the WAL is due and do it; False once the syncer is to stop."""
        while True:
            with self._wal_cond:
                while not self._wal_stop:
                    since = self._wal_dirty_since
                    if since is None:
                        self._wal_cond.wait()
                        continue
                    wait = since + self.commit_interval_s - time.monotonic()
                    if wait <= 0:
                        break
                    self._wal_cond.wait(wait)
                if self._wal_stop:
                    return False
            self._fsync_wal_if_due()
            return True

    def _stop_wal_syncer(self) -> None:
        syncer = self._wal_syncer
        if syncer is None:
            return
        with self._wal_cond:
            self._wal_stop = True
            self._wal_cond.notify()
        syncer.join()

    def _fsync_wal_if_due(self, *, force: bool = False) -> None:
        """"batch" mode: one fsync of the WAL for every commit of the last interval (the syncer thread,
        and the writer once more on close)."""
        with self._wal_cond:
            since = self._wal_dirty_since
            if since is None or (not force and time.monotonic() < since + self.commit_interval_s):
                return
            self._wal_dirty_since = None
            # Every commit that returned before now is in the WAL file; one still running is not
            # counted (the writer publishes its seq only after COMMIT returned) and marks the WAL
            # dirty again for the next fsync.
            covered = self._w_last_seq
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            # Checkpointed and removed: everything is in the database file, synced by SQLite.
            self._durable_seq = max(self._durable_seq, covered)
            return
        try:
            _sync_data(fd)
            self.wal_fsyncs += 1
            self._durable_seq = max(self._durable_seq, covered)  # published only after the fsync returned
        except OSError as exc:
            log.warning("audit log: fsync of the WAL failed: %s", exc)
        finally:
            os.close(fd)

    def _commit_failed(self, conn: sqlite3.Connection, batch: list[_Queued], exc: sqlite3.Error) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.warning("audit log: rollback after a failed commit failed: %s", rollback_exc)
        # What is really in the file decides where the chain continues (a failed COMMIT may or may
        # not have reached the disk); if the file cannot even be read, trust what we committed last.
        last_seq, last_hash = self._w_last_seq, self._w_last_hash
        try:
            row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            if row is not None:
                last_seq, last_hash = int(row[0]), unpack_digest(row[1])
        except sqlite3.Error as read_exc:
            log.warning("audit log: cannot read the tail after a failed commit: %s", read_exc)
        with self._cond:
            queued, self._queue = self._queue, []
            self._chain.rewind(last_seq + 1, last_hash)
        self._w_last_seq, self._w_last_hash = last_seq, last_hash
        done: list[tuple[asyncio.Future[int], int]] = []
        failed: list[asyncio.Future[int]] = []
        for record, future in batch + queued:
            if future is None:
                continue
            if record.seq <= last_seq:
                done.append((future, record.seq))
            else:
                failed.append(future)
        error = AuditUnavailable(f"audit commit failed; {len(failed)} record(s) not written", exc)
        log.error("%s", error)
        self._to_loop(self._on_failed, done, failed, error, last_seq)
        self._backoff = min(_BACKOFF_MAX_S, max(_BACKOFF_MIN_S, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    # ------------------------------------------------------------------ retention (writer thread)

    def _housekeeping_due(self, batch: list[_Queued], drop: _DropPlan | None) -> bool:
        # Measuring the file takes three PRAGMAs: after every commit that was a tenth of the
        # writer's time. Between measures the size is estimated from what was written (_commit);
        # the exact measure runs when the estimate nears max_bytes, after a drop, or every
        # _RETENTION_CHECK_S.
        now = time.monotonic()
        if drop is not None or self._full or self._used_bytes >= 0.9 * self.max_bytes or now >= self._next_retention:
            self._next_retention = now + _RETENTION_CHECK_S
            return True
        return False

    def _measure(self, conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _housekeeping(self, conn: sqlite3.Connection) -> None:
        try:
            self._used_bytes = used = self._measure(conn)
            self._next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
            if used <= self.max_bytes and not self._oldest_expired(conn):
                self._full = False
                return
            self._delete_synced(conn, over=used > self.max_bytes)
            self._used_bytes = used = self._measure(conn)
            if used <= self.max_bytes:
                self._full = False
                return
            # Still over: every synced record goes before an unsynced one does (so a gap never
            # names a record the stream holds).
            if self._delete_synced(conn, over=True, all_synced=True):
                self._used_bytes = used = self._measure(conn)
                if used <= self.max_bytes:
                    self._full = False
                    return
            if self.on_full == "block":
                self._full = True
                return
            self._plan_drop(conn, used)
        except sqlite3.Error as exc:
            # Retention failing is not fatal to appends; say so and try again after the next commit.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    log.warning("audit log: rollback after failed retention failed: %s", rollback_exc)
            self.last_error = f"audit retention failed: {type(exc).__name__}: {exc}"
            log.warning("%s", self.last_error)

    def _oldest_expired(self, conn: sqlite3.Connection) -> bool:
        # One primary-key lookup per commit: is the oldest record synced and past keep_synced?
        oldest = self._oldest
        if oldest == 0 or oldest > min(self._synced_target, self._w_last_seq - 1):
            return False
        row = conn.execute("SELECT ts FROM records WHERE seq = ?", (oldest,)).fetchone()
        return row is not None and int(row[0]) < time.time_ns() - int(self.keep_synced_s * 1e9)

    def _delete_synced(self, conn: sqlite3.Connection, *, over: bool, all_synced: bool = False) -> bool:
        with self._cond:
            synced = self._synced_target
        # Never delete the newest record: it carries the chain's head across a restart.
        limit = min(synced, self._w_last_seq - 1)
        oldest = self._oldest
        if limit < oldest or oldest == 0:
            return False
        cutoff_ns = time.time_ns() - int(self.keep_synced_s * 1e9)
        row = conn.execute(
            "SELECT seq FROM records WHERE seq BETWEEN ? AND ? AND ts >= ? ORDER BY seq LIMIT 1",
            (oldest, limit, cutoff_ns),
        ).fetchone()
        expired_to = limit if row is None else int(row[0]) - 1
        delete_to = expired_to
        if over:
            used = self._used_bytes
            count = max(1, self._w_last_seq - oldest + 1)
            excess = used - _RETENTION_TARGET * self.max_bytes
            need = max(1, math.ceil(excess / max(1.0, used / count)))
            delete_to = max(expired_to, min(limit, oldest + need - 1))
        if all_synced:
            delete_to = limit
        if delete_to < oldest:
            return False
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM records WHERE seq <= ?", (delete_to,))
        conn.execute(_SET_META, ("deleted_through", str(delete_to)))
        if synced != self._synced_written:
            conn.execute(_SET_META, ("synced_seq", str(synced)))
        conn.execute("COMMIT")
        self._commits += 1
        self._synced_written = synced
        self._deleted_through = delete_to
        self._oldest = self._min_seq(conn)
        return True

    @staticmethod
    def _min_seq(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT MIN(seq) FROM records").fetchone()[0] or 0)

    def _plan_drop(self, conn: sqlite3.Connection, used: int) -> None:
        with self._cond:
            synced = self._synced_target
        start = max(self._oldest, synced + 1, self._sent_through + 1)
        newest_droppable = self._w_last_seq - 1  # the newest record carries the chain's head: never
        if self._oldest == 0 or newest_droppable < start:
            return
        count = max(1, self._w_last_seq - self._oldest + 1)
        excess = used - _RETENTION_TARGET * self.max_bytes
        need = max(1, math.ceil(excess / max(1.0, used / count)))
        select = "SELECT seq, kind, body, prev, hash FROM records WHERE seq BETWEEN ? AND ?"
        protected = self.protected_kinds
        marks = ", ".join("?" * len(protected))
        where = f" AND kind NOT IN ({marks})" if protected else ""
        rows = conn.execute(f"{select}{where} ORDER BY seq LIMIT ?", (start, newest_droppable, *protected, need)
                            ).fetchall()
        plan = _plan_gaps(self.device, rows, max_runs=_MAX_GAPS_PER_DROP)
        if plan is None or plan.records == 0:
            # Nothing but protected records (and gap records) left to take: the oldest go, whatever their kind.
            rows = conn.execute(f"{select} ORDER BY seq LIMIT ?", (start, newest_droppable, need)).fetchall()
            plan = _plan_gaps(self.device, rows, max_runs=1)
            if plan is None:
                return
        spans = ", ".join(f"{lo}..{hi}" for lo, hi in plan.delete)
        log.warning("audit log full: dropping unsynced records %s", spans)
        with self._cond:
            self._drop = plan

    def note_sent(self, seq: int) -> None:
        """Records up to `seq` are being published (`read_wire` does this itself): they may reach
        the stream before their acks do, so `drop_oldest` must not delete them (nor name them in a gap)."""
        with self._cond:
            self._sent_through = max(self._sent_through, seq)

    # ------------------------------------------------------------------ small persisted notes

    def note(self, key: str) -> str | None:
        """A value kept with `set_note` (read when the log was opened, updated by set_note)."""
        return self._notes.get(key)

    async def set_note(self, key: str, value: str | None) -> None:
        """Keep (or, with None, forget) a small value in the log file, committed before this returns."""

        def write(conn: sqlite3.Connection) -> None:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (_NOTE_PREFIX + key,))
            else:
                conn.execute(_SET_META, (_NOTE_PREFIX + key, value))

        await self._run_in_writer(write)
        if value is None:
            self._notes.pop(key, None)
        else:
            self._notes[key] = value


def _plan_gaps(device: str, rows: list[tuple[Any, ...]], *, max_runs: int) -> _DropPlan | None:
    """Group rows to delete (seq, kind, body, prev, hash; in seq order) into runs and their gaps.

    A run is a range of consecutive seqs; its gap names the run and the hashes around it. A gap
    record among the rows named older losses: its body is written again, merged with a run it
    touches, so nothing it explained goes unexplained.
    """
    runs: list[list[Any]] = []  # [from_seq, to_seq, after_hash, last_hash]
    carried: list[GapBody] = []
    records = 0
    for seq, kind, stored_body, stored_prev, stored_digest in rows:
        prev, digest = unpack_digest(stored_prev), unpack_digest(stored_digest)
        if runs and runs[-1][1] + 1 == seq:
            runs[-1][1], runs[-1][3] = seq, digest
        elif len(runs) < max_runs:
            runs.append([seq, seq, prev, digest])
        else:
            break
        if kind == GAP_KIND:
            body = msgspec.Raw(unpack_body(bytes(stored_body)))
            record = AuditRecord(device=device, seq=seq, ts=0, kind=kind, body=body, prev=prev, hash=digest)
            old = gap_body(record)
            if old is not None:
                carried.append(old)
        else:
            records += 1
    if not runs:
        return None
    spans = [GapBody(from_seq=lo, to_seq=hi, reason="store_full", after_hash=after, last_hash=last)
             for lo, hi, after, last in runs]
    gaps: list[GapBody] = []
    for gap in sorted([*carried, *spans], key=lambda g: (g.from_seq, g.to_seq)):
        if gaps and gaps[-1].to_seq + 1 == gap.from_seq and gaps[-1].last_hash == gap.after_hash:
            # Adjacent and linked (the later range follows the earlier one's last hash): one gap.
            gaps[-1] = msgspec.structs.replace(gaps[-1], to_seq=max(gap.to_seq, gaps[-1].to_seq),
                                               last_hash=gap.last_hash)
        elif gaps and gaps[-1].from_seq <= gap.from_seq and gap.to_seq <= gaps[-1].to_seq:
            continue  # inside one already written
        else:
            gaps.append(gap)
    return _DropPlan(delete=[(lo, hi) for lo, hi, _, _ in runs], gaps=gaps, records=records)


# ---------------------------------------------------------------------- reading a file without the writer


def read_summary(path: Path) -> LogSummary:
    """What an audit log file holds (device, seq range, synced_seq), read-only."""
    conn = _connect_readonly(Path(path))
    try:
        device = _meta(conn, "device") or ""
        first, last, count = conn.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM records").fetchone()
        return LogSummary(
            path=str(path),
            device=device,
            records=int(count),
            first_seq=int(first or 0),
            last_seq=int(last or 0),
            synced_seq=int(_meta(conn, "synced_seq") or 0),
            deleted_through=int(_meta(conn, "deleted_through") or 0),
        )
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {str(path)!r}", exc) from exc
    finally:
        conn.close()


def iter_records(
    path: Path,
    *,
    from_seq: int = 1,
    kinds: Iterable[str] | None = None,
    since_ns: int | None = None,
    to_seq: int | None = None,
) -> Iterator[AuditRecord]:
    """The records of an audit log file in seq order, read-only (for `edge audit tail|query|export`).

    Safe while a runtime is writing the file (WAL readers see committed records only).
    """
    conn = _connect_readonly(Path(path))
    try:
        device = _meta(conn, "device") or ""
        where = ["seq >= ?"]
        args: list[object] = [from_seq]
        if to_seq is not None:
            where.append("seq <= ?")
            args.append(to_seq)
        kind_list = sorted(set(kinds)) if kinds is not None else None
        if kind_list is not None:
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            args.extend(kind_list)
        if since_ns is not None:
            where.append("ts >= ?")
            args.append(since_ns)
        cursor = conn.execute(f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq", args)
        while True:
            rows = cursor.fetchmany(1000)
            if not rows:
                return
            for row in rows:
                yield unpack_row(device, row)
    except sqlite3.Error as exc:
        raise AuditUnavailable(f"cannot read audit log {str(path)!r}", exc) from exc
    finally:
        conn.close()

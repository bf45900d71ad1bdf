"""Verification: the local chain (`verify_chain`) and the upstream stream (`verify_upstream`).

Both walk records in order and re-check every hash, every `prev` link and seq continuity. A range
of missing seqs is fine only when a `gap` record names it. Locally, records before the oldest are
fine when the file's `deleted_through` mark says retention removed them.

Limits of a hash chain, said plainly: rewriting the *newest* record (or the newest few, with their
hashes recomputed) cannot be detected from the file alone; `verify_upstream` on the stream, which
holds an independent copy, can.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from ._errors import SyncError
from ._log import iter_records, read_summary
from ._record import GENESIS, AuditRecord, decode_record, gap_range, hash_ok

_MAX_LISTED = 1000  # seqs listed per problem kind in a report; the counts are always complete


class ChainReport(msgspec.Struct, frozen=True):
    """The result of verifying a local audit log file."""

    path: str
    device: str
    records: int
    first_seq: int
    last_seq: int
    ok: bool
    first_bad_seq: int | None = None
    problem: str = ""
    gaps: list[tuple[int, int]] = []

    def summary(self) -> str:
        """One line for the CLI."""
        span = f"seqs {self.first_seq}..{self.last_seq}" if self.records else "no records"
        gaps = f", {len(self.gaps)} explained gap(s)" if self.gaps else ""
        if self.ok:
            return f"{self.path}: OK: {self.records} records ({span}) of device {self.device}{gaps}"
        return f"{self.path}: BROKEN at seq {self.first_bad_seq}: {self.problem} ({self.records} records, {span})"


class UpstreamReport(msgspec.Struct, frozen=True):
    """The result of verifying one device's records in the stream."""

    device: str
    records: int
    first_seq: int
    last_seq: int
    duplicates: int
    out_of_order: int
    missing: list[tuple[int, int]]
    missing_count: int
    explained: list[tuple[int, int]]
    chain_breaks: list[int]
    bad_hash: list[int]
    conflicts: list[int]
    undecodable: int
    ok: bool

    def summary(self) -> str:
        """One line for the CLI and the demo."""
        verdict = "OK" if self.ok else "PROBLEMS"
        span = f"seqs {self.first_seq}..{self.last_seq}" if self.records else "no records"
        parts = [
            f"{self.device}: {verdict}: {self.records} records ({span})",
            f"{self.missing_count} missing",
            f"{len(self.explained)} explained gap(s)",
            f"{self.duplicates} duplicate(s)",
            f"{self.out_of_order} out of order",
            f"{len(self.chain_breaks)} chain break(s)",
        ]
        if self.bad_hash:
            parts.append(f"{len(self.bad_hash)} bad hash(es)")
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} conflicting record(s)")
        if self.undecodable:
            parts.append(f"{self.undecodable} undecodable message(s)")
        return ", ".join(parts)


def _covered(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """True if every seq in start..end lies in the union of `spans` (sorted by start)."""
    at = start
    for lo, hi in spans:
        if lo > at:
            break
        at = max(at, hi + 1)
        if at > end:
            return True
    return at > end


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def verify_chain(path: Path) -> ChainReport:
    """Re-verify every record of a local audit log file (read-only; safe while a runtime writes it).

    Names the first seq where the chain does not hold: a record whose hash does not match its
    contents; a record whose successor's `prev` does not match its hash (that record, or its
    successor's `prev`, was altered); missing seqs no gap record explains.
    """
    path = Path(path)
    info = read_summary(path)
    gaps = _merge([span for r in iter_records(path, kinds=["gap"]) if (span := gap_range(r)) is not None])
    records = 0
    first_seq = last_seq = 0
    bad: tuple[int, str] | None = None
    previous: AuditRecord | None = None
    for record in iter_records(path):
        records += 1
        if previous is None:
            first_seq = record.seq
            if record.seq == 1 and record.prev != GENESIS:
                bad = bad or (1, "the first record's prev is not the genesis hash")
            elif record.seq > 1 and record.seq - 1 > info.deleted_through:
                start = info.deleted_through + 1
                if not _covered(start, record.seq - 1, gaps):
                    bad = bad or (start, f"seqs {start}..{record.seq - 1} are missing and not explained")
        if not hash_ok(record):
            bad = bad or (record.seq, "hash does not match the record's contents")
        elif previous is not None:
            if record.seq == previous.seq + 1:
                if record.prev != previous.hash:
                    bad = bad or (
                        previous.seq,
                        f"hash of seq {previous.seq} does not match prev of seq {record.seq} "
                        f"(seq {previous.seq} or the prev of seq {record.seq} was altered)",
                    )
            elif not _covered(previous.seq + 1, record.seq - 1, gaps):
                bad = bad or (
                    previous.seq + 1,
                    f"seqs {previous.seq + 1}..{record.seq - 1} are missing and not explained by a gap record",
                )
        last_seq = record.seq
        previous = record
    return ChainReport(
        path=str(path),
        device=info.device,
        records=records,
        first_seq=first_seq,
        last_seq=last_seq,
        ok=bad is None,
        first_bad_seq=None if bad is None else bad[0],
        problem="" if bad is None else bad[1],
        gaps=gaps,
    )


class _DeviceTally:
    """One device's records as they arrive from the stream, in stream order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.records = 0
        self.max_seq = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.undecodable = 0
        self.hashes: dict[int, str] = {}
        self.prevs: dict[int, str] = {}
        self.gaps: list[tuple[int, int]] = []
        self.bad_hash: list[int] = []
        self.conflicts: list[int] = []

    def add(self, record: AuditRecord) -> None:
        self.records += 1
        seq = record.seq
        if not hash_ok(record):
            self.bad_hash.append(seq)
            return
        known = self.hashes.get(seq)
        if known is not None:
            if known == record.hash:
                self.duplicates += 1
            else:
                self.conflicts.append(seq)
            return
        if seq < self.max_seq:
            self.out_of_order += 1
        self.max_seq = max(self.max_seq, seq)
        self.hashes[seq] = record.hash
        self.prevs[seq] = record.prev
        span = gap_range(record)
        if span is not None:
            self.gaps.append(span)

    def report(self) -> UpstreamReport:
        gaps = _merge(self.gaps)
        seqs = sorted(self.hashes)
        missing: list[tuple[int, int]] = []
        explained: list[tuple[int, int]] = []
        breaks: list[int] = []
        expected = 1
        for seq in seqs:
            if seq > expected:
                span = (expected, seq - 1)
                (explained if _covered(expected, seq - 1, gaps) else missing).append(span)
            elif seq == 1:
                if self.prevs[seq] != GENESIS:
                    breaks.append(seq)
            if seq > 1 and seq - 1 in self.hashes and self.prevs[seq] != self.hashes[seq - 1]:
                breaks.append(seq)
            expected = seq + 1
        problems = missing or breaks or self.bad_hash or self.conflicts or self.duplicates or self.out_of_order
        return UpstreamReport(
            device=self.device,
            records=self.records,
            first_seq=seqs[0] if seqs else 0,
            last_seq=seqs[-1] if seqs else 0,
            duplicates=self.duplicates,
            out_of_order=self.out_of_order,
            missing=missing[:_MAX_LISTED],
            missing_count=sum(hi - lo + 1 for lo, hi in missing),
            explained=explained[:_MAX_LISTED],
            chain_breaks=breaks[:_MAX_LISTED],
            bad_hash=self.bad_hash[:_MAX_LISTED],
            conflicts=self.conflicts[:_MAX_LISTED],
            undecodable=self.undecodable,
            ok=not problems and not self.undecodable,
        )


async def verify_upstream(
    js: JetStreamContext, stream: str = "EDGE_AUDIT", device: str | None = None, *, idle_timeout: float = 10.0
) -> dict[str, UpstreamReport]:
    """Read `audit.<device>` (or every `audit.*`) from `stream` and check each device's records.

    Per device: seq continuity from 1 (missing ranges a gap record names are "explained"),
    duplicates, records out of seq order, the hash of every record and the `prev` link between
    consecutive seqs. Reads the messages present when it starts with one ordered push consumer;
    raises SyncError if the stream stops delivering for `idle_timeout` seconds.
    """
    subject = f"audit.{device}" if device else "audit.>"
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == 10059:
            raise SyncError(f"stream {stream!r} does not exist") from None
        return {}
    target = int(last.seq or 0)
    tallies: dict[str, _DeviceTally] = {}
    done = False
    progress = asyncio.Event()

    def tally_for(name: str) -> _DeviceTally:
        tally = tallies.get(name)
        if tally is None:
            tally = tallies[name] = _DeviceTally(name)
        return tally

    async def on_msg(msg: Msg) -> None:
        nonlocal done
        progress.set()
        try:
            record = decode_record(msg.data)
        except SyncError:
            tally_for(msg.subject.removeprefix("audit.")).undecodable += 1
        else:
            tally_for(record.device).add(record)
        if _stream_seq(msg) >= target:
            done = True

    sub = await js.subscribe(subject, stream=stream, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        while not done:
            progress.clear()
            try:
                async with asyncio.timeout(idle_timeout):
                    await progress.wait()
            except TimeoutError:
                raise SyncError(f"stream {stream!r} stopped delivering {subject} after {idle_timeout}s") from None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return {name: tally.report() for name, tally in sorted(tallies.items())}


def _stream_seq(msg: Msg) -> int:
    # The reply subject carries the stream sequence: "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>..."
    # (9 tokens), or with domain and account hash in front (v2, 11+ tokens). Parsed by hand: the
    # full metadata object costs more than everything else this loop does per message.
    tokens = msg.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])

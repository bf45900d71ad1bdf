"""Verification: the local chain (`verify_chain`) and the upstream stream (`verify_upstream`).

Both walk records in seq order and re-check every hash, every `prev` link and seq continuity. A
range of missing seqs is fine only when gap records name it *and* link it: the first gap over the
range must name the hash of the kept record before it (`after_hash`), the kept record after it
must name the gap's `last_hash` as its `prev` (chained gaps hand the hash on). Locally, records
before the oldest are fine when the file's `deleted_through` mark says retention removed them
(their hashes are then not known, so the first gap after them is taken as it stands).

Upstream, records are checked per *subject*: everything on `audit.<device>` must be a record of
that device (a record of another device, or anything that is not a record, is a foreign message
and named by its stream seq). With the device's public key, every signature (`Edge-Signer`,
`Edge-Signature`, `edge-audit-v1` over device, seq and hash) must verify with that key, and the
device's newest record must carry one: records after the last signed one are an *unsigned tail*,
which fails at its first seq. A gap record that names seqs the stream holds did not come from
`drop_oldest` (which only drops records never synced) and is reported too.

Limits, said plainly. The local file has no key: whoever can write it can rewrite the records
that were never synced (the whole unsynced suffix, with hashes recomputed, and gap records with
the right hashes) and `verify_chain` cannot tell. What the stream holds is fixed once published;
what was signed cannot be altered or extended by anyone without the device key.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from ._errors import SyncError
from ._log import iter_records, read_summary
from ._record import GENESIS, AuditRecord, GapBody, decode_record, gap_body, hash_ok
from ._signing import H_SIGNATURE, H_SIGNER, audit_signature_ok

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
    """The result of verifying one device's subject (`audit.<device>`) in the stream.

    `first_bad_seq` and `problem` name the first record seq that fails, whatever the reason;
    `foreign` lists the stream seqs of messages on the subject that are not this device's records.
    """

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
    first_bad_seq: int | None = None
    problem: str = ""
    foreign: list[int] = []
    key: str = ""  # the public key signatures were checked with ("" when none was given)
    signers: list[str] = []  # the keys the records' Edge-Signer headers name
    signed: int = 0  # records whose signature verifies
    bad_signatures: list[int] = []
    unsigned_tail: tuple[int, int] | None = None
    gap_problems: list[int] = []  # seqs of gap records naming seqs the stream holds

    def summary(self) -> str:
        """One line for the CLI and the demo: the verdict and first bad seq, then the counts."""
        span = f"seqs {self.first_seq}..{self.last_seq}" if self.records else "no records"
        if self.ok:
            head = f"{self.device}: OK: {self.records} records ({span})"
        elif self.first_bad_seq is not None:
            head = (f"{self.device}: PROBLEMS: first bad seq {self.first_bad_seq}: {self.problem}; "
                    f"{self.records} records ({span})")
        else:
            head = f"{self.device}: PROBLEMS: {self.problem}; {self.records} records ({span})"
        parts = [
            head,
            f"{self.missing_count} missing",
            f"{len(self.explained)} explained gap(s)",
            f"{self.duplicates} duplicate(s)",
            f"{self.out_of_order} out of order",
            f"{len(self.chain_breaks)} chain break(s)",
        ]
        if self.key:
            parts.append(f"{self.signed} signed by {self.key[:12]}…")
        elif self.signers:
            parts.append(f"{self.signed} signed (not checked against a known key: use --key)")
        if self.bad_signatures:
            parts.append(f"{len(self.bad_signatures)} bad signature(s)")
        if self.unsigned_tail:
            parts.append(f"unsigned tail {self.unsigned_tail[0]}..{self.unsigned_tail[1]}")
        if self.bad_hash:
            parts.append(f"{len(self.bad_hash)} bad hash(es)")
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} conflicting record(s)")
        if self.foreign:
            parts.append(f"{len(self.foreign)} foreign message(s) (first at stream seq {self.foreign[0]})")
        if self.undecodable:
            parts.append(f"{self.undecodable} undecodable message(s)")
        return ", ".join(parts)


# ---------------------------------------------------------------------- the walk (pure)


class _Walk(msgspec.Struct):
    """What walking one device's kept records in seq order found."""

    missing: list[tuple[int, int]]
    explained: list[tuple[int, int]]
    breaks: list[tuple[int, str]]  # (seq, problem), in seq order
    blamed: dict[int, int] = {}  # a break at seq whose link to the record before failed: that record's seq


def _walk(
    seqs: Iterable[int], prevs: Mapping[int, str], hashes: Mapping[int, str], gaps: Iterable[GapBody],
    *, deleted_through: int = 0,
) -> _Walk:
    """Check seq continuity and every `prev` link of kept records, across the gaps that link them.

    `seqs` in increasing order; records up to `deleted_through` are known deleted (not checked).
    """
    by_start: dict[int, list[GapBody]] = {}
    for gap in gaps:
        by_start.setdefault(gap.from_seq, []).append(gap)
    ordered = sorted({g.from_seq for gs in by_start.values() for g in gs})
    result = _Walk(missing=[], explained=[], breaks=[])
    expected = deleted_through + 1
    last_hash: str | None = GENESIS if deleted_through == 0 else None  # None: not known here
    for seq in seqs:
        if seq < expected:
            continue
        if seq > expected:
            at, link, why = _bridge(expected, seq - 1, last_hash, by_start, ordered)
            if at > expected:
                result.explained.append((expected, at - 1))
            if at <= seq - 1:
                result.missing.append((at, seq - 1))
                result.breaks.append((at, why or f"seqs {at}..{seq - 1} are missing and not explained by a gap record"))
                link = None  # the link into `seq` cannot be checked
            last_hash = link
        if last_hash is not None and prevs[seq] != last_hash:
            if seq == 1:
                problem = "the first record's prev is not the genesis hash"
            elif seq == expected and seq - 1 in hashes:
                problem = (f"hash of seq {seq - 1} does not match prev of seq {seq} "
                           f"(seq {seq - 1} or the prev of seq {seq} was altered)")
                result.blamed[seq] = seq - 1
            else:
                problem = f"prev of seq {seq} does not match the last_hash of the gap record before it"
            result.breaks.append((seq, problem))
        last_hash = hashes[seq]
        expected = seq + 1
    return result


def _bridge(
    start: int, end: int, link: str | None, by_start: dict[int, list[GapBody]], ordered: list[int]
) -> tuple[int, str | None, str]:
    """Follow gaps from `start` (after a record with hash `link`, None if unknown) towards `end`.

    Returns the first seq not explained, the hash the chain continues with, and why it stopped.
    """
    at = start
    why = ""
    while at <= end:
        candidates = [g for g in by_start.get(at, []) if g.to_seq <= end]
        if link is None:
            # After records deleted by retention the hash before is not known: a gap may also
            # begin among those deleted records.
            candidates += [g for s in ordered if s < at for g in by_start[s] if at <= g.to_seq <= end]
        linked = [g for g in candidates if link is None or g.after_hash == link]
        if not linked:
            if candidates:
                why = (f"the gap record naming seqs {candidates[0].from_seq}..{candidates[0].to_seq} does not follow "
                       f"the hash of seq {at - 1} (a forged or altered gap)")
            break
        gap = max(linked, key=lambda g: g.to_seq)
        at, link = gap.to_seq + 1, gap.last_hash
    return at, link, why


# ---------------------------------------------------------------------- the local file


def verify_chain(path: Path) -> ChainReport:
    """Re-verify every record of a local audit log file (read-only; safe while a runtime writes it).

    Names the first seq where the chain does not hold: a record whose hash does not match its
    contents; a record whose `prev` does not match the hash before it (directly, or through the gap
    records between); missing seqs no linked gap record explains; a gap record naming a range that
    still holds records.
    """
    path = Path(path)
    info = read_summary(path)
    gap_records = [(r.seq, g) for r in iter_records(path, kinds=["gap"]) if (g := gap_body(r)) is not None]
    gaps = [g for _, g in gap_records]
    prevs: dict[int, str] = {}
    hashes: dict[int, str] = {}
    bad: list[tuple[int, str]] = []
    first_seq = last_seq = kept = 0
    for record in iter_records(path):
        if not first_seq:
            first_seq = record.seq
        last_seq = record.seq
        kept += 1
        if not hash_ok(record):
            bad.append((record.seq, "hash does not match the record's contents"))
            continue  # its links say nothing: it is reported as itself
        prevs[record.seq] = record.prev
        hashes[record.seq] = record.hash
    seqs = sorted(prevs)
    walk = _walk(seqs, prevs, hashes, gaps, deleted_through=info.deleted_through)
    # Locally the first bad seq of a broken link is the record before it (the usual rewrite).
    bad += [(walk.blamed.get(seq, seq), problem) for seq, problem in walk.breaks]
    for seq, gap in gap_records:
        inside = _first_within(seqs, gap.from_seq, gap.to_seq)
        if inside is not None:
            bad.append((seq, f"gap record names seqs {gap.from_seq}..{gap.to_seq} but seq {inside} is still kept"))
    first = min(bad, key=lambda b: b[0], default=None)  # the first added wins a tie: the record's own hash
    return ChainReport(
        path=str(path),
        device=info.device,
        records=kept,
        first_seq=first_seq,
        last_seq=last_seq,
        ok=first is None,
        first_bad_seq=None if first is None else first[0],
        problem="" if first is None else first[1],
        gaps=_merge(walk.explained),
    )


def _first_within(seqs: list[int], lo: int, hi: int) -> int | None:
    """The first of the sorted `seqs` in lo..hi, if any."""
    at = bisect.bisect_left(seqs, lo)
    return seqs[at] if at < len(seqs) and seqs[at] <= hi else None


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


# ---------------------------------------------------------------------- the stream


class _Copy(msgspec.Struct):
    record: AuditRecord
    signed: bool  # carries a signature that verifies (with the key, or its own signer without one)
    position: int  # its stream seq (the first one, for a record stored more than once)


class _DeviceTally:
    """One subject's messages as they arrive from the stream, in stream order."""

    def __init__(self, device: str, key: str | None) -> None:
        self.device = device
        self.key = key
        self.records = 0
        self.duplicates = 0
        self.undecodable = 0
        self.copies: dict[int, list[_Copy]] = {}  # seq -> its distinct records (one, unless conflicting)
        self.bad_hash: list[int] = []
        self.conflicts: list[int] = []
        self.foreign: list[int] = []  # stream seqs
        self.bad_signatures: list[int] = []
        self.signers: dict[str, None] = {}
        self.repeated: list[int] = []  # seqs seen again (first few)

    def add(self, record: AuditRecord, headers: Mapping[str, str] | None, stream_seq: int) -> None:
        if record.device != self.device:
            self.foreign.append(stream_seq)  # a record of another device on this device's subject
            return
        self.records += 1
        seq = record.seq
        if not hash_ok(record):
            self.bad_hash.append(seq)
            return
        signed = self._signature(record, headers or {})
        copies = self.copies.setdefault(seq, [])
        for copy in copies:
            if copy.record.hash == record.hash:
                self.duplicates += 1
                if len(self.repeated) < _MAX_LISTED:
                    self.repeated.append(seq)
                copy.signed = copy.signed or signed
                return
        if copies and seq not in self.conflicts:
            self.conflicts.append(seq)
        copies.append(_Copy(record, signed, stream_seq))

    def _chosen(self) -> dict[int, _Copy]:
        """One copy per seq: the one the chain goes through (the next record's prev names it), else
        a signed one, else the first. A forged copy stored first does not decide the order."""
        chosen: dict[int, _Copy] = {}
        after: _Copy | None = None
        for seq in sorted(self.copies, reverse=True):
            copies = self.copies[seq]
            pick = None
            if after is not None and after.record.seq == seq + 1:
                pick = next((c for c in copies if c.record.hash == after.record.prev), None)
            pick = pick or next((c for c in copies if c.signed), None) or copies[0]
            chosen[seq] = after = pick
        return chosen

    def _signature(self, record: AuditRecord, headers: Mapping[str, str]) -> bool:
        signer, signature = headers.get(H_SIGNER, ""), headers.get(H_SIGNATURE, "")
        if not signature and not signer:
            return False
        self.signers.setdefault(signer[:64])
        key = self.key or signer
        if (self.key and signer != self.key) or not audit_signature_ok(key, record.device, record.seq, record.hash,
                                                                       signature):
            self.bad_signatures.append(record.seq)
            return False
        return True

    def report(self) -> UpstreamReport:
        chosen = self._chosen()
        seqs = sorted(chosen)
        prevs = {s: c.record.prev for s, c in chosen.items()}
        hashes = {s: c.record.hash for s, c in chosen.items()}
        gap_records = [(s, g) for s, c in chosen.items() if (g := gap_body(c.record)) is not None]
        out_of_order, highest = 0, 0
        late: list[int] = []
        for copy in sorted(chosen.values(), key=lambda c: c.position):
            if copy.record.seq < highest:
                out_of_order += 1
                if len(late) < _MAX_LISTED:
                    late.append(copy.record.seq)
            highest = max(highest, copy.record.seq)
        walk = _walk(seqs, prevs, hashes, [g for _, g in gap_records])
        # In order of precedence for one seq: what is wrong with the record itself comes first.
        problems: list[tuple[int, str]] = [(s, "hash does not match the record's contents") for s in self.bad_hash]
        problems += [(s, "two different records under this seq") for s in self.conflicts]
        problems += walk.breaks
        problems += [(s, "signature does not verify" + (f" with {self.key}" if self.key else " with its Edge-Signer"))
                     for s in self.bad_signatures]
        gap_problems = []
        for seq, gap in gap_records:
            held = _first_within(seqs, gap.from_seq, gap.to_seq)
            if held is not None:
                gap_problems.append(seq)
                problems.append((seq, f"gap record names seqs {gap.from_seq}..{gap.to_seq} but the stream holds "
                                      f"seq {held}: not a gap drop_oldest writes"))
        signers = list(self.signers)
        if not self.key and len(signers) > 1:
            problems.append((seqs[0] if seqs else 0, f"records signed by {len(signers)} different keys"))
        unsigned_tail: tuple[int, int] | None = None
        if self.key and seqs:
            last_signed = max((s for s in seqs if chosen[s].signed), default=0)
            if last_signed < seqs[-1]:
                first_unsigned = next(s for s in seqs if s > last_signed)
                unsigned_tail = (first_unsigned, seqs[-1])
                problems.append((first_unsigned, f"unsigned tail: no record from seq {first_unsigned} to the newest "
                                                 f"({seqs[-1]}) is signed by the device key"))
        problems += [(s, "in the stream more than once") for s in self.repeated[:1]]
        problems += [(s, "out of seq order in the stream") for s in late[:1]]
        first = min(problems, key=lambda p: p[0], default=None)
        foreign_problem = ""
        if self.foreign:
            foreign_problem = (f"{len(self.foreign)} message(s) on audit.{self.device} that are not its records "
                               f"(first at stream seq {self.foreign[0]})")
        return UpstreamReport(
            device=self.device,
            records=self.records,
            first_seq=seqs[0] if seqs else 0,
            last_seq=seqs[-1] if seqs else 0,
            duplicates=self.duplicates,
            out_of_order=out_of_order,
            missing=walk.missing[:_MAX_LISTED],
            missing_count=sum(hi - lo + 1 for lo, hi in walk.missing),
            explained=_merge(walk.explained)[:_MAX_LISTED],
            chain_breaks=sorted({s for s, _ in walk.breaks if s not in {lo for lo, _ in walk.missing}})[:_MAX_LISTED],
            bad_hash=self.bad_hash[:_MAX_LISTED],
            conflicts=self.conflicts[:_MAX_LISTED],
            undecodable=self.undecodable,
            ok=first is None and not foreign_problem,
            first_bad_seq=None if first is None else first[0],
            problem=first[1] if first is not None else foreign_problem,  # foreign messages: see `foreign`
            foreign=self.foreign[:_MAX_LISTED],
            key=self.key or "",
            signers=signers[:10],
            signed=sum(1 for c in chosen.values() if c.signed),
            bad_signatures=self.bad_signatures[:_MAX_LISTED],
            unsigned_tail=unsigned_tail,
            gap_problems=gap_problems[:_MAX_LISTED],
        )



async def verify_upstream(
    js: JetStreamContext, stream: str = "EDGE_AUDIT", device: str | None = None, *, idle_timeout: float = 10.0,
    key: str | None = None,
) -> dict[str, UpstreamReport]:
    """Read `audit.<device>` (or every `audit.*`) from `stream` and check each subject's records.

    Per subject: every message must be a record of the subject's device; seq continuity from 1
    (missing ranges linked gap records name are "explained"), duplicates, records out of seq
    order, the hash of every record and every `prev` link, across gaps too. With `key` (the
    device's public nkey), every signature must verify with it and the newest record must be
    signed (an unsigned tail fails at its first seq); without one, signatures are checked against
    the key they name. Reads the messages present when it starts with one ordered push consumer;
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
            tally = tallies[name] = _DeviceTally(name, key)
        return tally

    async def on_msg(msg: Msg) -> None:
        nonlocal done
        progress.set()
        stream_seq = _stream_seq(msg)
        tally = tally_for(msg.subject.removeprefix("audit."))
        try:
            record = decode_record(msg.data)
        except SyncError:
            tally.undecodable += 1
            tally.foreign.append(stream_seq)
        else:
            tally.add(record, msg.headers, stream_seq)
        if stream_seq >= target:
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

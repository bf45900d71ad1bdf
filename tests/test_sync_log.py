"""AuditLog against real SQLite files: seqs, group commit, recovery, tampering, failures, retention."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from pathlib import Path

import msgspec
import pytest

import sync._log as sync_log
from sync import (
    GAP_KIND,
    AuditFull,
    AuditLog,
    AuditUnavailable,
    ChainBroken,
    LogState,
    iter_records,
    read_summary,
    record_hash,
    verify_chain,
)
from tests.polling import wait_until

# Incompressible, so that a record's size on disk is what the retention tests count on.
BODY = {"reading": random.Random(7).randbytes(300).hex(), "rms": 4.2, "label": "normal"}


def seqs_in(path: Path) -> list[int]:
    return [r.seq for r in iter_records(path)]


async def test_seqs_are_gap_free_and_in_call_order_across_concurrent_appenders(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:

        async def appender(name: str) -> list[int]:
            seqs = []
            for i in range(50):
                seqs.append(await log.append("decision", {"by": name, "i": i}))
            return seqs

        results = await asyncio.gather(*(appender(f"t{n}") for n in range(8)))
        burst = await asyncio.gather(*[log.append("burst", {"i": i}) for i in range(100)])
        for seqs in results:
            assert seqs == sorted(seqs)
        everything = sorted(s for seqs in results for s in seqs)
        assert everything == list(range(1, 401))
        assert burst == list(range(401, 501))  # futures resolve with the seq assigned at call time
        assert log.last_seq == 500 and log.pending == 0
    assert seqs_in(path) == list(range(1, 501))
    assert verify_chain(path).ok


async def test_group_commit_puts_many_appends_in_few_transactions(tmp_path: Path) -> None:
    async with AuditLog(tmp_path / "batch.db", "gw-1", fsync="batch", commit_interval_ms=5) as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(3000)])
        assert log.commits <= 30, log.commits  # 100+ records a transaction on average
    # One awaited append at a time cannot share: each is its own transaction.
    async with AuditLog(tmp_path / "always.db", "gw-1", fsync="always") as log:
        for _ in range(20):
            await log.append("decision", BODY)
        assert log.commits == 20
        assert log.durable_seq == log.last_seq == 20  # "always": each resolved commit is fsynced
    async with AuditLog(tmp_path / "off.db", "gw-1", fsync="off") as log:
        await log.append("decision", BODY)
        assert log.durable_seq == 0  # "off" promises no durability


async def test_batch_mode_fsyncs_the_wal_once_per_interval_not_per_commit(tmp_path: Path) -> None:
    """"batch": commits resolve at once; one fsync of the WAL covers every commit of an interval."""
    interval_ms = 50
    async with AuditLog(tmp_path / "b.db", "gw-1", fsync="batch", commit_interval_ms=interval_ms) as log:
        started = time.monotonic()
        for _ in range(200):  # one at a time: each is its own commit, none waits for an fsync
            await log.append("decision", BODY)
        elapsed = time.monotonic() - started
        assert log.commits >= 200
        # At most one fsync per interval elapsed (plus the one in flight), far fewer than commits.
        assert log.wal_fsyncs <= elapsed / (interval_ms / 1000) + 2
        # Nothing is left unsynced for long: the fsync for the last commits comes due by itself.
        # (durable_seq is published by the writer thread only after its fsync returned.)
        await wait_until(lambda: log.durable_seq == log.last_seq, within=5, what="the due group fsync")
        assert log.wal_fsyncs >= 1


async def test_batch_mode_commits_go_on_while_an_fsync_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk's fsync holds no commit back (it runs on a thread of its own), and durable_seq
    waits for it: what it claims is on stable storage is only what an fsync that returned covered."""
    entered, release = threading.Event(), threading.Event()

    def hanging_sync(fd: int) -> None:
        entered.set()
        release.wait(10)

    monkeypatch.setattr(sync_log, "_sync_data", hanging_sync)
    async with AuditLog(tmp_path / "b.db", "gw-1", fsync="batch", commit_interval_ms=1) as log:
        await log.append("decision", BODY)
        await asyncio.to_thread(entered.wait, 10)  # the first group fsync is stuck in the "disk"
        assert log.durable_seq == 0
        for _ in range(50):  # each one committed (resolved) while the fsync hangs
            await log.append("decision", BODY)
        assert log.last_seq == 51 and log.durable_seq == 0
        release.set()
        await wait_until(lambda: log.durable_seq == log.last_seq == 51, within=5, what="the fsyncs after the hang")


async def test_callable_body_receives_the_seq(tmp_path: Path) -> None:
    async with AuditLog(tmp_path / "a.db", "gw-1") as log:
        await log.append("start", {})
        seq = await log.append("decision", lambda s: {"audit_seq": s})
        [record] = await log.read(seq, 1)
        assert msgspec.json.decode(bytes(record.body)) == {"audit_seq": 2}


async def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:
        for i in range(10):
            await log.append("decision", {"i": i})
        log.mark_synced(4)
    async with AuditLog(path, "gw-1") as log:
        assert (log.last_seq, log.synced_seq, log.oldest_seq) == (10, 4, 1)
        assert await log.append("start", {}) == 11
        eleven, ten = (await log.read(11, 1))[0], (await log.read(10, 1))[0]
        assert eleven.prev == ten.hash
    assert verify_chain(path).ok
    with pytest.raises(Exception, match="belongs to device"):
        async with AuditLog(path, "gw-2"):
            pass


async def test_mark_synced_is_monotonic_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:
        for _ in range(10):
            await log.append("k", {})
        log.mark_synced(7)
        log.mark_synced(3)
        assert log.synced_seq == 7 and log.backlog == 3
        log.mark_synced(99)  # never beyond what is committed
        assert log.synced_seq == 10
        log.rewind_synced(6)  # the explicit way back, for an upstream that lost records
        assert log.synced_seq == 6
    assert read_summary(path).synced_seq == 6


async def _tampered(tmp_path: Path, sql: str, args: tuple[object, ...]) -> Path:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:
        for i in range(20):
            await log.append("decision", {"i": i})
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)
    return path


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        ("UPDATE records SET body = ? WHERE seq = 7", (b'{"i":666}',)),
        ("UPDATE records SET hash = ? WHERE seq = 7", ("ab" * 32,)),
        ("UPDATE records SET ts = ts + 1 WHERE seq = 7", ()),
        ("UPDATE records SET kind = 'approval' WHERE seq = 7", ()),
        ("UPDATE records SET prev = ? WHERE seq = 7", ("cd" * 32,)),
        ("DELETE FROM records WHERE seq = 7", ()),
    ],
)
async def test_tampering_names_the_seq(tmp_path: Path, sql: str, args: tuple[object, ...]) -> None:
    path = await _tampered(tmp_path, sql, args)
    report = verify_chain(path)
    assert not report.ok
    assert report.first_bad_seq == 7, report.problem
    assert "seq 7" in report.summary() or "7" in report.summary()


async def test_a_rewritten_record_with_a_recomputed_hash_is_named(tmp_path: Path) -> None:
    path = await _tampered(tmp_path, "SELECT 1", ())
    with sqlite3.connect(path) as conn:
        ts, stored_prev = conn.execute("SELECT ts, prev FROM records WHERE seq = 7").fetchone()
        body = b'{"i":666}'
        digest = record_hash("gw-1", 7, ts, "decision", body, stored_prev.hex())
        conn.execute("UPDATE records SET body = ?, hash = ? WHERE seq = 7", (body, digest))
    report = verify_chain(path)
    assert report.first_bad_seq == 7 and "prev of seq 8" in report.problem


async def test_opening_a_log_with_a_tampered_tail_raises_chain_broken(tmp_path: Path) -> None:
    path = await _tampered(tmp_path, "UPDATE records SET body = ? WHERE seq = 19", (b'{"i":0}',))
    with pytest.raises(ChainBroken) as err:
        async with AuditLog(path, "gw-1"):
            pass
    assert err.value.seq == 19


async def test_failed_commits_fail_their_futures_and_do_not_break_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", commit_interval_ms=1) as log:
        for i in range(20):
            await log.append("decision", {"i": i})

        def disk_full(conn: sqlite3.Connection) -> None:
            # The SQLite way to run out of disk: no page may be added to the file.
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

        await log._run_in_writer(disk_full)
        big = {"blob": random.Random(1).randbytes(10_000).hex()}  # incompressible: it needs new pages
        first = [log.append("decision", big) for _ in range(5)]
        results = await asyncio.gather(*first, return_exceptions=True)
        assert all(isinstance(r, AuditUnavailable) for r in results), results
        assert "full" in str(results[0])
        assert log.state is LogState.FAILING and log.last_error and "full" in log.last_error
        # Appends while failing are tried again (after a back-off) and fail too: nothing half-written.
        more = await asyncio.gather(*[log.append("decision", big) for _ in range(3)], return_exceptions=True)
        assert all(isinstance(r, AuditUnavailable) for r in more)
        assert log.last_seq == 20

        await log._run_in_writer(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
        seqs = [await log.append("decision", {"after": i}) for i in range(5)]
        assert seqs == [21, 22, 23, 24, 25]  # the failed seqs are reused: still gap-free
        assert log.status()["state"] == "open"
    assert seqs_in(path) == list(range(1, 26))
    report = verify_chain(path)
    assert report.ok, report.problem


async def test_drop_oldest_writes_a_gap_record_naming_what_was_lost(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", max_bytes=64 * 1024, on_full="drop_oldest") as log:
        for _ in range(10):
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(60)])
        assert log.oldest_seq > 1
        last = log.last_seq
        # Retention converges: once appends stop, the store is back under max_bytes.
        await wait_until(lambda: log.used_bytes <= 64 * 1024, within=10, what="retention under max_bytes")
    records = list(iter_records(path))
    gaps = [msgspec.json.decode(bytes(r.body)) for r in records if r.kind == GAP_KIND]
    assert gaps and all(g["reason"] == "store_full" for g in gaps)
    # Every seq ever assigned is either still here or inside a range a gap record names.
    kept = {r.seq for r in records}
    named = {s for g in gaps for s in range(g["from_seq"], g["to_seq"] + 1)}
    assert set(range(1, last + 1)) <= kept | named
    assert min(named) == 1
    report = verify_chain(path)
    assert report.ok, report.problem
    assert report.first_seq == records[0].seq > 1


async def test_drop_oldest_never_takes_records_the_uploader_is_publishing(tmp_path: Path) -> None:
    """A record being published may reach the stream before its ack: a gap must never name it."""
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", max_bytes=64 * 1024, on_full="drop_oldest") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(30)])  # ~15 KB: far from full
        assert log.oldest_seq == 1
        log.note_sent(30)  # read by the uploader, acks still on their way
        for _ in range(10):
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(60)])
        await wait_until(lambda: log.used_bytes <= 64 * 1024, within=10, what="retention under max_bytes")
    records = list(iter_records(path))
    named = {s for r in records if r.kind == GAP_KIND
             for g in [msgspec.json.decode(bytes(r.body))] for s in range(g["from_seq"], g["to_seq"] + 1)}
    assert named, "the store never filled"
    assert not named & set(range(1, 31)), sorted(named & set(range(1, 31)))[:5]
    assert {r.seq for r in records} >= set(range(1, 31))


async def test_drop_oldest_keeps_command_config_and_model_records_while_anything_else_can_go(
    tmp_path: Path,
) -> None:
    """Who changed the device outlives the flood: every command, config and model record stays, the
    decisions around them go, and each dropped run has a gap record linked on both sides."""
    path = tmp_path / "audit.db"
    protected: list[int] = []
    async with AuditLog(path, "gw-1", max_bytes=64 * 1024, on_full="drop_oldest") as log:
        for round_ in range(12):
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(40)])
            kind = ("command", "config", "model")[round_ % 3]
            protected.append(await log.append(kind, {"round": round_}))
        await wait_until(lambda: log.used_bytes <= 64 * 1024, within=10, what="retention under max_bytes")
        assert log.oldest_seq <= protected[0]
    records = {r.seq: r for r in iter_records(path)}
    assert set(protected) <= set(records)  # not one of them dropped
    assert min(records) == protected[0]  # ... while the decisions before and between them went
    gaps = [msgspec.json.decode(bytes(r.body)) for r in records.values() if r.kind == GAP_KIND]
    assert len(gaps) >= 2 and all(len(g["after_hash"]) == len(g["last_hash"]) == 64 for g in gaps)
    for gap in gaps:
        after = records.get(gap["to_seq"] + 1)
        if after is not None:
            assert after.prev == gap["last_hash"]  # the record after the run follows the hash the gap names
        before = records.get(gap["from_seq"] - 1)
        if before is not None:
            assert before.hash == gap["after_hash"]
    report = verify_chain(path)
    assert report.ok, report.problem


async def test_block_raises_audit_full_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", max_bytes=64 * 1024, on_full="block") as log:
        committed = 0
        with pytest.raises(AuditFull):
            for _ in range(100):
                await asyncio.gather(*[log.append("decision", BODY) for _ in range(20)])
                committed += 20
        assert log.full and committed > 0
        last = log.last_seq
        assert seqs_in(path) == list(range(1, last + 1))  # nothing deleted, nothing unsynced dropped
        # Once the records are upstream, they may go and appends work again.
        log.mark_synced(last)
        await wait_until(lambda: not log.full, within=10, what="synced records deleted")
        assert await log.append("decision", BODY) == last + 1
        assert log.oldest_seq > 1
    assert not any(r.kind == GAP_KIND for r in iter_records(path))
    assert verify_chain(path).ok


async def test_synced_records_go_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_log, "_COMPRESS_UP_TO", 1 << 30)  # every body stored alike, whatever the commit's size
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", max_bytes=96 * 1024) as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(100)])
        log.mark_synced(100)
        for _ in range(4):
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(30)])
        assert log.oldest_seq > 1
    records = list(iter_records(path))
    assert not any(r.kind == GAP_KIND for r in records)
    assert {r.seq for r in records} >= set(range(101, 221))  # every unsynced record kept
    assert verify_chain(path).ok


async def test_old_synced_records_are_swept_after_keep_synced(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1", keep_synced_s=0.0) as log:
        for _ in range(5):
            await log.append("k", {})
    async with AuditLog(path, "gw-1", keep_synced_s=0.0) as log:
        log.mark_synced(3)
        await log.append("k", {})  # a commit (after open) sweeps
        await wait_until(lambda: log.oldest_seq == 4, within=10, what="sweep of synced records")
    assert seqs_in(path) == [4, 5, 6]
    assert verify_chain(path).ok


async def test_reading_and_file_helpers(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    async with AuditLog(path, "gw-1") as log:
        for i in range(10):
            await log.append("decision" if i % 2 else "link", {"i": i})
        records = await log.read(3, 4)
        assert [r.seq for r in records] == [3, 4, 5, 6]
        assert records == list(iter_records(path, from_seq=3, to_seq=6))
        # Read-only helpers work while the writer has the file open.
        assert [r.seq for r in iter_records(path, kinds=["link"])] == [1, 3, 5, 7, 9]
        cutoff = records[2].ts
        assert [r.seq for r in iter_records(path, since_ns=cutoff)][0] <= 5
        summary = read_summary(path)
        assert (summary.device, summary.first_seq, summary.last_seq, summary.records) == ("gw-1", 1, 10, 10)
        status = log.status()
        assert status["last_seq"] == 10 and status["state"] == "open"
    with pytest.raises(AuditUnavailable):
        log.append("k", {})
    with pytest.raises(AuditUnavailable):
        list(iter_records(tmp_path / "missing.db"))

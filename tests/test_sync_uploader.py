"""The Uploader against real nats-servers: exactly once, in order, through restarts and stream loss."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType

from edge import NatsServer
from sync import (
    AuditLog,
    Chain,
    StreamMissing,
    Uploader,
    UploaderState,
    connect_for_upload,
    encode_record,
    verify_upstream,
)
from tests.nats_harness import ServerFactory
from tests.polling import wait_until

BODY = {"reading": "x" * 300, "rms": 4.2, "label": "normal"}


def connector(server: NatsServer) -> Callable[[], Awaitable[Client]]:
    async def connect() -> Client:
        return await connect_for_upload(server.url, connect_timeout=1)

    return connect


def uploading(log: AuditLog, server: NatsServer, **options: Any) -> Uploader:
    """An Uploader that retries fast, as tests need."""
    return Uploader(log, connector(server), retry_s=0.05, retry_max_s=0.3, **options)


@contextlib.asynccontextmanager
async def admin(server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def stream_seqs(server: NatsServer, stream: str = "EDGE_AUDIT") -> list[int]:
    """The record seqs in the stream, in stream order."""
    async with admin(server) as nc:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        seqs = []
        for n in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, n)
            assert msg.data is not None
            seqs.append(int(msg.data.split(b'"seq":')[1].split(b",")[0]))
        return seqs


@pytest.mark.parametrize("catch_up_share", [1.0, 0.25])  # full speed, and paced as the runtime does
async def test_a_backlog_is_synced_exactly_once_in_order_with_msg_ids(
    tmp_path: Path, nats_server: NatsServer, catch_up_share: float
) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(2000)])
        await log.append("link", {"state": "up"})
        async with uploading(log, nats_server, create_stream=True, catch_up_share=catch_up_share) as uploader:
            assert await uploader.sync_now(20) == 0
            status = uploader.status()
            assert status["state"] == "syncing" and status["connected"] is True
            assert status["published"] == status["acked"] == 2001 and status["duplicates"] == 0
        assert log.synced_seq == 2001
    async with admin(nats_server) as nc:
        js = nc.jetstream()
        info = await js.stream_info("EDGE_AUDIT")
        assert info.config.storage == StorageType.FILE and info.config.duplicate_window == 120
        msg = await js.get_msg("EDGE_AUDIT", 2001)
        assert msg.subject == "audit.gw-1"
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == "gw-1:2001" and msg.headers["Edge-Kind"] == "link"
        report = (await verify_upstream(js, device="gw-1"))["gw-1"]
    assert report.ok, report.summary()
    assert (report.records, report.first_seq, report.last_seq, report.out_of_order) == (2001, 1, 2001, 0)
    assert await stream_seqs(nats_server) == list(range(1, 2002))


async def test_steady_appends_through_upstream_stop_and_kill(tmp_path: Path, nats_server: NatsServer) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1", commit_interval_ms=1) as log:
        stop = asyncio.Event()

        async def appender() -> None:
            while not stop.is_set():
                await log.append("decision", BODY)
                await asyncio.sleep(0.001)  # pace: a steady trickle of decisions

        async with uploading(log, nats_server, create_stream=True, window=64) as uploader:
            task = asyncio.create_task(appender())
            try:
                for outage in (nats_server.stop, nats_server.kill, nats_server.kill, nats_server.stop):
                    mark = log.last_seq
                    await wait_until(lambda m=mark: log.synced_seq > m + 50, within=10, what="sync while up")  # type: ignore[misc]
                    await outage()
                    mark = log.last_seq
                    await wait_until(lambda m=mark: log.last_seq > m + 100, within=10, what="appends while down")  # type: ignore[misc]
                    assert not uploader.connected
                    await nats_server.start()
            finally:
                stop.set()
                await task
            assert await uploader.sync_now(20) == 0
            reconnects = uploader.status()["reconnects"]
            assert isinstance(reconnects, int) and reconnects >= 4
            last = log.last_seq
    async with admin(nats_server) as nc:
        report = (await verify_upstream(nc.jetstream(), device="gw-1"))["gw-1"]
    assert report.ok, report.summary()
    assert (report.records, report.last_seq, report.duplicates) == (last, last, 0)


async def test_stream_deleted_and_recreated_is_refilled_from_the_kept_records(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # Chosen behaviour: the stream lost what we had synced, so synced_seq moves back and every record
    # still kept locally (keep_synced) goes out again, in order, into the new stream.
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(300)])
        async with uploading(log, nats_server, create_stream=True) as uploader:
            assert await uploader.sync_now(20) == 0
            async with admin(nats_server) as nc:
                await nc.jetstream().delete_stream("EDGE_AUDIT")
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(100)])
            await wait_until(lambda: log.synced_seq == 400 and log.backlog == 0, within=10, what="refill")
            assert uploader.status()["upstream_lost"] == []
    assert await stream_seqs(nats_server) == list(range(1, 401))


async def test_a_missing_stream_is_reported_and_sync_resumes_once_it_exists(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(50)])
        async with uploading(log, nats_server, create_stream=False) as uploader:
            await wait_until(lambda: uploader.status()["stream_missing"] is True, within=10, what="stream_missing")
            assert "nats stream add EDGE_AUDIT" in str(uploader.last_error)
            assert log.synced_seq == 0
            async with admin(nats_server) as nc:
                await nc.jetstream().add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True,
                                                duplicate_window=120)
            assert await uploader.sync_now(10) == 0
            assert uploader.status()["stream_missing"] is False
    assert await stream_seqs(nats_server) == list(range(1, 51))
    assert issubclass(StreamMissing, Exception)


async def test_a_restarted_uploader_behind_the_stream_does_not_duplicate(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    path = tmp_path / "audit.db"
    async with admin(nats_server) as nc:
        # A tiny duplicate window: the stream's own de-duplication cannot hide a re-send.
        await nc.jetstream().add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True,
                                        duplicate_window=0.1)
    async with AuditLog(path, "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(500)])
        async with uploading(log, nats_server) as uploader:
            assert await uploader.sync_now(20) == 0
    # A crash between publish and bookkeeping: the file forgot what was synced.
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'synced_seq'")
    async with AuditLog(path, "gw-1") as log:
        assert log.synced_seq == 0 and log.backlog == 500
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(10)])
        async with uploading(log, nats_server) as uploader:
            assert await uploader.sync_now(20) == 0
            assert uploader.status()["published"] == 10  # only the new records went out
    assert await stream_seqs(nats_server) == list(range(1, 511))


async def test_a_refused_record_is_reported_never_skipped_silently(tmp_path: Path, nats_server: NatsServer) -> None:
    async with admin(nats_server) as nc:
        js = nc.jetstream()
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True, duplicate_window=120,
                            max_msg_size=4096)
        async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
            huge = {"blob": "z" * 8000}
            futures = [log.append("decision", huge if i == 5 else BODY) for i in range(1, 11)]
            await asyncio.gather(*futures)
            async with uploading(log, nats_server) as uploader:
                # 5 is refused while 6..10, already in flight, get in: a hole, said out loud.
                await wait_until(lambda: log.synced_seq == 10, within=10, what="sync past the refused record")
                status = uploader.status()
                assert status["holes"] == [[5, 5]]
                assert "rejected seq 5" in str(status["last_error"])
                report = (await verify_upstream(js, device="gw-1"))["gw-1"]
                assert report.missing == [(5, 5)] and not report.ok

                # A refused record with nothing after it blocks the sync instead of being skipped.
                await log.append("decision", huge)
                await wait_until(lambda: "rejected seq 11" in str(uploader.last_error), within=10, what="refusal of 11")
                assert await uploader.sync_now(0.3) == 1

                # The operator lifts the limit: 11 goes out, and resend() repairs 5 (out of order).
                await js.update_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True,
                                       duplicate_window=120)
                assert await uploader.sync_now(10) == 0
                assert uploader.resend(5, 5) == 1
                await wait_until(lambda: uploader.status()["resend"] is None, within=10, what="resend of 5")
        report = (await verify_upstream(js, device="gw-1"))["gw-1"]
        assert report.missing == [] and report.out_of_order == 1 and report.duplicates == 0
    assert await stream_seqs(nats_server) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 5]


async def test_stops_with_audit_conflict_when_the_stream_is_ahead_of_the_local_log(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with admin(nats_server) as nc:
        js = nc.jetstream()
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True, duplicate_window=120)
        other = Chain("gw-1")
        for _ in range(30):
            await js.publish("audit.gw-1", encode_record(other.make("decision", {}, ts=1)))
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await log.append("decision", BODY)
        async with uploading(log, nats_server) as uploader:
            # Said, not a silent wedge: a conflict an operator resolves (`audit.resend`).
            await wait_until(lambda: uploader.state is UploaderState.AUDIT_CONFLICT, within=10, what="conflict")
            assert "reset or replaced" in str(uploader.last_error)
            assert uploader.status()["published"] == 0 and log.synced_seq == 0


async def test_bandwidth_cap_slows_the_catch_up(tmp_path: Path, nats_server: NatsServer) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(60)])  # ~30 KB of records
        started = time.monotonic()
        async with uploading(log, nats_server, create_stream=True, max_bytes_per_s=50_000) as uploader:
            assert await uploader.sync_now(10) == 0
        assert time.monotonic() - started >= 0.4


async def test_close_is_idempotent_and_stops_the_task(tmp_path: Path, nats_servers: ServerFactory) -> None:
    server = await nats_servers("hub")
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        uploader = uploading(log, server, create_stream=True)
        async with uploader:
            await log.append("start", {})
            assert await uploader.sync_now(10) == 0
        await uploader.close()
        assert uploader.state is UploaderState.CLOSED and not uploader.connected
        await log.append("stop", {})
        assert log.backlog == 1  # nobody is syncing any more
    with pytest.raises(ValueError):
        uploading(log, server, window=0)


async def test_records_dropped_while_offline_arrive_upstream_as_an_explained_gap(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1", max_bytes=64 * 1024, on_full="drop_oldest") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(50)])
        async with uploading(log, nats_server, create_stream=True) as uploader:
            assert await uploader.sync_now(10) == 0
        # Offline for long enough that the store fills: synced records go, then unsynced ones.
        for _ in range(10):
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(60)])
        assert log.oldest_seq > 51
        # The drops are over before the link comes back (what this test is about; a drop while
        # records are being published is the reservation's business, tests/test_sync_log.py).
        await wait_until(lambda: log.used_bytes <= 64 * 1024, within=10, what="retention under max_bytes")
        async with uploading(log, nats_server) as uploader:
            assert await uploader.sync_now(10) == 0
        last = log.last_seq
    async with admin(nats_server) as nc:
        report = (await verify_upstream(nc.jetstream(), device="gw-1"))["gw-1"]
    assert report.ok, report.summary()
    assert report.missing == [] and report.explained and report.explained[0][0] == 51
    assert report.last_seq == last

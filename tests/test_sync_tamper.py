"""The audit trail under attack, against a real nats-server and real SQLite.

Each test performs the attack: records signed by the device key, a record pre-published under the
device's Msg-Id, foreign messages on its subject (while it is offline and between two bursts), a
rewritten suffix of the local log; each is detected and reported as `audit_conflict` (never booked
as synced), or found by `verify_upstream` with the device's key, naming the first bad seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy

from edge import NatsServer
from edge.fleet import new_seed
from sync import (
    H_SIGNATURE,
    H_SIGNER,
    AuditLog,
    AuditSigner,
    Chain,
    Uploader,
    UploaderState,
    connect_for_upload,
    encode_record,
    iter_records,
    record_hash,
    verify_chain,
    verify_upstream,
)
from tests.polling import wait_until

BODY = {"reading": "x" * 300, "rms": 4.2, "label": "normal"}
KEY = AuditSigner(new_seed())


def uploading(log: AuditLog, server: NatsServer, **options: Any) -> Uploader:
    """An Uploader signing with KEY that retries fast, as tests need."""

    async def connect() -> Client:
        return await connect_for_upload(server.url, connect_timeout=1)

    options.setdefault("signer", KEY)
    return Uploader(log, connect, retry_s=0.05, retry_max_s=0.3, **options)


@contextlib.asynccontextmanager
async def stream(server: NatsServer, *, duplicate_window: float = 120) -> AsyncIterator[JetStreamContext]:
    """A connection to `server` with the audit stream made as an operator would make it."""
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True, deny_delete=True,
                            deny_purge=True, duplicate_window=duplicate_window)
        yield js
    finally:
        await nc.close()


async def in_conflict(uploader: Uploader) -> dict[str, Any]:
    await wait_until(lambda: uploader.state is UploaderState.AUDIT_CONFLICT, within=10, what="audit_conflict")
    conflict = uploader.status()["conflict"]
    assert isinstance(conflict, dict)
    return conflict


async def test_records_are_signed_every_nth_and_at_the_end_of_each_burst(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(150)])
        async with uploading(log, nats_server, create_stream=True, sign_every=64) as uploader:
            assert await uploader.sync_now(20) == 0
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(5)])  # a second burst
            assert await uploader.sync_now(20) == 0
            assert uploader.status()["device_key"] == KEY.public_key
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EDGE_AUDIT")
        # The stream the uploader made: records cannot be deleted or purged, and it is bounded.
        config = info.config
        assert config.deny_delete and config.deny_purge and config.allow_direct
        assert (config.max_msg_size, config.max_bytes, config.discard) == (1 << 20, 1 << 30, DiscardPolicy.NEW)
        signed, expectations = [], {}
        for n in range(1, info.state.last_seq + 1):
            msg = await js.get_msg("EDGE_AUDIT", n)
            headers = msg.headers or {}
            seq = int(headers["Nats-Msg-Id"].split(":")[1])
            if H_SIGNATURE in headers:
                assert headers[H_SIGNER] == KEY.public_key
                signed.append(seq)
            if "Nats-Expected-Last-Subject-Sequence" in headers:
                expectations[seq] = int(headers["Nats-Expected-Last-Subject-Sequence"])
        assert {64, 128, 150, 155} <= set(signed) and len(signed) <= 6
        # The first publish of each burst says what it expects the subject's last message to be.
        assert expectations[1] == 0 and expectations[151] == 150
        report = (await verify_upstream(js, device="gw-1", key=KEY.public_key))["gw-1"]
        assert report.ok, report.summary()
        assert report.signed == len(signed) and report.unsigned_tail is None
    finally:
        await nc.close()


async def test_a_record_pre_published_under_the_devices_msg_id_is_a_conflict_never_booked(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Someone publishes `audit.gw-1` with `Nats-Msg-Id: gw-1:220` ahead of the device: JetStream
    answers the device's real 220 "duplicate". The uploader stops at 219, names the foreign stream
    seq, keeps the conflict across a restart; `resend(220)` resolves it once the window passed."""
    async with stream(nats_server, duplicate_window=3.0) as js, \
            AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(300)])
        async with uploading(log, nats_server, max_bytes_per_s=25_000) as uploader:
            # 70 records ahead of the sync (well over a second at this rate), well inside the window.
            await wait_until(lambda: uploader.status()["published"] >= 150, within=10, what="the sync under way")
            forged = Chain("gw-1", 220, "ab" * 32).make("decision", {"label": "all fine"}, ts=1)
            ack = await js.publish("audit.gw-1", encode_record(forged), headers={"Nats-Msg-Id": "gw-1:220"})
            forged_at = asyncio.get_running_loop().time()
            conflict = await in_conflict(uploader)
            assert (conflict["stream_seq"], conflict["seq"]) == (ack.seq, 220)
            assert log.synced_seq == 219  # everything before it booked, nothing from it on
            assert f"stream seq {ack.seq}" in str(uploader.last_error)
            assert await uploader.sync_now(0.2) > 0  # a conflict is not waited out
        kinds = [r.kind for r in iter_records(log.path, from_seq=301)]
        assert kinds == ["audit_conflict"]  # the device's own record of it

        # A restart does not forget it: nothing is published until an operator resolves it.
        async with uploading(log, nats_server) as uploader:
            assert uploader.state is UploaderState.AUDIT_CONFLICT and uploader.status()["published"] == 0
            # pace: the stream's 3 s duplicate window passes (meanwhile 220 would still be "duplicate")
            await asyncio.sleep(max(0.0, forged_at + 3.2 - asyncio.get_running_loop().time()))
            assert uploader.resend(220) == log.last_seq - 219
            assert await uploader.sync_now(20) == 0
            assert uploader.state is UploaderState.SYNCING and uploader.status()["accepted_foreign"] == [ack.seq]
        last = log.last_seq
        report = (await verify_upstream(js, device="gw-1", key=KEY.public_key))["gw-1"]
    # The stream holds the device's every record, and still shows the forgery for what it is.
    assert report.missing == [] and report.last_seq == last
    assert report.conflicts == [220] and report.first_bad_seq == 220 and not report.ok


async def test_a_foreign_message_on_the_subject_while_offline_is_a_conflict_then_resolved(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with stream(nats_server) as js, AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(10)])
        async with uploading(log, nats_server) as uploader:
            assert await uploader.sync_now(10) == 0
        junk = await js.publish("audit.gw-1", b"not a record")  # while the device is away
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(10)])
        async with uploading(log, nats_server) as uploader:
            conflict = await in_conflict(uploader)
            assert conflict["stream_seq"] == junk.seq and conflict["seq"] is None
            assert "not an audit record" in conflict["detail"]
            assert log.synced_seq == 10 and uploader.status()["published"] == 0
            # The operator resolves it: the message stays as evidence, the device goes on after it.
            assert uploader.resend(11) == log.last_seq - 10
            assert await uploader.sync_now(10) == 0
        report = (await verify_upstream(js, device="gw-1", key=KEY.public_key))["gw-1"]
    assert report.foreign == [junk.seq] and not report.ok and f"stream seq {junk.seq}" in report.summary()
    assert report.missing == [] and report.chain_breaks == [] and report.first_bad_seq is None


async def test_a_foreign_record_between_two_bursts_is_caught_by_the_expected_last_sequence(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with stream(nats_server) as js, AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(10)])
        async with uploading(log, nats_server) as uploader:
            assert await uploader.sync_now(10) == 0
            # A record with a valid hash and the next seq, on the device's subject, no Msg-Id.
            forged = Chain("gw-1", 11, "cd" * 32).make("decision", {}, ts=1)
            ack = await js.publish("audit.gw-1", encode_record(forged))
            await log.append("decision", BODY)
            conflict = await in_conflict(uploader)
            assert (conflict["stream_seq"], conflict["seq"]) == (ack.seq, 11)
            assert "different record under seq 11" in conflict["detail"]
            assert log.synced_seq == 10


async def test_a_rewritten_suffix_is_refused_upstream_and_an_unsigned_one_fails_verify(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """With the data dir, records 15..25 rewritten, hashes recomputed: the local chain cannot tell,
    but 15..20 were synced and signed, so the uploader refuses to go on. The same rewrite published
    by someone without the key fails verify at its first seq: it is not signed."""
    path = tmp_path / "audit.db"
    async with stream(nats_server) as js:
        async with AuditLog(path, "gw-1") as log:
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(20)])
            async with uploading(log, nats_server) as uploader:
                assert await uploader.sync_now(10) == 0
            await asyncio.gather(*[log.append("decision", BODY) for _ in range(5)])
        with sqlite3.connect(path) as conn:
            prev = conn.execute("SELECT hash FROM records WHERE seq = 14").fetchone()[0].hex()
            for seq in range(15, 26):
                ts = conn.execute("SELECT ts FROM records WHERE seq = ?", (seq,)).fetchone()[0]
                body = b'{"label":"normal","rewritten":true}'
                digest = record_hash("gw-1", seq, ts, "decision", body, prev)
                conn.execute("UPDATE records SET body = ?, prev = ?, hash = ? WHERE seq = ?", (body, prev, digest, seq))
                prev = digest
        assert verify_chain(path).ok  # the limit of a file without a key, stated in the README

        async with AuditLog(path, "gw-1") as log, uploading(log, nats_server) as uploader:
            conflict = await in_conflict(uploader)
            assert conflict["seq"] == 20 and "different record under seq 20" in conflict["detail"]
            assert uploader.status()["published"] == 0

        # Someone without the device key pre-publishes the rewritten 21..25 under the device's Msg-Ids.
        for record in iter_records(path, from_seq=21, to_seq=25):
            await js.publish("audit.gw-1", encode_record(record), headers={"Nats-Msg-Id": f"gw-1:{record.seq}"})
        report = (await verify_upstream(js, device="gw-1", key=KEY.public_key))["gw-1"]
        assert report.unsigned_tail == (21, 25) and report.first_bad_seq == 21
        assert "first bad seq 21" in report.summary()


@pytest.mark.parametrize("sign_every", [0, -3])
def test_sign_every_must_be_positive(tmp_path: Path, sign_every: int) -> None:
    log = AuditLog(tmp_path / "audit.db", "gw-1")
    with pytest.raises(ValueError, match="sign_every"):
        Uploader(log, connect_for_upload, sign_every=sign_every)  # type: ignore[arg-type]

"""kill -9 of the device at seeded random moments during a backlog sync: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import nats
from nats.aio.client import Client

from edge import NatsServer
from sync import AuditLog, Uploader, iter_records, verify_chain, verify_upstream
from tests.sync_helpers import wait_until

WRITER = Path(__file__).parent / "sync_helpers" / "writer.py"


def committed_seqs(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [int(line) for line in lines[:-1] if line]  # the last piece may be torn by the kill


async def test_kill_9_during_backlog_sync_loses_and_duplicates_nothing(tmp_path: Path, nats_server: NatsServer) -> None:
    admin = await nats.connect(nats_server.url)
    js = admin.jetstream()
    # A duplicate window far shorter than a restart: de-duplication cannot hide a re-send, only
    # the uploader's "ask the stream where it stands" can prevent one.
    await js.add_stream(name="EDGE_AUDIT", subjects=["audit.>"], duplicate_window=0.1)
    db, committed, stderr = tmp_path / "audit.db", tmp_path / "committed.txt", tmp_path / "writer.err"
    rng = random.Random(20240607)
    try:
        for round_ in range(6):
            before = len(committed_seqs(committed))
            target = before + rng.randint(30, 1800)
            with stderr.open("ab") as err:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(WRITER),
                    "--db",
                    str(db),
                    "--device",
                    "gw-1",
                    "--url",
                    nats_server.url,
                    "--committed",
                    str(committed),
                    "--burst",
                    str(rng.choice([200, 1500, 3000])),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=err,
                )
            try:
                await wait_until(
                    lambda: len(committed_seqs(committed)) >= target or process.returncode is not None,  # noqa: B023
                    within=30,
                    what=f"round {round_}: {target} committed records",
                )
                assert process.returncode is None, stderr.read_text()[-3000:]
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                await process.wait()

        # The device comes back one last time and drains its backlog.
        async def connect() -> Client:
            return await nats.connect(nats_server.url, allow_reconnect=False, pending_size=0)

        async with AuditLog(db, "gw-1") as log:
            async with Uploader(log, connect, retry_s=0.05) as uploader:
                assert await uploader.sync_now(30) == 0, uploader.status()
            last = log.last_seq

        report = verify_chain(db)
        assert report.ok, report.problem
        assert (report.first_seq, report.last_seq, report.records) == (1, last, last)
        upstream = (await verify_upstream(js, device="gw-1"))["gw-1"]
        assert upstream.ok, upstream.summary()
        assert (upstream.records, upstream.first_seq, upstream.last_seq) == (last, 1, last)
        assert upstream.duplicates == 0 and upstream.out_of_order == 0 and upstream.missing == []
        # Everything the driver was told was committed survived its kills, locally and upstream.
        promised = committed_seqs(committed)
        assert promised and max(promised) <= last
        kept = {r.seq for r in iter_records(db)}
        assert set(promised) <= kept
        assert len(promised) == len(set(promised))  # and no seq was ever handed out twice
    finally:
        await admin.close()

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
from tests.polling import wait_until

WRITER = Path(__file__).parent / "sync_helpers" / "writer.py"


def committed_seqs(path: Path) -> list[int]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [int(line) for line in lines[:-1] if line]  # the last piece may be torn by the kill


async def start_writer(server: NatsServer, tmp_path: Path, burst: int) -> asyncio.subprocess.Process:
    with (tmp_path / "writer.err").open("ab") as err:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, str(WRITER), "--db", str(tmp_path / "audit.db"), "--device", "gw-1"),
            *("--url", server.url, "--committed", str(tmp_path / "committed.txt"), "--burst", str(burst)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


async def test_kill_9_during_backlog_sync_loses_and_duplicates_nothing(tmp_path: Path, nats_server: NatsServer) -> None:
    db, committed = tmp_path / "audit.db", tmp_path / "committed.txt"
    rng = random.Random(20240607)

    def count() -> int:
        return len(committed_seqs(committed))

    async def commits_reach(target: int, process: asyncio.subprocess.Process, what: str) -> None:
        await wait_until(lambda: count() >= target or process.returncode is not None, within=30, what=what)
        assert process.returncode is None, (tmp_path / "writer.err").read_text()[-3000:]

    nc = await nats.connect(nats_server.url)
    # A duplicate window far shorter than a restart: de-duplication cannot hide a re-send, only
    # the uploader's "ask the stream where it stands" can prevent one.
    await nc.jetstream().add_stream(name="EDGE_AUDIT", subjects=["audit.>"], allow_direct=True, duplicate_window=0.1)
    await nc.close()

    for round_ in range(8):
        process = await start_writer(nats_server, tmp_path, burst=rng.choice([200, 1500, 3000]))
        try:
            if round_ % 2:
                # Odd rounds: the upstream is killed too, and comes back while the device runs.
                await commits_reach(count() + 100, process, f"round {round_}: commits before the outage")
                await nats_server.kill()
                await commits_reach(count() + 300, process, f"round {round_}: commits during the outage")
                await nats_server.start()
            await commits_reach(count() + rng.randint(30, 1800), process, f"round {round_}: commits")
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
    nc = await nats.connect(nats_server.url)
    try:
        upstream = (await verify_upstream(nc.jetstream(), device="gw-1"))["gw-1"]
    finally:
        await nc.close()
    assert upstream.ok, upstream.summary()
    assert (upstream.records, upstream.first_seq, upstream.last_seq) == (last, 1, last)
    assert upstream.duplicates == 0 and upstream.out_of_order == 0 and upstream.missing == []
    # Everything the driver was told was committed survived its kills, locally and upstream.
    promised = committed_seqs(committed)
    assert len(promised) == len(set(promised))  # no seq was ever handed out twice
    assert promised and max(promised) <= last
    assert set(promised) <= {r.seq for r in iter_records(db)}

"""The audit stream on a clustered hub: three JetStream nodes on loopback, the stream replicated
three times (R3), the node leading it killed while a backlog syncs, then brought back.

Every record reaches the stream exactly once and in order, the chain holds and every signature
verifies with the device key, and the uploader never mistakes its own records (stored by a
session whose acks were lost with the leader) for someone else's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
from nats.aio.client import Client

from edge.fleet import new_seed
from sync import AuditLog, AuditSigner, Uploader, connect_for_upload, verify_upstream
from tests.nats_harness import ClusterFactory
from tests.polling import wait_until

BODY = {"reading": "x" * 300, "rms": 4.2, "label": "normal"}
RECORDS = 3000


async def test_a_backlog_syncs_exactly_once_through_a_stream_leader_kill(
    nats_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = await nats_cluster(3)
    key = AuditSigner(new_seed())

    async def connect() -> Client:
        return await connect_for_upload(cluster.urls, connect_timeout=1)

    async with AuditLog(tmp_path / "audit.db", "gw-1") as log:
        await asyncio.gather(*[log.append("decision", BODY) for _ in range(RECORDS)])
        # Paced to last a few seconds, so the kill lands in the middle of it.
        uploader = Uploader(log, connect, create_stream=True, stream_replicas=3, signer=key, retry_s=0.05,
                            retry_max_s=0.5, ack_timeout_s=2.0, max_bytes_per_s=400_000)
        async with uploader:
            await wait_until(lambda: log.synced_seq >= 600, within=30, what="the backlog sync under way")
            leader = await cluster.leader_of("EDGE_AUDIT")
            await leader.kill()
            mark = log.synced_seq
            await wait_until(lambda: log.synced_seq >= mark + 300, within=30,
                             what="the sync going on with a new leader")
            await leader.start()
            assert await uploader.sync_now(30) == 0
            status = uploader.status()
            assert status["conflict"] is None and status["state"] == "syncing", status
            assert status["reconnects"] >= 1  # the kill did break the session it hit

        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info("EDGE_AUDIT")
            assert info.config.num_replicas == 3 and info.cluster is not None
            report = (await verify_upstream(js, device="gw-1", key=key.public_key))["gw-1"]
        finally:
            await nc.close()
    assert report.ok, report.summary()
    assert (report.records, report.first_seq, report.last_seq) == (RECORDS, 1, RECORDS)
    assert report.duplicates == 0 and report.out_of_order == 0 and report.missing == []
    assert report.signed >= RECORDS // 64 and report.unsigned_tail is None

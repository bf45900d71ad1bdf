"""A device in a box, for the crash test: appends audit records steadily and uploads them.

    python tests/sync_helpers/writer.py --db audit.db --device gw-1 --url nats://... --committed seqs.txt

It starts with a burst (a backlog for the uploader to catch up on), then appends in small groups
forever. After each group's futures resolve (committed to SQLite), it appends their seqs, one a
line, to the `--committed` file: what the test may hold the log to after a SIGKILL. It never
exits on its own; the test kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from nats.aio.client import Client

from sync import AuditLog, Uploader, connect_for_upload


async def run(args: argparse.Namespace) -> None:
    async def connect() -> Client:
        return await connect_for_upload(args.url, connect_timeout=1)

    fd = os.open(args.committed, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    async with AuditLog(Path(args.db), args.device, fsync=args.fsync, commit_interval_ms=1) as log:
        async with Uploader(log, connect, window=args.window, retry_s=0.05, retry_max_s=0.3):
            group = args.burst
            while True:
                futures = [log.append("decision", lambda seq: {"n": seq, "pad": "x" * 200}) for _ in range(group)]
                seqs = await asyncio.gather(*futures)
                # One write per group: a kill lands between lines, and a torn last line is ignored.
                os.write(fd, "".join(f"{seq}\n" for seq in seqs).encode())
                group = args.group
                await asyncio.sleep(args.pause)  # pace: a steady trickle, not a busy loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--committed", required=True)
    parser.add_argument("--fsync", default="batch", choices=["always", "batch", "off"])
    parser.add_argument("--burst", type=int, default=1500)
    parser.add_argument("--group", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--window", type=int, default=256)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

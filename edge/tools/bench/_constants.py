"""Subjects, windows and limits that the bench's processes and sections agree on."""

from __future__ import annotations

from typing import Literal

SECTIONS = ("saturation", "latency", "fixed_rate", "audit", "sync", "blackhole", "backlog", "memory", "approvals",
            "race", "replay")
FSYNC_MODES: tuple[Literal["off", "batch", "always"], ...] = ("off", "batch", "always")
INPUT_SUBJECT = "sensors.p1.pump"
BARE_RESULT_SUBJECT = "bench.bare.result"
PIPELINE = "pump"
WINDOW = 2048  # inputs unanswered at most during saturation: well under every pending limit on the way
CHUNK = 64  # inputs published per burst
SYNC_WINDOW = 256  # publishes in flight for raw JetStream: the uploader's default `audit.sync_window`
BLACKHOLE_RATE_HZ = 200.0
FIXED_RATE_HZ = 400.0  # issue 15's fixed offered load: CPU per decision, bytes per decision, the backlog drain
# The backlog counts as drained when at most this many records wait: at 400/s the uploader's
# steady state keeps a handful in flight, so 0 exactly may never be seen by a poll.
DRAINED_BACKLOG = 64
CLOUD_TIMEOUT_MS = 200
# The race section: provider A thinks 300 ms, well inside its 1 s timeout (slow, not down), B at once;
# a moderate load, so that what is measured is the waiting, not a queue.
RACE_RATE_HZ = 50.0
RACE_SLOW_MS = 300.0
RACE_TIMEOUT_MS = 1000
MIB = 1024 * 1024
SINK_PENDING_MSGS = 1 << 20  # a sink (or the bare service) must never be the slow consumer
SINK_PENDING_BYTES = 512 * MIB

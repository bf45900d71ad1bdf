"""Subjects, windows and limits that the bench's processes and sections agree on."""

from __future__ import annotations

from typing import Literal

SECTIONS = ("saturation", "latency", "audit", "sync", "blackhole", "memory", "approvals")
FSYNC_MODES: tuple[Literal["off", "batch", "always"], ...] = ("off", "batch", "always")
INPUT_SUBJECT = "sensors.p1.pump"
BARE_RESULT_SUBJECT = "bench.bare.result"
PIPELINE = "pump"
WINDOW = 2048  # inputs unanswered at most during saturation: well under every pending limit on the way
CHUNK = 64  # inputs published per burst
SYNC_WINDOW = 256  # publishes in flight for raw JetStream: the uploader's default `audit.sync_window`
BLACKHOLE_RATE_HZ = 200.0
CLOUD_TIMEOUT_MS = 200
MIB = 1024 * 1024
SINK_PENDING_MSGS = 1 << 20  # a sink (or the bare service) must never be the slow consumer
SINK_PENDING_BYTES = 512 * MIB

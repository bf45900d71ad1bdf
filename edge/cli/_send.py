"""`edge send -c FILE [--pipeline NAME] '{"rms": 9, ...}'`: try a pipeline without a NATS client.

Sends one reading, as a request, to the pipeline's first `subscribe` subject made concrete (each
`*` or `>` token becomes `cli`) on the device's local bus, and prints the answer: the Decision, or
the Rejected that says why the reading was refused. The reading goes as given: the device, not
this command, says what it accepts. The connection is the CLI's own (`_connected`, with the
config's local-bus credentials), and the reply comes back under the config's first reply prefix,
where the device is willing to answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from .._config import PipelineConfig, load_config, redact_url
from .._messages import Decision, Rejected
from ._operator import _connected, _connection_args, _run
from ._output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, local_url, print_json
from ._reference import pick_pipeline

Add = Callable[..., argparse.ArgumentParser]
_DECISION = msgspec.json.Decoder(Decision)
_REJECTED = msgspec.json.Decoder(Rejected)
SAMPLE_CHARS = 200  # a reply that is neither a Decision nor a Rejected is quoted this far


def concrete_subject(pattern: str) -> str:
    """A subject a subscription to `pattern` receives: `sensors.*.pump` → `sensors.cli.pump`."""
    return ".".join("cli" if token in ("*", ">") else token for token in pattern.split("."))


def default_timeout(pipeline: PipelineConfig) -> float:
    """Long enough for the pipeline's slowest approval (a decision waits for its human), else 5 s."""
    waits = [a.approval_timeout_ms / 1000 for a in pipeline.actions.values() if a.approval == "required"]
    return max([5.0, *(w + 2.0 for w in waits)])


async def send_reading(args: argparse.Namespace) -> int:
    config = await asyncio.to_thread(load_config, Path(args.config) if args.config else None)
    pipeline = pick_pipeline(config, args.pipeline)
    if pipeline is None:
        return EXIT_USAGE
    payload = sys.stdin.buffer.read() if args.reading == "-" else args.reading.encode()
    subject = args.subject or concrete_subject(pipeline.subscribe[0])
    args.server = await asyncio.to_thread(local_url, config)
    if args.timeout is None:
        args.timeout = default_timeout(pipeline)
    args.inbox_prefix = config.nats.reply_prefixes[0] if config.nats.reply_prefixes else "_INBOX"
    async with _connected(args, default=(config.nats.local_auth, Path(config.base_dir or "."))) as nc:
        try:
            reply = await nc.request(subject, payload, timeout=args.timeout)
        except nats.errors.NoRespondersError:
            print(f"edge: nothing subscribes to {subject} on {redact_url(args.server)} (is the runtime of this "
                  "config running?)", file=sys.stderr)
            return EXIT_FAILURE
        except nats.errors.TimeoutError:
            print(f"edge: no answer on {subject} within {args.timeout:g}s", file=sys.stderr)
            return EXIT_FAILURE
    return report(args, pipeline, subject, reply.data)


def report(args: argparse.Namespace, pipeline: PipelineConfig, subject: str, data: bytes) -> int:
    """Print the device's answer; exit 0 for a Decision, 2 for a Rejected (bad input), 1 otherwise."""
    try:
        decision: Decision | None = _DECISION.decode(data)
    except msgspec.DecodeError:
        decision = None
    rejected: Rejected | None = None
    if decision is None:
        try:
            rejected = _REJECTED.decode(data)
        except msgspec.DecodeError:
            print(f"edge: {subject}: the answer is neither a Decision nor a Rejected: "
                  f"{data[:SAMPLE_CHARS].decode(errors='replace')!r}", file=sys.stderr)
            return EXIT_FAILURE
    if args.json:
        print_json(msgspec.json.decode(data))
    elif decision is not None:
        print("\n".join(decision_lines(decision, pipeline, subject)))
    elif rejected is not None:
        print(f"{subject}: rejected ({rejected.reason}): {rejected.detail}")
    return EXIT_OK if decision is not None else EXIT_USAGE


def decision_lines(d: Decision, pipeline: PipelineConfig, subject: str) -> list[str]:
    confidence = "-" if d.confidence is None else f"{d.confidence:.2f}"
    lines = [f"{subject}: {d.action} (label {d.label}, tier {d.tier}, confidence {confidence})"]
    g = d.governance
    if g.status != "auto" or g.requested_action != d.action:
        who = f" by {g.by_name or g.by}" if g.by or g.by_name else ""
        why = f": {g.reason}" if g.reason else ""
        lines.append(f"  governance  {g.status}{who} (requested {g.requested_action}){why}")
    if d.fallbacks:
        lines.append("  fallbacks   " + ", ".join(f"{f.tier} {f.reason}" for f in d.fallbacks))
    if d.shadow is not None:
        lines.append(f"  shadow      {d.shadow.label} (version {d.shadow.version or '-'})")
    seq = "-" if d.audit_seq is None else str(d.audit_seq)
    published = pipeline.publish.format(device=d.device, pipeline=d.pipeline)
    lines.append(f"  decision {d.id}, audit seq {seq}, published on {published}")
    return lines


def cmd_send(args: argparse.Namespace) -> int:
    return _run(send_reading(args))


def register_send(sub: Any, add: Add) -> None:
    """Add `send` to the CLI."""
    p = add("send", cmd_send, "send one reading to a pipeline of the running device and print its decision", sub)
    p.add_argument("reading", help='the reading as a JSON object, e.g. \'{"rms": 9, "kurtosis": 4}\' ("-": stdin)')
    p.add_argument("-c", "--config", help="config file (default: the bundled example)")
    p.add_argument("--pipeline", help="the pipeline (default: the config's first)")
    p.add_argument("--subject", help="the subject to send on (default: the pipeline's first, * and > as 'cli')")
    p.add_argument("--timeout", type=float, help="seconds to wait for the decision (default: 5, or longer than "
                                                  "the pipeline's approval timeouts)")
    _connection_args(p, default="; without any of these: the config's nats.local_auth")

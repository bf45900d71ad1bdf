"""`edge replay` and `edge report`: what the AI is worth, from the audit log."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from .._config import load_config
from .._replay import Replayer, ReplayError, ReplayReport, records_from_export
from ._output import EXIT_OK, EXIT_USAGE

Add = Callable[..., argparse.ArgumentParser]


def _records(args: argparse.Namespace) -> Iterable[Any]:
    """The records to read: an export file, or the local log (-c's data_dir, or --db)."""
    from sync import iter_records

    from ._main import _since_ns

    if args.from_export:
        return records_from_export(Path(args.from_export))
    if args.db:
        db = Path(args.db)
    else:
        device = load_config(Path(args.device_config) if args.device_config else None)
        db = device.resolve(device.data_dir) / "audit.db"
    if not db.exists():
        raise FileNotFoundError(f"no audit log at {db} (use --db, -c or --from-export)")
    return iter_records(db, from_seq=args.from_seq, to_seq=args.to_seq, since_ns=_since_ns(args.since))


def cmd_replay(args: argparse.Namespace) -> int:
    from models import load_model

    chosen = args.candidate_config or args.device_config
    config = load_config(Path(chosen) if chosen else None)
    candidate = load_model(Path(args.model)) if args.model else None
    if candidate is None and not args.candidate_config:
        print("edge: replay needs a candidate: --model FOLDER and/or --config FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = Replayer(config, candidate=candidate, changes=args.changes).run(_records(args))
    except ReplayError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _emit(args, report, replay_text(report))
    return EXIT_OK


def _emit(args: argparse.Namespace, report: object, text: str) -> None:
    """A report as JSON (`--json`) or as the text for people."""
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(text)


def replay_text(r: ReplayReport) -> str:
    """The replay report for people."""
    who = f"{r.candidate['name']} v{r.candidate['version']}" if r.candidate else "the candidate config"
    lines = [f"replayed {r.replayed:,} of {r.records_read:,} records with {who} in {r.elapsed_s:.2f} s"]
    if r.skipped:
        lines.append("  skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(r.skipped.items())))
    if r.replayed:
        lines.append(f"  agreement: labels {r.label_agreement:.1%}, requested actions {r.action_agreement:.1%} "
                     f"({r.changed:,} would change)")
        lines.append("  recorded action -> replayed action:")
        for recorded, row in r.confusion.items():
            lines.append(f"    {recorded:>12} -> " + ", ".join(f"{a} {n:,}" for a, n in sorted(row.items())))
        lines.append("  decided by: " + ", ".join(f"{t} {n:,}" for t, n in sorted(r.by_tier.items())))
        if r.fallbacks:
            lines.append("  fallbacks: " + ", ".join(f"{f} {n:,}" for f, n in sorted(r.fallbacks.items())))
        if r.model_us_per_input is not None:
            lines.append(f"  candidate model: {r.model_us_per_input:.2f} us per input, {r.model_runs:,} batched runs")
    for c in r.changes:
        lines.append(f"  seq {c.seq}: {c.recorded.action} ({c.recorded.tier}) -> {c.replayed.action} "
                     f"({c.replayed.tier}:{c.replayed.tier_name}, label {c.replayed.label})")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from .._report import plot_report, report_text, value_report
    from ._main import _since_ns

    config = load_config(Path(args.device_config) if args.device_config else None)
    since = _since_ns(args.since)
    args.since = None  # the period is the report's: records before it still say whether the link was up
    cost = args.cloud_call_cost if args.cloud_call_cost is not None else config.value.cloud_call_cost
    report = value_report(_records(args), since_ns=since, cloud_call_cost=cost, currency=config.value.currency)
    if args.png:
        try:
            plot_report(report, args.png)
        except RuntimeError as exc:
            print(f"edge: {exc}", file=sys.stderr)
            return EXIT_USAGE
    shown = report_text(report) + (f"\n  timeline and tier shares: {args.png}" if args.png else "")
    _emit(args, report, shown)
    return EXIT_OK


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", dest="device_config", metavar="FILE",
                   help="the device's config: where its log is, and its pipelines (default: the bundled example)")
    p.add_argument("--db", help="the audit log file itself (instead of -c's data_dir)")
    p.add_argument("--from-export", metavar="FILE", help="read an `edge audit export` file instead of a log")
    p.add_argument("--since", help="a duration back from now ('24h', '7d') or an ISO time")
    p.add_argument("--from-seq", type=int, default=1)
    p.add_argument("--to-seq", type=int)


def register_value(sub: Any, add: Add) -> None:
    p = add("replay", cmd_replay, "decide recorded inputs again with a candidate model and/or config; "
                                  "what would change (never publishes, never writes the log)")
    _source_args(p)
    p.add_argument("--model", metavar="FOLDER", help="the candidate model (a folder with model.onnx and "
                                                     "manifest.toml): replaces the pipelines' own model tier")
    p.add_argument("--config", dest="candidate_config", metavar="FILE",
                   help="the candidate config (rules, ladder, thresholds; default: -c's)")
    p.add_argument("--changes", type=int, default=20, metavar="N", help="list at most N changed decisions")
    p = add("report", cmd_report, "what the AI was worth over a period: decisions by tier, cloud calls avoided, "
                                  "fallbacks, approvals and overrides, time offline, agreement")
    _source_args(p)
    p.set_defaults(since="7d")
    p.add_argument("--png", metavar="FILE", help="also draw the timeline and tier shares (needs matplotlib)")
    p.add_argument("--cloud-call-cost", type=float, help="price one cloud call (default: value.cloud_call_cost)")

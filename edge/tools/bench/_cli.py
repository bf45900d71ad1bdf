"""The command line (`scripts/bench.py`, `edge bench`): options in, the table printed, bench.json written."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path

import nats.errors

from edge import EdgeError

from ._constants import SECTIONS
from ._results import BenchOptions, BenchResult
from ._run import command_line, run_bench
from ._table import format_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="The edge runtime benchmark against a bare baseline.")
    parser.add_argument("--quick", action="store_true", help="smoke mode: small sizes, under a minute")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json, bench.txt and bench.log")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--profile", action="store_true", help="also profile the runtime's hot path (cProfile)")
    parser.add_argument("--rss-decisions", type=int, default=None,
                        help="decisions for the RSS run (default 20k quick, 1M full)")
    parser.add_argument("--seed", type=int, default=20240601)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`scripts/bench.py` and `edge bench`: run, print the table, write bench.json.

    Exit 0, 1 when something could not be measured, 2 on bad usage.
    """
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    options = BenchOptions(quick=args.quick, out=args.out, sections=sections, profile=args.profile,
                           rss_decisions=args.rss_decisions, seed=args.seed, command=command_line())
    if set(sections) - set(SECTIONS):
        print(f"bench: unknown sections {sorted(set(sections) - set(SECTIONS))}; expected some of {SECTIONS}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The runtime's own warnings (link changes, uploader back-off) go to a file: the table stays readable.
    handler = logging.FileHandler(out / "bench.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        result = _run(run_bench(options))
    except (EdgeError, OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        handler.close()
    print(format_table(result))
    print(f"wrote {out / 'bench.json'}")
    return 0


def _run(coro: Awaitable[BenchResult]) -> BenchResult:
    async def wrapped() -> BenchResult:
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapped())
    return uvloop.run(wrapped())

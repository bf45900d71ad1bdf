"""The `edge` command line (SPEC §3). Exit codes: 0 success, 1 runtime failure, 2 bad usage or input."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models import ModelError, inspect_model
from sync import SyncError

from ._config import Config, load_config
from ._errors import ConfigError, EdgeError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_async(coro: Any) -> Any:
    """Run on uvloop where it is available (SPEC §1), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- commands --------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file))
    if args.json:
        print_json({"ok": True, "file": args.file, "device_id": config.device_id,
                    "pipelines": [p.name for p in config.pipelines]})
    else:
        print(f"{args.file}: ok ({len(config.pipelines)} pipeline(s), {len(config.models)} model(s))")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from ._runtime import run

    config = _load(args)
    run_async(run(config))
    return EXIT_OK


def cmd_models_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(Path(args.path))
    if args.json:
        print_json(info)
        return EXIT_OK
    for key, value in info.items():
        if isinstance(value, (list, dict)):
            print(f"{key}:")
            for item in value if isinstance(value, list) else [f"{k} = {v}" for k, v in value.items()]:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")
    return EXIT_OK


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if getattr(args, "config", None) else None)


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="Edge AI orchestrator runtime.")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("run", cmd_run, "run the runtime until SIGINT/SIGTERM, then drain")
    p.add_argument("-c", "--config", help="config file (default: the bundled example)")

    p = add("check", cmd_check, "validate a config file")
    p.add_argument("file")

    models = sub.add_parser("models", help="model files").add_subparsers(dest="models_command", required=True)
    p = add("inspect", cmd_models_inspect, "print a model's inputs, outputs, manifest and sha256", models)
    p.add_argument("path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    started = time.monotonic()
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"edge: {exc.source or 'config'}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelError, FileNotFoundError) as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (EdgeError, SyncError) as exc:
        print(f"edge: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    logging.getLogger("edge.cli").debug("done in %.3fs", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())

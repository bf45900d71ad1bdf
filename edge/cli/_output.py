"""What every `edge` command shares: exit codes, one line per error, JSON output, logging, the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from models import ModelError
from sync import SyncError

from .._config import Config
from .._errors import CommandError, ConfigError, EdgeError

_T = TypeVar("_T")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# Command errors that mean the operator asked wrongly (exit 2), not that a device failed (exit 1).
_USAGE_CODES = frozenset({"bad_target", "unknown_verb", "bad_seed", "bad_credentials"})


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error that ends a command, after printing it as one line on stderr."""
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            print(f"edge: {exc.source or 'config'}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, CommandError):
        print(f"edge: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if exc.code in _USAGE_CODES else EXIT_FAILURE
    print(f"edge: {exc}", file=sys.stderr)
    if isinstance(exc, ModelError | FileNotFoundError):
        return EXIT_USAGE
    return EXIT_FAILURE


# What exit_code_for answers; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (EdgeError, SyncError, ModelError, FileNotFoundError)


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


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the record (tests swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: str, fmt: str) -> None:
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on uvloop where it is available (SPEC §1), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def local_url(config: Config) -> str:
    """The device's local bus: the config's URL, or for an embedded server the URL the running
    runtime wrote in `data_dir/local.url` (its port may have been chosen at start). That file
    never holds credentials: they come from the config's `nats.local_auth`."""
    if config.nats.local != "embedded":
        return config.nats.local
    url_file = config.resolve(config.data_dir) / "local.url"
    try:
        return url_file.read_text().strip()
    except OSError:
        return f"nats://127.0.0.1:{config.nats.embedded_port}"

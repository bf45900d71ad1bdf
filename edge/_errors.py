"""The runtime's exceptions, one tree.

    EdgeError                      root: every error the runtime raises on purpose
    ├── ConfigError                a config (file, pushed, or env override) is wrong; carries every problem
    ├── RuleError                  a rule expression does not parse or names an unknown field
    ├── InputRejected              one input message cannot be decoded or validated (reason, detail)
    ├── ServerError                an embedded nats-server did not start or stopped unexpectedly
    └── CommandError               a fleet command is malformed, unauthorised or failed (code, message)

`models` and `sync` keep trees of their own (`ModelError`, `SyncError`); the CLI turns any of them
into one line and an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

QUOTE_CHARS = 200  # outside text (a name, a path, a body) is quoted at most this long in errors and logs
MESSAGE_CHARS = 1000  # and no error message is longer than this, whatever it quotes


def quoted(text: object, limit: int = QUOTE_CHARS) -> str:
    """`repr` of outside text, cut to `limit` characters with the full length said: never the whole of it."""
    value = str(text)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _bounded(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else f"{message[:MESSAGE_CHARS]}... (cut)"


class EdgeError(Exception):
    """Root of every error the runtime raises on purpose."""


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a config: where (`pipelines[0].rules[2].when`) and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(EdgeError):
    """A config is wrong; `problems` lists every problem found, each with its key path."""

    def __init__(self, problems: Sequence[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        lines = "; ".join(str(p) for p in self.problems)
        super().__init__(f"{where}{lines}")


class RuleError(EdgeError):
    """A rule expression is malformed or names something unknown; `column` is 1-based, 0 if unknown."""

    def __init__(self, message: str, expression: str = "", column: int = 0) -> None:
        self.message = message
        self.expression = expression
        self.column = column
        at = f" at column {column}" if column else ""
        super().__init__(f"{message}{at} in {expression!r}" if expression else message)


class InputRejected(EdgeError):
    """One input message was refused: `reason` is a short code (`schema`, `not_json`...), `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail = _bounded(detail)
        super().__init__(f"{reason}: {detail}")


class ServerError(EdgeError):
    """An embedded nats-server could not be started or died."""


class CommandError(EdgeError):
    """A fleet command failed; `code` is machine-readable (`bad_command`, `unauthorized`, ...)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message = _bounded(message)
        super().__init__(f"{code}: {message}")

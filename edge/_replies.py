"""Where the runtime may publish a reply, and refusals counted per second instead of audited one by one.

A request's reply subject is chosen by whoever sent it. Obeyed blindly, it would let any client
make the device publish a Decision or a command Reply, with the device's own credentials, onto
its audit stream subject, another pipeline's decision subject or an actuator's. So a reply goes
only to a subject whose first token is one of `nats.reply_prefixes` (default `_INBOX`) or begins
with one of them followed by `_` (`_INBOX_gw-17.x` matches `_INBOX`; `_INBOXevil.x` does not).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

EXAMPLE_CHARS = 200  # outside text is quoted truncated, never whole


class ReplyPolicy:
    """Decides whether a reply subject is one the runtime may publish to; counts the refusals."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.prefixes = tuple(prefixes)
        self.refused = 0

    def allows(self, subject: str) -> bool:
        first = subject.split(".", 1)[0]
        for prefix in self.prefixes:
            if first == prefix or first.startswith(prefix + "_"):
                return True
        self.refused += 1
        return False


class RefusalTally:
    """Events of one kind counted, then recorded as one audit record per window (never one per message):
    refusals (a window of a second), read-only commands such as `status` polls (a minute).

    `add` counts; `flush` writes what the window gathered as `{until, counts, examples}` under
    `kind` and is called by whoever owns the tally, once a window and at the end.
    """

    def __init__(self, kind: str, record: Callable[[str, dict[str, Any]], None], *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.kind = kind
        self.record = record
        self.clock = clock
        self.totals: Counter[str] = Counter()
        self._window: Counter[str] = Counter()
        self._examples: dict[str, str] = {}

    def add(self, reason: str, example: str = "") -> None:
        self.totals[reason] += 1
        self._window[reason] += 1
        if example and reason not in self._examples:
            self._examples[reason] = example[:EXAMPLE_CHARS]

    @property
    def pending(self) -> int:
        """Refusals counted but not yet recorded (the current second's)."""
        return sum(self._window.values())

    def flush(self) -> None:
        if not self._window:
            return
        body: dict[str, Any] = {"until": self.clock(), "counts": dict(self._window)}
        if self._examples:
            body["examples"] = dict(self._examples)
        self._window.clear()
        self._examples.clear()
        self.record(self.kind, body)

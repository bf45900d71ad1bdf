"""What every wire-facing module of the runtime shares: the msgpack content type, and msgspec's
validation errors said in our words (which key, what was expected)."""

from __future__ import annotations

from typing import NamedTuple

MSGPACK = "application/msgpack"  # the Content-Type header value that switches a message to msgpack


class ValidationIssue(NamedTuple):
    """One msgspec validation error, taken apart."""

    path: str  # where, as `pipelines[0].rules` ("" at the top level)
    message: str  # msgspec's text without the location, first letter lowered ("expected `int`, got `str`")
    unknown: str = ""  # the field that is not allowed there, for "unknown field" errors
    missing: str = ""  # the required field that is absent, for "missing field" errors
    located: bool = True  # False when msgspec named no location (the whole value is wrong)


def validation_issue(text: str) -> ValidationIssue:
    """msgspec says "Expected `int`, got `str` - at `$.pipelines[0].max_batch`": take that apart."""
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, ""
    path = where.rstrip("`").removeprefix("$").removeprefix(".")
    quoted = message.split("`")[1] if "`" in message else ""
    lowered = message[:1].lower() + message[1:]
    if message.startswith("Object contains unknown field"):
        return ValidationIssue(path, lowered, unknown=quoted or "?", located=bool(sep))
    if message.startswith("Object missing required field"):
        return ValidationIssue(path, lowered, missing=quoted or "?", located=bool(sep))
    return ValidationIssue(path, lowered, located=bool(sep))

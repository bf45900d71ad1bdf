"""Decoding and validating one pipeline's input messages (pure: bytes in, values or a reason out).

The pipeline's `input` table becomes a msgspec Struct type once, so decoding and type checking
are one C call per message. Unknown fields are tolerated (sensors evolve); the fields the
pipeline names are checked for type, presence and finiteness, and an `int` is a 64-bit signed
integer: JSON allows a 4,300-digit one, which no model, rule or audit reader should meet.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from ._codec import MSGPACK, validation_issue
from ._errors import InputRejected
from ._messages import Rejected
from ._rules import FIELD_TYPES

INT64 = msgspec.Meta(ge=-(2**63), le=2**63 - 1)
_TYPES: dict[str, Any] = {"float": float, "int": Annotated[int, INT64], "str": str, "bool": bool}
assert tuple(_TYPES) == FIELD_TYPES  # one Python type for each field type the config allows
SAMPLE_BYTES = 256


class InputSchema:
    """Turns raw message bytes into a dict of validated field values, or raises `InputRejected`."""

    def __init__(self, fields: Mapping[str, str], *, max_bytes: int) -> None:
        self.fields = dict(fields)
        self.max_bytes = max_bytes
        spec: list[tuple[str, Any, Any]] = []
        required = []
        optional = []
        for name, kind in fields.items():
            base = _TYPES[kind.removesuffix("?")]
            if kind.endswith("?"):
                optional.append((name, base | None, None))
            else:
                required.append((name, base))
        spec = [*required, *optional]  # type: ignore[list-item]
        self.struct_type = msgspec.defstruct("Input", spec, forbid_unknown_fields=False)
        self._json = msgspec.json.Decoder(self.struct_type)
        self._msgpack = msgspec.msgpack.Decoder(self.struct_type)
        self._names = tuple(fields)
        self._float_names = tuple(n for n, k in fields.items() if k.removesuffix("?") == "float")

    def decode(self, data: bytes, content_type: str = "") -> dict[str, Any]:
        """Validated values for every declared field (optional ones may be None)."""
        if len(data) > self.max_bytes:
            raise InputRejected("too_large", f"{len(data)} bytes, the limit is {self.max_bytes}")
        msgpack = content_type == MSGPACK
        try:
            value = (self._msgpack if msgpack else self._json).decode(data)
        except msgspec.ValidationError as exc:
            message = str(exc)
            if message.startswith("Number out of range"):
                # 1e999 and friends: JSON's only way to spell infinity.
                raise InputRejected("not_finite", _schema_detail(message)) from None
            raise InputRejected("schema", _schema_detail(message)) from None
        except msgspec.DecodeError as exc:
            kind = "not_msgpack" if msgpack else "not_json"
            raise InputRejected(kind, str(exc)) from None
        except RecursionError:
            raise InputRejected("too_deep", "nesting is deeper than the decoder allows") from None
        values = {name: getattr(value, name) for name in self._names}
        for name in self._float_names:
            v = values[name]
            if v is not None and not math.isfinite(v):
                raise InputRejected("not_finite", f"field {name!r} is {v!r}; expected a finite number")
        return values


def _schema_detail(message: str) -> str:
    # msgspec: "Expected `float`, got `str` - at `$.rms`" → "field 'rms': expected `float`, got `str`".
    issue = validation_issue(message)
    if not issue.located:
        if message.startswith("Expected `object`"):
            return "expected a JSON object with the pipeline's input fields"
        return message
    return f"field {issue.path!r}: {issue.message}"


def rejection(pipeline: str, subject: str, data: bytes, error: InputRejected) -> Rejected:
    """The Rejected message for an input, with a base64 sample of its first bytes."""
    return Rejected(
        pipeline=pipeline,
        subject=subject,
        reason=error.reason,
        detail=error.detail,
        size=len(data),
        sample=base64.b64encode(data[:SAMPLE_BYTES]).decode("ascii"),
    )

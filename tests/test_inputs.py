"""Input decoding: each kind of bad input gets its own precise reason."""

from __future__ import annotations

import base64

import msgspec
import pytest

from edge import InputRejected
from edge._codec import MSGPACK
from edge._inputs import InputSchema, rejection

FIELDS = {"rms": "float", "kurtosis": "float", "temp_c": "float", "rpm": "float", "asset": "str?"}


@pytest.fixture
def schema() -> InputSchema:
    return InputSchema(FIELDS, max_bytes=1024)


def reason(schema: InputSchema, data: bytes, content_type: str = "") -> InputRejected:
    with pytest.raises(InputRejected) as info:
        schema.decode(data, content_type)
    return info.value


def test_valid_json_and_msgpack(schema: InputSchema) -> None:
    row = {"rms": 1.0, "kurtosis": 3, "temp_c": 40.5, "rpm": 1450.0, "extra": "ignored"}
    values = schema.decode(msgspec.json.encode(row))
    assert values == {"rms": 1.0, "kurtosis": 3.0, "temp_c": 40.5, "rpm": 1450.0, "asset": None}
    assert schema.decode(msgspec.msgpack.encode(row), MSGPACK)["temp_c"] == 40.5


@pytest.mark.parametrize(
    ("data", "expected_reason", "detail_has"),
    [
        (b"\x00\xff\xfe garbage", "not_json", ""),
        (b'{"rms": 1.0', "not_json", ""),
        (b'{"rms": "loud", "kurtosis": 3, "temp_c": 40, "rpm": 1}', "schema", "rms"),
        (b'{"kurtosis": 3, "temp_c": 40, "rpm": 1}', "schema", "rms"),
        (b"[1, 2, 3]", "schema", "object"),
        (b'{"rms": 1e999, "kurtosis": 3, "temp_c": 40, "rpm": 1}', "not_finite", "rms"),
        (b'{"rms": 1, "kurtosis": 3, "temp_c": 40, "rpm": 1, "asset": 7}', "schema", "asset"),
        (b"x" * 2000, "too_large", "1024"),
    ],
)
def test_bad_input_reasons(schema: InputSchema, data: bytes, expected_reason: str, detail_has: str) -> None:
    error = reason(schema, data)
    assert error.reason == expected_reason
    assert detail_has in error.detail


def test_nan_in_msgpack_is_not_finite(schema: InputSchema) -> None:
    data = msgspec.msgpack.encode({"rms": float("nan"), "kurtosis": 3.0, "temp_c": 40.0, "rpm": 1.0})
    assert reason(schema, data, MSGPACK).reason == "not_finite"


def test_deep_nesting_is_rejected_not_crashing(schema: InputSchema) -> None:
    data = b'{"junk": ' + b"[" * 900 + b"]" * 900 + b', "rms": 1}'
    error = reason(InputSchema(FIELDS, max_bytes=1 << 20), data)
    assert error.reason in ("schema", "not_json", "too_deep")


def test_rejection_carries_a_base64_sample() -> None:
    data = b"z" * 300
    rejected = rejection("pump", "sensors.p1.pump", data, InputRejected("not_json", "bad"))
    assert rejected.size == 300
    assert base64.b64decode(rejected.sample) == data[:256]

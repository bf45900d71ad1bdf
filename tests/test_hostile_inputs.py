"""Hostile inputs and configs (SPEC §9, §12): every input gets exactly one answer, the inbox is bounded
in bytes, and a config that would loop a pipeline on its own output, or spin a timer, is refused.

The matrix drives every field type with extreme values through a real runtime on a real nats-server
(a model without a training range, so the extremes reach the model's float32 input, and a shadow
beside it) and counts the answers: one Decision or one Rejected per input, nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from nats.aio.msg import Msg

from edge import Runtime
from edge._codec import MSGPACK
from edge._config import subjects_overlap
from edge._pipeline import CLOUD_IN_FLIGHT, INBOX_BYTES
from edge.cli import main
from tests.model_builders import matmul_model, write_model
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, config_data, connect, make_config, write_config

FIELDS = {"rms": "float", "kurtosis": "float", "temp_c": "float", "rpm": "int", "count": "int?", "note": "str",
          "flag": "bool", "level": "float?", "tag": "str?", "armed": "bool?"}
BASE: dict[str, Any] = {"rms": 1.0, "kurtosis": 3.0, "temp_c": 40.0, "rpm": 1480, "note": "ok", "flag": False}
RULES = [
    {"when": "flag and rpm > 10000", "action": "inspect", "label": "fast"},
    {"when": "rms * 2 > 7.5 or temp_c / rpm > 1 or count % 7 == 3 or abs(level) > 1e300", "action": "inspect",
     "label": "anomaly"},
    {"when": "note == 'stop' or tag in ['x', 'ünï']", "action": "shutdown", "label": "critical"},
    {"default": True, "action": "none", "label": "normal"},
]
BIG = 2**63
OVERSIZED_STR = '"x' + "y" * 70_000 + '"'  # a JSON string literal past max_input_bytes


def _json(**fields: Any) -> bytes:
    return msgspec.json.encode({**BASE, **fields})


def _raw_json(field: str, literal: str) -> bytes:
    """`BASE` with one field spelt as a raw JSON literal (what no encoder would write)."""
    body = msgspec.json.encode({k: v for k, v in BASE.items() if k != field}).decode()
    return f'{body[:-1]}, "{field}": {literal}}}'.encode()


def _msgpack(**fields: Any) -> tuple[bytes, dict[str, str]]:
    return msgspec.msgpack.encode({**BASE, **fields}), {"Content-Type": MSGPACK}


def _short(literal: str) -> str:
    return literal if len(literal) <= 20 else f"{literal[:12]}...({len(literal)})"


def extreme_inputs() -> list[tuple[str, bytes, dict[str, str] | None]]:
    """(name, body, headers): every field type at and beyond its edges, and junk around them."""
    cases: list[tuple[str, bytes, dict[str, str] | None]] = []
    floats = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-45, 1e308, -1e308, 1.7976931348623157e308,
              3.5e38, -3.5e38, 3.4028234e38, 16777217.0, 1e-300]
    for name in ("rms", "kurtosis", "temp_c", "level"):
        cases += [(f"{name}={v!r}", _json(**{name: v}), None) for v in floats]
        cases += [(f"{name}={_short(lit)}", _raw_json(name, lit), None) for lit in
                  ("1e309", "-1e309", "1" + "0" * 400, "-" + "9" * 5000, "1E-400", "0.0000001e-330", '"1.5"',
                   "true", "null", "[1.0]", '{"v": 1.0}', "NaN", "Infinity", "1.0.0")]
    for name in ("rpm", "count"):
        cases += [(f"{name}={v}", _json(**{name: v}), None) for v in
                  (0, -1, 1, BIG - 1, -BIG, BIG, -BIG - 1, 2**64, 10**30, 16777217)]
        cases += [(f"{name}={_short(lit)}", _raw_json(name, lit), None) for lit in
                  ("1" + "0" * 308, "1" + "0" * 400, "9" * 4300, "9" * 5000, "1.5", "1e3", "-0", "true", '"7"', "[]")]
        cases += [(f"{name}=msgpack {v}", *_msgpack(**{name: v})) for v in (BIG - 1, -BIG, 2**64 - 1)]
    for name in ("note", "tag"):
        cases += [(f"{name}={v[:12]!r}", _json(**{name: v}), None) for v in
                  ("", "x" * 60_000, "ünïcödé 🚀", "\u0000", "\u202e evil", "a\nb", "'; drop", "\\", "ünï", "x")]
        cases += [(f"{name}={_short(lit)}", _raw_json(name, lit), None) for lit in
                  ('"\\ud800"', '"\\udfff\\ud800"', "7", "null", "[\"a\"]", OVERSIZED_STR)]
    for name in ("flag", "armed"):
        cases += [(f"{name}={v}", _json(**{name: v}), None) for v in (True, False)]
        cases += [(f"{name}={lit}", _raw_json(name, lit), None) for lit in ("0", "1", '"true"', "null", "[]")]
    junk = [b"", b"null", b"[]", b"[1, 2, 3]", b'"just a string"', b"{}", b"{" * 5000, b"[" * 100_000,
            _json(extra={"a": [1, {"b": [None] * 100}]}), _raw_json("rms", '1.0, "rms": 2.0'),
            b"\xff\xfe\xfd", b'{"rms": 1.0' + b" " * 70_000 + b"}", "{\"rms\": \"ü\"}".encode("utf-16")]
    cases += [(f"junk {i}", body, None) for i, body in enumerate(junk)]
    cases += [("msgpack junk", b"\xc1\xc1", {"Content-Type": MSGPACK}),
              ("msgpack ext", msgspec.msgpack.encode({**BASE, "rms": msgspec.msgpack.Ext(1, b"x")}),
               {"Content-Type": MSGPACK}),
              ("msgpack bin note", msgspec.msgpack.encode({**BASE, "note": b"\x00\x01"}), {"Content-Type": MSGPACK})]
    return cases


async def test_every_extreme_input_gets_exactly_one_decision_or_rejected(nats_servers: ServerFactory,
                                                                         tmp_path: Path) -> None:
    server = await nats_servers("hub")
    # No training range: the extremes reach the batcher's float32 conversion.
    folder = write_model(tmp_path / "m", matmul_model(np.eye(4, 3, dtype=np.float32), softmax=True),
                         features=["rms", "kurtosis", "temp_c", "rpm"], labels=["normal", "anomaly", "critical"],
                         task="classifier", scores="probabilities")
    models = [{"name": "m", "path": str(folder)}, {"name": "m-shadow", "path": str(folder)}]
    pipeline = {"name": "p", "subscribe": ["sensors.*.x"], "input": FIELDS, "rules": RULES, "model": "m",
                "shadow": "m-shadow", "ladder": ["model", "rules"], "min_confidence": 0.0, "labels": {}}
    config = make_config(tmp_path, server.url, device="gw-x", pipeline=pipeline, models=models)
    cases = extreme_inputs()
    nc = await connect(server.url)
    answers: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(cases))}
    published: list[Msg] = []

    async def on_answer(msg: Msg) -> None:
        try:
            answer = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:  # a decision answers a msgpack input in msgpack
            answer = msgspec.msgpack.decode(msg.data)
        answers[int(msg.subject.rsplit(".", 1)[1])].append(answer)

    async def on_published(msg: Msg) -> None:
        published.append(msg)

    await nc.subscribe("_INBOX.matrix.*", cb=on_answer, pending_msgs_limit=100_000)
    await nc.subscribe("edge.gw-x.decision.p", cb=on_published, pending_msgs_limit=100_000)
    await nc.subscribe("edge.gw-x.rejected.p", cb=on_published, pending_msgs_limit=100_000)
    await nc.flush()
    async with Runtime(config) as runtime:
        for i, (_, body, headers) in enumerate(cases):
            await nc.publish("sensors.a.x", body, reply=f"_INBOX.matrix.{i}", headers=headers)
        await nc.flush()
        await wait_until(lambda: all(answers.values()), within=30, what="an answer to every input")
        # Then nothing more: the pipeline's own counts and what it published agree, one per input.
        await wait_until(lambda: len(published) >= len(cases), within=10, what="every answer published")
        status = runtime.pipelines["p"].status()
        assert status["decisions"] + sum(status["rejected"].values()) == len(cases)
        assert len(published) == len(cases)
        for i, (name, _, _) in enumerate(cases):
            got = answers[i]
            assert len(got) == 1, f"{name}: {len(got)} answers"
            assert ("action" in got[0]) != ("reason" in got[0]), f"{name}: neither a Decision nor a Rejected"
        decided = {name for i, (name, _, _) in enumerate(cases) if "action" in answers[i][0]}
        rejected = {name: answers[i][0]["reason"] for i, (name, _, _) in enumerate(cases) if "reason" in answers[i][0]}
        # The edges decide; beyond them, a precise reason.
        assert {"rpm=9223372036854775807", "rpm=-9223372036854775808", "rms=1e+308", "rms=5e-324",
                "note='xxxxxxxxxxxx'", "flag=True"} <= decided
        assert len(cases) > 200 and len(decided) > 50 and len(rejected) > 50, (len(decided), len(rejected))
        for name in ("rpm=9223372036854775808", "rpm=-9223372036854775809", "rpm=100000000000...(401)",
                     "count=999999999999...(4300)", "rpm=msgpack 18446744073709551615", "rpm=1.5", "flag=0"):
            assert rejected[name] == "schema", (name, rejected[name])
        assert rejected["rms=1e309"] == rejected["level=100000000000...(401)"] == "not_finite"
        assert rejected[f"note={_short(OVERSIZED_STR)}"] == "too_large"
        fallbacks = {fb["reason"] for msg in published for fb in msgspec.json.decode(msg.data).get("fallbacks", [])}
        assert "out_of_range" in fallbacks  # 1e308 cannot be a float32: the model steps aside, the rules decide
        # And the runtime still decides as usual.
        reply = await nc.request("sensors.a.x", _json(), timeout=5)
        assert msgspec.json.decode(reply.data)["tier"] == "model"
    await nc.close()


async def test_an_oversized_input_is_rejected_before_it_queues_and_the_inbox_is_bounded_in_bytes(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    await nc.subscribe("cloud.slow")  # a cloud that never answers: every worker waits on it (then the breaker opens)
    pipeline = {"ladder": ["cloud", "rules"], "model": "", "cloud": {"subject": "cloud.slow", "timeout_ms": 6000}}
    config = make_config(tmp_path, server.url, device="gw-q", pipeline=pipeline)
    async with Runtime(config) as runtime:
        pump = runtime.pipelines["pump"]
        for _ in range(300):  # 256 wait on the cloud; the batch task waits for a slot, the rest queue
            await nc.publish("sensors.p1.pump", msgspec.json.encode(NORMAL))
        await nc.flush()
        await wait_until(lambda: pump.status()["waiting"]["cloud"] == CLOUD_IN_FLIGHT, within=5,
                         what="256 inputs waiting for the cloud")
        queued = pump.status()["inbox"]["messages"]
        await nc.publish("sensors.p1.pump", msgspec.json.encode(NORMAL))  # nothing takes from the queue now
        await wait_until(lambda: pump.status()["inbox"]["messages"] == queued + 1, within=5, what="one more queued")
        started = time.monotonic()
        reply = await nc.request("sensors.p1.pump", b"{" + b" " * 70_000 + b"}", timeout=3)
        assert msgspec.json.decode(reply.data)["reason"] == "too_large"
        assert time.monotonic() - started < 1.5  # not behind the queue: the cloud has not answered anyone
        assert pump.status()["inbox"]["messages"] == queued + 1  # it never took a place there

        padded = msgspec.json.encode({**NORMAL, "asset": "p" * 60_000})
        for _ in range(700):  # 42 MB: the count (4096) would hold them all
            await nc.publish("sensors.p1.pump", padded)
        await nc.flush()
        await wait_until(lambda: pump.status()["inbox"]["bytes"] > INBOX_BYTES - 128 * 1024, within=10,
                         what="the inbox full (in bytes)")
        inbox = pump.status()["inbox"]
        assert inbox["bytes"] <= INBOX_BYTES and inbox["messages"] < queued + 1 + 700  # held back by bytes
    await nc.close()


# ---------------------------------------------------------------------------------------------
# Configs: `edge check`


@pytest.mark.parametrize(("a", "b", "overlap"), [
    (">", "edge.gw.>", True), ("edge.>", "edge.gw.>", True), ("edge.*.decision.*", "edge.gw.>", True),
    ("*.gw.x", "edge.gw.>", True), ("edge.gw", "edge.gw.>", False), ("edge.other.>", "edge.gw.>", False),
    ("sensors.*.pump", "edge.gw.>", False), ("a.*", "a.b.c", False), ("a.*.c", "a.b.*", True),
    ("a.b", "a.b", True), ("a.>", "a", False),
])
def test_subject_overlap(a: str, b: str, overlap: bool) -> None:
    assert subjects_overlap(a, b) is overlap and subjects_overlap(b, a) is overlap


def test_check_refuses_a_pipeline_that_hears_the_devices_own_subjects(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    subjects = ["sensors.*.pump", ">", "edge.>", "edge.*.decision.*", "edge.gw-c.rejected.pump", "*.gw-c.>",
                "edge.gw-other.decision.pump"]
    data = config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-c", pipeline={"subscribe": subjects})
    assert main(["check", str(write_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    for j in (1, 2, 3, 4, 5):
        assert f"pipelines[0].subscribe[{j}]" in err and "edge.gw-c.>" in err, err
    assert "subscribe[0]" not in err and "subscribe[6]" not in err
    # A custom publish subject is the pipeline's own output too.
    data = config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-c",
                       pipeline={"subscribe": ["plant.>"], "publish": "plant.decisions.{pipeline}"})
    assert main(["check", str(write_config(tmp_path, data))]) == 2
    assert "pipelines[0].subscribe[0]" in capsys.readouterr().err


def test_check_refuses_timing_settings_below_their_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = {"ladder": ["model", "cloud", "rules"], "cloud": {"subject": "cloud.x", "timeout_ms": 0},
                "actions": {"shutdown": {"approval": "required", "approval_timeout_ms": 1, "instead": "hold"},
                            "hold": {}}}
    data = config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-c", pipeline=pipeline,
                       link={"probe_interval_ms": 0, "probe_timeout_ms": 1, "breaker_reset_ms": 5},
                       fleet={"heartbeat_s": 1e-9})
    data["models"][0]["warmup_timeout_ms"] = 1
    assert main(["check", str(write_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    for key in ("fleet.heartbeat_s", "link.probe_interval_ms", "link.probe_timeout_ms", "link.breaker_reset_ms",
                "pipelines[0].cloud.timeout_ms", "pipelines[0].actions.shutdown.approval_timeout_ms",
                "models[0].warmup_timeout_ms"):
        assert key in err, (key, err)
    data = config_data(tmp_path, "nats://127.0.0.1:4222", device="gw-c", fleet={"heartbeat_s": 0.1},
                       link={"probe_interval_ms": 10, "probe_timeout_ms": 10, "breaker_reset_ms": 10})
    assert main(["check", str(write_config(tmp_path, data))]) == 0  # the bounds themselves are fine


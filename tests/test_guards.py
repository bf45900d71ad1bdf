"""Guards (per-pipeline hard limits, checked before any tier): config checks, governance, and a real
Runtime where whoever answers as the cloud cannot override an interlock.

The integration test runs the runtime against two real nats-servers (the local bus and the "cloud"
upstream) with a forged cloud responder that always says "normal" with 0.99 confidence.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from edge import BUNDLED_CONFIG, CommandError, ConfigError, Runtime, decode_config, load_config
from edge._config import ActionPolicy
from edge._governance import Governor
from edge.cli import main
from edge.fleet import pushed_config
from models import bundled_model_path
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import NORMAL, bundled_config_with, config_data, connect, encode, make_config

INTERLOCK = {"when": "temp_c > 119", "action": "shutdown", "label": "interlock"}
CLOUD_SUBJECT = "cloud.infer.pump"


def with_pipeline(tmp_path: Path, **pipeline: Any) -> dict[str, Any]:
    return config_data(tmp_path, "nats://127.0.0.1:4222", pipeline=pipeline)


def problems(tmp_path: Path, **pipeline: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        decode_config(with_pipeline(tmp_path, **pipeline), base_dir=tmp_path, env={})
    return [(p.path, p.message) for p in caught.value.problems]


# --- config -----------------------------------------------------------------------------------


def test_guards_decode_and_the_bundled_example_has_one(tmp_path: Path) -> None:
    config = decode_config(with_pipeline(tmp_path, guards=[INTERLOCK]), base_dir=tmp_path, env={})
    assert [g.when for g in config.pipelines[0].guards] == ["temp_c > 119"]
    bundled = load_config(BUNDLED_CONFIG, env={})
    assert [(g.when, g.action, g.label) for g in bundled.pipelines[0].guards] == [
        ("temp_c > 119", "shutdown", "interlock")]


def test_a_guard_may_not_be_a_default(tmp_path: Path) -> None:
    found = problems(tmp_path, guards=[INTERLOCK, {"default": True, "action": "none"}])
    assert found == [("pipelines[0].guards[1].default",
                      "guards have no default: a guard needs 'when' and no 'default = true'")]
    # A guard without `when` would match everything, like a default.
    found = problems(tmp_path, guards=[{"action": "none"}])
    assert found == [("pipelines[0].guards[0]", "guards have no default: a guard needs 'when' and no 'default = true'")]


def test_a_guard_naming_an_unknown_field_is_refused_at_its_path(tmp_path: Path) -> None:
    found = problems(tmp_path, guards=[INTERLOCK, {"when": "tmp_c > 119", "action": "shutdown"}])
    assert len(found) == 1
    path, message = found[0]
    assert path == "pipelines[0].guards[1].when"
    assert "unknown field 'tmp_c'" in message and "column 1" in message


def test_a_guard_when_must_be_true_or_false(tmp_path: Path) -> None:
    found = problems(tmp_path, guards=[{"when": "temp_c + 1", "action": "shutdown"}])
    assert [path for path, _ in found] == ["pipelines[0].guards[0].when"]
    assert "must be true or false" in found[0][1]


def test_actions_produced_by_guards_count_for_instead(tmp_path: Path) -> None:
    # `stop_line` is produced by a guard only: a policy may name it as its `instead`.
    actions = {"inspect": {"approval": "required", "instead": "stop_line"}}
    guards = [{"when": "rpm > 3500", "action": "stop_line"}]
    config = decode_config(with_pipeline(tmp_path, guards=guards, actions=actions), base_dir=tmp_path, env={})
    assert config.pipelines[0].actions["inspect"].instead == "stop_line"
    found = problems(tmp_path, actions=actions)
    assert [path for path, _ in found] == ["pipelines[0].actions.inspect.instead"]
    assert "unknown action 'stop_line'" in found[0][1]


def test_an_action_may_be_allowed_to_the_guard_tier(tmp_path: Path) -> None:
    actions = {"shutdown": {"tiers": ["rules", "guard"], "instead": "hold"}, "hold": {}}
    config = decode_config(with_pipeline(tmp_path, guards=[INTERLOCK], actions=actions), base_dir=tmp_path, env={})
    assert config.pipelines[0].actions["shutdown"].tiers == ["rules", "guard"]
    found = problems(tmp_path, actions={"shutdown": {"tiers": ["guards"], "instead": "hold"}, "hold": {}})
    assert found == [("pipelines[0].actions.shutdown.tiers[0]", "unknown tier 'guards'")]


def test_edge_check_names_a_bad_guard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = bundled_config_with(tmp_path, {'{ when = "temp_c > 119"': '{ when = "temp_f > 246"'})
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "pipelines[0].guards[0].when" in err and "temp_f" in err


def test_edge_check_refuses_a_default_guard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = bundled_config_with(tmp_path, {'{ when = "temp_c > 119"': "{ default = true"})
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pipelines[0].guards[0].default" in err and "guards have no default" in err


def test_config_apply_refuses_a_bad_guard(tmp_path: Path) -> None:
    running = make_config(tmp_path, "nats://127.0.0.1:4222", device="gw-7")
    pipeline = config_data(tmp_path, "x")["pipelines"][0]
    models = [{"name": "pump-anomaly", "path": str(bundled_model_path())}]
    applied = pushed_config({"pipelines": [{**pipeline, "guards": [INTERLOCK]}], "models": models}, running)
    assert applied.pipelines[0].guards[0].label == "interlock"
    bad = {"pipelines": [{**pipeline, "guards": [{"when": "nope > 1", "action": "shutdown"}]}], "models": models}
    with pytest.raises(CommandError) as caught:
        pushed_config(bad, running)
    assert caught.value.code == "bad_config"
    assert "pipelines[0].guards[0].when" in caught.value.message and "nope" in caught.value.message


# --- governance -------------------------------------------------------------------------------


def test_governance_applies_to_a_guard_action_but_no_confidence_bar() -> None:
    # A guard has no confidence, like the rules: a model's bar does not refuse it.
    bar = Governor({"shutdown": ActionPolicy(min_confidence=0.95, instead="hold")})
    assert bar.review("shutdown", "guard", None, paused=False).status == "auto"
    assert bar.review("shutdown", "cloud", None, paused=False).status == "threshold"
    # Everything else still applies: approval, the tiers allowed, the rate limit, pause.
    approval = Governor({"shutdown": ActionPolicy(approval="required", instead="hold")})
    pending = approval.review("shutdown", "guard", None, paused=False)
    assert (pending.status, pending.action) == ("approval_pending", "hold")
    rules_only = Governor({"shutdown": ActionPolicy(tiers=["rules"], instead="hold")})
    assert rules_only.review("shutdown", "guard", None, paused=False).status == "tier_not_allowed"
    limited = Governor({"shutdown": ActionPolicy(rate_limit="1/h", instead="hold")})
    assert limited.review("shutdown", "guard", None, paused=False).status == "auto"
    assert limited.review("shutdown", "guard", None, paused=False).status == "rate_limited"
    assert bar.review("shutdown", "guard", None, paused=True).action == "hold"


# --- a real runtime and a forged cloud ----------------------------------------------------------


class ForgedCloud:
    """Answers every request on the cloud subject with a confident "normal"; keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []  # decision requests (the link's probes carry no body)
        self.probes = 0

    async def on_request(self, msg: Msg) -> None:
        if msg.data:
            self.asked.append(msgspec.json.decode(msg.data))
        else:
            self.probes += 1
        await msg.respond(b'{"label": "normal", "confidence": 0.99}')


async def test_a_forged_cloud_cannot_override_the_interlock(nats_servers: ServerFactory, tmp_path: Path) -> None:
    local = await nats_servers("local")
    cloud = await nats_servers("cloud")
    config = make_config(
        tmp_path, local.url, upstream_url=cloud.url,
        pipeline={"ladder": ["cloud", "rules"], "cloud": {"subject": CLOUD_SUBJECT, "timeout_ms": 1000},
                  "guards": [INTERLOCK],
                  # A bar no guard has to clear (a guard has no confidence), and no approval.
                  "actions": {"shutdown": {"min_confidence": 0.999, "instead": "hold"}, "hold": {}}},
    )
    cloud_nc = await connect(cloud.url)
    local_nc = await connect(local.url)
    forged = ForgedCloud()
    try:
        await cloud_nc.subscribe(CLOUD_SUBJECT, cb=forged.on_request)
        await cloud_nc.flush()
        async with Runtime(config) as runtime:
            await wait_until(lambda: runtime.link.state.value == "online", within=10, what="the cloud link online")

            async def decide(temp_c: float) -> dict[str, Any]:
                reply = await local_nc.request("sensors.p1.pump", encode({**NORMAL, "temp_c": temp_c}), timeout=5)
                decision: dict[str, Any] = msgspec.json.decode(reply.data)
                return decision

            hot = await decide(120.0)
            assert (hot["tier"], hot["label"], hot["confidence"], hot["fallbacks"]) == ("guard", "interlock", None, [])
            assert hot["action"] == "shutdown"
            assert hot["governance"]["status"] == "auto" and hot["governance"]["requested_action"] == "shutdown"
            assert hot["audit_seq"] is not None

            legit = await decide(60.0)
            assert (legit["tier"], legit["label"], legit["action"]) == ("cloud", "normal", "none")
            assert legit["confidence"] == 0.99

            # The forged cloud was asked for the legitimate input only, never for the hot one.
            assert [a["temp_c"] for a in forged.asked] == [60.0]

            def counted() -> bool:
                by_tier = runtime.status()["pipelines"]["pump"]["by_tier"]
                return bool(by_tier == {"guard": 1, "cloud": 1})

            await wait_until(counted, within=5, what="status counting one guard and one cloud decision")
    finally:
        await asyncio.gather(local_nc.close(), cloud_nc.close())

"""Desired state, the pure part (edge.fleet._desired): keys, signed values, resolution, the steps to
a desired model, and the operator's reading of reports. No network (the real thing is in
tests/test_convergence.py)."""

from __future__ import annotations

import msgspec
import pytest

from edge import CommandError
from edge.fleet import ConfigApply, ModelDeploy, ModelPromote, ModelRollback, Pause, Resume, new_seed
from edge.fleet._desired import (
    Applied,
    ConfigIntent,
    Desired,
    DesiredVerifier,
    DeviceReport,
    Divergence,
    ModelIntent,
    ModelVersion,
    PausedIntent,
    Serving,
    desired_key,
    divergence,
    encode_value,
    is_missing,
    model_steps,
    next_intent,
    parse_key,
    read_value,
    resolve,
    serving_of,
    view_fleet,
    watch_subjects,
)
from tests.runtime_harness import OPERATOR, OPERATOR_SEED

INTRUDER_SEED = new_seed()
T0 = 1_700_000_000 * 10**9
S = 10**9
V2 = ModelVersion(version="2", bucket="models", object="pump-anomaly-2.tar.gz", sha256="a" * 64, signature="c2ln")
V3 = ModelVersion(version="3", bucket="models", object="pump-anomaly-3.tar.gz", sha256="b" * 64)


def desired(key: str, value: object, timestamp: int = T0) -> Desired:
    data = encode_value(OPERATOR_SEED, key, value, timestamp_ns=timestamp)  # type: ignore[arg-type]
    return read_value(key, data, [OPERATOR])


# ---------------------------------------------------------------------------------------------
# Keys


def test_keys_name_a_level_and_what() -> None:
    assert desired_key("all", "paused") == "all.paused"
    assert desired_key("group:north", "config") == "group.north.config"
    assert desired_key("gw-7", "model.pump.v2") == "device.gw-7.model.pump.v2"
    assert parse_key("group.north.model.pump.v2") == ("group", "north", "model.pump.v2")
    assert parse_key("device.gw-7.paused") == ("device", "gw-7", "paused")
    assert parse_key("all.config") == ("all", "", "config")
    for bad in ("all.reboot", "group.north", "device..paused", "fleet.paused", "all.model.", "all.model...x",
                "group.a b.paused"):
        with pytest.raises(CommandError) as caught:
            parse_key(bad)
        assert caught.value.code == "bad_key", bad
    for target in ("group:", "group", "a.b"):
        with pytest.raises(CommandError, match="bad_target"):
            desired_key(target, "paused")
    assert watch_subjects("gw-7", ["north", "pumps"]) == [
        "$KV.EDGE_FLEET.all.>", "$KV.EDGE_FLEET.group.north.>", "$KV.EDGE_FLEET.group.pumps.>",
        "$KV.EDGE_FLEET.device.gw-7.>"]


# ---------------------------------------------------------------------------------------------
# Signed values


def test_a_value_verifies_only_under_its_own_key_by_a_trusted_signer() -> None:
    key = "group.north.paused"
    data = encode_value(OPERATOR_SEED, key, PausedIntent(paused=True, reason="storm", by="ops"), timestamp_ns=T0)
    assert b'"value":{"paused":true' in data  # readable by any KV tool
    got = DesiredVerifier().verify(key, data, [OPERATOR])
    assert (got.scope, got.target, got.what, got.signer, got.timestamp) == ("group", "north", "paused", OPERATOR, T0)
    assert got.value == PausedIntent(paused=True, reason="storm", by="ops") and got.by == "ops"

    def refused(key: str, data: bytes, trusted: list[str] | None = None) -> str:
        with pytest.raises(CommandError) as caught:
            DesiredVerifier().verify(key, data, [OPERATOR] if trusted is None else trusted)
        return caught.value.code

    assert refused("group.south.paused", data) == "bad_signature"  # moved to another key
    assert refused("all.paused", data) == "bad_signature"
    tampered = data.replace(b'"paused":true', b'"paused":false')
    assert refused(key, tampered) == "bad_signature"
    assert refused(key, data, trusted=[]) == "unauthorized"  # a device that trusts nobody
    assert refused(key, encode_value(INTRUDER_SEED, key, PausedIntent(paused=False))) == "unauthorized"
    forged = msgspec.json.decode(data)
    forged["signer"] = OPERATOR
    forged["signature"] = msgspec.json.decode(encode_value(INTRUDER_SEED, key, PausedIntent(paused=True)))["signature"]
    assert refused(key, msgspec.json.encode(forged)) == "bad_signature"  # a trusted name on another's signature
    assert refused(key, b'{"value": {"paused": false}}') == "unsigned"
    assert refused(key, b"not json") == "bad_value"
    assert refused(key, b"x" * (1024 * 1024 + 1)) == "too_large"
    typo = encode_value(OPERATOR_SEED, "all.config", None).replace(b'"value":null', b'"value":{"confg":{}}')
    assert refused("all.config", typo) == "bad_signature"  # the signature covers the value's bytes
    # A well-signed value of the wrong shape: refused for its shape, after the signature.
    wrong = encode_value(OPERATOR_SEED, "all.paused", ConfigIntent(config={}))  # type: ignore[arg-type]
    assert refused("all.paused", wrong) == "bad_value"


def test_an_older_value_written_back_is_refused_and_the_marks_survive_a_restart() -> None:
    key = "all.paused"
    old = encode_value(OPERATOR_SEED, key, PausedIntent(paused=False), timestamp_ns=T0)
    new = encode_value(OPERATOR_SEED, key, PausedIntent(paused=True), timestamp_ns=T0 + 60 * S)
    verifier = DesiredVerifier()
    assert verifier.verify(key, old, [OPERATOR]).value == PausedIntent(paused=False)
    assert verifier.verify(key, new, [OPERATOR]).value == PausedIntent(paused=True)
    assert verifier.verify(key, new, [OPERATOR]).timestamp == T0 + 60 * S  # read again on a reconnect: fine
    restarted = DesiredVerifier()
    restarted.load(verifier.export())
    with pytest.raises(CommandError) as caught:
        restarted.verify(key, old, [OPERATOR])
    assert caught.value.code == "stale"
    # Marks are per key: an old value of another key is not affected.
    other = encode_value(OPERATOR_SEED, "group.north.paused", PausedIntent(paused=False), timestamp_ns=T0)
    assert restarted.verify("group.north.paused", other, [OPERATOR]).value is not None


# ---------------------------------------------------------------------------------------------
# Resolution


def test_the_most_specific_key_wins_and_a_cleared_one_falls_back() -> None:
    values = [
        desired("all.paused", PausedIntent(paused=False)),
        desired("group.north.paused", PausedIntent(paused=True), T0 + S),
        desired("group.pumps.paused", PausedIntent(paused=False), T0 + 2 * S),
        desired("device.gw-b.paused", PausedIntent(paused=False)),
        desired("group.south.config", ConfigIntent(config={"groups": ["south"]})),
    ]
    assert resolve(values, "gw-x", [])["paused"].key == "all.paused"
    assert resolve(values, "gw-a", ["north"])["paused"].key == "group.north.paused"
    assert resolve(values, "gw-b", ["north"])["paused"].key == "device.gw-b.paused"
    # Among the device's groups (equally specific) the newest value wins, whatever their order.
    assert resolve(values, "gw-c", ["north", "pumps"])["paused"].key == "group.pumps.paused"
    assert resolve(values, "gw-c", ["pumps", "north"])["paused"].key == "group.pumps.paused"
    assert "config" not in resolve(values, "gw-a", ["north"])  # another group's
    by_key = {d.key: d for d in values} | {"device.gw-b.paused": desired("device.gw-b.paused", None, T0 + 5 * S)}
    assert resolve(by_key.values(), "gw-b", ["north"])["paused"].key == "group.north.paused"
    assert "paused" not in resolve([desired("all.paused", None)], "gw-x", [])


# ---------------------------------------------------------------------------------------------
# Intent stated by commands, and the steps to a desired model


def test_commands_state_intent_and_model_verbs_keep_what_they_do_not_change() -> None:
    assert next_intent(Pause(reason="storm", by="ops"), None) == ("paused", PausedIntent(paused=True, reason="storm",
                                                                                       by="ops"))
    assert next_intent(Resume(), None) == ("paused", PausedIntent(paused=False))
    assert next_intent(ConfigApply(config={"groups": []}), None) == ("config", ConfigIntent(config={"groups": []}))

    def deploy(version: ModelVersion, mode: str) -> ModelDeploy:
        return ModelDeploy(name="pump", version=version.version, bucket=version.bucket, object=version.object,
                           sha256=version.sha256, signature=version.signature, mode=mode)  # type: ignore[arg-type]

    what, active2 = next_intent(deploy(V2, "active"), None)  # type: ignore[misc]
    assert what == "model.pump" and active2 == ModelIntent(active=V2)
    _, shadow3 = next_intent(deploy(V3, "shadow"), active2)  # type: ignore[misc]
    assert shadow3 == ModelIntent(active=V2, shadow=V3)
    _, promoted = next_intent(ModelPromote(name="pump"), shadow3)  # type: ignore[misc]
    assert promoted == ModelIntent(active=V3, previous=V2)
    _, rolled_back = next_intent(ModelRollback(name="pump"), promoted)  # type: ignore[misc]
    assert rolled_back == ModelIntent(active=V2, previous=V3)
    _, dropped = next_intent(ModelRollback(name="pump"), shadow3)  # type: ignore[misc]
    assert dropped == ModelIntent(active=V2)
    assert next_intent(ModelPromote(name="pump"), active2) is None  # no desired shadow: nothing to say
    assert next_intent(ModelRollback(name="pump"), None) is None


def test_model_steps_close_the_gap_only() -> None:
    assert model_steps("pump", ModelIntent(active=V2), "2", None) == []
    [step] = model_steps("pump", ModelIntent(active=V2), "1", None)
    assert isinstance(step, ModelDeploy) and (step.version, step.mode, step.signature) == ("2", "active", "c2ln")
    steps = model_steps("pump", ModelIntent(active=V3, shadow=None), "2", "3")  # a promote missed while offline
    assert [type(s) for s in steps] == [ModelPromote]  # the loaded candidate swapped in, not loaded again
    steps = model_steps("pump", ModelIntent(active=V3, shadow=V2), "2", "3")  # 3 active and 2 as the new shadow
    assert [(type(s), getattr(s, "mode", "")) for s in steps] == [(ModelDeploy, "active"), (ModelDeploy, "shadow")]
    steps = model_steps("pump", ModelIntent(active=None, shadow=V3), "1", None)
    assert [(s.version, s.mode) for s in steps if isinstance(s, ModelDeploy)] == [("3", "shadow")]


# ---------------------------------------------------------------------------------------------
# The operator's reading of reports


def test_missing_devices_and_divergence_are_read_from_reports() -> None:
    wanted = {"paused": desired("group.north.paused", PausedIntent(paused=True)),
              "config": desired("group.north.config", ConfigIntent(config={}))}
    report = DeviceReport(device="gw-b", groups=["north"], heartbeat_s=2.0, last_seen=T0,
                          applied={"paused": Applied("group.north.paused", T0)},
                          divergence={"config": Divergence("group.north.config", T0, "bad_config", "no pipelines")})
    assert divergence(report, wanted) == ["config: bad_config: no pipelines"]
    assert divergence(DeviceReport(device="gw-b"), wanted) == [
        "config: group.north.config not applied yet", "paused: group.north.paused not applied yet"]
    assert not is_missing(report, T0, T0 + 6 * S) and is_missing(report, T0, T0 + 6 * S + 1)

    live = {"gw-a": {"device": "gw-a", "groups": ["north"], "paused": True,
                     "models": [{"name": "pump", "version": "2"}, {"name": "pump.shadow", "version": "3"}],
                     "pipelines": {"p": {"shadow": {"compared": 10, "agreement": 0.9}}}}}
    views = view_fleet({"gw-b": (report, T0)}, wanted.values(), live, T0 + 10 * S)
    assert [(v.device, v.state) for v in views] == [("gw-a", "online"), ("gw-b", "missing")]
    a, b = views
    assert a.models == {"pump": Serving(active="2", shadow="3")} and a.shadow_agreement == {"p": 0.9}
    assert a.divergence == ["config: group.north.config: the device has not reported yet",
                            "paused: group.north.paused: the device has not reported yet"]
    assert b.seen_ago_s == 10.0 and b.paused is False and b.divergence == ["config: bad_config: no pipelines"]
    assert serving_of([{"name": "m", "version": None}, {"name": "n.shadow", "version": "4"}]) == {
        "n": Serving(shadow="4")}

"""The user's reference: `edge config reference`, `edge schema`, `edge keys new`, `edge send`,
`edge check` reporting every problem at once, the README's tables, and the output rough edges."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge import (
    BUNDLED_CONFIG,
    ApprovalReply,
    ApprovalRequest,
    CloudReply,
    Config,
    ConfigError,
    Decision,
    Heartbeat,
    LinkState,
    Rejected,
    Runtime,
    decode_config,
    run,
)
from edge.cli import build_parser, main
from edge.cli._operator import device_status
from edge.cli._send import concrete_subject, send_reading
from edge.fleet import VERBS, Reply, load_seed, public_key_of
from models import bundled_model_path
from sync import AuditLog
from tests.nats_harness import ServerFactory
from tests.polling import wait_until
from tests.runtime_harness import (
    CRITICAL,
    NORMAL,
    bundled_config_text,
    config_data,
    connect,
    encode,
    make_config,
    start_runtime_process,
    wait_until_answering,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


# -- edge config reference ---------------------------------------------------------------------------


def struct_keys(cls: type[msgspec.Struct], prefix: str = "") -> set[str]:
    """Every key a config Struct accepts, walked with typing (not the reference's own walk)."""
    keys: set[str] = set()
    for field in msgspec.structs.fields(cls):
        if field.name == "base_dir":  # the loader's, refused in a file
            continue
        key = f"{prefix}{field.name}"
        keys.add(key)
        kind = _bare(field.type)
        args = typing.get_args(kind)
        if _is_struct(kind):
            keys |= struct_keys(kind, f"{key}.")
        elif isinstance(kind, types.UnionType) and any(_is_struct(a) for a in args):
            keys |= struct_keys(next(a for a in args if _is_struct(a)), f"{key}.")
        elif typing.get_origin(kind) is list and _is_struct(_bare(args[0])):
            keys |= struct_keys(_bare(args[0]), f"{key}[].")
        elif typing.get_origin(kind) is dict and _is_struct(_bare(args[1])):
            keys |= struct_keys(_bare(args[1]), f"{key}.<name>.")
    return keys


def _bare(kind: Any) -> Any:
    return typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def toml_keys(data: dict[str, Any], prefix: str = "", named: frozenset[str] = frozenset()) -> set[str]:
    """The keys of a parsed TOML file in the reference's notation (tables under `named` are <name>)."""
    keys: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, dict) and path not in {"pipelines[].input", "pipelines[].labels"}:
            if path in named:
                for inner in value.values():
                    keys |= toml_keys(inner, f"{path}.<name>.", named)
            else:
                keys |= toml_keys(value, f"{path}.", named)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for element in value:
                keys |= toml_keys(element, f"{path}[].", named)
    return keys


def test_config_reference_lists_every_key_the_structs_accept(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    keys = [entry["key"] for entry in listed]
    assert len(keys) == len(set(keys))
    assert set(keys) == struct_keys(Config)
    for entry in listed:
        assert entry["meaning"] and entry["type"], entry
        assert entry["required"] == (entry["default"] is None and entry["key"] in {
            "pipelines", "pipelines[].name", "pipelines[].subscribe", "pipelines[].input", "pipelines[].rules",
            "pipelines[].rules[].action", "pipelines[].guards[].action", "pipelines[].cloud.subject",
            "pipelines[].clouds.<name>.subject", "models[].name", "models[].path"}), entry
    by_key = {entry["key"]: entry for entry in listed}
    assert by_key["link.probe_interval_ms"]["default"] == 1000
    assert by_key["audit.fsync"]["type"] == '"always" | "batch" | "off"'
    assert by_key["pipelines[].ladder"]["default"] == ["model", "cloud", "rules"]
    # Every key of the bundled example is one the reference lists.
    example = tomllib.loads(BUNDLED_CONFIG.read_text())
    assert toml_keys(example, named=frozenset({"pipelines[].actions"})) <= set(keys)


def test_config_reference_text_is_one_line_per_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "TYPE", "DEFAULT", "MEANING"]
    assert len(lines) == 1 + len(struct_keys(Config))
    probe = next(line for line in lines if line.startswith("link.probe_interval_ms "))
    assert probe.split()[1:3] == ["integer", "1000"] and "milliseconds" in probe
    assert main(["config", "reference", "fleet."]) == 0
    assert all(line.startswith("fleet.") for line in capsys.readouterr().out.splitlines()[1:])
    assert main(["config", "reference", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


# -- edge check: every problem at once ------------------------------------------------------------


def bundled_text() -> str:
    return bundled_config_text()


def test_check_reports_all_three_planted_problems_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = bundled_text()
    text = 'devise_id = "gw-1"\n' + text  # unknown key 1
    text = text.replace("[[models]]", "[link]\nprobe_intervall_ms = 250\n\n[[models]]", 1)  # unknown key 2
    text = re.sub(r'(?m)^subscribe = .*\n', "", text, count=1)  # a required key missing
    assert "probe_intervall_ms" in text and "subscribe" not in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    assert main(["check", str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"edge: {bad}: devise_id: unknown key; did you mean 'device_id'?",
        f"edge: {bad}: link.probe_intervall_ms: unknown key; did you mean 'probe_interval_ms'?",
        f"edge: {bad}: pipelines[0].subscribe: required key is missing",
    ]


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={})
    return {p.path: p.message for p in info.value.problems}


def bundled() -> dict[str, Any]:
    return tomllib.loads(BUNDLED_CONFIG.read_text())


def test_every_structural_problem_has_its_path_in_lists_and_named_tables() -> None:
    data = bundled()
    p = data["pipelines"][0]
    p["rules"][2]["whne"] = "rms > 1"
    p["actions"]["shutdown"]["aproval"] = "required"
    p["subscribe"] = ["sensors.*.pump", 7]
    p["cloud"]["timeout"] = 100
    data["models"][0] = {"name": "m"}
    data["nats"] = {"upstream_auth": {"tls": {"ca": "ca.pem", "crt": "c.pem"}}}
    data["heartbeat_s"] = 5
    found = problems(data)
    assert found == {
        "pipelines[0].rules[2].whne": "unknown key; did you mean 'when'?",
        "pipelines[0].actions.shutdown.aproval": "unknown key; did you mean 'approval'?",
        "pipelines[0].subscribe[1]": "expected `str`, got `int`",
        "pipelines[0].cloud.timeout": "unknown key; did you mean 'timeout_ms'?",
        "models[0].path": "required key is missing",
        "nats.upstream_auth.tls.crt": "unknown key; did you mean 'cert'?",
        "heartbeat_s": "unknown key; did you mean 'fleet.heartbeat_s'?",
    }


def test_a_table_that_is_not_a_table_and_an_unguessable_key() -> None:
    data = bundled()
    data["pipelines"].append("pump")
    data["link"] = {"zzz": 1}
    found = problems(data)
    assert found["pipelines[1]"] == "expected a table, got a string"
    assert found["link.zzz"].startswith("unknown key (expected one of: probe_interval_ms, probe_timeout_ms")


def test_semantic_problems_are_reported_beside_a_misspelt_key() -> None:
    data = bundled()
    data["fleet"] = {"heartbeat": 3}
    data["devise_id"] = "gw-1"
    data["pipelines"][0]["rules"][1]["when"] = "rms > 4.5 and kurtosiz > 5"
    found = problems(data)
    assert found["fleet.heartbeat"] == "unknown key; did you mean 'heartbeat_s'?"
    assert found["devise_id"] == "unknown key; did you mean 'device_id'?"
    assert "kurtosiz" in found["pipelines[0].rules[1].when"]
    # Inside the table of a misspelt key, a problem may only be its consequence: not reported.
    data = bundled()
    del data["pipelines"][0]["model"]
    data["pipelines"][0]["modle"] = "pump-anomaly"
    assert problems(data) == {"pipelines[0].modle": "unknown key; did you mean 'model'?"}


def test_problems_quote_a_hostile_config_bounded() -> None:
    data = bundled()
    data["k" * 100_000] = 1
    for i in range(5000):
        data[f"junk{i}"] = i
    with pytest.raises(ConfigError) as info:
        decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={})
    found = info.value.problems
    assert len(found) == 101 and found[-1].message == "... and 4901 more problems with keys"
    assert found[0].path == "k" * 64 + "...(100000 characters)"
    assert len(str(info.value)) < 20_000  # a hundred problems of a line each, not the input


def test_base_dir_is_not_a_key() -> None:
    data = bundled()
    data["base_dir"] = "/etc"
    found = problems(data)
    assert list(found) == ["base_dir"] and found["base_dir"].startswith("unknown key")


# -- edge schema ------------------------------------------------------------------------------------


def schema_of(name: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["schema", name, *extra]) == 0
    out = capsys.readouterr().out
    assert "SPEC" not in out  # users have the README and the CLI, nothing else
    schema: dict[str, Any] = json.loads(out)
    return schema


def definition(schema: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["$defs"][name]
    return found


@pytest.mark.parametrize(("name", "cls"), [
    ("decision", Decision), ("rejected", Rejected), ("reply", Reply), ("approval-request", ApprovalRequest),
    ("approval-answer", ApprovalReply), ("heartbeat", Heartbeat), ("cloud-reply", CloudReply),
])
def test_message_schemas_have_the_structs_fields(name: str, cls: type[msgspec.Struct],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    body = definition(schema_of(name, capsys), cls.__name__)
    fields = msgspec.structs.fields(cls)
    assert set(body["properties"]) == {f.encode_name for f in fields}
    assert set(body.get("required", [])) == {f.encode_name for f in fields if f.required}


def test_command_schema_has_every_verb_and_the_verb_is_optional(capsys: pytest.CaptureFixture[str]) -> None:
    schema = schema_of("command", capsys)
    assert len(schema["anyOf"]) == len(VERBS)
    for verb, cls in VERBS.items():
        body = definition(schema, cls.__name__)
        assert body["properties"]["verb"] == {"enum": [verb]}
        assert "verb" not in body.get("required", [])
    deploy = definition(schema, "ModelDeploy")
    assert set(deploy["required"]) == {"name", "version", "bucket", "object", "sha256"}


def test_input_schema_comes_from_the_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config_data(tmp_path, "nats://127.0.0.1:4222")
    second = {**data["pipelines"][0], "name": "fan", "subscribe": ["fans.>"],
              "input": {"speed": "int", "ok": "bool?"}, "ladder": ["rules"], "model": "", "labels": {},
              "rules": [{"default": True, "action": "none"}]}
    data["pipelines"].append(second)
    path = write_config(tmp_path, data)
    schema = schema_of("input", capsys, "-c", str(path), "--pipeline", "fan")
    body = definition(schema, "Input")
    assert set(body["properties"]) == {"speed", "ok"} and body["required"] == ["speed"]
    assert body["properties"]["speed"]["type"] == "integer"
    assert "fans.>" in body["description"] and body["title"] == "Input of pipeline fan"
    assert set(definition(schema_of("input", capsys, "-c", str(path)), "Input")["required"]) == {
        "rms", "kurtosis", "temp_c", "rpm"}
    assert main(["schema", "input", "-c", str(path), "--pipeline", "nope"]) == 2
    assert "no pipeline 'nope'" in capsys.readouterr().err


def test_config_schema_has_meanings_and_no_loader_fields(capsys: pytest.CaptureFixture[str]) -> None:
    schema = schema_of("config", capsys)
    top = definition(schema, "Config")
    assert "base_dir" not in top["properties"] and top["required"] == ["pipelines"]
    assert top["properties"]["device_id"]["description"].startswith("the device's name")
    assert top["additionalProperties"] is False


# -- edge keys new ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["operator", "approver", "device"])
def test_keys_new_writes_a_private_seed_and_prints_its_public_key(
        role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{role}.nk"
    assert main(["keys", "new", role, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    public_key = captured.out.strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    seed = load_seed(out)  # a bare user seed: what --sign-with and fleet.device_key read
    assert public_key == public_key_of(seed) and public_key.startswith("U") and len(public_key) == 56
    assert str(out) in captured.err
    # Never over a key that may already be trusted, unless told so.
    assert main(["keys", "new", role, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and load_seed(out) == seed
    assert main(["keys", "new", role, "--out", str(out), "--force", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["role"] == role and shown["public_key"] == public_key_of(load_seed(out)) != public_key


def test_keys_new_hints_where_the_key_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for role, where in (("operator", "fleet.trusted_keys"), ("approver", "fleet.approver_keys"),
                        ("device", "fleet.device_key")):
        assert main(["keys", "new", role, "--out", str(tmp_path / role)]) == 0
        assert where in capsys.readouterr().err


# -- edge send ----------------------------------------------------------------------------------------


def test_concrete_subject() -> None:
    assert concrete_subject("sensors.*.pump") == "sensors.cli.pump"
    assert concrete_subject("fans.>") == "fans.cli"
    assert concrete_subject("plain.subject") == "plain.subject"


async def test_send_prints_the_decision_and_the_rejection(nats_server: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, config_data(tmp_path, nats_server.url))
    parser = build_parser()
    async with Runtime(make_config(tmp_path, nats_server.url)):
        args = parser.parse_args(["send", "-c", str(path), json.dumps(CRITICAL)])
        assert await send_reading(args) == 0
        out = capsys.readouterr().out
        assert out.startswith("sensors.cli.pump: shutdown (label critical, tier ")
        assert "published on edge.gw-test.decision.pump" in out
        assert "None" not in out and "{" not in out

        args = parser.parse_args(["send", "-c", str(path), "--json", json.dumps(NORMAL)])
        assert await send_reading(args) == 0
        decision = json.loads(capsys.readouterr().out)
        assert decision["action"] == "none" and decision["subject"] == "sensors.cli.pump"
        assert decision["audit_seq"] >= 1

        args = parser.parse_args(["send", "-c", str(path), '{"rms": "loud"}'])
        assert await send_reading(args) == 2
        assert capsys.readouterr().out.startswith("sensors.cli.pump: rejected (schema): field 'rms'")

    args = parser.parse_args(["send", "-c", str(path), "--timeout", "1", json.dumps(NORMAL)])
    assert await send_reading(args) == 1  # nobody subscribes any more
    assert "nothing subscribes to sensors.cli.pump" in capsys.readouterr().err


async def test_edge_send_end_to_end(nats_server: Any, tmp_path: Path) -> None:
    path = write_config(tmp_path, config_data(tmp_path, nats_server.url))
    async with Runtime(make_config(tmp_path, nats_server.url)):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "send", "-c", str(path), json.dumps(CRITICAL),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ})
        out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert out.decode().startswith("sensors.cli.pump: shutdown")


# -- output rough edges ----------------------------------------------------------------------------


async def test_status_text_shows_no_raw_python_values(nats_server: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, config_data(tmp_path, nats_server.url))
    parser = build_parser()
    async with Runtime(make_config(tmp_path, nats_server.url)):
        assert await device_status(parser.parse_args(["status", "-c", str(path)])) == 0
        before = capsys.readouterr().out  # no decision yet: no latency, no tiers
        args = parser.parse_args(["send", "-c", str(path), json.dumps(NORMAL)])
        assert await send_reading(args) == 0
        capsys.readouterr()
        assert await device_status(parser.parse_args(["status", "-c", str(path)])) == 0
        after = capsys.readouterr().out
    for text in (before, after):
        assert not re.search(r"None|\{|\}|\[|\]", text), text
    assert "pipeline pump: 0 decisions" in before
    assert re.search(r"pipeline pump: 1 decisions \((model|rules) 1\), p50 [\d.]+ ms, p99 [\d.]+ ms", after), after


def test_models_inspect_text_shows_no_raw_python_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "inspect", str(bundled_model_path())]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"None|True|False|\{'|\['|\(", out.replace("tensor(float)", "").replace(
        "tensor(int64)", "")), out
    assert "  input  tensor(float)  [?, 4]" in out.splitlines()
    assert '  features = ["rms", "kurtosis", "temp_c", "rpm"]' in out.splitlines()
    assert "sha256_matches: yes" in out and "problems: none" in out


async def test_audit_tail_shows_whole_bodies_up_to_a_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    db = tmp_path / "audit.db"
    command = {"verb": "config.apply", "by": "ops", "ok": True, "signer": "U" + "A" * 55,
               "result": {"changed": ["pipelines"], "config_sha256": "f" * 64}, "padding": "x" * 100}
    async with AuditLog(db, "gw-1") as log:
        await log.append("command", command)
        await log.append("config", {"blob": "y" * 5000})
    assert main(["audit", "tail", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert '"verb":"config.apply"' in lines[0] and lines[0].endswith("}")  # whole, to the last brace
    assert "more characters; --json shows all" in lines[1] and len(lines[1]) < 2200
    assert main(["audit", "tail", "--db", str(db), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[1]["body"]["blob"] == "y" * 5000


async def test_the_first_link_online_is_info_and_the_drain_says_it_finished(
        nats_servers: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local, hub = await nats_servers("local"), await nats_servers("hub")
    config = make_config(tmp_path, local.url, upstream_url=hub.url)
    caplog.set_level(logging.INFO, logger="edge.runtime")

    async def scenario(runtime: Runtime) -> None:
        await wait_until(lambda: runtime.link.state is LinkState.ONLINE, within=10, what="the link online")
        await hub.stop()
        await wait_until(lambda: runtime.link.state is LinkState.OFFLINE, within=10, what="the link offline")
        runtime.request_stop()

    await run(config, ready=scenario)
    link = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("link ")]
    assert link[0][0] == logging.INFO and link[0][1].startswith("link offline -> online")
    assert len(link) >= 2 and all(level == logging.WARNING for level, _ in link[1:]), link
    drained = [r for r in caplog.records if "drain finished" in r.getMessage()]
    assert len(drained) == 1 and drained[0].levelno == logging.INFO


async def test_edge_run_takes_its_log_level_from_the_config(nats_server: Any, tmp_path: Path) -> None:
    # No trusted keys: the device warns about it at start, so the log is not empty.
    path = write_config(tmp_path, config_data(tmp_path, nats_server.url, log_level="warning",
                                              fleet={"trusted_keys": []}))
    child = start_runtime_process(path)
    try:
        nc = await connect(nats_server.url)
        await wait_until_answering(nc, "sensors.p1.pump", encode(NORMAL))
        await nc.close()
    finally:
        child.terminate()
        await asyncio.to_thread(child.wait, 30)
    lines = [json.loads(line) for line in path.with_suffix(".log").read_text().splitlines() if line.startswith("{")]
    assert "warning" in {line["level"] for line in lines}
    assert not [line for line in lines if line["level"] in ("info", "debug")], lines


# -- the README -------------------------------------------------------------------------------------


def _section(title: str) -> str:
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## )", README)
    assert match is not None, f"README has no section {title!r}"
    return match.group(1)


def _subcommands(parser: Any) -> dict[str, Any]:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(actions[0].choices) if actions else {}


def test_readme_command_table_lists_every_command() -> None:
    # The first cell of each row, as words: "`edge fleet ls\\|status\\|cmd`" -> edge, fleet, ls, status, cmd.
    cells = [re.split(r"[\s`\\|\[\]]+", line.split(" | ")[0].removeprefix("| "))
             for line in _section("Command line").splitlines() if line.startswith("| `edge ")]
    for name, sub in _subcommands(build_parser()).items():
        rows = [words for words in cells if words[1:3] == ["edge", name]]
        assert rows, f"`edge {name}` is not in the README's Command line table"
        for subname in _subcommands(sub):
            assert any(subname in words[3:] for words in rows), \
                f"`edge {name} {subname}` is not in the README's Command line table"


def test_readme_verb_table_matches_the_command_structs() -> None:
    rows = {}
    for line in _section("Reference").splitlines():
        match = re.match(r"\| `([a-z.]+)` \| (.*?) \|", line)
        if match and match.group(1) in VERBS:
            rows[match.group(1)] = match.group(2)
    assert set(rows) == set(VERBS)
    for verb, cls in VERBS.items():
        fields = {f.name for f in msgspec.structs.fields(cls)} - {"by"}
        documented = set(re.findall(r"`([a-z_0-9]+)`", rows[verb])) - {"none"}
        assert documented == fields, f"{verb}: README says {sorted(documented)}, the Struct has {sorted(fields)}"


def test_readme_never_sends_users_elsewhere_for_the_reference() -> None:
    assert "SPEC" not in README and "../shared" not in README
    reference = _section("Reference")
    for needle in ("edge config reference", "edge schema", "edge keys new", "edge send",
                   "edge.<device>.decision.<pipeline>", "edge.<device>.rejected.<pipeline>",
                   "edge.<device>.approval.<pipeline>", "edge.<device>.heartbeat", "edge.<device>.cmd.<verb>",
                   "edge.group.<group>.cmd.<verb>", "edge.all.cmd.<verb>", "audit.<device>", "$SRV",
                   "Edge-Signer", "Edge-Timestamp", "Edge-Nonce", "Edge-Signature"):
        assert needle in reference, needle

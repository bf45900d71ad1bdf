"""Config loading: every problem reported with its key path; a bad config is rejected whole."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge import BUNDLED_CONFIG, ConfigError, decode_config, load_config
from edge._config import parse_duration, parse_rate, parse_size


def bundled() -> dict[str, Any]:
    return tomllib.loads(BUNDLED_CONFIG.read_text())


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={})
    return {p.path: p.message for p in info.value.problems}


def test_bundled_config_is_valid() -> None:
    config = load_config(None, env={"EDGE_DEVICE_ID": "gw-1"})
    assert config.device_id == "gw-1"
    # Its data goes to the working directory, not into the installed package.
    assert config.resolve(config.data_dir) == Path.cwd() / "var"
    assert [p.name for p in config.pipelines] == ["pump"]
    assert config.resolve(config.models[0].path).joinpath("manifest.toml").exists()


def test_env_overrides_device_id_and_hostname_is_default() -> None:
    data = bundled()
    data["device_id"] = "from-file"
    assert decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={"EDGE_DEVICE_ID": "env-1"}).device_id == "env-1"
    assert decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={}).device_id == "from-file"
    del data["device_id"]
    assert decode_config(data, base_dir=BUNDLED_CONFIG.parent, env={}).device_id


def test_unknown_key_names_its_path() -> None:
    data = bundled()
    data["pipelines"][0]["subscrbe"] = ["x"]
    assert problems(data) == {"pipelines[0].subscrbe": "unknown key; did you mean 'subscribe'?"}


def test_wrong_type_names_its_path() -> None:
    data = bundled()
    data["link"] = {"breaker_failures": "three"}
    found = problems(data)
    assert list(found) == ["link.breaker_failures"]
    assert "int" in found["link.breaker_failures"]


def test_every_semantic_problem_is_reported_at_once() -> None:
    data = bundled()
    p = data["pipelines"][0]
    p["rules"][1]["when"] = "rms > 4.5 and kurtosiss > 5"
    p["ladder"] = ["rules", "model"]
    p["subscribe"] = ["sensors..pump"]
    p["actions"]["shutdown"]["instead"] = "nowhere"
    data["device_id"] = "all"
    found = problems(data)
    assert "pipelines[0].rules[1].when" in found and "kurtosiss" in found["pipelines[0].rules[1].when"]
    assert "rules" in found["pipelines[0].ladder"]
    assert "pipelines[0].subscribe[0]" in found
    assert "nowhere" in found["pipelines[0].actions.shutdown.instead"]
    assert "device_id" in found


def test_rules_without_default_is_rejected() -> None:
    data = bundled()
    data["pipelines"][0]["rules"] = data["pipelines"][0]["rules"][:2]
    assert any(path.startswith("pipelines[0].rules") for path in problems(data))


def test_instead_chain_must_end() -> None:
    data = bundled()
    actions = data["pipelines"][0]["actions"]
    actions["hold"] = {"instead": "shutdown", "rate_limit": "1/s"}
    found = problems(data)
    assert any("loops" in message for message in found.values())


def test_model_manifest_must_match_input() -> None:
    data = bundled()
    del data["pipelines"][0]["input"]["kurtosis"]
    found = problems(data)
    assert "kurtosis" in found["pipelines[0].model"]


def test_missing_model_folder_is_a_config_error() -> None:
    data = bundled()
    data["models"][0]["path"] = "no/such/model"
    assert "models[0].path" in problems(data)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("pipelines = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_units() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("500MB") == 500_000_000
    assert parse_size(4096) == 4096
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("250ms") == 0.25
    assert parse_rate("3/h") == (3, 3600.0)
    for bad in ("1 parsec", ""):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_rate("0/s")

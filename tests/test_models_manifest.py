"""Manifest parsing, its errors (with key paths) and the training-range check. Pure: no onnxruntime."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from models import Manifest, ManifestError, load_manifest

SHA = "ab" * 32
GOOD = f"""
name = "pump-anomaly"
version = "1"
sha256 = "{SHA}"
features = ["rms", "kurtosis", "temp_c", "rpm"]
labels = ["normal", "anomaly", "critical"]

[training_range]
rms = [0.1, 11.5]
temp_c = [0, 120]
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "manifest.toml").write_text(text, encoding="utf-8")
    return tmp_path


def test_loads_from_folder_or_file_with_defaults(tmp_path: Path) -> None:
    folder = write(tmp_path, GOOD)
    m = load_manifest(folder)
    assert m == load_manifest(folder / "manifest.toml")
    assert (m.name, m.version, m.sha256) == ("pump-anomaly", "1", SHA)
    assert (m.file, m.task, m.scores) == ("model.onnx", "classifier", "probabilities")
    assert m.labels == ["normal", "anomaly", "critical"]
    # TOML integers in a range become floats.
    assert m.training_range == {"rms": (0.1, 11.5), "temp_c": (0.0, 120.0)}
    assert isinstance(m.training_range["temp_c"][0], float)


def test_regressor_needs_no_labels(tmp_path: Path) -> None:
    text = f'name = "flow"\nversion = "2"\nsha256 = "{SHA}"\ntask = "regressor"\nfeatures = ["a"]\n'
    m = load_manifest(write(tmp_path, text))
    assert m.task == "regressor" and m.labels == []


def without(line_start: str) -> str:
    return "\n".join(line for line in GOOD.splitlines() if not line.startswith(line_start))


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        (GOOD.replace('version = "1"', 'version = "1"\ncolour = "red"'), "colour", "unknown key"),
        (without("sha256"), "sha256", "required key is missing"),
        (GOOD.replace(SHA, SHA.upper()), "sha256", "matching regex"),
        (GOOD + "speed = [0, 1]\n", "training_range.speed", "expected one of features"),
        (GOOD.replace("rms = [0.1, 11.5]", "rms = [11.5, 0.1]"), "training_range.rms", "lo <= hi"),
        (GOOD.replace("rms = [0.1, 11.5]", "rms = [0.1]"), "training_range.rms", "two numbers"),
        (GOOD.replace("rms = [0.1, 11.5]", 'rms = [0.1, "x"]'), "training_range.rms", "two numbers"),
        (without("labels"), "labels", "non-empty list of labels for a classifier"),
        (GOOD.replace('"kurtosis", "temp_c"', '"rms", "temp_c"'), "features[1]", "unique"),
        (GOOD.replace('["rms", "kurtosis", "temp_c", "rpm"]', "[]"), "features", "length >= 1"),
        (GOOD.replace('"kurtosis", "temp_c"', '3, "temp_c"'), "features[1]", "expected `str`"),
        (GOOD.replace('version = "1"', 'version = "1"\ntask = "ranker"'), "task", "invalid enum value"),
        (GOOD.replace('version = "1"', 'version = "1"\nfile = "../../etc/passwd"'), "file", "plain file name"),
        (GOOD.replace('version = "1"', 'version = "1"\nscores = 3'), "scores", "expected `str`"),
    ],
    ids=[
        "unknown-key",
        "missing-sha256",
        "sha256-not-lowercase-hex",
        "range-key-not-a-feature",
        "range-lo-above-hi",
        "range-one-number",
        "range-not-a-number",
        "classifier-without-labels",
        "duplicate-feature",
        "no-features",
        "feature-not-a-string",
        "bad-task",
        "file-escapes-folder",
        "scores-not-a-string",
    ],
)
def test_errors_name_the_file_and_key_path(tmp_path: Path, text: str, key: str, expected: str) -> None:
    folder = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    err = info.value
    assert err.path == folder / "manifest.toml"
    assert err.key == key
    assert expected.lower() in err.message.lower()
    assert str(err).startswith(f"{folder / 'manifest.toml'}: {key}: ")


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read the manifest") as info:
        load_manifest(tmp_path / "nowhere")
    assert info.value.path == tmp_path / "nowhere" / "manifest.toml"
    with pytest.raises(ManifestError, match="expected valid UTF-8 TOML") as info:
        load_manifest(write(tmp_path, "name = \n"))
    assert info.value.key == ""


def test_constructing_directly_runs_the_same_checks() -> None:
    with pytest.raises(ManifestError) as info:
        Manifest(name="m", version="1", sha256=SHA, features=["a"], labels=["x"], training_range={"b": (0, 1)})
    assert info.value.key == "training_range.b" and info.value.path is None


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return load_manifest(write(tmp_path, GOOD))


def test_out_of_range_inside_and_at_the_bounds(manifest: Manifest) -> None:
    assert manifest.out_of_range([1.0, 3.0, 60.0, 1500.0]) is None
    assert manifest.out_of_range([0.1, 3.0, 120.0, 1500.0]) is None  # bounds are inclusive
    # Features without a range (kurtosis, rpm) are unbounded.
    assert manifest.out_of_range([1.0, 1e9, 60.0, -5.0]) is None


def test_out_of_range_names_the_first_feature_outside(manifest: Manifest) -> None:
    assert manifest.out_of_range([12.0, 3.0, 60.0, 1500.0]) == "rms"
    assert manifest.out_of_range([1.0, 3.0, 121.0, 1500.0]) == "temp_c"
    assert manifest.out_of_range([0.0, 3.0, 121.0, 1500.0]) == "rms"  # features order decides
    assert manifest.out_of_range([1.0, 3.0, math.nan, 1500.0]) == "temp_c"


def test_out_of_range_rejects_a_row_of_the_wrong_length(manifest: Manifest) -> None:
    with pytest.raises(ValueError, match="expected 4 values"):
        manifest.out_of_range([1.0, 2.0])

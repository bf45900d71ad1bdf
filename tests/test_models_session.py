"""Loading and verifying models, and reading each exporter's outputs. Tiny models are built here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from models import (
    ChecksumMismatch,
    GraphMismatch,
    ModelFileMissing,
    ModelUnavailable,
    Prediction,
    inspect_model,
    load_model,
)
from tests.model_builders import matmul_model, sklearn_model, training_data, write_model

FEATURES = ["a", "b", "c", "d"]
LABELS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return training_data()


@pytest.fixture(scope="module")
def logreg(data: tuple[np.ndarray, np.ndarray]) -> LogisticRegression:
    x, y = data
    return LogisticRegression(max_iter=500).fit(x, y)


def check_against_sklearn(model_folder: Path, clf: LogisticRegression, x: np.ndarray, labels: list[str]) -> None:
    model = load_model(model_folder)
    got = model.predict(x)
    proba = clf.predict_proba(x)
    assert [p.label for p in got] == [labels[i] for i in proba.argmax(axis=1)]
    np.testing.assert_allclose([p.confidence for p in got], proba.max(axis=1), rtol=1e-4)
    assert all(type(p.confidence) is float and p.value is None for p in got)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "probability-tensor"])
def test_skl2onnx_classifier(tmp_path: Path, logreg: LogisticRegression, data: tuple, zipmap: bool) -> None:
    folder = write_model(tmp_path / "m", sklearn_model(logreg, zipmap=zipmap), features=FEATURES, labels=LABELS)
    check_against_sklearn(folder, logreg, data[0][:50], LABELS)


def test_skl2onnx_zipmap_with_string_classes_maps_names_to_labels(tmp_path: Path, data: tuple) -> None:
    x, y = data
    names = np.array(["cat", "dog", "eel"])[y]
    clf = LogisticRegression(max_iter=500).fit(x, names)
    # The manifest lists the labels in another order than the model's (sorted) classes.
    folder = write_model(tmp_path / "m", sklearn_model(clf), features=FEATURES, labels=["eel", "cat", "dog"])
    got = load_model(folder).predict(x[:50])
    assert [p.label for p in got] == list(clf.predict(x[:50]))
    np.testing.assert_allclose([p.confidence for p in got], clf.predict_proba(x[:50]).max(axis=1), rtol=1e-4)


def test_logits_get_a_softmax(tmp_path: Path) -> None:
    weights = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], dtype=np.float32)
    folder = write_model(tmp_path / "m", matmul_model(weights), features=["u", "v"], labels=LABELS, scores="logits")
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.3]], dtype=np.float32)
    logits = rows @ weights
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = load_model(folder).predict(rows)
    assert [p.label for p in got] == [LABELS[i] for i in logits.argmax(axis=1)]
    np.testing.assert_allclose([p.confidence for p in got], softmax.max(axis=1), rtol=1e-5)


def test_probability_scores_are_taken_as_they_are(tmp_path: Path) -> None:
    weights = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], dtype=np.float32)
    folder = write_model(tmp_path / "m", matmul_model(weights, softmax=True), features=["u", "v"], labels=LABELS)
    rows = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    logits = rows @ weights
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = load_model(folder).predict(rows)
    np.testing.assert_allclose([p.confidence for p in got], softmax.max(axis=1), rtol=1e-5)


def test_skl2onnx_regressor(tmp_path: Path, data: tuple) -> None:
    x, _ = data
    target = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 7.0
    reg = LinearRegression().fit(x, target)
    folder = write_model(tmp_path / "m", sklearn_model(reg), features=FEATURES, task="regressor")
    got = load_model(folder).predict(x[:20])
    np.testing.assert_allclose([p.value for p in got], reg.predict(x[:20]), rtol=1e-4, atol=1e-4)
    assert all(p.label == "" and p.confidence is None and type(p.value) is float for p in got)


def test_one_dimensional_regressor_output(tmp_path: Path) -> None:
    weights = np.array([1.0, 10.0, 100.0], dtype=np.float32)
    folder = write_model(tmp_path / "m", matmul_model(weights), features=["a", "b", "c"], task="regressor")
    got = load_model(folder).predict(np.array([[1, 2, 3], [0, 0, 1]], dtype=np.float32))
    assert got == [Prediction("", None, 321.0), Prediction("", None, 100.0)]


@pytest.mark.parametrize("n", [1, 4, 9])
def test_fixed_batch_is_padded_and_split(tmp_path: Path, n: int) -> None:
    weights = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], dtype=np.float32)
    fixed = write_model(tmp_path / "fixed", matmul_model(weights, batch=4), features=["u", "v"], labels=LABELS)
    dynamic = write_model(tmp_path / "dyn", matmul_model(weights), features=["u", "v"], labels=LABELS)
    model = load_model(fixed)
    assert model.fixed_batch == 4 and load_model(dynamic).fixed_batch is None
    rows = np.random.default_rng(n).normal(size=(n, 2)).astype(np.float32)
    got = model.predict(rows)
    assert len(got) == n
    assert got == load_model(dynamic).predict(rows)


def test_fixed_batch_regressor_and_zipmap(tmp_path: Path, logreg: LogisticRegression, data: tuple) -> None:
    x = data[0][:9]
    zip_fixed = write_model(tmp_path / "z", sklearn_model(logreg, batch=4), features=FEATURES, labels=LABELS)
    assert load_model(zip_fixed).fixed_batch == 4
    check_against_sklearn(zip_fixed, logreg, x, LABELS)
    reg = write_model(
        tmp_path / "r", matmul_model(np.ones(4, dtype=np.float32), batch=2), features=FEATURES, task="regressor"
    )
    got = load_model(reg).predict(x)
    np.testing.assert_allclose([p.value for p in got], x.sum(axis=1), rtol=1e-5)


def test_model_attributes(tmp_path: Path, logreg: LogisticRegression) -> None:
    onnx_bytes = sklearn_model(logreg, zipmap=False)
    folder = write_model(tmp_path / "m", onnx_bytes, features=FEATURES, labels=LABELS)
    model = load_model(folder / "manifest.toml")  # the manifest file works as well as the folder
    assert model.path == folder
    assert model.sha256 == hashlib.sha256(onnx_bytes).hexdigest() == model.manifest.sha256
    assert model.manifest.labels == LABELS and model.fixed_batch is None
    assert model.predict(np.zeros((0, 4), dtype=np.float32)) == []
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        model.predict(np.zeros((2, 3), dtype=np.float32))


def test_checksum_mismatch(tmp_path: Path, logreg: LogisticRegression) -> None:
    folder = write_model(tmp_path / "m", sklearn_model(logreg), features=FEATURES, labels=LABELS)
    expected = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    tampered = sklearn_model(LogisticRegression(C=0.01).fit(*training_data(1)))
    (folder / "model.onnx").write_bytes(tampered)
    with pytest.raises(ChecksumMismatch) as info:
        load_model(folder)
    assert info.value.expected == expected
    assert info.value.actual == hashlib.sha256(tampered).hexdigest()
    assert info.value.path == folder / "model.onnx"


def test_missing_model_file(tmp_path: Path, logreg: LogisticRegression) -> None:
    folder = write_model(tmp_path / "m", sklearn_model(logreg), features=FEATURES, labels=LABELS)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelFileMissing) as info:
        load_model(folder)
    assert info.value.path == folder / "model.onnx"


def test_corrupt_file_with_matching_checksum_is_unavailable(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", b"not an onnx model", features=FEATURES, labels=LABELS)
    with pytest.raises(ModelUnavailable, match="cannot open"):
        load_model(folder)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "probability-tensor"])
def test_class_count_must_match_labels(tmp_path: Path, logreg: LogisticRegression, zipmap: bool) -> None:
    folder = write_model(
        tmp_path / "m", sklearn_model(logreg, zipmap=zipmap), features=FEATURES, labels=["zero", "one"]
    )
    with pytest.raises(GraphMismatch, match="3 classes") as info:
        load_model(folder)
    assert info.value.path == folder / "model.onnx"


def test_score_tensor_class_count_must_match_labels(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", matmul_model(np.ones((2, 3))), features=["u", "v"], labels=["p", "q"])
    with pytest.raises(GraphMismatch, match="3 classes, the manifest has 2 labels"):
        load_model(folder)


@pytest.mark.parametrize(
    ("features", "fields", "match"),
    [
        (["a", "b", "c"], {"labels": LABELS}, r"takes 4 features, the manifest lists 3"),
        (FEATURES, {"task": "regressor"}, r"one float tensor output \[batch\] or \[batch, 1\] for a regressor"),
    ],
    ids=["input-width", "classifier-graph-for-a-regressor"],
)
def test_graph_must_fit_the_manifest(
    tmp_path: Path, logreg: LogisticRegression, features: list[str], fields: dict, match: str
) -> None:
    folder = write_model(tmp_path / "m", sklearn_model(logreg, zipmap=False), features=features, **fields)
    with pytest.raises(GraphMismatch, match=match):
        load_model(folder)


def test_regressor_graph_for_a_classifier(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", matmul_model(np.ones(2)), features=["u", "v"], labels=LABELS)
    with pytest.raises(GraphMismatch, match=r"score output to be \[batch, 3\]"):
        load_model(folder)


def test_inspect_folder_and_file(tmp_path: Path, logreg: LogisticRegression) -> None:
    onnx_bytes = sklearn_model(logreg, zipmap=False)
    folder = write_model(tmp_path / "m", onnx_bytes, features=FEATURES, labels=LABELS)
    info = inspect_model(folder)
    assert info == inspect_model(folder / "model.onnx")
    assert info["inputs"] == [{"name": "input", "type": "tensor(float)", "shape": [None, 4]}]
    assert info["outputs"] == [
        {"name": "label", "type": "tensor(int64)", "shape": [None]},
        {"name": "probabilities", "type": "tensor(float)", "shape": [None, 3]},
    ]
    assert info["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert info["sha256_matches"] is True and info["problems"] == []
    manifest = info["manifest"]
    assert isinstance(manifest, dict) and manifest["labels"] == LABELS


def test_inspect_reports_problems(tmp_path: Path, logreg: LogisticRegression) -> None:
    folder = write_model(tmp_path / "m", sklearn_model(logreg), features=FEATURES, labels=["zero", "one"])
    (folder / "model.onnx").write_bytes(sklearn_model(logreg, zipmap=False))
    info = inspect_model(folder)
    assert info["sha256_matches"] is False
    problems = info["problems"]
    assert isinstance(problems, list) and len(problems) == 2
    assert "sha256 mismatch" in problems[0] and "3 classes" in problems[1]
    # A bare .onnx file without a manifest still describes its graph.
    (tmp_path / "bare.onnx").write_bytes(sklearn_model(logreg))
    bare = inspect_model(tmp_path / "bare.onnx")
    assert bare["manifest"] is None and bare["sha256_matches"] is None
    assert [o["type"] for o in bare["outputs"]] == ["tensor(int64)", "seq(map(int64,tensor(float)))"]
    with pytest.raises(ModelFileMissing):
        inspect_model(tmp_path / "missing.onnx")

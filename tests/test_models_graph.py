"""Reading graph signatures against a manifest: pure, on (name, type, shape) descriptors, no onnxruntime."""

from __future__ import annotations

import pytest

from models import Manifest
from models._graph import Mismatch, Plan, Port, plan

SHA = "0" * 64
CLASSIFIER = Manifest(name="m", version="1", sha256=SHA, features=["a", "b"], labels=["x", "y", "z"])
REGRESSOR = Manifest(name="m", version="1", sha256=SHA, features=["a", "b"], task="regressor")
INPUT = Port("input", "tensor(float)", (None, 2))
LABEL = Port("label", "tensor(int64)", (None,))
PROBA = Port("probabilities", "tensor(float)", (None, 3))
ZIPMAP = Port("output_probability", "seq(map(int64,tensor(float)))", ())


@pytest.mark.parametrize(
    ("manifest", "inputs", "outputs", "expected"),
    [
        (CLASSIFIER, [INPUT], [LABEL, PROBA], Plan("input", None, "probabilities", "probabilities")),
        (CLASSIFIER, [INPUT], [LABEL, ZIPMAP], Plan("input", None, "zipmap", "output_probability")),
        # Both present: the tensor wins, it is far cheaper to decode.
        (CLASSIFIER, [INPUT], [LABEL, ZIPMAP, PROBA], Plan("input", None, "probabilities", "probabilities")),
        (
            CLASSIFIER,
            [Port("x", "tensor(float)", ("N", 2))],
            [Port("y", "tensor(float)", ("N", 3))],
            Plan("x", None, "scores", "y"),
        ),
        (
            CLASSIFIER,
            [Port("x", "tensor(float)", (1, 2))],
            [Port("y", "tensor(float)", (1, 3))],
            Plan("x", 1, "scores", "y"),
        ),
        (REGRESSOR, [INPUT], [Port("v", "tensor(float)", (None, 1))], Plan("input", None, "regression", "v")),
        (REGRESSOR, [INPUT], [Port("v", "tensor(double)", (None,))], Plan("input", None, "regression", "v")),
    ],
    ids=["probabilities", "zipmap", "tensor-over-zipmap", "scores", "fixed-batch", "regressor-n1", "regressor-n"],
)
def test_recognised_signatures(manifest: Manifest, inputs: list[Port], outputs: list[Port], expected: Plan) -> None:
    assert plan(manifest, inputs, outputs) == expected


@pytest.mark.parametrize(
    ("manifest", "inputs", "outputs", "match"),
    [
        (CLASSIFIER, [INPUT, INPUT], [PROBA], "found 2 inputs"),
        (CLASSIFIER, [Port("input", "tensor(int64)", (None, 2))], [PROBA], "one float tensor input"),
        (CLASSIFIER, [Port("input", "tensor(float)", (None, 2, 1))], [PROBA], "one float tensor input"),
        (CLASSIFIER, [INPUT], [PROBA, PROBA], "at most one float score tensor"),
        (CLASSIFIER, [INPUT], [LABEL], "expected a float score tensor"),
        (CLASSIFIER, [INPUT], [LABEL, Port("p", "tensor(float)", (None, 4))], "4 classes, the manifest has 3"),
        (CLASSIFIER, [INPUT], [LABEL, PROBA, Port("extra", "tensor(bool)", (None,))], "unexpected output 'extra'"),
        (REGRESSOR, [INPUT], [Port("v", "tensor(float)", (None, 2))], "for a regressor"),
        (REGRESSOR, [INPUT], [Port("v", "tensor(float)", (None,)), Port("w", "tensor(float)", (None,))], "2 outputs"),
    ],
    ids=[
        "two-inputs",
        "int-input",
        "rank-3-input",
        "two-score-tensors",
        "label-only",
        "class-count",
        "unknown-output",
        "regressor-width-2",
        "regressor-two-outputs",
    ],
)
def test_mismatches_say_what_was_expected(
    manifest: Manifest, inputs: list[Port], outputs: list[Port], match: str
) -> None:
    with pytest.raises(Mismatch, match=match):
        plan(manifest, inputs, outputs)

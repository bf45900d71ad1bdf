"""Helpers for the models tests: tiny ONNX models in every exporter style, written as model folders.

No tests here; the test_models_* modules import these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None


def write_model(
    folder: Path, model: bytes, *, features: Sequence[str], labels: Sequence[str] = (), **fields: object
) -> Path:
    """Write model.onnx and a manifest.toml (sha256 computed) into `folder`; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model)
    manifest: dict[str, object] = {
        "name": folder.name,
        "version": "1",
        "sha256": hashlib.sha256(model).hexdigest(),
        "features": list(features),
    }
    if labels:
        manifest["labels"] = list(labels)
    manifest.update(fields)
    (folder / "manifest.toml").write_text(to_toml(manifest), encoding="utf-8")
    return folder


def to_toml(table: Mapping[str, object]) -> str:
    """Just enough TOML for manifests: strings, numbers, lists and one level of sub-tables."""
    lines, tables = [], []
    for key, value in table.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables.extend(f"{k} = {_value(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def matmul_model(
    weights: np.ndarray, *, batch: Dim = "N", softmax: bool = False, output: str = "scores", input_name: str = "x"
) -> bytes:
    """A PyTorch-style graph: one float input [batch, F] @ weights -> one float output (softmax optional).

    weights of shape (F, C) give [batch, C] scores; shape (F,) gives a [batch] regression output.
    """
    width = weights.shape[0]
    out_shape: list[Dim] = [batch] if weights.ndim == 1 else [batch, weights.shape[1]]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, width])
    y = helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)
    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    if softmax:
        nodes = [
            helper.make_node("MatMul", [input_name, "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [output], axis=1),
        ]
    else:
        nodes = [helper.make_node("MatMul", [input_name, "W"], [output])]
    graph = helper.make_graph(nodes, "test", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def training_data(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated classes over four features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.array([[0, 0, 0, 0], [4, 0, 4, 0], [0, 4, 0, 4]], dtype=np.float32)
    x = (centres[y] + rng.normal(0, 1, (n, 4))).astype(np.float32)
    return x, y


def sklearn_model(estimator: object, *, zipmap: bool = True, batch: Dim = None) -> bytes:
    """An skl2onnx export of a fitted estimator with float input 'input' [batch, 4]."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = None if zipmap else {id(estimator): {"zipmap": False}}
    model = to_onnx(
        estimator,
        initial_types=[("input", FloatTensorType([batch, 4]))],
        options=options,
        target_opset={"": 17, "ai.onnx.ml": 1},
    )
    return bytes(model.SerializeToString())

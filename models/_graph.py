"""Reading an ONNX graph's signature against a manifest: pure functions over (name, type, shape).

The runtime adapts to what the common exporters write:

    kind           outputs                                                   exporter
    probabilities  label tensor + float tensor [N, C]                         skl2onnx, zipmap=False
    zipmap         label tensor + seq(map(int64|string, float))               skl2onnx default
    scores         one float tensor [N, C] (softmax when scores = "logits")   PyTorch, Keras, ...
    regression     one float tensor [N] or [N, 1]                             any regressor

When a graph has both a probability tensor and a ZipMap, the tensor wins: decoding a list of dicts
costs far more than an argmax over an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._manifest import Manifest

Dim = int | str | None
Kind = Literal["probabilities", "zipmap", "scores", "regression"]

_FLOAT_TENSORS = ("tensor(float)", "tensor(double)", "tensor(float16)")
_LABEL_TENSORS = ("tensor(int64)", "tensor(int32)", "tensor(string)")


@dataclass(frozen=True, slots=True)
class Port:
    """One graph input or output as onnxruntime describes it (`NodeArg`)."""

    name: str
    type: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {self.type} [{dims}]"


@dataclass(frozen=True, slots=True)
class Plan:
    """How to feed a graph and read its answer, decided once at load."""

    input_name: str
    fixed_batch: int | None
    kind: Kind
    output_name: str


class Mismatch(Exception):
    """Internal: the graph does not fit; the caller turns it into GraphMismatch with the file's path."""


def plan(manifest: Manifest, inputs: Sequence[Port], outputs: Sequence[Port]) -> Plan:
    """Check a graph's signature against `manifest` and decide how to run it; raises Mismatch."""
    name, fixed_batch = _check_input(manifest, inputs)
    if manifest.task == "regressor":
        kind, output = _regression_output(outputs)
    else:
        kind, output = _classifier_output(manifest, outputs)
    return Plan(name, fixed_batch, kind, output)


def _check_input(manifest: Manifest, inputs: Sequence[Port]) -> tuple[str, int | None]:
    width = len(manifest.features)
    expected = f"one float tensor input [batch, {width}]"
    if len(inputs) != 1:
        found = ", ".join(p.describe() for p in inputs) or "none"
        raise Mismatch(f"expected {expected}, found {len(inputs)} inputs: {found}")
    port = inputs[0]
    if port.type != "tensor(float)" or len(port.shape) != 2:
        raise Mismatch(f"expected {expected}, found {port.describe()}")
    batch, features = port.shape
    # A symbolic feature dimension is accepted here; the warm-up run proves the width works.
    if isinstance(features, int) and features != width:
        raise Mismatch(
            f"input {port.describe()} takes {features} features, the manifest lists {width}: {manifest.features}"
        )
    if isinstance(batch, int) and batch < 1:
        raise Mismatch(f"input {port.describe()} has a batch dimension of {batch}")
    return port.name, batch if isinstance(batch, int) else None


def _regression_output(outputs: Sequence[Port]) -> tuple[Kind, str]:
    expected = "one float tensor output [batch] or [batch, 1] for a regressor"
    if len(outputs) != 1:
        found = ", ".join(p.describe() for p in outputs)
        raise Mismatch(f"expected {expected}, found {len(outputs)} outputs: {found}")
    port = outputs[0]
    # [batch, k] with a symbolic k is accepted here; the warm-up run checks that k is 1.
    ok_shape = len(port.shape) == 1 or (
        len(port.shape) == 2 and not (isinstance(port.shape[1], int) and port.shape[1] != 1)
    )
    if port.type not in _FLOAT_TENSORS or not ok_shape:
        raise Mismatch(f"expected {expected}, found {port.describe()}")
    return "regression", port.name


def _classifier_output(manifest: Manifest, outputs: Sequence[Port]) -> tuple[Kind, str]:
    classes = len(manifest.labels)
    tensors, zipmaps, labels = [], [], []
    for port in outputs:
        if port.type in _FLOAT_TENSORS:
            tensors.append(port)
        elif port.type.startswith("seq(map("):
            zipmaps.append(port)
        elif port.type in _LABEL_TENSORS:
            labels.append(port)
        else:
            raise Mismatch(f"unexpected output {port.describe()} for a classifier")
    for group, what in ((tensors, "float score tensor"), (zipmaps, "ZipMap"), (labels, "label tensor")):
        if len(group) > 1:
            raise Mismatch(f"expected at most one {what}, found {', '.join(p.describe() for p in group)}")
    if tensors:
        port = tensors[0]
        if len(port.shape) != 2:
            raise Mismatch(f"expected the score output to be [batch, {classes}], found {port.describe()}")
        width = port.shape[1]
        if isinstance(width, int) and width != classes:
            raise Mismatch(
                f"output {port.describe()} has {width} classes, the manifest has {classes} labels: {manifest.labels}"
            )
        return ("probabilities" if labels else "scores"), port.name
    if zipmaps:
        return "zipmap", zipmaps[0].name
    found = ", ".join(p.describe() for p in outputs) or "none"
    raise Mismatch(f"expected a float score tensor [batch, {classes}] or a ZipMap output, found {found}")

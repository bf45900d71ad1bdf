"""The model registry: manifests, loading, verification, batched ONNX sessions, bundled models."""

import importlib
from typing import TYPE_CHECKING, Any

from ._bundled import bundled_model_path
from ._errors import (
    ChecksumMismatch,
    GraphMismatch,
    ManifestError,
    ModelError,
    ModelFileMissing,
    ModelUnavailable,
    WarmupTimeout,
)
from ._manifest import Manifest, load_manifest

if TYPE_CHECKING:  # imported on first use (below): reading a manifest needs neither numpy nor onnxruntime
    from ._batcher import BatcherState, MicroBatcher
    from ._registry import ModelRegistry, ModelSlot
    from ._session import Model, Prediction, inspect_model, load_model

_LAZY = {
    "BatcherState": "._batcher",
    "MicroBatcher": "._batcher",
    "ModelRegistry": "._registry",
    "ModelSlot": "._registry",
    "Model": "._session",
    "Prediction": "._session",
    "inspect_model": "._session",
    "load_model": "._session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "BatcherState",
    "ChecksumMismatch",
    "GraphMismatch",
    "Manifest",
    "ManifestError",
    "MicroBatcher",
    "Model",
    "ModelError",
    "ModelRegistry",
    "ModelSlot",
    "ModelFileMissing",
    "ModelUnavailable",
    "Prediction",
    "WarmupTimeout",
    "bundled_model_path",
    "inspect_model",
    "load_manifest",
    "load_model",
]

"""The model registry: manifests, loading, verification, batched ONNX sessions, bundled models."""

from ._batcher import BatcherState, MicroBatcher
from ._bundled import bundled_model_path
from ._errors import (
    ChecksumMismatch,
    GraphMismatch,
    ManifestError,
    ModelError,
    ModelFileMissing,
    ModelUnavailable,
)
from ._manifest import Manifest, load_manifest
from ._registry import ModelRegistry, ModelSlot
from ._session import Model, Prediction, inspect_model, load_model

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
    "bundled_model_path",
    "inspect_model",
    "load_manifest",
    "load_model",
]

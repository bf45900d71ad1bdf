"""The model registry: manifests, loading, verification, batched ONNX sessions, bundled models."""

"""The model registry's exceptions, one tree.

    ModelError                     root: every error `models` raises on purpose
    ├── ManifestError              manifest.toml is unreadable or wrong (path, key, what was expected)
    ├── ModelFileMissing           the model file (or bundled folder) is not there (path)
    ├── ChecksumMismatch           the model file's sha256 differs from the manifest's (expected, actual)
    ├── GraphMismatch              the ONNX graph's inputs/outputs do not fit the manifest (path, detail)
    └── ModelUnavailable           a model cannot answer: it failed to open, warm up or run, or the
        │                          batcher is not running; the cause is chained (`raise ... from`)
        └── WarmupTimeout          its warm-up run took longer than allowed (a graph that hangs)

The runtime maps any of them to the `unavailable` fallback (ladder) or to exit code 2 (`edge check`).
"""

from __future__ import annotations

from pathlib import Path


class ModelError(Exception):
    """Root of every error the `models` package raises on purpose."""


class ManifestError(ModelError):
    """A manifest is wrong: `path` is the file, `key` the key path (`training_range.rms`), `message` why."""

    def __init__(self, path: Path | None, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        parts = [str(p) for p in (path, key) if p]
        super().__init__(": ".join([*parts, message]))


class ModelFileMissing(ModelError):
    """The model file named by a manifest (or a bundled model folder) does not exist."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path}: model file not found")


class ChecksumMismatch(ModelError):
    """The model file's sha256 is not the one the manifest promises."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: sha256 mismatch: manifest says {expected}, file is {actual}")


class GraphMismatch(ModelError):
    """The ONNX graph's inputs or outputs do not fit the manifest; `detail` says which and how."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: graph does not fit the manifest: {detail}")


class ModelUnavailable(ModelError):
    """A model cannot answer right now (failed to open, warm up or run; batcher not running)."""


class WarmupTimeout(ModelUnavailable):
    """The warm-up run did not finish within `timeout_s` and was stopped (a Loop that never ends, say)."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        super().__init__(f"{path}: the warm-up run took longer than {timeout_s * 1000:.0f} ms and was stopped")

"""Models shipped inside the package (built by scripts/build_models.py)."""

from __future__ import annotations

import re
from pathlib import Path

from ._errors import ModelFileMissing

BUNDLED_DIR = Path(__file__).parent / "bundled"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def bundled_model_path(name: str = "pump-anomaly", version: str = "1") -> Path:
    """The folder of a bundled model (model.onnx + manifest.toml); raises ModelFileMissing if absent."""
    for part in (name, version):
        # Names come from configs and fleet commands: never let them climb out of the bundle.
        if not _NAME.fullmatch(part) or ".." in part:
            raise ValueError(f"not a bundled model name or version: {part!r}")
    folder = BUNDLED_DIR / name / version
    if not folder.is_dir():
        raise ModelFileMissing(folder)
    return folder

"""Strict tooling is part of the suite: ruff (E,F,I,B,UP,ASYNC) and mypy --strict on the packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_models_and_sync_never_import_edge() -> None:
    """The runtime depends on `models` and `sync`, never the other way round."""
    for package in ("models", "sync"):
        for source in (ROOT / package).rglob("*.py"):
            text = source.read_text()
            assert "import edge" not in text and "from edge" not in text, source

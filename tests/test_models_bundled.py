"""The bundled pump-anomaly model, its reproducible build, and what the `models` package may import."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import MicroBatcher, ModelFileMissing, bundled_model_path, load_manifest, load_model

ROOT = Path(__file__).resolve().parent.parent

# (rms mm/s, kurtosis, temp_c, rpm) -> what the plant's rules say
ROWS = {
    "critical": [8.5, 3.5, 70.0, 1480.0],  # shaking hard
    "critical ": [2.0, 3.0, 104.0, 2000.0],  # hot bearing
    "anomaly": [5.5, 7.0, 60.0, 1480.0],  # spiky vibration: a wearing bearing
    "normal": [1.2, 3.0, 55.0, 1480.0],
}


def test_bundled_model_loads_and_its_sha_matches() -> None:
    folder = bundled_model_path()
    assert folder == bundled_model_path("pump-anomaly", "1")
    model = load_model(folder)
    data = (folder / "model.onnx").read_bytes()
    assert len(data) < 1_000_000
    assert hashlib.sha256(data).hexdigest() == model.manifest.sha256 == model.sha256
    assert model.manifest.features == ["rms", "kurtosis", "temp_c", "rpm"]
    assert model.manifest.labels == ["normal", "anomaly", "critical"]
    assert model.fixed_batch is None


def test_bundled_model_agrees_with_the_rules_on_clear_cases() -> None:
    model = load_model(bundled_model_path())
    assert all(model.manifest.out_of_range(r) is None for r in ROWS.values())
    got = model.predict(np.array(list(ROWS.values()), dtype=np.float32))
    assert [p.label for p in got] == [label.strip() for label in ROWS]
    assert all(p.confidence is not None and p.confidence >= 0.9 for p in got)


async def test_bundled_model_behind_the_batcher() -> None:
    async with MicroBatcher(load_model(bundled_model_path())) as batcher:
        critical, normal = await batcher.predict(ROWS["critical"]), await batcher.predict(ROWS["normal"])
    assert (critical.label, normal.label) == ("critical", "normal")


def test_bundled_model_path_refuses_unknown_or_climbing_names() -> None:
    with pytest.raises(ModelFileMissing):
        bundled_model_path("no-such-model")
    with pytest.raises(ValueError, match="not a bundled model"):
        bundled_model_path("..", "1")
    with pytest.raises(ValueError, match="not a bundled model"):
        bundled_model_path("pump-anomaly", "../../..")


def test_training_range_covers_the_example_config() -> None:
    ranges = load_manifest(bundled_model_path()).training_range
    assert set(ranges) == {"rms", "kurtosis", "temp_c", "rpm"}
    assert ranges["temp_c"][0] <= 95 <= ranges["temp_c"][1] and ranges["rms"][0] <= 7.5 <= ranges["rms"][1]


def test_models_imports_no_runtime_or_training_packages() -> None:
    code = (
        "import sys, models; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'edge', 'sync', 'sklearn', 'skl2onnx', 'onnx'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


@pytest.mark.xdist_group("models-build")  # one worker takes it while the others run the quick tests
@pytest.mark.timeout(60)
def test_build_script_reproduces_the_committed_artifact_byte_for_byte() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_models.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=55,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK:" in out.stdout and "held-out accuracy" in out.stdout

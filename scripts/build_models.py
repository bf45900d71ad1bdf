"""Build the bundled pump-anomaly model: models/bundled/pump-anomaly/1/{model.onnx, manifest.toml}.

The story. A centrifugal pump is driven by an induction motor whose drive runs it between 900 and
3000 rpm. Four sensors watch it:

* `rms`      vibration velocity RMS at the bearing housing, mm/s. ISO 10816 puts a healthy machine
             of this size under ~2.8 mm/s; it also rises with speed.
* `kurtosis` of the acceleration signal: ~3 for the Gaussian hum of a healthy machine; the impacts
             of a spalled bearing race make it spiky (5 and above).
* `temp_c`   bearing housing temperature, °C: 40-75 in service, above 95 the lubricant breaks down.
* `rpm`      shaft speed.

Each sample is one pump in one of three latent conditions: healthy (70%), a wearing bearing (18%:
vibration and kurtosis up) or a severe fault (12%: looseness shaking it hard, or a hot bearing). Its
label comes from the plant's rules applied to the *true* values,

    critical  when temp_c > 95 or rms > 7.5
    anomaly   when rms > 4.5 and kurtosis > 5
    normal    otherwise

while the model only sees the *measured* values, with sensor noise (rms ±3%, kurtosis ±0.25,
temp ±0.8 °C, rpm ±5). So near a threshold the answer is genuinely uncertain: a real model with
real confidences, not a lookup table.

The classifier is a small seeded random forest (16 trees, depth 6, all features per split),
exported by skl2onnx without ZipMap (a float probability tensor), float32 input "input" of shape
[None, 4], fixed opsets. The build is byte-for-byte reproducible; `--check` rebuilds into a
temporary folder and compares.

Usage: python scripts/build_models.py [--out DIR] [--check]
Needs the `train` extra (scikit-learn, skl2onnx, onnx); the `models` package never imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import skl2onnx
import sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import RandomForestClassifier

NAME, VERSION = "pump-anomaly", "1"
FEATURES = ["rms", "kurtosis", "temp_c", "rpm"]
LABELS = ["normal", "anomaly", "critical"]
SEED = 20240601
N_TRAIN, N_TEST = 6000, 2000
OPSETS = {"": 17, "ai.onnx.ml": 1}
IR_VERSION = 8  # the IR version that goes with opset 17
# Training ranges are rounded outward to these steps, so a value at the edge of the data is inside.
RANGE_STEP = {"rms": 0.1, "kurtosis": 0.1, "temp_c": 1.0, "rpm": 10.0}

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "bundled" / NAME / VERSION


def simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` pumps: measured features (float32, FEATURES order) and labels (index into LABELS)."""
    condition = rng.choice(3, size=n, p=[0.70, 0.18, 0.12])
    rpm = rng.uniform(900, 3000, n)
    # Healthy: vibration grows with speed, kurtosis near 3, temperature follows load.
    rms = 0.2 + 0.0007 * rpm * rng.uniform(0.4, 1.5, n) + np.abs(rng.normal(0, 0.4, n))
    kurtosis = 3.0 + rng.normal(0, 0.3, n) + np.abs(rng.normal(0, 0.4, n))
    temp = 40 + 0.008 * rpm + rng.normal(0, 6, n)
    wear = condition == 1
    rms[wear] = rng.uniform(2.5, 7.5, wear.sum())
    kurtosis[wear] = rng.uniform(3.5, 10.0, wear.sum())
    temp[wear] += rng.uniform(0, 15, wear.sum())
    severe = condition == 2
    loose = severe & (rng.random(n) < 0.5)
    hot = severe & ~loose
    rms[loose] = rng.uniform(6.5, 11.5, loose.sum())
    kurtosis[loose] = rng.uniform(2.5, 8.0, loose.sum())
    temp[hot] = rng.uniform(85, 118, hot.sum())
    rms = np.clip(rms, 0.1, None)
    kurtosis = np.clip(kurtosis, 1.5, None)
    # The plant's rules decide the truth, on the true values.
    label = np.where((temp > 95) | (rms > 7.5), 2, np.where((rms > 4.5) & (kurtosis > 5), 1, 0))
    measured = np.column_stack(
        [
            rms * (1 + rng.normal(0, 0.03, n)),
            kurtosis + rng.normal(0, 0.25, n),
            temp + rng.normal(0, 0.8, n),
            rpm + rng.normal(0, 5, n),
        ]
    ).astype(np.float32)
    return measured, label


def train(x: np.ndarray, y: np.ndarray) -> RandomForestClassifier:
    # max_features=None: the truth is made of single-feature thresholds, so every split may look at
    # every feature; the forest then finds the thresholds crisply and its confidences are sharp.
    clf = RandomForestClassifier(
        n_estimators=16, max_depth=6, min_samples_leaf=5, max_features=None, random_state=SEED, n_jobs=1
    )
    return clf.fit(x, y)


def export(clf: RandomForestClassifier) -> bytes:
    """ONNX bytes with every field that could vary between runs or tool versions set explicitly."""
    model = skl2onnx.to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, len(FEATURES)]))],
        options={id(clf): {"zipmap": False}},
        target_opset=dict(OPSETS),
    )
    model.ir_version = IR_VERSION
    model.producer_name = "edge-orchestrator scripts/build_models.py"
    model.producer_version = VERSION
    model.domain = "edge.models"
    model.model_version = int(VERSION)
    model.doc_string = f"{NAME} {VERSION}: pump condition from vibration, kurtosis, temperature and speed"
    model.graph.name = NAME
    model.graph.doc_string = ""
    # skl2onnx may list the default domain twice; keep one entry per domain, in a fixed order.
    del model.opset_import[:]
    for domain, version in OPSETS.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def training_range(x: np.ndarray) -> dict[str, tuple[float, float]]:
    out = {}
    for i, name in enumerate(FEATURES):
        step = RANGE_STEP[name]
        lo = math.floor(float(x[:, i].min()) / step) * step
        hi = math.ceil(float(x[:, i].max()) / step) * step
        out[name] = (round(lo, 6), round(hi, 6))
    return out


def manifest_toml(sha256: str, ranges: dict[str, tuple[float, float]]) -> str:
    def strings(values: list[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = [
        "# Built by scripts/build_models.py; rebuild with it, never edit by hand (the sha256 would lie).",
        f'name = "{NAME}"',
        f'version = "{VERSION}"',
        'file = "model.onnx"',
        f'sha256 = "{sha256}"',
        'task = "classifier"',
        'scores = "probabilities"',
        f"features = {strings(FEATURES)}",
        f"labels = {strings(LABELS)}",
        "",
        "[training_range]",
        *(f"{name} = [{lo!r}, {hi!r}]" for name, (lo, hi) in ranges.items()),
    ]
    return "\n".join(lines) + "\n"


def build(out: Path) -> dict[str, float]:
    """Write model.onnx and manifest.toml into `out`; returns figures for the report."""
    rng = np.random.default_rng(SEED)
    x, y = simulate(N_TRAIN + N_TEST, rng)
    x_train, y_train, x_test, y_test = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    clf = train(x_train, y_train)
    data = export(clf)
    sha256 = hashlib.sha256(data).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(data)
    (out / "manifest.toml").write_text(manifest_toml(sha256, training_range(x)), encoding="utf-8")
    counts = np.bincount(y, minlength=len(LABELS))
    return {
        "held_out_accuracy": float(clf.score(x_test, y_test)),
        "bytes": float(len(data)),
        **{f"share_{label}": float(c / len(y)) for label, c in zip(LABELS, counts, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare bytes with --out")
    args = parser.parse_args(argv)
    print(f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__}")
    if not args.check:
        figures = build(args.out)
        _report(figures)
        print(f"wrote {args.out / 'model.onnx'} and {args.out / 'manifest.toml'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        figures = build(Path(tmp))
        _report(figures)
        bad = [
            name
            for name in ("model.onnx", "manifest.toml")
            if not (args.out / name).is_file() or (args.out / name).read_bytes() != (Path(tmp) / name).read_bytes()
        ]
    if bad:
        print(f"MISMATCH: {', '.join(bad)} in {args.out} differ from a fresh build", file=sys.stderr)
        return 1
    print(f"OK: {args.out} is byte-for-byte what this script builds")
    return 0


def _report(figures: dict[str, float]) -> None:
    shares = ", ".join(f"{label} {figures[f'share_{label}']:.1%}" for label in LABELS)
    print(f"classes: {shares}")
    accuracy, size = figures["held_out_accuracy"], figures["bytes"]
    print(f"held-out accuracy: {accuracy:.4f} ({N_TEST} rows); model.onnx {size:.0f} bytes")


if __name__ == "__main__":
    sys.exit(main())

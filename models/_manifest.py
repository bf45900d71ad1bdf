"""The model manifest (`manifest.toml` beside the model file): its schema, checks and loader."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ._errors import ManifestError

MANIFEST_NAME = "manifest.toml"

_SHA256 = "^[0-9a-f]{64}$"
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Manifest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a model is, what it expects and what its outputs mean (SPEC §4, "Model manifest")."""

    name: _NonEmpty
    version: _NonEmpty
    sha256: Annotated[str, msgspec.Meta(pattern=_SHA256)]
    features: Annotated[list[_NonEmpty], msgspec.Meta(min_length=1)]
    file: _NonEmpty = "model.onnx"
    task: Literal["classifier", "regressor"] = "classifier"
    scores: Literal["probabilities", "logits"] = "probabilities"
    labels: list[_NonEmpty] = []
    training_range: dict[str, tuple[float, float]] = {}

    def __post_init__(self) -> None:
        # Cross-field checks msgspec cannot express. ManifestError is not a ValueError, so
        # msgspec.convert lets it through with its key path intact; load_manifest adds the file.
        if Path(self.file).name != self.file or self.file in (".", ".."):
            # A deployed manifest must not point outside its own folder.
            raise ManifestError(None, "file", f"expected a plain file name, got {self.file!r}")
        _check_unique(self.features, "features")
        _check_unique(self.labels, "labels")
        if self.task == "classifier" and not self.labels:
            raise ManifestError(None, "labels", "expected a non-empty list of labels for a classifier")
        for key, (lo, hi) in self.training_range.items():
            if key not in self.features:
                raise ManifestError(None, f"training_range.{key}", f"expected one of features {self.features}")
            if not lo <= hi:
                raise ManifestError(None, f"training_range.{key}", f"expected [lo, hi] with lo <= hi, got {[lo, hi]}")

    def out_of_range(self, row: Sequence[float]) -> str | None:
        """The first feature (in `features` order) whose value lies outside its training range, or None.

        NaN is outside every range; features without a range are unbounded.
        """
        if len(row) != len(self.features):
            raise ValueError(f"expected {len(self.features)} values ({self.features}), got {len(row)}")
        ranges = self.training_range
        for name, value in zip(self.features, row, strict=True):
            bounds = ranges.get(name)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                return name
        return None


def _check_unique(values: list[str], key: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ManifestError(None, f"{key}[{i}]", f"expected unique names, {value!r} appears twice")
        seen.add(value)


def load_manifest(path: Path) -> Manifest:
    """Read and check a manifest; `path` is the model folder or the manifest file itself.

    Every problem raises ManifestError naming the file, the key path and what was expected.
    """
    file = path if path.suffix == ".toml" and not path.is_dir() else path / MANIFEST_NAME
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(file, "", f"cannot read the manifest ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(file, "", f"expected valid UTF-8 TOML ({exc})") from exc
    return manifest_from_dict(raw, file)


def manifest_from_dict(raw: dict[str, Any], source: Path | None = None) -> Manifest:
    """Build a Manifest from already-parsed TOML/JSON; errors name `source` and the key path."""
    _check_training_range_shape(raw.get("training_range"), source)
    try:
        return msgspec.convert(raw, Manifest)
    except ManifestError as exc:
        raise ManifestError(source, exc.key, exc.message) from None
    except msgspec.ValidationError as exc:
        key, message = _explain(str(exc))
        raise ManifestError(source, key, message) from None


def _check_training_range_shape(table: object, source: Path | None) -> None:
    """Check `training_range` entries up front: msgspec reports dict values as `[...]`, losing the key."""
    if not isinstance(table, dict):
        return  # absent, or not a table: msgspec's own message is clear enough
    for key, value in table.items():
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
        if not ok:
            raise ManifestError(source, f"training_range.{key}", f"expected [lo, hi], two numbers, got {value!r}")


_FIELDS = ", ".join(Manifest.__struct_fields__)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _explain(error: str) -> tuple[str, str]:
    """Turn msgspec's `Expected ... - at `$.a.b`` into (`a.b`, `expected ...`)."""
    at = _AT.search(error)
    prefix = at.group("path").lstrip(".") if at else ""
    message = error[: at.start()] if at else error
    if m := _MISSING.fullmatch(message):
        return _join(prefix, m.group("field")), "required key is missing"
    if m := _UNKNOWN.fullmatch(message):
        return _join(prefix, m.group("field")), f"unknown key (expected one of: {_FIELDS})"
    return prefix, message[:1].lower() + message[1:]


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if prefix else field


def midpoint_row(manifest: Manifest) -> list[float]:
    """A plausible input: the middle of each training range (0.0 where there is none). Used to warm up."""
    row = []
    for name in manifest.features:
        lo, hi = manifest.training_range.get(name, (0.0, 0.0))
        mid = (lo + hi) / 2
        # Half-open ranges ([x, inf]) warm up at their finite end.
        row.append(next((v for v in (mid, lo, hi) if math.isfinite(v)), 0.0))
    return row

"""One loaded, verified ONNX model: checksum, session, graph check, warm-up and the `predict` hot path."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnxruntime as ort

from ._errors import ChecksumMismatch, GraphMismatch, ManifestError, ModelFileMissing, ModelUnavailable, WarmupTimeout
from ._graph import Mismatch, Port, plan
from ._manifest import MANIFEST_NAME, Manifest, load_manifest, midpoint_row

FloatArray = npt.NDArray[np.floating[Any]]


class Prediction(msgspec.Struct, frozen=True, gc=False):
    """One model answer. Classifiers: `label` and `confidence` (top probability). Regressors: `value`."""

    # gc=False: only str/float fields, so no reference cycles are possible; it makes creation cheaper.
    label: str
    confidence: float | None
    value: float | None = None


class Model:
    """One loaded, verified onnxruntime session; build it with `load_model`.

    `predict` is blocking and thread-safe (onnxruntime sessions are); run it in a worker thread.
    """

    manifest: Manifest
    sha256: str
    path: Path
    fixed_batch: int | None

    def __init__(self, manifest: Manifest, session: ort.InferenceSession, *, path: Path, sha256: str,
                 warmup_timeout_s: float | None = None) -> None:
        self.manifest = manifest
        self.sha256 = sha256
        self.path = path
        try:
            self._plan = plan(manifest, _ports(session.get_inputs()), _ports(session.get_outputs()))
        except Mismatch as exc:
            raise GraphMismatch(path / manifest.file, str(exc)) from None
        self.fixed_batch = self._plan.fixed_batch
        self._width = len(manifest.features)
        self._run = session.run
        self._output_names = [self._plan.output_name]
        self._input_name = self._plan.input_name
        self._labels: tuple[str, ...] = tuple(manifest.labels)
        self._zipmap_keys: tuple[object, ...] = ()
        self._logits = manifest.scores == "logits"
        # The decoder is chosen once, so predict does no branching on the graph's kind.
        decoders: dict[str, Callable[[Any, int], list[Prediction]]] = {
            "probabilities": self._decode_scores,
            "scores": self._decode_scores,
            "zipmap": self._decode_zipmap,
            "regression": self._decode_regression,
        }
        self._decode = decoders[self._plan.kind]
        self._warm_up(warmup_timeout_s)

    def __repr__(self) -> str:
        m = self.manifest
        kind, batch = self._plan.kind, self.fixed_batch
        return f"<Model {m.name}:{m.version} {kind} sha256={self.sha256[:12]} batch={batch}>"

    def predict(self, rows: npt.ArrayLike, run_options: ort.RunOptions | None = None) -> list[Prediction]:
        """Run `rows` (float32, shape (n, len(features)), in `features` order); one Prediction per row."""
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self._width:
            raise ValueError(f"expected rows of shape (n, {self._width}), got {batch.shape}")
        n = batch.shape[0]
        if n == 0:
            return []
        fixed = self.fixed_batch
        if fixed is None or n == fixed:
            out = self._run(self._output_names, {self._input_name: batch}, run_options)[0]
        else:
            out = self._run_fixed(batch, fixed, run_options)
        return self._decode(out, n)

    def _run_fixed(self, batch: npt.NDArray[np.float32], fixed: int, run_options: ort.RunOptions | None) -> Any:
        """A graph with a fixed batch dimension: feed it chunks of exactly `fixed` rows, padding the last."""
        n = batch.shape[0]
        parts: list[Any] = []
        for start in range(0, n, fixed):
            chunk = batch[start : start + fixed]
            if chunk.shape[0] < fixed:
                padded = np.zeros((fixed, self._width), dtype=np.float32)
                padded[: chunk.shape[0]] = chunk
                chunk = padded
            parts.append(self._run(self._output_names, {self._input_name: chunk}, run_options)[0])
        if self._plan.kind == "zipmap":
            return [item for part in parts for item in part][:n]
        return np.concatenate(parts)[:n]

    def _decode_scores(self, out: FloatArray, n: int) -> list[Prediction]:
        labels = self._labels
        idx = out.argmax(axis=1).tolist()
        if self._logits:
            # softmax(x)[argmax] = 1 / sum(exp(x - max)): the top probability without the full softmax.
            confidence = (1.0 / np.exp(out - out.max(axis=1, keepdims=True)).sum(axis=1)).tolist()
            return [Prediction(labels[i], c) for i, c in zip(idx, confidence, strict=True)]
        # Plain lists and indexing beat a numpy gather for a handful of classes (1.2 vs 3 us at batch 1).
        return [Prediction(labels[i], row[i]) for i, row in zip(idx, out.tolist(), strict=True)]

    def _decode_zipmap(self, out: Sequence[dict[object, float]], n: int) -> list[Prediction]:
        keys = self._zipmap_keys
        scores = np.array([[row[k] for k in keys] for row in out], dtype=np.float64)
        return self._decode_scores(scores, n)

    def _decode_regression(self, out: FloatArray, n: int) -> list[Prediction]:
        return [Prediction("", None, v) for v in out.reshape(n).tolist()]

    def _warm_up(self, timeout_s: float | None) -> None:
        """Run once on a plausible row: pays one-off allocation costs and proves the outputs fit.

        Within `timeout_s` (None: unbounded): a timer sets onnxruntime's terminate flag, which every
        node and every Loop iteration checks, so a graph that would run forever stops and is refused
        (WarmupTimeout). A single node that runs long without checking the flag is not interrupted.
        """
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # a stopped run is reported by WarmupTimeout, not on stderr
        file = self.path / self.manifest.file
        timer = threading.Timer(timeout_s, _terminate, (options,)) if timeout_s is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            self._warm_up_runs(options, file)
        except ModelUnavailable as exc:
            if options.terminate and timeout_s is not None:
                raise WarmupTimeout(file, timeout_s) from exc
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _warm_up_runs(self, options: ort.RunOptions, file: Path) -> None:
        row = np.asarray([midpoint_row(self.manifest)], dtype=np.float32)
        fed = self._pad(row)
        try:
            out = self._run(self._output_names, {self._input_name: fed}, options)[0]
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelUnavailable(f"{file}: warm-up run failed: {exc}") from exc
        rows, classes, kind = fed.shape[0], len(self._labels), self._plan.kind
        if kind == "zipmap":
            self._zipmap_keys = self._check_zipmap(out, file)
        elif kind == "regression":
            size = np.asarray(out).size
            if size != rows:
                raise GraphMismatch(file, f"regressor output has {size} values for {rows} rows, expected one per row")
        else:
            shape = list(np.asarray(out).shape)
            if shape != [rows, classes]:
                raise GraphMismatch(
                    file,
                    f"score output has shape {shape} for {rows} rows, expected [{rows}, {classes}] ({classes} labels)",
                )
        try:
            self.predict(row, options)
        except Exception as exc:
            raise ModelUnavailable(f"{file}: warm-up prediction failed: {exc}") from exc

    def _check_zipmap(self, out: Sequence[dict[object, float]], file: Path) -> tuple[object, ...]:
        """ZipMap keys are class ids (int64) or class names (string); map them onto the manifest's labels."""
        keys = list(out[0])
        labels = self._labels
        if len(keys) != len(labels):
            raise GraphMismatch(file, f"ZipMap output has {len(keys)} classes {keys}, the manifest has {len(labels)}")
        if all(isinstance(k, str) for k in keys):
            if set(keys) != set(labels):
                raise GraphMismatch(file, f"ZipMap class names {keys} are not the manifest's labels {list(labels)}")
            # Read the columns in the manifest's label order, so column i is labels[i].
            return tuple(labels)
        ids = [k for k in keys if isinstance(k, int)]
        if len(ids) != len(keys):
            raise GraphMismatch(file, f"ZipMap keys {keys} are neither all class ids nor all class names")
        # Integer class ids: the i-th class in sorted id order is labels[i].
        return tuple(sorted(ids))

    def _pad(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.fixed_batch is None or rows.shape[0] == self.fixed_batch:
            return rows
        padded = np.zeros((self.fixed_batch, self._width), dtype=np.float32)
        padded[: rows.shape[0]] = rows
        return padded


def _terminate(options: ort.RunOptions) -> None:
    options.terminate = True


def _ports(args: Sequence[Any]) -> list[Port]:
    return [Port(a.name, a.type, tuple(a.shape)) for a in args]


def _session_options() -> ort.SessionOptions:
    import onnxruntime as ort  # here, not at import: reading manifests or audit logs must not load it

    options = ort.SessionOptions()
    # One thread per session: the batcher owns concurrency; an edge box has few cores to share.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: onnxruntime's warnings go to stderr, not our logs
    return options


def _open_session(data: bytes, file: Path) -> ort.InferenceSession:
    import onnxruntime as ort
    try:
        return ort.InferenceSession(data, _session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ModelUnavailable(f"{file}: onnxruntime cannot open the model: {exc}") from exc


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise ModelFileMissing(file) from None
    except OSError as exc:
        raise ModelUnavailable(f"{file}: cannot read the model file: {exc}") from exc


def _folder(path: Path) -> Path:
    """The model folder, given the folder itself, its manifest.toml or its .onnx file."""
    return path.parent if path.suffix in (".toml", ".onnx") and not path.is_dir() else path


def load_model(folder: Path, *, warmup_timeout_s: float | None = None) -> Model:
    """Load the model in `folder` (or named by its manifest.toml): check sha256 and graph, warm up
    (within `warmup_timeout_s` when given).

    Blocking; run it in a thread. Raises ManifestError, ModelFileMissing, ChecksumMismatch,
    GraphMismatch or ModelUnavailable (WarmupTimeout when the warm-up was stopped).
    """
    manifest = load_manifest(folder)
    folder = _folder(folder)
    file = folder / manifest.file
    # Hash the very bytes handed to onnxruntime, so the file cannot change between check and load.
    data = _read(file)
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.sha256:
        raise ChecksumMismatch(file, manifest.sha256, actual)
    return Model(manifest, _open_session(data, file), path=folder, sha256=actual, warmup_timeout_s=warmup_timeout_s)


def inspect_model(path: Path) -> dict[str, object]:
    """Describe a model folder (or .onnx file): inputs, outputs, manifest, sha256 and any problems.

    `problems` lists what would stop `load_model` (bad manifest, checksum, graph); it is empty when the
    model would load. Raises ModelFileMissing or ModelUnavailable when the file cannot be opened at all.
    """
    folder = _folder(path)
    manifest: Manifest | None = None
    problems: list[str] = []
    if (folder / MANIFEST_NAME).exists():
        try:
            manifest = load_manifest(folder)
        except ManifestError as exc:
            problems.append(str(exc))
    if path.suffix == ".onnx" and not path.is_dir():
        file = path
        if manifest is not None and manifest.file != path.name:
            manifest = None  # the manifest beside it describes another file
    else:
        file = folder / (manifest.file if manifest is not None else "model.onnx")
    data = _read(file)
    actual = hashlib.sha256(data).hexdigest()
    session = _open_session(data, file)
    inputs, outputs = _ports(session.get_inputs()), _ports(session.get_outputs())
    matches: bool | None = None
    if manifest is not None:
        matches = actual == manifest.sha256
        if not matches:
            problems.append(str(ChecksumMismatch(file, manifest.sha256, actual)))
        try:
            Model(manifest, session, path=folder, sha256=actual)
        except (GraphMismatch, ModelUnavailable) as exc:
            problems.append(str(exc))
    meta = session.get_modelmeta()
    return {
        "path": str(file),
        "size_bytes": len(data),
        "sha256": actual,
        "sha256_matches": matches,
        "producer": meta.producer_name,
        "inputs": [_port_dict(p) for p in inputs],
        "outputs": [_port_dict(p) for p in outputs],
        "manifest": msgspec.to_builtins(manifest) if manifest is not None else None,
        "problems": problems,
    }


def _port_dict(port: Port) -> dict[str, object]:
    return {"name": port.name, "type": port.type, "shape": list(port.shape)}

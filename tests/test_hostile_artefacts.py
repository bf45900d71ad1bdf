"""Hostile artefacts (SPEC §12): archive and object bombs, tampered model folders, hanging warm-ups,
pushed model paths — each performed as an attacker would, against a real runtime on a real hub.

What an attacker controls here: the bytes of an object in a bucket it can write (archives, chunks
beyond the declared size), the files under data_dir once the device is off, and a graph that never
ends. What must hold: a refusal with a bounded message, within seconds and a bounded memory growth
(< 50 MB for the whole process, read from /proc/self/status), while the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import numpy as np
import onnx
import pytest
from nats.aio.client import Client as NATS
from onnx import TensorProto, helper, numpy_helper

from edge import CommandError, Runtime
from edge.cli._operator import publish_model, send_command
from edge.fleet import ModelDeploy, pack_model_folder, pushed_config, sign_model, unpack_model_archive
from edge.fleet._archive import verify_deployed
from models import ModelUnavailable, bundled_model_path, load_model
from tests.fleet_helpers import figure, model_version
from tests.model_builders import matmul_model, write_model
from tests.nats_harness import ServerFactory
from tests.runtime_harness import NORMAL, OPERATOR, OPERATOR_SEED, config_data, connect, make_config

SEED = OPERATOR_SEED
MB = 1024 * 1024
RSS_BUDGET = 50 * MB
NAME = "pump-anomaly"


# ---------------------------------------------------------------------------------------------
# Memory, as the kernel counts it for this process (runtime and test alike)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class PeakRss:
    """Growth of the process's peak RSS over a block: the peak is reset on entry (/proc/self/clear_refs)."""

    def __enter__(self) -> PeakRss:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status_kib("VmHWM") * 1024 - self.before


# ---------------------------------------------------------------------------------------------
# Archives built as an attacker would: gzip streamed, so the test never holds what they claim


def _gz(parts: Iterable[bytes]) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(part) for part in parts]
    out.append(z.flush())
    return b"".join(out)


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _filler(size: int, byte: bytes = b"a") -> Iterator[bytes]:
    chunk = byte * MB
    while size:
        n = min(size, MB)
        yield chunk[:n]
        size -= n


def _end() -> bytes:
    return bytes(2 * tarfile.BLOCKSIZE)


def long_name_bomb(size: int = 50_000_000) -> bytes:
    """A GNU long-name header claiming a `size`-byte file name (tarfile reads it whole)."""
    return _gz([_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size), *_filler(size),
                bytes(-size % 512), _header("model.onnx", tarfile.REGTYPE, 0), _end()])


def pax_bomb(size: int = 50_000_000) -> bytes:
    """A PAX header of one `path` record of about `size` bytes."""
    value = size - 20
    record_tail = len(" path=") + value + 1
    length = record_tail + len(str(record_tail))
    length = record_tail + len(str(length))
    prefix = f"{length} path=".encode()
    return _gz([_header("./PaxHeaders/x", tarfile.XHDTYPE, length), prefix, *_filler(value), b"\n",
                bytes(-length % 512), _header("model.onnx", tarfile.REGTYPE, 0), _end()])


def many_members_bomb(count: int = 100_000) -> bytes:
    return _gz([*(_header(f"f{i}", tarfile.REGTYPE, 0) for i in range(count)), _end()])


def huge_member_bomb(size: int = 100 * 1024**3) -> bytes:
    """A member declaring 100 GiB (GNU base-256 size field); its data never comes."""
    return _gz([_header("manifest.toml", tarfile.REGTYPE, 0), _header("model.onnx", tarfile.REGTYPE, size),
                *_filler(4 * MB, b"\0")])


def long_path_archive(chars: int = 60_000) -> bytes:
    """A name under the header bound but far over any path: it must not be echoed whole."""
    name = "d/" * (chars // 2)
    return _gz([_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name) + 1), name.encode() + b"\0",
                bytes(-(len(name) + 1) % 512), _header("x", tarfile.REGTYPE, 0), _end()])


# ---------------------------------------------------------------------------------------------
# Unit: the unpacker alone (no network)


@pytest.mark.parametrize(("bomb", "code", "words"), [
    (long_name_bomb, "bad_archive", "extended headers"),
    (pax_bomb, "bad_archive", "extended headers"),
    (many_members_bomb, "bad_archive", "more than 256 entries"),
    (huge_member_bomb, "too_large", "unpacks to more than"),
    (long_path_archive, "bad_archive", "characters in the archive"),
])
def test_archive_bombs_are_refused_before_the_bytes_they_claim_are_read(tmp_path: Path, bomb: Any, code: str,
                                                                       words: str) -> None:
    data = bomb()
    assert len(data) < 2 * MB  # what the attacker uploads
    target = tmp_path / "store" / NAME / "2"
    with PeakRss() as rss, pytest.raises(CommandError) as caught:
        unpack_model_archive(data, target)
    assert caught.value.code == code and words in caught.value.message, caught.value
    assert len(caught.value.message) < 400  # the attacker's name is quoted, never whole
    assert rss.growth < RSS_BUDGET, f"{bomb.__name__}: peak RSS grew by {rss.growth / MB:.0f} MB"
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_an_archive_made_with_tar_dash_c_dot_unpacks(tmp_path: Path) -> None:
    folder = model_version(tmp_path, "2")
    (folder / "notes").mkdir()
    (folder / "notes" / "README").write_text("trained on 2024 data\n")
    archive = tmp_path / "m.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(folder), "."], check=True)
    with tarfile.open(archive) as listing:
        assert "." in listing.getnames()  # the folder's own entry ("./"), which used to be refused
    out = tmp_path / "out"
    unpack_model_archive(archive.read_bytes(), out)
    for name in ("manifest.toml", "model.onnx", "notes/README"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()


def test_a_negative_size_cannot_lower_the_total(tmp_path: Path) -> None:
    data = _gz([_header("manifest.toml", tarfile.REGTYPE, 0), _header("a", tarfile.REGTYPE, -(10**12)),
                _header("b", tarfile.REGTYPE, 10**12), _end()])
    with pytest.raises(CommandError, match="negative size"):
        unpack_model_archive(data, tmp_path / "out")


def test_an_archive_without_end_blocks_unpacks(tmp_path: Path) -> None:
    data = _gz([_header("manifest.toml", tarfile.REGTYPE, 3), b"x=1" + bytes(509)])
    unpack_model_archive(data, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.toml").read_bytes() == b"x=1"


@pytest.mark.parametrize("name", ["./../x", "a/../../x", "/etc/x", ".edge-signature", "a/.edge-object.sha256"])
def test_unsafe_and_reserved_paths_are_refused(tmp_path: Path, name: str) -> None:
    data = _gz([_header("manifest.toml", tarfile.REGTYPE, 0), _header(name, tarfile.REGTYPE, 0), _end()])
    with pytest.raises(CommandError, match="unsafe path"):
        unpack_model_archive(data, tmp_path / "out")


def test_a_model_whose_external_data_escapes_its_folder_is_refused(tmp_path: Path) -> None:
    """What the onnxruntime floor (pyproject) buys: a graph cannot make the device read `../anything`."""
    (tmp_path / "secret.bin").write_bytes(bytes(48))
    weights = numpy_helper.from_array(np.zeros((4, 3), dtype=np.float32), "W")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "48")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["scores"])], "escape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
                              initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = write_model(tmp_path / "m", model.SerializeToString(), features=["a", "b", "c", "d"],
                         labels=["x", "y", "z"], task="classifier", scores="probabilities")
    with pytest.raises(ModelUnavailable, match="escapes"):
        load_model(folder)


def test_a_pushed_config_names_only_the_running_model_folders_or_the_store(tmp_path: Path) -> None:
    running = make_config(tmp_path, "nats://127.0.0.1:4222", device="gw-p")
    base = config_data(tmp_path, "x")
    elsewhere = model_version(tmp_path, "2")  # a valid model, outside the store: unsigned
    store = Path(running.data_dir) / "models" / NAME / "2"
    shutil.copytree(elsewhere, store)

    def push(path: str) -> Any:
        return pushed_config({"pipelines": base["pipelines"], "models": [{"name": NAME, "path": path}]}, running)

    assert push(str(bundled_model_path())).models[0].path == str(bundled_model_path())  # the running one
    assert push(str(store)).models[0].path == str(store)
    for path, words in ((str(elsewhere), "outside this device's model store"),
                        (f"{store}/../../../../{elsewhere.name}", "'..' is not allowed")):
        with pytest.raises(CommandError) as caught:
            push(path)
        assert caught.value.code == "bad_config" and "models[0].path" in caught.value.message
        assert words in caught.value.message


# ---------------------------------------------------------------------------------------------
# On a real hub, through `model.deploy`


async def _put(nc: NATS, obj: str, data: bytes) -> str:
    js = nc.jetstream()
    try:
        store = await js.object_store("models")
    except nats.js.errors.BucketNotFoundError:
        store = await js.create_object_store("models")
    await store.put(obj, data)
    return hashlib.sha256(data).hexdigest()


async def _deploy(nc: NATS, device: str, version: str, obj: str, sha: str) -> Any:
    body = msgspec.to_builtins(ModelDeploy(name=NAME, version=version, bucket="models", object=obj, sha256=sha,
                                           signature=sign_model(SEED, sha)))
    got = await send_command(nc, device, "model.deploy", body, seed=SEED, timeout=30)
    assert len(got.replies) == 1, got
    return got.replies[0]


async def _serving_version(nc: NATS) -> str:
    reply = await nc.request("sensors.p1.pump", msgspec.json.encode(NORMAL), timeout=5)
    decision = msgspec.json.decode(reply.data)
    return str(decision["model"]["version"]) if decision.get("model") else ""


async def test_bombs_deployed_are_refused_within_seconds_in_bounded_memory_while_v1_serves(
    nats_servers: ServerFactory, tmp_path: Path, pytestconfig: pytest.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    bombs = {"long-name": long_name_bomb(), "pax": pax_bomb(), "many-members": many_members_bomb(),
             "huge-member": huge_member_bomb(), "long-path": long_path_archive()}
    shas = {kind: await _put(nc, f"{kind}.tar.gz", data) for kind, data in bombs.items()}
    measured = []
    async with Runtime(make_config(tmp_path, server.url, device="gw-b")) as runtime:
        for version, kind in enumerate(bombs, start=2):
            started = time.monotonic()
            with PeakRss() as rss:
                reply = await _deploy(nc, "gw-b", str(version), f"{kind}.tar.gz", shas[kind])
            elapsed = time.monotonic() - started
            assert not reply.ok and reply.error.code in ("bad_archive", "too_large"), (kind, reply)
            assert len(reply.error.message) < 400, kind
            assert elapsed < 10, f"{kind}: answered after {elapsed:.1f}s"
            assert rss.growth < RSS_BUDGET, f"{kind}: peak RSS grew by {rss.growth / MB:.0f} MB"
            assert not runtime.deployments.store_dir(NAME, str(version)).exists()
            assert await _serving_version(nc) == "1", kind
            measured.append(f"{kind} ({len(bombs[kind]) // 1024} KiB): {reply.error.code} in {elapsed * 1000:.0f} ms, "
                            f"peak RSS +{rss.growth / MB:.1f} MB")

        # A bucket writer appends chunks to a good object's stream: the declared size is the bound.
        good = model_version(tmp_path, "9")
        obj, sha = await publish_model(nc, good, bucket="models", name=NAME, version="9")
        info = await (await nc.jetstream().object_store("models")).get_info(obj)
        flood = bytes(900 * 1024)
        for _ in range(64):  # 57 MB beyond what the info declares
            await nc.jetstream().publish(f"$O.models.C.{info.nuid}", flood)
        started = time.monotonic()
        with PeakRss() as rss:
            reply = await _deploy(nc, "gw-b", "9", obj, sha)
        assert not reply.ok and reply.error.code == "too_large", reply
        assert "streams more than" in reply.error.message
        elapsed = time.monotonic() - started
        assert elapsed < 10
        assert rss.growth < RSS_BUDGET, f"object flood: peak RSS grew by {rss.growth / MB:.0f} MB"
        assert await _serving_version(nc) == "1"
        measured.append(f"object flood (57 MB past the declared size): {reply.error.code} in {elapsed * 1000:.0f} ms, "
                        f"peak RSS +{rss.growth / MB:.1f} MB")
    figure(pytestconfig, capsys, "\n".join(measured))
    await nc.close()


async def test_an_archive_made_with_tar_dash_c_dot_deploys(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    folder = model_version(tmp_path, "2")
    archive = tmp_path / "m.tar.gz"
    await asyncio.to_thread(subprocess.run, ["tar", "-czf", str(archive), "-C", str(folder), "."], check=True)
    sha = await _put(nc, "by-hand.tar.gz", archive.read_bytes())
    async with Runtime(make_config(tmp_path, server.url, device="gw-t")):
        reply = await _deploy(nc, "gw-t", "2", "by-hand.tar.gz", sha)
        assert reply.ok, reply
        assert await _serving_version(nc) == "2"
    await nc.close()


def _hijack(folder: Path) -> None:
    """A consistent model folder of the attacker's: model.onnx replaced, the manifest's sha256 updated."""
    weights = np.array([[0, 1, 0]] * 4, dtype=np.float32)
    model = matmul_model(weights, softmax=True)
    (folder / "model.onnx").write_bytes(model)
    manifest = folder / "manifest.toml"
    lines = [f'sha256 = "{hashlib.sha256(model).hexdigest()}"' if line.startswith("sha256") else line
             for line in manifest.read_text().splitlines()]
    manifest.write_text("\n".join(lines) + "\n")


async def test_a_tampered_model_folder_is_refused_at_restart(nats_servers: ServerFactory, tmp_path: Path) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    config = make_config(tmp_path, server.url, device="gw-r")
    async with Runtime(config) as runtime:
        obj, sha = await publish_model(nc, model_version(tmp_path, "2"), bucket="models", name=NAME, version="2")
        assert (await _deploy(nc, "gw-r", "2", obj, sha)).ok
        assert await _serving_version(nc) == "2"
        deployed = runtime.deployments.store_dir(NAME, "2")
        state_file = runtime.deployments.state_file
    pristine, state = tmp_path / "pristine", state_file.read_bytes()
    shutil.copytree(deployed, pristine)

    def files_replaced() -> None:
        _hijack(deployed)

    def signature_replaced() -> None:
        (deployed / ".edge-signature").write_text(sign_model(SEED, "0" * 64))

    def state_points_elsewhere() -> None:  # a folder of its own, with a copy of the genuine deploy record
        outside = tmp_path / "outside"
        shutil.copytree(pristine, outside)
        _hijack(outside)
        state_file.write_bytes(state.replace(str(deployed).encode(), str(outside).encode()))

    for attack, code in ((files_replaced, "tampered"), (signature_replaced, "bad_signature"),
                         (state_points_elsewhere, "tampered")):
        shutil.rmtree(deployed)
        shutil.copytree(pristine, deployed)
        state_file.write_bytes(state)
        attack()
        async with Runtime(config) as runtime:
            status = (await send_command(nc, "gw-r", "status", seed=SEED)).replies[0].result
            models = {m["name"]: m for m in status["models"]}
            assert models[NAME]["version"] == "1", attack.__name__  # the config's model serves instead
            refused = status["deployments"][NAME]["refused"]  # status says why
            assert "refused at start" in refused and f"{code}:" in refused, (attack.__name__, refused)
            assert await _serving_version(nc) == "1", attack.__name__
    await nc.close()


def _hanging_model(folder: Path, version: str) -> Path:
    """The pump model's interface around a Loop that runs 2**62 times: loads fine, never finishes a run."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "C", "x"], ["looped"], body=body),
         helper.make_node("MatMul", ["looped", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["scores"], axis=1)],
        "hang",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(np.array(2**62, dtype=np.int64), "M"),
                     numpy_helper.from_array(np.array(True), "C"),
                     numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return write_model(folder, model.SerializeToString(), features=["rms", "kurtosis", "temp_c", "rpm"],
                       labels=["normal", "anomaly", "critical"], name=NAME, version=version, task="classifier",
                       scores="probabilities")


async def test_a_hanging_warm_up_is_refused_without_blocking_the_next_command(
    nats_servers: ServerFactory, tmp_path: Path
) -> None:
    server = await nats_servers("hub")
    nc = await connect(server.url)
    models = [{"name": NAME, "path": str(bundled_model_path()), "warmup_timeout_ms": 3000}]
    config = make_config(tmp_path, server.url, device="gw-w", models=models)
    hanging = _hanging_model(tmp_path / "hanging", "2")
    obj, sha = await publish_model(nc, hanging, bucket="models", name=NAME, version="2")
    async with Runtime(config):
        started = time.monotonic()
        deploy = asyncio.ensure_future(_deploy(nc, "gw-w", "2", obj, sha))
        # A change that needs the fleet's lock, sent while the model warms up: answered at once.
        push = {"config": {"pipelines": [{**config_data(tmp_path, "x")["pipelines"][0], "min_confidence": 0.85}],
                           "models": models}}
        applied = await send_command(nc, "gw-w", "config.apply", push, seed=SEED, timeout=10)
        applied_after = time.monotonic() - started
        assert applied.all_ok, applied
        assert not deploy.done()
        assert applied_after < 2.5, f"config.apply waited {applied_after:.1f}s behind the warm-up"
        reply = await deploy
        assert not reply.ok and reply.error.code == "warmup_timeout", reply
        assert time.monotonic() - started < 10
        assert await _serving_version(nc) == "1"
        # Nothing was left holding anything: a good version deploys next.
        obj3, sha3 = await publish_model(nc, model_version(tmp_path, "3"), bucket="models", name=NAME, version="3")
        assert (await _deploy(nc, "gw-w", "3", obj3, sha3)).ok
        assert await _serving_version(nc) == "3"
    await nc.close()


def test_the_packer_and_the_unpacker_agree_on_the_deploy_record(tmp_path: Path) -> None:
    """What `model.deploy` keeps beside a model is checked against the files at every load."""
    folder = model_version(tmp_path, "2")
    data = pack_model_folder(folder)
    sha = hashlib.sha256(data).hexdigest()
    out = tmp_path / "store" / "2"
    unpack_model_archive(data, out, sha256=sha, signature=sign_model(SEED, sha))
    verify_deployed(out, [OPERATOR])
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(CommandError, match="extra.bin") as caught:
        verify_deployed(out, [OPERATOR])
    assert caught.value.code == "tampered"

"""Pushed configs and model archives: pure transformations and file work, no network.

`model.deploy` fetches an object from a JetStream Object Store bucket: the model folder packed as
a .tar.gz (`model.onnx` + `manifest.toml` at the top, as `edge fleet deploy-model` writes it, or
`tar -czf m.tar.gz -C folder .`). The folder is unpacked (regular files only, no path escapes,
size-bounded) into the model store.

The archive comes from whoever can write the bucket, so it is read as hostile: the gzip stream is
inflated in bounded steps by a counting reader, and the tar stream is read by hand in 512-byte
blocks (`tarfile` only parses one header block at a time). Every bound is checked before the bytes
it bounds are read: a GNU long-name or PAX header's size before its body, a member's size before
its data, the member count before the next header. So a 48 KiB object claiming a 50 MB file name,
a million empty members or a 100 GB member costs a few blocks of memory and is refused at once.

What was deployed stays checkable: beside the unpacked files, the folder keeps the object it came
from (`.edge-object.tar.gz`), its sha256 (`.edge-object.sha256`) and the operator's signature over
that sha256 (`.edge-signature`). `verify_deployed` checks the three against each other and against
the trusted keys, and the files against the archive, whenever the model is loaded (restart
included): a folder edited after the deploy is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .._config import TRUST_ROOTS, Config, check_pushed_models, decode_config, encode_config
from .._errors import CommandError, ConfigError, quoted
from .._files import write_atomically
from ._signing import verify_artifact

if TYPE_CHECKING:
    pass



log = logging.getLogger("edge.fleet")

MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # the object as fetched (compressed)
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024  # the members' contents, all together
MAX_ARCHIVE_MEMBERS = 256  # files and folders
MAX_HEADER_BYTES = 64 * 1024  # one member's extended headers (GNU long name/link, PAX), all together
MAX_PATH_CHARS = 1024  # a member's path; and 255 per path component (what file systems take)
BLOCK = tarfile.BLOCKSIZE  # 512
STEP = 64 * 1024  # what is inflated or copied at a time
OBJECT_MARKER = ".edge-object.sha256"  # inside a deployed folder: the sha256 of the object it came from
SIGNATURE_FILE = ".edge-signature"  # ... the operator's signature over that sha256 (empty when unsigned)
ARCHIVE_COPY = ".edge-object.tar.gz"  # ... and the object itself, so the files can be checked against it
RESERVED_PREFIX = ".edge-"  # names an archive may not hold: the device's own records
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)




# ---------------------------------------------------------------------------------------------
# Pushed configs and model archives (no I/O on the network)


def pushed_config(data: Mapping[str, Any], running: Config) -> Config:
    """A config pushed with `config.apply`, completed from the running one, decoded and checked.

    One file can be pushed to a whole group: what it leaves out of device_id, groups, data_dir,
    nats, audit and the fleet's trust roots (trusted_keys, approver_keys, allow_unsigned,
    device_key) is the device's own, so a push that forgets `[fleet]` cannot switch command
    signatures off; one that names different trust roots or connections is refused when applied
    (`restart_required`): those come from the config file only. A `nats` table exactly as
    `config.get` shows it (redacted) stands for the running one. Relative paths resolve against
    the device's config folder; a model's path is the one the device runs for that model already,
    or a folder in its model store (`data_dir/models`, where `model.deploy` puts what it verified):
    a push cannot make the device load a model from anywhere else. Raises CommandError
    `bad_config` listing every problem as "path: message".
    """
    data = dict(data)
    device = data.get("device_id")
    if device not in (None, "", running.device_id):
        raise CommandError("bad_config", f"device_id: this config is for {quoted(device)}, this device is "
                                         f"{running.device_id!r}")
    if "base_dir" in data:
        raise CommandError("bad_config", "base_dir: unknown key")
    current = encode_config(running, redact=False)
    for key in ("device_id", "groups", "data_dir", "nats", "audit"):
        if data.get(key) in (None, ""):
            data[key] = current[key]
    if data["nats"] == encode_config(running, redact=True)["nats"]:
        data["nats"] = current["nats"]  # a config.get, edited and pushed back
    fleet = data.get("fleet", {})
    if isinstance(fleet, Mapping):
        data["fleet"] = {**{key: current["fleet"][key] for key in TRUST_ROOTS}, **fleet}
    try:
        config = decode_config(data, source="config.apply",
                               base_dir=Path(running.base_dir) if running.base_dir else None, env={})
    except ConfigError as exc:
        raise CommandError("bad_config", "; ".join(str(p) for p in exc.problems)) from None
    problems = list(check_pushed_models(config, running))  # model folders: the running ones or the store
    if problems:
        raise CommandError("bad_config", "; ".join(str(p) for p in problems))
    return config


def unpack_model_archive(data: bytes | memoryview, folder: Path, *, max_bytes: int = MAX_UNPACKED_BYTES,
                         max_members: int = MAX_ARCHIVE_MEMBERS, sha256: str = "", signature: str = "") -> None:
    """Unpack a model folder packed as .tar.gz into `folder` (which must not exist); blocking.

    Only regular files and folders, every path inside the archive (`./x` is `x`; the `.` entry of
    `tar -C dir .` is the folder itself), at most `max_members` entries and `max_bytes` unpacked,
    every header within MAX_HEADER_BYTES. With `sha256` (the object's, as verified), the deploy
    record is kept beside the files (`keep_deploy_record`): the folder appears complete or not at
    all. Nothing is left behind on error (CommandError `bad_archive` / `too_large` / `store_failed`).
    """
    staging = folder.parent / f".unpack-{folder.name}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        reader = _TarReader(data, max_bytes=max_bytes, max_members=max_members)
        for entry in reader:
            target = staging.joinpath(*entry.path)
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("xb") as out:
                for chunk in reader.content():
                    out.write(chunk)
        if not (staging / "manifest.toml").is_file():
            raise CommandError("bad_archive", "no manifest.toml at the top of the archive")
        if sha256:
            keep_deploy_record(staging, data, sha256, signature)
        try:
            os.replace(staging, folder)
        except OSError as exc:  # the same version deployed meanwhile by another command
            raise CommandError("store_failed", f"cannot move the model into the store: {exc.strerror}") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        where = str(exc.filename or "?").removeprefix(f"{staging}{os.sep}")
        raise CommandError("bad_archive", f"a path appears twice in the archive: {quoted(where)}") from None
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CommandError("store_failed", f"cannot write the model store: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def archive_digests(data: bytes | memoryview, *, max_bytes: int = MAX_UNPACKED_BYTES,
                    max_members: int = MAX_ARCHIVE_MEMBERS) -> dict[str, str]:
    """The sha256 of every regular file in a model archive, by its path (`a/b`); read with the same
    bounds as `unpack_model_archive`, nothing written. Raises CommandError like it."""
    digests: dict[str, str] = {}
    reader = _TarReader(data, max_bytes=max_bytes, max_members=max_members)
    for entry in reader:
        if entry.is_dir:
            continue
        h = hashlib.sha256()
        for chunk in reader.content():
            h.update(chunk)
        digests["/".join(entry.path)] = h.hexdigest()
    return digests


class _Entry(NamedTuple):
    path: tuple[str, ...]  # normalised: no "", ".", ".." or leading "/"
    is_dir: bool
    size: int


class _Inflater:
    """The inflated bytes of a (multi-member) gzip stream, produced in bounded steps and counted.

    zlib is asked for at most what the caller wants (`max_length`), so one compressed block that
    inflates a thousandfold never lands in memory whole; past `limit` inflated bytes it refuses.
    """

    def __init__(self, data: bytes | memoryview, limit: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._z = zlib.decompressobj(wbits=31)  # gzip only
        self._feed = b""
        self.total = 0
        self.limit = limit

    def read(self, n: int, *, end_ok: bool = False) -> bytes:
        """Exactly `n` bytes (n <= a few STEPs), or CommandError `bad_archive` if the stream ends first
        (with `end_ok`, b"" when it ends before the first of them)."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            out = self._inflate(n - got)
            if not out:
                if end_ok and not got:
                    return b""
                raise CommandError("bad_archive", "the archive ends in the middle of an entry (truncated)")
            parts.append(out)
            got += len(out)
        return b"".join(parts)

    def _inflate(self, want: int) -> bytes:
        while True:
            z = self._z
            if z.eof:
                leftover = z.unused_data
                if not leftover and self._pos >= len(self._data):
                    return b""
                self._z = zlib.decompressobj(wbits=31)  # the next gzip member
                self._feed = leftover
                continue
            if not self._feed:
                if self._pos >= len(self._data):
                    return b""  # the gzip stream stops mid-member
                self._feed = bytes(self._data[self._pos:self._pos + STEP])
                self._pos += STEP
            try:
                out = z.decompress(self._feed, want)
            except zlib.error as exc:
                raise CommandError("bad_archive", f"not a readable .tar.gz: {exc}") from None
            self._feed = z.unconsumed_tail
            if out:
                self.total += len(out)
                if self.total > self.limit:
                    raise CommandError("too_large", f"the archive inflates to more than {self.limit} bytes")
                return out


class _TarReader:
    """The entries of a tar stream inside a gzip stream, each checked before anything of it is read.

    Iterate for the entries; read a file's bytes with `content()` before asking for the next entry
    (what is not read is skipped, through the same counting reader).
    """

    def __init__(self, data: bytes | memoryview, *, max_bytes: int, max_members: int) -> None:
        if len(data) > MAX_ARCHIVE_BYTES:
            raise CommandError("too_large", f"the archive is {len(data)} bytes (at most {MAX_ARCHIVE_BYTES})")
        self.max_bytes = max_bytes
        self.max_members = max_members
        # Everything a well-formed archive within the bounds can hold: contents, and per entry a
        # header, its extended headers and padding; then the end blocks and GNU tar's record padding.
        limit = max_bytes + (max_members + 1) * (MAX_HEADER_BYTES + 4 * BLOCK) + 20 * BLOCK
        self._stream = _Inflater(data, limit)
        self._left = 0  # content bytes of the current entry not read yet
        self._pad = 0

    def __iter__(self) -> Iterator[_Entry]:
        total = 0
        for count in range(1, self.max_members + 2):
            self._skip_rest()
            entry = self._next_entry()
            if entry is None:
                return
            if count > self.max_members:
                raise CommandError("bad_archive", f"more than {self.max_members} entries in the archive")
            if not entry.is_dir:
                total += entry.size
                if total > self.max_bytes:
                    raise CommandError("too_large", f"the archive unpacks to more than {self.max_bytes} bytes")
                self._left, self._pad = entry.size, -entry.size % BLOCK
            if entry.path or not entry.is_dir:
                yield entry
            # else: the archive's own top folder (`.` or `./`), which is `folder` itself

    def content(self) -> Iterator[bytes]:
        """The current file's bytes, in chunks of at most STEP."""
        while self._left:
            chunk = self._stream.read(min(self._left, STEP))
            self._left -= len(chunk)
            yield chunk

    def _skip_rest(self) -> None:
        for _ in self.content():
            pass
        if self._pad:
            self._stream.read(self._pad)
            self._pad = 0

    def _next_entry(self) -> _Entry | None:
        """The next member's header, extended headers applied; None at the end of the archive."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        extended = 0
        while True:
            block = self._stream.read(BLOCK, end_ok=not extended)
            if block in (b"", bytes(BLOCK)):
                return None  # the end-of-archive marker, or the end of a stream without one; nothing after is read
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise CommandError("bad_archive", f"not a tar archive inside the gzip stream ({exc})") from None
            if info.size < 0:  # GNU base-256 can say so; it would lower every total below
                raise CommandError("bad_archive", "an entry with a negative size")
            if info.type not in _EXTENDED:
                break
            # Checked before the header's body is read: a 50 MB "file name" is refused at 512 bytes.
            extended += info.size
            if extended > MAX_HEADER_BYTES:
                raise CommandError("bad_archive", f"an entry's extended headers (GNU long name, PAX) exceed "
                                                  f"{MAX_HEADER_BYTES} bytes")
            body = self._stream.read(info.size + (-info.size % BLOCK))[:info.size]
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                pax.update(_pax_records(body))
            elif info.type == tarfile.XGLTYPE and {"path", "size"} & set(_pax_records(body)):
                raise CommandError("bad_archive", "a global PAX header sets a path or size")
            # GNUTYPE_LONGLINK: a link's target; links are refused below anyway.
        name = pax.get("path", long_name if long_name is not None else info.name)
        size = info.size
        if "size" in pax:
            text = pax["size"]
            if not (text.isascii() and text.isdigit() and len(text) <= 20):
                raise CommandError("bad_archive", f"a PAX size that is not a number: {quoted(text)}")
            size = int(text)
        path = _safe_path(name)
        if info.type == tarfile.DIRTYPE:
            return _Entry(path, True, 0)
        if info.type not in _FILE_TYPES:
            raise CommandError("bad_archive", f"{quoted(name)}: only regular files and folders are allowed "
                                              "(no links, devices or sparse files)")
        if not path:
            raise CommandError("bad_archive", f"unsafe path in the archive: {quoted(name)}")
        return _Entry(path, False, size)


def _safe_path(name: str) -> tuple[str, ...]:
    """A member's path as components inside the folder; CommandError `bad_archive` when it could leave
    it, is too long, or names one of the device's own records."""
    if len(name) > MAX_PATH_CHARS:
        raise CommandError("bad_archive", f"a path of {len(name)} characters in the archive (at most "
                                          f"{MAX_PATH_CHARS}): {quoted(name)}")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if (name.startswith("/") or "\0" in name or ".." in parts or any(len(part) > 255 for part in parts)
            or any(part.startswith(RESERVED_PREFIX) for part in parts)):
        raise CommandError("bad_archive", f"unsafe path in the archive: {quoted(name)}")
    return parts


def _pax_records(body: bytes) -> dict[str, str]:
    """`"%d %s=%s\\n"` records (POSIX pax extended header); CommandError `bad_archive` if malformed."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        space = body.find(b" ", pos, pos + 21)
        length_text = body[pos:space] if space > 0 else b""
        if not length_text.isdigit():
            raise CommandError("bad_archive", "a malformed PAX header")
        length = int(length_text)
        record = body[space + 1:pos + length]
        if pos + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            raise CommandError("bad_archive", "a malformed PAX header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


# ---------------------------------------------------------------------------------------------
# What a deployed folder keeps of its deploy, checked whenever the model is loaded


def keep_deploy_record(folder: Path, archive: bytes | memoryview, sha256: str, signature: str) -> None:
    """Beside the unpacked files: the object, the operator's signature over its sha256, then the sha256
    (written last: a folder with the marker is complete). Blocking."""
    write_atomically(folder / ARCHIVE_COPY, bytes(archive), mode=0o644)
    write_signature(folder, signature)
    write_atomically(folder / OBJECT_MARKER, sha256.encode(), mode=0o644)


def write_signature(folder: Path, signature: str) -> None:
    """The signature a (re)deploy of this folder's object came with."""
    write_atomically(folder / SIGNATURE_FILE, signature.encode(), mode=0o644)


def verify_deployed(folder: Path, trusted_keys: Sequence[str]) -> None:
    """Check a deployed model folder before it is loaded; blocking. CommandError `tampered` when the
    kept object, its sha256 and the files disagree; `unsigned` / `bad_signature` when, with trusted
    keys, the kept signature is missing or verifies with none of them."""
    where = quoted(str(folder))
    sha256 = read_object_marker(folder)
    copy = folder / ARCHIVE_COPY
    try:
        info = copy.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ARCHIVE_BYTES:
            raise CommandError("tampered", f"{where}: the deployed object kept beside the model is not a file "
                                           "of a deployable size")
        archive = copy.read_bytes()
    except OSError:
        raise CommandError("tampered", f"{where}: no record of a deploy (the object it came from is missing); "
                                       "deploy the model again") from None
    if not sha256 or sha256_hex(archive) != sha256:
        raise CommandError("tampered", f"{where}: the kept object does not match the sha256 it was deployed with")
    if trusted_keys:
        try:
            signature = (folder / SIGNATURE_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError):
            signature = ""
        try:
            verify_artifact(sha256, signature, trusted_keys)
        except CommandError as exc:
            raise CommandError(exc.code, f"{where}: the deploy signature kept beside the model: "
                                         f"{exc.message.removeprefix('model.deploy: ')}") from None
    expected = archive_digests(archive)
    actual = _folder_digests(folder)
    if actual != expected:
        changed = sorted(set(expected) ^ set(actual)) or sorted(p for p in expected if expected[p] != actual[p])
        raise CommandError("tampered", f"{where}: the files differ from the deployed archive "
                                       f"(first: {quoted(changed[0])}); deploy the model again")


def _folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` but the deploy record; a link or a special file is
    itself a difference (CommandError `tampered`)."""
    digests: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for name in [*dirs, *files]:
            path = here / name
            mode = path.lstat().st_mode
            relative = path.relative_to(folder).as_posix()
            if here == folder and name in (OBJECT_MARKER, SIGNATURE_FILE, ARCHIVE_COPY):
                continue
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise CommandError("tampered", f"{quoted(str(folder))}: {quoted(relative)} is not a regular file")
            h = hashlib.sha256()
            with path.open("rb") as source:
                while chunk := source.read(1 << 20):
                    h.update(chunk)
            digests[relative] = h.hexdigest()
    return digests


def pack_model_folder(folder: Path) -> bytes:
    """A model folder as a deterministic .tar.gz (sorted, no times or owners): same folder, same sha256."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != OBJECT_MARKER):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            content = path.read_bytes()
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def read_object_marker(folder: Path) -> str:
    try:
        return (folder / OBJECT_MARKER).read_text().strip()
    except OSError:
        return ""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()



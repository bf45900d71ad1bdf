"""Files the runtime keeps in `data_dir`: written whole or not at all."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a crash leaves the old content or the new, never a torn file.

    The temporary file is fsynced before the rename and the folder after it, so the new content
    survives a power loss once this returns. The file is `mode` (0600 by default: files in
    data_dir may hold secrets). Blocking: call it in a worker thread from the loop.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A name of its own per write: two writers of one file never share (or delete) a temporary.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            # A temporary file left by a crash keeps its old mode through O_CREAT: set it each time.
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

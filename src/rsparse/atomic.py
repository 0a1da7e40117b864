"""Files written whole or not at all: each is written under a temporary name in its own directory
(so the rename cannot cross filesystems) and renamed over the target, which readers therefore see
either as it was or complete. A failed write removes its temporary file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path, writer) -> Path:
    """`writer(tmp)` writes the content to the path it is given; then it becomes `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path, obj, indent: int | None = 1) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent)))

"""Writing results without ever leaving a half-written file: everything goes to a temporary file in
the destination folder first and is renamed into place (an atomic replace on POSIX filesystems)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from eqlin.errors import InputError


def ensure_writable_dir(folder: Path) -> Path:
    """Create `folder` if needed and prove it is writable, before any heavy work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".eqlin-probe-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write to output folder {folder}: {e.strerror or e}; choose another --out") from None
    return folder


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling file and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Pretty JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())

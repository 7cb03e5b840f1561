"""An append-only JSON-lines file that a crash never leaves with a torn record.

Each record is one line of compact, strict JSON (no NaN or Infinity) written by a single `write` on an
`O_APPEND` descriptor and fsynced before `append` returns, so a finished append survives a crash and
records are never interleaved. A crash during a write can only leave a partial *last* line; `open_log`
cuts it off (saying so) before anything is appended. One writer at a time: `open_log` takes an
exclusive `flock` on the file, and a second writer is refused.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from eqlin.errors import InputError, OutputError
from eqlin.outputs import fsync_dir, json_text


@dataclasses.dataclass
class JsonLog:
    """An open, locked log: `records` holds its records (1-based line numbers in `lines`), those it held
    when opened and those appended since; `repaired` says what was cut off when it was opened (None:
    nothing). Use as a context manager, or `close()`."""

    path: Path
    fd: int
    records: list[dict[str, Any]]
    lines: list[int]
    line_count: int
    repaired: str | None

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line, whole or not at all (a disk-full write is undone), and fsync."""
        try:
            data = (json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode()
        except ValueError:
            json_text(record)  # raises NonFiniteError naming where the NaN or infinity is
            raise
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes were written")
            os.fsync(self.fd)
        except OSError as e:
            os.ftruncate(self.fd, size)
            raise OutputError(f"cannot append to {self.path}: {e.strerror or e}; the records before this one are "
                              "kept, and a rerun resumes after them; free space on that disk") from None
        self.line_count += 1
        self.records.append(record)
        self.lines.append(self.line_count)

    def close(self) -> None:
        os.close(self.fd)  # releases the lock

    def __enter__(self) -> JsonLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_log(path: Path) -> JsonLog:
    """Open (creating) the log at `path` for appending, locked for this process; cut off a partial last
    line left by an interrupted write. A damaged line before the last is an InputError naming it."""
    path = Path(path)
    created = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot open {path}: {e.strerror or e}; choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"{path} is being written by another eqlin run; wait for it to finish or choose another "
                          "--out") from None
    try:
        if created:
            fsync_dir(path.parent)
        with open(path, "rb") as f:
            data = f.read()
        records, lines, keep, repaired = _parse(data, path)
        if keep < len(data):
            os.ftruncate(fd, keep)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return JsonLog(path, fd, records, lines, data[:keep].count(b"\n"), repaired)


def _parse(data: bytes, path: Path) -> tuple[list[dict[str, Any]], list[int], int, str | None]:
    """(records, their 1-based line numbers, bytes to keep, what was cut off or None) of a log's bytes.
    Bytes after the last newline are a partial line; a last complete line that does not parse is damaged
    (an interrupted write, e.g. zeros after a power loss): both are cut off. Blank lines are skipped."""
    end = data.rfind(b"\n") + 1
    body = data[:end].split(b"\n")[:-1]
    records, lines, offset = [], [], 0
    for number, chunk in enumerate(body, start=1):
        if chunk.strip():
            try:
                record = json.loads(chunk)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except (ValueError, RecursionError) as e:
                if number == len(body) and end == len(data):
                    return records, lines, offset, (f"{path} ended in a damaged line ({len(chunk)} bytes at line "
                                                    f"{number}: a run was interrupted while writing it); removed it")
                raise InputError(f"{path} line {number} is not a JSON record ({str(e)[:80]}): the file was edited or "
                                 "damaged; delete that line (its prompt is analysed again) or choose another --out"
                                 ) from None
            records.append(record)
            lines.append(number)
        offset += len(chunk) + 1
    if end < len(data):
        return records, lines, end, (f"{path} ended in a partial line ({len(data) - end} bytes at line {len(body) + 1}:"
                                     " a run was interrupted while writing it); removed it")
    return records, lines, end, None

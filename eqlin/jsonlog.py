"""An append-only JSON-lines file that a crash never leaves with a torn record.

Each record is one line of compact, strict JSON (no NaN or Infinity) written by a single `write` on an
`O_APPEND` descriptor and fsynced before `append` returns, so a finished append survives a crash and
records are never interleaved. A crash during a write can only leave a partial *last* line; `open_log`
cuts it off (saying so) before anything is appended. One writer at a time: `open_log` takes an
exclusive `flock` on the file, and a second writer is refused. The file is checked and read back one line
at a time (`JsonLog.records`), so memory does not grow with the number of records.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from eqlin.errors import InputError, OutputError
from eqlin.outputs import fsync_dir, json_text


@dataclasses.dataclass
class JsonLog:
    """An open, locked log: `line_count` lines (blank ones included), `repaired` says what was cut off when
    it was opened (None: nothing). Records are read back by `records()`. Use as a context manager, or
    `close()`."""

    path: Path
    fd: int
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

    def records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based line, record) of every record, those appended since it was opened included, read from
        the file one line at a time (`open_log` checked every line)."""
        with open(self.path, "rb") as f:
            for number, chunk in enumerate(f, start=1):
                if chunk.strip():
                    yield number, json.loads(chunk)

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
            lines, keep, repaired = _check(f, path)
        if repaired:
            os.ftruncate(fd, keep)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return JsonLog(path, fd, lines, repaired)


def _check(f: BinaryIO, path: Path) -> tuple[int, int, str | None]:
    """(complete lines to keep, their bytes, what was cut off or None) of a log, read one line at a time.
    Bytes after the last newline are a partial line; a last complete line that does not parse is damaged
    (an interrupted write, e.g. zeros after a power loss): both are cut off. Blank lines are kept."""
    lines = offset = 0
    for chunk in f:
        if not chunk.endswith(b"\n"):
            return lines, offset, (f"{path} ended in a partial line ({len(chunk)} bytes at line {lines + 1}: a run was "
                                   "interrupted while writing it); removed it")
        if chunk.strip():
            try:
                record = json.loads(chunk)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except (ValueError, RecursionError) as e:
                if not f.read(1):  # the last line
                    return lines, offset, (f"{path} ended in a damaged line ({len(chunk) - 1} bytes at line "
                                           f"{lines + 1}: a run was interrupted while writing it); removed it")
                raise InputError(f"{path} line {lines + 1} is not a JSON record ({str(e)[:80]}): the file was edited "
                                 "or damaged; delete that line (its prompt is analysed again) or choose another --out"
                                 ) from None
        lines += 1
        offset += len(chunk)
    return lines, offset, None

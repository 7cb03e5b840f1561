"""Writing results so that a reader only ever sees complete files and complete sets of files.

- `write_folder_atomic`: a whole set of files (a report: JSON, HTML, figures) is written into a fresh
  temporary folder beside the target, fsynced, and swapped into place in one step (Linux's atomic
  exchange; elsewhere two renames), so the folder holds either the previous complete set or the new
  one, never a mix, and no file of an earlier run that this one does not write lingers.
- `write_bytes_atomic` / `write_json_atomic`: one file, via a temporary sibling and a rename.
- Temporary entries are named `.{name}.eqlin-tmp-{pid}-{host}-{random}` (a set moved aside during a
  swap: `eqlin-old`); `clean_temps` removes those of processes on this host that no longer run, and on
  an interrupt this process's own.
- `json_text` refuses NaN and ±Infinity, which strict JSON parsers reject, naming where they are.
- An output folder is eqlin's only if eqlin marked it so itself: `MARKER` ({schema, kind, run, written,
  files}) is written with every set (`write_folder_atomic`) and when a prompt set's folder is created
  (`claim_folder`). File names prove nothing (a user's report.json, a checkpoint folder), so a folder that
  is neither empty nor marked for the same kind of output, or that holds files its marker does not
  list, is refused and never replaced or written into (`check_output_dir`, before any heavy work).
- Swaps and a signal's clean-up never overlap: `stop_swaps` (for a process about to end on a signal)
  waits for a swap in progress and refuses later ones, so removing this process's temporary folder
  cannot go on inside a folder that was just swapped into place. This is the module's one piece of
  process-wide state (a lock and a flag), on purpose: a signal ends the whole process, so which swaps
  may still run is the process's business, not one call's.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import re
import secrets
import shutil
import socket
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from eqlin.errors import NonFiniteError, OutputError

MARKER, MARKER_SCHEMA = ".eqlin-output.json", "eqlin.output/1"
_LEGACY = frozenset({  # every name eqlin 0.1.0 wrote into an output folder, before it marked them
    "report.json", "report.html", "reconstruction.png", "jacobian.png", "spectra.png", "emergence.png",
    "dimensionality.png", "jacobian.safetensors", "steering.json", "steering.png", "reports.jsonl", "set.json",
    "study.json", "study.html", "errors.png", "stable_rank.png"})
_TEMP = re.compile(r"\.eqlin-(tmp|old)-(\d+)-([A-Za-z0-9-]*)-[0-9a-f]{8}$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SWAP = threading.Lock()  # held while a temporary entry is renamed into place (process-wide: see `stop_swaps`)
_STOPPED = threading.Event()


class SwapRefused(BaseException):
    """A swap asked for after `stop_swaps`: the process is ending on a signal, and nothing is replaced. A
    BaseException, so that no handler of ordinary errors reports it as a failure of its own."""


def stop_swaps() -> None:
    """For a process about to end on a signal, before it removes its temporary entries: wait for a swap in
    progress to finish and refuse every later one in this process (`SwapRefused`). Without this, the
    removal of a temporary folder could start before its swap and go on, through its open descriptor,
    inside the folder just swapped into place, leaving neither the old set nor the new one."""
    with _SWAP:
        _STOPPED.set()


@contextlib.contextmanager
def _swapping(target: Path) -> Iterator[None]:
    with _SWAP:
        if _STOPPED.is_set():
            raise SwapRefused(f"{target} was not replaced: this process is stopping")
        yield


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling path of `target` tagged with this process (kind "tmp" or "old")."""
    target = Path(target)
    return target.with_name(f".{target.name}.eqlin-{kind}-{os.getpid()}-{_host()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file or folder tree if it exists; errors are ignored (best effort clean-up)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def clean_temps(folder: Path, *, own: bool = False) -> None:
    """Remove eqlin's temporary entries in `folder` left by processes on this host that no longer run
    (with `own`, this process's too). A set moved aside by an unfinished swap is moved back if its
    target is missing. Unreadable folders are skipped."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.search(entry.name)
        if not match or match[3] != _host():
            continue
        pid = int(match[2])
        if (pid == os.getpid() and not own) or (pid != os.getpid() and _alive(pid)):
            continue
        target = entry.with_name(entry.name[1:match.start()])
        if match[1] == "old" and not target.exists():
            try:
                os.rename(entry, target)
                continue
            except OSError:
                pass
        remove(entry)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc/self/status),
    else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file that a library created with a fixed private mode the mode an ordinary new file gets
    (0666 less the umask)."""
    os.chmod(path, 0o666 & ~current_umask())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some filesystems do not sync folders
            raise
    finally:
        os.close(fd)


def write_file_durable(path: Path, data: bytes) -> None:
    """Create `path` (which must not exist) holding `data`, fsynced."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder `tmp` in the place of `folder` in one step; `tmp` is left holding the
    previous content (or is gone) and is the caller's to delete. `SwapRefused` after `stop_swaps`."""
    with _swapping(folder):
        try:
            os.rename(tmp, folder)  # absent or an empty folder: atomic
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not _exchange(tmp, folder):
            old = temp_path(folder, "old")
            os.rename(folder, old)  # a reader may find no folder for an instant, never a mixed one
            os.rename(tmp, folder)
            remove(old)


def write_folder_atomic(folder: Path, files: dict[str, bytes], *, kind: str) -> list[Path]:
    """Write `files` ({name: bytes}) and `MARKER` (this `kind` of output, listing `files`) as the whole
    content of `folder`, replacing what it held, in one swap (module docstring). `folder` must be absent,
    empty or an earlier output of this kind (`check_output_dir`). Returns the written paths; OutputError
    if the disk is full or unwritable."""
    folder = check_output_dir(folder, kind)
    tmp = temp_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_temps(folder.parent)
        tmp.mkdir()
        for name, data in {**files, MARKER: marker_bytes(kind, files)}.items():
            write_file_durable(tmp / name, data)
        fsync_dir(tmp)
        replace_folder(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as e:
        raise OutputError(f"cannot write {folder}: {e.strerror or e}; nothing was changed there; free space on "
                          "that disk or choose another output folder (--out)") from None
    finally:
        remove(tmp)
    return [folder / name for name in files]


def marker_bytes(kind: str, files: Iterable[str]) -> bytes:
    """`MARKER`'s content: this run's identity (a random id and the time) and the files it may write."""
    return json_text({"schema": MARKER_SCHEMA, "kind": kind, "run": secrets.token_hex(8),
                      "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "files": sorted(files)}).encode()


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker eqlin left in `folder`, or None (absent, unreadable, or not eqlin's format)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(marker, dict) and marker.get("schema") == MARKER_SCHEMA and isinstance(marker.get("kind"), str)
          and isinstance(marker.get("files"), list) and all(isinstance(f, str) for f in marker["files"]))
    return marker if ok else None


def _entries(folder: Path) -> list[str]:
    """The names in `folder` but eqlin's temporary entries."""
    try:
        return sorted(p.name for p in folder.iterdir() if not _TEMP.search(p.name))
    except OSError as e:
        raise OutputError(f"cannot write to output folder {folder}: {e.strerror}; choose another --out") from None


def check_output_dir(folder: Path, kind: str) -> Path:
    """Check an output folder before any heavy work, creating nothing: it must be absent, empty, or marked
    by eqlin as an earlier output of this `kind` holding only the files its marker lists (module
    docstring), in a place this process can write to. OutputError naming the fix otherwise."""
    folder = Path(folder)
    if folder.name in ("", ".", ".."):
        raise OutputError(f"--out {str(folder)!r} names no folder of its own (it is the current or a parent folder, "
                          "which eqlin cannot replace); give a new folder's name, e.g. --out eqlin-report")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = "a symbolic link" if folder.is_symlink() else "not a folder"
        raise OutputError(f"cannot write to output folder {folder}: it is {what}; choose another --out")
    names = _entries(folder) if folder.is_dir() else []
    if names:
        marker = read_marker(folder)
        if marker is None:
            hint = (" If it is the output of an earlier eqlin version (which did not mark its folders: every name "
                    "in it is one that version wrote), move it away or delete it yourself first."
                    if set(names) <= _LEGACY else "")
            raise OutputError(f"output folder {folder} is not empty and eqlin did not create it (it holds no {MARKER}: "
                              f"{', '.join(names[:5])}); eqlin writes only into a new or empty folder, or one it "
                              f"marked itself, so nothing of yours is replaced: choose an empty or new --out.{hint}")
        if marker["kind"] != kind:
            raise OutputError(f"output folder {folder} holds eqlin's {marker['kind']}, not a {kind}; choose an empty or "
                              "new --out")
        foreign = [n for n in names if n not in {*marker["files"], MARKER}]
        if foreign:
            raise OutputError(f"output folder {folder} holds files eqlin did not write ({', '.join(foreign[:5])}); each "
                              "run replaces or adds to its output folder, so choose an empty or new --out (or move "
                              "those files away)")
    check_parent_writable(folder, "choose another --out")
    return folder


def claim_folder(folder: Path, kind: str, files: Iterable[str]) -> Path:
    """Create `folder` (or take an empty one) as an output of this `kind` that may hold `files`, marking
    it (`MARKER`), or check that it is one already (`check_output_dir`). For outputs written file by file
    (a prompt set); a whole set is marked by `write_folder_atomic`."""
    folder = check_output_dir(folder, kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if read_marker(folder) is None:
            write_bytes_atomic(folder / MARKER, marker_bytes(kind, files))
            fsync_dir(folder)
    except OSError as e:
        raise OutputError(f"cannot write to output folder {folder}: {e.strerror or e}; choose another --out") from None
    return folder


def check_parent_writable(folder: Path, fix: str) -> None:
    """Prove that `folder` can be created or replaced (its nearest existing ancestor takes a new entry),
    leaving nothing behind; OutputError naming `fix` otherwise."""
    existing = next(p for p in (folder.parent, *folder.parent.parents) if p.exists() or p == Path(p.anchor))
    probe = temp_path(existing / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        reason = "a file is in the way" if e.errno == errno.ENOTDIR or not existing.is_dir() else e.strerror
        raise OutputError(f"cannot write to output folder {folder}: {reason}; {fix}") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling file and an atomic rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write_file_durable(tmp, data)
        with _swapping(path):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_text(data: Any) -> str:
    """Pretty JSON. NaN and ±Infinity (invalid in strict JSON) are refused with a NonFiniteError naming
    the first place they occur."""
    try:
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        where = _non_finite(data, "")
        if where is None:
            raise
        raise NonFiniteError(
            f"the result holds {where[1]} at {where[0] or 'the top level'}, which JSON cannot carry; nothing was "
            "written. In float32 this is usually an overflow: run again with --dtype float64; if float64 gives it "
            "too, please report it") from None


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """(path, value) of the first NaN or infinite float in a JSON-like tree, or None."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))
        if found:
            return found
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Pretty, strict JSON (`json_text`), atomically."""
    write_bytes_atomic(path, json_text(data).encode())

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
- `check_output_dir` checks an output folder before any heavy work, creating nothing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from eqlin.errors import NonFiniteError, OutputError

OUTPUT_SUFFIXES = (".json", ".html", ".png", ".safetensors")  # what eqlin's commands write into an output folder
_TEMP = re.compile(r"\.eqlin-(tmp|old)-(\d+)-([A-Za-z0-9-]*)-[0-9a-f]{8}$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


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
    previous content (or is gone) and is the caller's to delete."""
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


def write_folder_atomic(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write `files` ({name: bytes}) as the whole content of `folder`, replacing what it held, in one
    swap (module docstring). Returns the written paths; OutputError if the disk is full or unwritable."""
    folder = Path(folder)
    tmp = temp_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_temps(folder.parent)
        tmp.mkdir()
        for name, data in files.items():
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


def check_output_dir(folder: Path, marker: str) -> Path:
    """Check the output folder of a command before any heavy work, creating nothing: it must be absent,
    empty, or an earlier output of the same command (holding `marker` and only report files, since the
    new set replaces it whole), in a place this process can write to."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = "a symbolic link" if folder.is_symlink() else "not a folder"
        raise OutputError(f"cannot write to output folder {folder}: it is {what}; choose another --out")
    if folder.is_dir():
        try:
            names = sorted(p.name for p in folder.iterdir())
        except OSError as e:
            raise OutputError(f"cannot write to output folder {folder}: {e.strerror}; choose another --out") from None
        foreign = [n for n in names if not (n.endswith(OUTPUT_SUFFIXES) and (folder / n).is_file())]
        if names and (marker not in names or foreign):
            raise OutputError(f"output folder {folder} holds files eqlin did not write ({', '.join((foreign or names)[:5])});"
                              " each run replaces its output folder as a whole, so choose an empty or new --out")
    check_parent_writable(folder, "choose another --out")
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

"""What a path is, checked before it is opened: opening a FIFO, or reading a device, can block forever, so
every file eqlin reads as input (a .gguf file, a shard, a saved result) must be a regular file first."""

from __future__ import annotations

import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file"))


def file_kind(path: Path) -> str:
    """What `path` is, in words ("a FIFO (named pipe)", "a folder", "missing", …), following symlinks."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")

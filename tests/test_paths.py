"""What a path is, said before anything opens it (a FIFO would block the open)."""

from __future__ import annotations

import os
import socket

from eqlin.paths import file_kind


def test_every_kind_of_path_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("fifo")  # symlinks are followed
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        kinds = {name: file_kind(tmp_path / name) for name in ("file", "fifo", "link", "sock", "gone")}
    assert kinds == {"file": "a file", "fifo": "a FIFO (named pipe)", "link": "a FIFO (named pipe)",
                     "sock": "a socket", "gone": "missing"}
    assert file_kind(tmp_path) == "a folder" and file_kind("/dev/null") == "a character device"

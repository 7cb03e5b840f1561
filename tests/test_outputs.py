"""Results are written atomically: an interrupted write leaves the previous file whole and no debris."""

from __future__ import annotations

import os

import pytest

from eqlin.errors import InputError
from eqlin.outputs import ensure_writable_dir, write_bytes_atomic, write_json_atomic


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"version": 1})

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b'{"version": 2, "half": ')
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_unwritable_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot write to output folder .*choose another --out"):
        ensure_writable_dir(tmp_path / "file" / "out")

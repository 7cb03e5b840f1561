"""Results are written atomically: an interrupted or failed write leaves the previous file (or the previous
set of files) whole and no debris; temporary entries of dead processes are cleaned; JSON stays strict."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from eqlin import outputs
from eqlin.errors import InputError, NonFiniteError, OutputError
from eqlin.outputs import (check_output_dir, clean_temps, json_text, write_bytes_atomic, write_folder_atomic,
                           write_json_atomic)


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
        check_output_dir(tmp_path / "file" / "out", "report.json")
    assert (tmp_path / "file").read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("exchange", [True, False])
def test_a_set_replaces_the_previous_one_whole(tmp_path, monkeypatch, exchange):
    """With Linux's atomic exchange, and with the two-rename swap used where it is unavailable."""
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "report"
    write_folder_atomic(out, {"report.json": b"1", "layers.png": b"old"})
    inode = out.stat().st_ino
    assert write_folder_atomic(out, {"report.json": b"2"}) == [out / "report.json"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no stale layers.png
    assert (out / "report.json").read_bytes() == b"2" and out.stat().st_ino != inode  # a new folder, swapped in
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no debris


@pytest.mark.parametrize("failure, error, message", [
    (KeyboardInterrupt, KeyboardInterrupt, None),
    (OSError(errno.ENOSPC, "No space left on device"), OutputError,
     "cannot write .*: No space left on device; nothing was changed there; free space on that disk or choose another"),
])
def test_an_interrupted_or_disk_full_rewrite_leaves_the_old_set(tmp_path, monkeypatch, failure, error, message):
    out = tmp_path / "report"
    write_folder_atomic(out, {"report.json": b"old", "a.png": b"old"})
    real, written = outputs.write_file_durable, []

    def second_fails(path, data):
        if written:
            raise failure
        written.append(path)
        real(path, data)

    monkeypatch.setattr(outputs, "write_file_durable", second_fails)
    with pytest.raises(error, match=message):
        write_folder_atomic(out, {"report.json": b"new", "a.png": b"new", "b.png": b"new"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"report.json": b"old", "a.png": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_temporary_entries_of_dead_processes_are_cleaned(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = outputs.temp_path(tmp_path / "report").with_name(
        outputs.temp_path(tmp_path / "report").name.replace(f"-{alive}-", f"-{dead}-"))
    stale.mkdir()
    (stale / "half.png").write_bytes(b"x")
    mine = outputs.temp_path(tmp_path / "report")
    mine.mkdir()
    moved_aside = outputs.temp_path(tmp_path / "kept", "old").with_name(
        outputs.temp_path(tmp_path / "kept", "old").name.replace(f"-{alive}-", f"-{dead}-"))
    moved_aside.mkdir()  # a swap that died between its two renames: the old set comes back
    (tmp_path / ".notes.tmp").write_text("not eqlin's")
    clean_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".notes.tmp", mine.name, "kept"])
    clean_temps(tmp_path, own=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "kept"]


def test_json_never_holds_nan_or_infinity():
    assert json.loads(json_text({"a": [1.5, 2]})) == {"a": [1.5, 2]}
    with pytest.raises(NonFiniteError, match=r"holds nan at per_token\[1\].singular_values\[0\].*--dtype float64"):
        json_text({"per_token": [{"singular_values": [1.0]}, {"singular_values": [float("nan")]}]})
    with pytest.raises(NonFiniteError, match="holds -inf at logit"):
        json_text({"logit": float("-inf")})


def test_an_output_folder_with_other_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"output folder .*mine holds files eqlin did not write \(notes.txt\); each run "
                                         "replaces its output folder as a whole"):
        check_output_dir(out, "report.json")
    (out / "notes.txt").unlink()
    (out / "steering.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds files eqlin did not write \(steering.json\)"):
        check_output_dir(out, "report.json")
    (out / "report.json").write_text("{}")
    assert check_output_dir(out, "report.json") == out  # an earlier report: replaced by the next one


def test_what_eqlin_writes_follows_the_umask(tmp_path):
    """Under umask 022 every file and folder eqlin writes is readable by others (safetensors files were
    once created 0600 by mkstemp)."""
    import numpy as np

    from eqlin.safetensors_io import write_safetensors

    old = os.umask(0o022)
    try:
        write_folder_atomic(tmp_path / "report", {"report.json": b"{}", "figure.png": b"png"})
        write_bytes_atomic(tmp_path / "one.json", b"{}")
        write_safetensors(tmp_path / "w.safetensors", {"a": np.zeros(2, np.float32)})
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.rglob("*"))}
    assert modes == {"report": "0o755", "report/figure.png": "0o644", "report/report.json": "0o644",
                     "one.json": "0o644", "w.safetensors": "0o644"}

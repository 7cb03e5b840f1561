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
from eqlin.outputs import (MARKER, check_output_dir, claim_folder, clean_temps, json_text, read_marker,
                           write_bytes_atomic, write_folder_atomic, write_json_atomic)


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
        check_output_dir(tmp_path / "file" / "out", "report")
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
    write_folder_atomic(out, {"report.json": b"1", "layers.png": b"old"}, kind="report")
    inode = out.stat().st_ino
    assert write_folder_atomic(out, {"report.json": b"2"}, kind="report") == [out / "report.json"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.json"]  # no stale layers.png
    assert (out / "report.json").read_bytes() == b"2" and out.stat().st_ino != inode  # a new folder, swapped in
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no debris


@pytest.mark.parametrize("failure, error, message", [
    (KeyboardInterrupt, KeyboardInterrupt, None),
    (OSError(errno.ENOSPC, "No space left on device"), OutputError,
     "cannot write .*: No space left on device; nothing was changed there; free space on that disk or choose another"),
])
def test_an_interrupted_or_disk_full_rewrite_leaves_the_old_set(tmp_path, monkeypatch, failure, error, message):
    out = tmp_path / "report"
    write_folder_atomic(out, {"report.json": b"old", "a.png": b"old"}, kind="report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, written = outputs.write_file_durable, []

    def second_fails(path, data):
        if written:
            raise failure
        written.append(path)
        real(path, data)

    monkeypatch.setattr(outputs, "write_file_durable", second_fails)
    with pytest.raises(error, match=message):
        write_folder_atomic(out, {"report.json": b"new", "a.png": b"new", "b.png": b"new"}, kind="report")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and before["report.json"] == b"old"
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


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_output_folder_eqlin_did_not_mark_is_never_replaced(tmp_path):
    """Issue 29, item 1: a folder holding a report.json eqlin did not write (a user's results, a checkpoint
    folder) and only .json/.png/.safetensors files was taken for an earlier report and replaced whole."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.json").write_text('{"accuracy": 0.93}')
    (out / "finetuned.safetensors").write_bytes(b"weights")
    (out / "loss_curve.png").write_bytes(b"\x89PNG")
    before = _snapshot(out)
    for call in (lambda: check_output_dir(out, "report"),
                 lambda: write_folder_atomic(out, {"report.json": b"{}"}, kind="report"),
                 lambda: claim_folder(out, "prompt set", ["reports.jsonl"])):
        with pytest.raises(OutputError, match=rf"^output folder .*results is not empty and eqlin did not create it \(it "
                                              rf"holds no {MARKER}: finetuned.safetensors, loss_curve.png, report.json\);"
                                              r" eqlin writes only into a new or empty folder, or one it marked itself, "
                                              r"so nothing of yours is replaced: choose an empty or new --out.$"):
            call()
        assert _snapshot(out) == before


def test_an_earlier_versions_output_is_left_with_a_hint(tmp_path):
    """eqlin 0.1.0 wrote no marker: its folders are refused like any other, with what to do."""
    out = tmp_path / "old"
    out.mkdir()
    for name in ("report.json", "report.html", "spectra.png", "jacobian.safetensors"):
        (out / name).write_bytes(b"0.1.0")
    before = _snapshot(out)
    with pytest.raises(OutputError, match=r"eqlin did not create it .*choose an empty or new --out. If it is the output "
                                          r"of an earlier eqlin version \(which did not mark its folders: every name in "
                                          r"it is one that version wrote\), move it away or delete it yourself first.$"):
        write_folder_atomic(out, {"report.json": b"{}"}, kind="report")
    assert _snapshot(out) == before


def test_a_marked_folder_is_replaced_only_by_its_own_kind_and_only_with_its_files(tmp_path):
    out = tmp_path / "mine"
    write_folder_atomic(out, {"report.json": b"1", "a.png": b"1"}, kind="report")
    marker = read_marker(out)
    assert marker["kind"] == "report" and marker["files"] == ["a.png", "report.json"] and len(marker["run"]) == 16
    assert check_output_dir(out, "report") == out  # an earlier report: replaced by the next one
    with pytest.raises(OutputError, match=r"output folder .*mine holds eqlin's report, not a steering sweep; choose an "
                                          "empty or new --out"):
        check_output_dir(out, "steering sweep")
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    with pytest.raises(OutputError, match=r"output folder .*mine holds files eqlin did not write \(notes.txt\); each "
                                          "run replaces or adds to its output folder"):
        write_folder_atomic(out, {"report.json": b"2"}, kind="report")
    assert _snapshot(out) == before
    (out / MARKER).write_text("{}")  # not eqlin's format: not a mark
    with pytest.raises(OutputError, match="eqlin did not create it"):
        check_output_dir(out, "report")


def test_claim_folder_marks_a_new_or_empty_folder_once(tmp_path):
    new, empty = tmp_path / "a" / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        assert claim_folder(folder, "prompt set", ["reports.jsonl"]) == folder
        marker = (folder / MARKER).read_bytes()
        assert read_marker(folder)["files"] == ["reports.jsonl"] and [p.name for p in folder.iterdir()] == [MARKER]
        (folder / "reports.jsonl").write_text("")
        claim_folder(folder, "prompt set", ["reports.jsonl"])
        assert (folder / MARKER).read_bytes() == marker  # the first run's identity is kept


@pytest.mark.parametrize("name", [".", "", "..", "sub/.."])
def test_the_current_or_a_parent_folder_is_refused(tmp_path, monkeypatch, name):
    """Issue 29, item 7: --out . or --out "" passed the checks, ran everything, then ended in a ValueError."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"names no folder of its own .*give a new folder's name, e.g. --out "
                                          "eqlin-report"):
        check_output_dir(outputs.Path(name), "report")
    assert list(tmp_path.iterdir()) == []


def test_a_swap_after_stop_swaps_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_STOPPED", outputs.threading.Event())  # this test's own; the process goes on
    out = tmp_path / "report"
    write_folder_atomic(out, {"report.json": b"old"}, kind="report")
    before = _snapshot(out)
    outputs.stop_swaps()
    with pytest.raises(outputs.SwapRefused, match="was not replaced: this process is stopping"):
        write_folder_atomic(out, {"report.json": b"new"}, kind="report")
    with pytest.raises(outputs.SwapRefused):
        write_bytes_atomic(tmp_path / "set.json", b"{}")
    assert _snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_what_eqlin_writes_follows_the_umask(tmp_path):
    """Under umask 022 every file and folder eqlin writes is readable by others (safetensors files were
    once created 0600 by mkstemp)."""
    import numpy as np

    from eqlin.safetensors_io import write_safetensors

    old = os.umask(0o022)
    try:
        write_folder_atomic(tmp_path / "report", {"report.json": b"{}", "figure.png": b"png"}, kind="report")
        write_bytes_atomic(tmp_path / "one.json", b"{}")
        write_safetensors(tmp_path / "w.safetensors", {"a": np.zeros(2, np.float32)})
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in sorted(tmp_path.rglob("*"))}
    assert modes == {"report": "0o755", f"report/{MARKER}": "0o644", "report/figure.png": "0o644", "report/report.json": "0o644",
                     "one.json": "0o644", "w.safetensors": "0o644"}

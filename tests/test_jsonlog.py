"""The append-only JSON-lines log: whole lines or nothing, a torn last line cut off, one writer at a time."""

from __future__ import annotations

import errno
import os

import pytest

from eqlin import jsonlog
from eqlin.errors import InputError, NonFiniteError, OutputError
from eqlin.jsonlog import open_log


def test_records_survive_reopening(tmp_path):
    path = tmp_path / "log.jsonl"
    with open_log(path) as log:
        assert list(log.records()) == [] and log.repaired is None
        log.append({"text": "a", "value": 1.5})
        log.append({"text": "b ü", "value": [1, 2]})
    assert path.read_text(encoding="utf-8").count("\n") == 2
    with open_log(path) as log:
        assert list(log.records()) == [(1, {"text": "a", "value": 1.5}), (2, {"text": "b ü", "value": [1, 2]})]
        log.append({"text": "c"})
        assert [line for line, _ in log.records()] == [1, 2, 3] and log.line_count == 3


@pytest.mark.parametrize("tail, what", [(b'{"text": "c", "val', "partial line (18 bytes at line 3"),
                                        (b"\x00" * 12 + b"\n", "damaged line (12 bytes at line 3")])
def test_a_torn_last_line_is_cut_off_and_said(tmp_path, tail, what):
    path = tmp_path / "log.jsonl"
    whole = b'{"text": "a"}\n{"text": "b"}\n'
    path.write_bytes(whole + tail)
    with open_log(path) as log:
        assert [r["text"] for _, r in log.records()] == ["a", "b"]
        assert what in log.repaired and "a run was interrupted while writing it" in log.repaired
        log.append({"text": "c"})
    assert path.read_bytes() == whole + b'{"text":"c"}\n'


def test_a_damaged_line_before_the_last_is_refused_by_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"text": "a"}\nnot json\n{"text": "b"}\n')
    with pytest.raises(InputError, match="log.jsonl line 2 is not a JSON record .*delete that line"):
        open_log(path)
    path.write_bytes(b'{"text": "a"}\n[1, 2]\n{"text": "b"}\n')
    with pytest.raises(InputError, match="line 2 is not a JSON record \\(a JSON list, not an object\\)"):
        open_log(path)


def test_one_writer_at_a_time(tmp_path):
    with open_log(tmp_path / "log.jsonl"):
        with pytest.raises(OutputError, match="is being written by another eqlin run; wait for it"):
            open_log(tmp_path / "log.jsonl")
    open_log(tmp_path / "log.jsonl").close()  # the lock goes with the first writer


def test_a_short_write_is_undone(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    with open_log(path) as log:
        log.append({"text": "a"})
        real = os.write
        monkeypatch.setattr(jsonlog.os, "write", lambda fd, data: real(fd, data[:5]))
        with pytest.raises(OutputError, match="cannot append to .*: only 5 of 13 bytes were written; the records "
                                              "before this one are kept"):
            log.append({"text": "b"})
        monkeypatch.setattr(jsonlog.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(OutputError, match="full"):
            log.append({"text": "b"})
    assert path.read_text() == '{"text":"a"}\n'


def test_nan_is_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "log.jsonl"
    with open_log(path) as log:
        with pytest.raises(NonFiniteError, match="nan at values\\[1\\]"):
            log.append({"values": [1.0, float("nan")]})
    assert path.read_bytes() == b""

"""Prompt sets end to end on a tiny model: `eqlin analyze --prompts` writes one report per prompt to
reports.jsonl, resumes without model work, repairs a torn line, refuses another model's log, and answers
every bad prompt file (empty, blank lines, too long, not UTF-8) with a clear error or a recorded skip."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from eqlin import cli, prompt_sets
from eqlin.cli import EXIT_BAD_INPUT, EXIT_OK, main
from eqlin.errors import InputError, OutputError
from eqlin.outputs import MARKER, write_folder_atomic
from eqlin.prompt_sets import read_prompts, read_text_file
from eqlin.study import write_study

# Nine words each (ten tokens with BOS, as tests.conftest.TEXT): one compiled length for the whole module.
PROMPTS = ["The small red boat crossed the river to the", "A cold wind runs over the old city of",
           "The dog sees a bird in the tree by"]
TOO_LONG = " ".join(["the"] * 70)
OPTIONS = ["--layers", "none", "--top-k", "3", "-q", "--no-compile-cache"]


def _write(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Calls:
    """Counts the model work of a run: model loads and prompts analysed."""

    def __init__(self, monkeypatch):
        self.loads = self.analyses = 0
        load, analyze = cli._load, prompt_sets.analyze

        def counting_load(*a, **k):
            self.loads += 1
            return load(*a, **k)

        def counting_analyze(*a, **k):
            self.analyses += 1
            return analyze(*a, **k)

        monkeypatch.setattr(cli, "_load", counting_load)
        monkeypatch.setattr(prompt_sets, "analyze", counting_analyze)


@pytest.fixture(scope="module")
def prompt_set(checkpoint, tmp_path_factory):
    """(exit code, prompts file, output folder) of one `analyze --prompts` run on the tiny Gemma 3: three
    prompts, a blank line, a repeat and a prompt longer than the model's 64 positions."""
    folder = tmp_path_factory.mktemp("set")
    prompts = _write(folder / "prompts.txt", [PROMPTS[0], "", PROMPTS[1], PROMPTS[0], TOO_LONG, PROMPTS[2]])
    out = folder / "out"
    code = main(["analyze", "--prompts", str(prompts), "--model", str(checkpoint("gemma3")), "--out", str(out),
                 *OPTIONS])
    return code, prompts, out


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "reports.jsonl").read_text(encoding="utf-8").splitlines()]


def test_one_report_per_prompt_and_skips_recorded(prompt_set):
    code, _, out = prompt_set
    assert code == EXIT_OK
    reports = _lines(out)
    assert [r["text"] for r in reports] == PROMPTS
    assert all(r["relative_error"] <= 1e-13 and r["dtype"] == "float64" for r in reports)
    assert all(r["options"] == {"layers": [], "top_k": 3, "branch_tap": "post", "layer_engine": "auto",
                                 "analysis": "full"} for r in reports)
    record = json.loads((out / "set.json").read_text())
    assert record["prompts"] == 4 and record["reports"] == 3 and record["runs"][-1]["analysed"] == 3
    assert [(s["line"], s["reason"]) for s in record["skipped"]] == [
        (2, "blank line"), (4, "the same prompt as line 1"),
        (5, "71 tokens, more than the model's 64 positions; shorten it")]
    assert record["request"]["checkpoint"].startswith("sha256:") and record["request"]["layers"] == "none"


def test_a_line_is_exactly_the_prompts_report_json(prompt_set, checkpoint, tmp_path):
    _, _, out = prompt_set
    single = tmp_path / "single"
    assert main(["analyze", PROMPTS[1], "--model", str(checkpoint("gemma3")), "--out", str(single), *OPTIONS,
                 "--analysis", "full"]) == EXIT_OK  # a set is analysed in full
    report = json.loads((single / "report.json").read_text())
    line = _lines(out)[1]
    assert report.pop("timings_s").keys() == line.pop("timings_s").keys()
    assert line == report


def test_a_finished_set_is_resumed_without_model_work(prompt_set, checkpoint, tmp_path, monkeypatch, capsys):
    _, prompts, out = prompt_set
    out = shutil.copytree(out, tmp_path / "out")
    before = (out / "reports.jsonl").read_bytes()
    calls = Calls(monkeypatch)
    assert main(["analyze", "--prompts", str(prompts), "--model", str(checkpoint("gemma3")), "--out", str(out),
                 *OPTIONS]) == EXIT_OK
    assert (calls.loads, calls.analyses) == (0, 0)
    assert (out / "reports.jsonl").read_bytes() == before
    first, last = json.loads((out / "set.json").read_text())["runs"]
    assert (first["analysed"], last["analysed"], last["reused"], last["model_load_s"]) == (3, 0, 3, 0)
    assert "nothing to analyse: the model was not loaded" in capsys.readouterr().out


def test_study_reuses_the_sets_reports(prompt_set, checkpoint, tmp_path, monkeypatch, capsys):
    _, prompts, out = prompt_set
    out = shutil.copytree(out, tmp_path / "out")
    calls = Calls(monkeypatch)
    assert main(["study", str(prompts), "--model", str(checkpoint("gemma3")), "--out", str(out), *OPTIONS]) == EXIT_OK
    assert (calls.loads, calls.analyses) == (0, 0)
    summary = json.loads((out / "study.json").read_text())
    assert summary["reports"] == 3 and summary["stable_rank"] == {} and summary["emergence"] is None
    assert "No layer maps were analysed" in (out / "study.html").read_text()
    assert "3 of 3 (100 %) ≤ 1e-13" in capsys.readouterr().out


def test_an_interrupted_set_is_finished_and_its_torn_line_repaired(prompt_set, checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    """As a crash leaves it: the last report half written. The rerun cuts it off, says so, and analyses
    that prompt alone."""
    _, prompts, out = prompt_set
    out = shutil.copytree(out, tmp_path / "out")
    data = (out / "reports.jsonl").read_bytes()
    last_line = data.rstrip(b"\n").rfind(b"\n") + 1
    (out / "reports.jsonl").write_bytes(data[: last_line + 100])
    calls = Calls(monkeypatch)
    assert main(["analyze", "--prompts", str(prompts), "--model", str(checkpoint("gemma3")), "--out", str(out),
                 *OPTIONS]) == EXIT_OK
    assert (calls.loads, calls.analyses) == (1, 1)
    assert "ended in a partial line (100 bytes at line 3" in capsys.readouterr().err
    assert [r["text"] for r in _lines(out)] == PROMPTS


@pytest.mark.parametrize("change, message", [
    (["--top-k", "2"], "top_k 3 where this run has 2"),
    (["--layers", "all"], "layers [] where this run has [0, 1, 2, 3]"),
    (["--model", "qwen3"], "checkpoint 'sha256:"),
])
def test_a_log_of_another_model_or_options_is_refused(prompt_set, checkpoint, tmp_path, monkeypatch, capsys, change,
                                                      message):
    _, prompts, out = prompt_set
    out = shutil.copytree(out, tmp_path / "out")
    before = (out / "reports.jsonl").read_bytes()
    args = dict(zip(OPTIONS[0:4:2], OPTIONS[1:4:2]))
    args["--model"] = str(checkpoint("gemma3"))
    args[change[0]] = str(checkpoint(change[1])) if change[0] == "--model" else change[1]
    calls = Calls(monkeypatch)
    code = main(["analyze", "--prompts", str(prompts), "--out", str(out), *(x for kv in args.items() for x in kv),
                 "-q", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "holds reports of another model or other options (line 1: " in err and message in err
    assert "rerun with the --model, --dtype, --layers" in err and "or choose another --out" in err
    assert calls.loads == 0 and (out / "reports.jsonl").read_bytes() == before


@pytest.mark.parametrize("command", ["analyze", "study"])
@pytest.mark.parametrize("edit, what", [
    (lambda r: r.update(relative_error="tiny"), "relative_error is a string, not a number"),
    (lambda r: r.pop("per_token"), "per_token is missing"),
])
def test_an_edited_line_is_named_with_the_fix(prompt_set, checkpoint, tmp_path, monkeypatch, capsys, command, edit,
                                               what):
    """Issue 29, item 9: a line of reports.jsonl edited to hold a wrong type or to lack a key (still a JSON
    object) ended in a TypeError or KeyError traceback, exit 1."""
    _, prompts, out = prompt_set
    out = shutil.copytree(out, tmp_path / "out")
    lines = (out / "reports.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    report = json.loads(lines[1])
    edit(report)
    lines[1] = json.dumps(report) + "\n"
    (out / "reports.jsonl").write_text("".join(lines), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = Calls(monkeypatch)
    args = ["analyze", "--prompts", str(prompts)] if command == "analyze" else ["study", str(prompts)]
    assert main([*args, "--model", str(checkpoint("gemma3")), "--out", str(out), *OPTIONS]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (f"eqlin: error: {out / 'reports.jsonl'} line 2 is not a whole report ({what}): "
                                       "the file was edited or damaged; delete that line (its prompt is analysed "
                                       "again) or choose another --out\n")
    assert (calls.loads, calls.analyses) == (0, 0) and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_memory_grows_by_a_digest_per_prompt_not_a_report(prompt_set, checkpoint, tmp_path):
    """Issue 29, item 13: a set kept every report in memory, and a resume read all of reports.jsonl at once.
    Measured (tracemalloc's peak inside run_prompt_set, what its result keeps included) over a resume of N and
    of 4N prompts: each added prompt costs less than half its report line (measured on the 2-core Xeon: 1.7 KB
    per prompt for a 6.7 KB line; 46 KB when every report was held)."""
    import tracemalloc

    from eqlin.model import checkpoint_identity, read_config

    _, _, out = prompt_set
    line = json.loads((out / "reports.jsonl").read_text(encoding="utf-8").splitlines()[0])
    size = len(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
    folder = checkpoint("gemma3")
    request = prompt_sets.SetRequest(str(folder), checkpoint_identity(str(folder), folder), "float64", "none", 3,
                                     "post", "auto")
    config = read_config(folder)[1]

    def peak(n: int) -> int:
        where = shutil.copytree(out, tmp_path / str(n), ignore=shutil.ignore_patterns("reports.jsonl"))
        (where / "reports.jsonl").write_text("".join(
            json.dumps({**line, "text": f"prompt {i}"}, ensure_ascii=False, separators=(",", ":")) + "\n"
            for i in range(n)), encoding="utf-8")
        prompts = read_prompts(str(_write(tmp_path / f"{n}.txt", [f"prompt {i}" for i in range(n)])))
        tracemalloc.start()
        try:
            run = prompt_sets.run_prompt_set(prompts, where, request, config=config, folder=folder,
                                             load=lambda: pytest.fail("nothing to analyse: no model"))
            assert len(run.reports) == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(40), peak(160)
    assert (large - small) / 120 < size / 2, (small, large, size)


def test_groups_of_equal_length_share_one_vmapped_call(prompt_set, checkpoint, tmp_path):
    _, prompts, out = prompt_set
    batched = tmp_path / "batched"
    assert main(["analyze", "--prompts", str(prompts), "--model", str(checkpoint("gemma3")), "--out", str(batched),
                 "--batch", "2", *OPTIONS]) == EXIT_OK
    for one, other in zip(_lines(out), _lines(batched)):
        assert one["text"] == other["text"] and other["relative_error"] <= 1e-13
        assert other["per_token"][3]["singular_values"] == pytest.approx(one["per_token"][3]["singular_values"],
                                                                         rel=1e-12)
    shared = [k for k in _lines(batched)[0]["timings_s"] if "vmapped over 2 prompts" in k]
    assert shared and json.loads((batched / "set.json").read_text())["runs"][-1]["batch"] == 2


def test_text_file_is_one_prompt(checkpoint, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(PROMPTS[2] + "\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["analyze", "--text-file", str(text_file), "--model", str(checkpoint("gemma3")), "--out", str(out),
                 *OPTIONS]) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["text"] == PROMPTS[2]


# --- bad prompt files: refused before the model is found (--model names nothing), nothing created -------------


@pytest.mark.parametrize("content, message", [
    (b"", "prompts.txt is empty: write one prompt per line"),
    (b"\n  \n\t\n", "prompts.txt holds only blank lines: write one prompt per line"),
    (b"The cat\nLe caf\xe9 est\n", "prompts.txt is not UTF-8: line 2, byte 7 \\(0xe9\\) cannot be decoded; save the "
                                   "file as UTF-8"),
    (b"The cat\x00\n", "holds a NUL character at line 1: it is not a text file"),
])
def test_bad_prompt_files_are_refused(tmp_path, capsys, content, message):
    import re

    (tmp_path / "prompts.txt").write_bytes(content)
    out = tmp_path / "o"
    code = main(["analyze", "--prompts", str(tmp_path / "prompts.txt"), "--model", str(tmp_path / "nowhere"),
                 "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["analyze"], "give the text to analyse: TEXT"),
    (["analyze", "The cat", "--prompts", "p.txt"], "give one of TEXT, --text-file FILE or --prompts FILE, not TEXT "
                                                   "and --prompts"),
    (["analyze", "--prompts", "missing.txt"], "cannot read missing.txt: No such file or directory"),
    (["analyze", "--text-file", "missing.txt"], "cannot read missing.txt"),
    (["study", "missing.txt"], "cannot read missing.txt"),
    (["analyze", "The cat", "--batch", "0"], "--batch must be at least 1 (prompts of equal length per vmapped call)"),
])
def test_bad_arguments(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--model", str(tmp_path / "nowhere"), "-q"]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_single_report_folder_is_not_a_set_folder(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("The cat\n")
    out = tmp_path / "o"
    write_folder_atomic(out, {"report.json": b"{}"}, kind="report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["analyze", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "-q"]) == EXIT_BAD_INPUT
    assert f"output folder {out} holds eqlin's report, not a prompt set; choose an empty or new --out" in (
        capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_of_the_users_images_is_not_a_set_folder(tmp_path, capsys):
    """Issue 29, item 3: `eqlin study` took a folder of PNGs for a set folder and overwrote errors.png and
    deleted emergence.png there."""
    (tmp_path / "p.txt").write_text("The cat\n")
    out = tmp_path / "pics"
    out.mkdir()
    for name in ("holiday", "errors", "emergence"):
        (out / f"{name}.png").write_bytes(b"\x89PNG my " + name.encode() + b" photo")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["study", str(tmp_path / "p.txt"), "--out", str(out), "-q"]) == EXIT_BAD_INPUT
    assert (f"output folder {out} is not empty and eqlin did not create it (it holds no {MARKER}: emergence.png, "
            "errors.png, holiday.png); eqlin writes only into a new or empty folder, or one it marked itself, so "
            "nothing of yours is replaced: choose an empty or new --out.\n") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OutputError, match="is not empty and eqlin did not create it"):
        write_study({}, [], out)  # the library refuses too, before drawing anything
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_prompt_too_long_to_fit_is_skipped_by_its_length_before_tokenizing(checkpoint, tmp_path, monkeypatch):
    """Issue 29, item 12 (the bound itself: test_tokenizer.py): a 200 MB line was tokenized whole and OOM-killed;
    now a line longer than any text that fits is skipped from its length, and nothing is loaded."""
    from eqlin.tokenizer import Tokenizer

    limit, longest = Tokenizer.from_folder(checkpoint("gemma3")).text_limit(64)
    prompts = _write(tmp_path / "p.txt", ["a" * (limit + 1)])
    calls = Calls(monkeypatch)
    assert main(["analyze", "--prompts", str(prompts), "--model", str(checkpoint("gemma3")), "--out",
                 str(tmp_path / "o"), *OPTIONS]) == EXIT_OK
    assert (calls.loads, calls.analyses) == (0, 0) and (tmp_path / "o" / "reports.jsonl").read_bytes() == b""
    assert json.loads((tmp_path / "o" / "set.json").read_text())["skipped"] == [
        {"line": 1, "text": "a" * prompt_sets.SHOWN + "…",  # not the whole line
         "reason": f"the text has {limit + 1:,} characters, more than any text that fits the model's 64 positions can "
                   f"have (this tokenizer's longest token is {longest} characters, so at most {limit:,}); shorten it"}]


def test_prompt_files_are_read_as_written(tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfThe cat \r\n\r\nThe dog\r\nThe cat \n")
    read = read_prompts(str(path))
    assert [(p.line, p.text) for p in read.prompts] == [(1, "The cat "), (3, "The dog")]
    assert [s["line"] for s in read.skipped] == [2, 4]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo")))
    assert [p.text for p in read_prompts("-").prompts] == ["one", "two"]
    path.write_bytes(b"line one\nline two\n")
    assert read_text_file(str(path)) == "line one\nline two"
    path.write_bytes(b" \n")
    with pytest.raises(InputError, match="p.txt is blank: write the text to analyse into it"):
        read_text_file(str(path))

"""Prompt sets: many next-token predictions analysed into one reports.jsonl that a rerun finishes.

A prompt file is UTF-8 text, one prompt per line, each exactly as written (only the line ending is
removed); blank lines and repeated prompts are skipped and recorded. `run_prompt_set` appends one report
per prompt to reports.jsonl in the output folder (each line exactly what report.json would hold for that
prompt, `eqlin.analysis`), one whole line at a time (`eqlin.jsonlog`), and records the set in set.json.
A rerun reuses every report already there for the same request: the checkpoint's content
(`eqlin.model.checkpoint_identity`), the dtype and every option that shapes a report (layers, top-k,
branch tap, layer engine), matched per prompt text; a log written for another request is refused, never
mixed. When nothing is left to do, the model is not even loaded. A prompt that cannot be analysed (longer
than the context, over the memory budget, …) is skipped with the reason and the set goes on.

Groups of equal length can share one vmapped detached Jacobian (`eqlin.detached_jacobians`, `batch` > 1).
Measured, it does not pay (benchmarks/README.md, "Prompt sets"): 1.16× slower on the 2-core CPU, 0.88–1.11×
the speed of one at a time on an H100, so `batch` is 1 (one at a time) unless asked otherwise.

set.json:
    schema          "eqlin.prompt_set/1"
    prompts_file    the prompt file's path ("<stdin>" for -)
    request         {source, checkpoint, dtype, layers (the --layers spec), top_k, branch_tap, layer_engine}
    prompts         distinct prompts in the file; reports: how many of them reports.jsonl holds
    skipped         [{line, text (cut after 1000 characters, "…"), reason}]: lines of the file not analysed,
                     and why
    other_reports   reports in reports.jsonl of prompts that are not in this file (kept, not counted)
    runs            every run into this folder, oldest first: {prompts_file, started (UTC), analysed, reused,
                     skipped, seconds (the whole run), model_load_s, analysis_s (analysing and appending),
                     prompts_per_minute (analysed / analysis_s), batch, repaired (what was cut off
                     reports.jsonl, or null), load_average (1, 5, 15 min, at the end)}
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from eqlin.analysis import SCHEMA, analyze, auto_layers
from eqlin.batch import detached_jacobians
from eqlin.config import ModelConfig
from eqlin.digest import digest
from eqlin.errors import EqlinError, InputError, MemoryBudgetError, OutputError
from eqlin.jsonlog import JsonLog, open_log
from eqlin.layer_story import Engine
from eqlin.linear_maps import Linearization
from eqlin.model import Model
from eqlin.outputs import check_output_dir, claim_folder, clean_temps, write_json_atomic
from eqlin.progress import shown, steps
from eqlin.selection import Tap, parse_layers
from eqlin.tokenizer import Tokenizer

SET_SCHEMA = "eqlin.prompt_set/1"
REPORTS, SET_FILE = "reports.jsonl", "set.json"
SET_KIND = "prompt set"  # the kind of output folder a set is (eqlin.outputs.MARKER)
SET_FILES = (REPORTS, SET_FILE, "study.json", "study.html", "errors.png", "stable_rank.png", "emergence.png")
EXACT = 1e-13  # the paper's float64 bound on the relative reconstruction error
SHOWN = 1000  # characters of a skipped line's text kept in set.json


# --------------------------------------------------------------------------------------------------
# Prompt files.


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt and its 1-based line in the file."""

    line: int
    text: str


@dataclasses.dataclass(frozen=True)
class PromptFile:
    """The distinct prompts of a file in order, and the lines skipped ({line, text, reason})."""

    name: str
    prompts: tuple[Prompt, ...]
    skipped: tuple[dict[str, Any], ...]


def _read_bytes(path: str) -> tuple[bytes, str]:
    """The bytes of `path` ("-": standard input) and its name for messages."""
    if path == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    try:
        return Path(path).read_bytes(), path
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}; give a UTF-8 text file") from None


def decode_text(data: bytes, name: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped), else an InputError naming the line and
    byte that cannot be decoded."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise InputError(f"{name} is not UTF-8: line {line}, byte {column} (0x{data[e.start]:02x}) cannot be decoded;"
                         " save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise InputError(f"{name} holds a NUL character at line {line}: it is not a text file; give a UTF-8 text file")
    return text


def _skip(line: int, text: str, reason: str) -> dict[str, Any]:
    """A skipped line's record, its text cut after SHOWN characters (a line too long to fit the context
    may be megabytes)."""
    return {"line": line, "text": text if len(text) <= SHOWN else text[:SHOWN] + "…", "reason": reason}


def read_prompts(path: str) -> PromptFile:
    """The prompts of `path` ("-": standard input), one per line. An empty file, or one of blank lines
    only, is an InputError; blank lines and repeats among others are skipped and recorded."""
    text = decode_text(*_read_bytes(path))
    name = "<stdin>" if path == "-" else path
    if not text.strip():
        what = "is empty" if not text else "holds only blank lines"
        raise InputError(f"{name} {what}: write one prompt per line, e.g. \"The bridge out of Marin is the\"")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final line ending
    prompts: list[Prompt] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            skipped.append(_skip(number, line, "blank line"))
        elif line in seen:
            skipped.append(_skip(number, line, f"the same prompt as line {seen[line]}"))
        else:
            seen[line] = number
            prompts.append(Prompt(number, line))
    return PromptFile(name, tuple(prompts), tuple(skipped))


def read_text_file(path: str) -> str:
    """The whole of `path` ("-": standard input) as one prompt, without its final line ending."""
    text = decode_text(*_read_bytes(path))
    name = "<stdin>" if path == "-" else path
    if not text.strip():
        raise InputError(f"{name} is {'empty' if not text else 'blank'}: write the text to analyse into it")
    return text.removesuffix("\n").removesuffix("\r")


# --------------------------------------------------------------------------------------------------
# What a set asks for, and whether a stored report answers it.


@dataclasses.dataclass(frozen=True)
class SetRequest:
    """Everything that shapes a prompt's report. `layers` is the --layers spec: 'auto' resolves per prompt
    by its length (`eqlin.analysis.auto_layers`), so a report's layers are checked against its own tokens."""

    source: str
    checkpoint: str
    dtype: str
    layers: str
    top_k: int
    tap: Tap
    engine: Engine

    def layers_for(self, num_layers: int, length: int) -> tuple[int, ...]:
        """The layers analysed for a prompt of `length` tokens."""
        if self.layers.strip().lower() == "auto":
            return auto_layers(num_layers, length)
        return parse_layers(self.layers, num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "checkpoint": self.checkpoint, "dtype": self.dtype, "layers": self.layers,
                "top_k": self.top_k, "branch_tap": self.tap, "layer_engine": self.engine}

    def mismatch(self, report: dict[str, Any], num_layers: int) -> str | None:
        """How `report` differs from what this request writes for its text; None if it does not."""
        try:
            options = report["options"]
            found = {"schema": report["schema"], "checkpoint": report["model"]["checkpoint"], "dtype": report["dtype"],
                     "layers": options["layers"], "top_k": options["top_k"], "branch_tap": options["branch_tap"],
                     "layer_engine": options["layer_engine"]}
            length = len(report["tokens"])
            if not isinstance(report["text"], str):
                raise TypeError
        except (KeyError, TypeError):
            return f"it is not a report of {SCHEMA} with its options"
        expected = {"schema": SCHEMA, "checkpoint": self.checkpoint, "dtype": self.dtype,
                    "layers": list(self.layers_for(num_layers, length)), "top_k": self.top_k, "branch_tap": self.tap,
                    "layer_engine": self.engine}
        differ = [f"{key} {found[key]!r} where this run has {value!r}" for key, value in expected.items()
                  if found[key] != value]
        return "; ".join(differ) or None


@dataclasses.dataclass(frozen=True)
class Reusable:
    """What a log holds for a set: {text: digest} of the reports of the file's prompts (a repeated text
    keeps its first), how many lines hold reports of other prompts, and the sources all of them name."""

    digests: dict[str, dict[str, Any]]
    others: int
    sources: frozenset[str]


def reusable_reports(log: JsonLog, request: SetRequest, num_layers: int, texts: set[str]) -> Reusable:
    """The log's reports for `texts`, read one line at a time and kept as digests (`eqlin.digest`). An
    InputError names the first line made for another request (what differs and the fix), or the first
    line that is not a whole report (a field missing or of the wrong type: an edited file)."""
    digests: dict[str, dict[str, Any]] = {}
    others, sources = 0, set()
    for line, report in log.records():
        differs = request.mismatch(report, num_layers)
        if differs:
            raise InputError(
                f"{log.path} holds reports of another model or other options (line {line}: {differs}); one folder "
                "holds one set: rerun with the --model, --dtype, --layers, --top-k, --branch-tap and --layer-engine "
                "that wrote it, or choose another --out")
        try:
            found = digest(report)
        except ValueError as e:
            raise InputError(f"{log.path} line {line} is not a whole report ({e}): the file was edited or damaged; "
                             "delete that line (its prompt is analysed again) or choose another --out") from None
        sources.add(found["source"])
        if found["text"] in texts:
            digests.setdefault(found["text"], found)
        else:
            others += 1
    return Reusable(digests, others, frozenset(sources))


def check_set_dir(folder: Path) -> Path:
    """Check a prompt set's output folder before any heavy work, creating nothing: absent, empty, or a set
    folder eqlin marked (`eqlin.outputs.check_output_dir`), writable."""
    return check_output_dir(folder, SET_KIND)


# --------------------------------------------------------------------------------------------------
# Running a set.


@dataclasses.dataclass(frozen=True)
class SetRun:
    """The outcome of `run_prompt_set`: the digests of the file's reports (`eqlin.digest`: what the summary
    and the study read, not whole reports, so memory grows by a digest per prompt) in file order with their
    lines in the file, and set.json's content."""

    reports: list[dict[str, Any]]
    lines: list[int]
    record: dict[str, Any]


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    """The runs recorded in an earlier set.json (none if absent; said if unreadable: it is only a record)."""
    if not path.exists():
        return []
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs")
        if isinstance(runs, list):
            return runs
    except (OSError, ValueError, AttributeError):
        pass
    _note(f"{path} could not be read as a set record; its list of earlier runs starts again")
    return []


def _note(message: str) -> None:
    print(f"eqlin: note: {message}", file=sys.stderr, flush=True)


def _lengths(prompts: list[Prompt], folder: Path, config: ModelConfig, skipped: list[dict[str, Any]]) -> dict[int, int]:
    """{line: token count} of the prompts that fit the model's positions (the tokenizer alone, no weights);
    the others are added to `skipped`."""
    tokenizer = Tokenizer.from_folder(folder)
    lengths = {}
    for p in prompts:
        try:
            n = len(tokenizer.encode(p.text, config.max_position_embeddings))
        except EqlinError as e:
            skipped.append(_skip(p.line, p.text, str(e)))
            continue
        if n > config.max_position_embeddings:
            skipped.append(_skip(p.line, p.text, f"{n} tokens, more than the model's "
                                 f"{config.max_position_embeddings} positions; shorten it"))
        else:
            lengths[p.line] = n
    return lengths


def _groups(prompts: list[Prompt], lengths: dict[int, int], batch: int) -> list[list[Prompt]]:
    """Prompts in file order, one at a time (batch 1), or up to `batch` of equal length together."""
    if batch == 1:
        return [[p] for p in prompts]
    by_length: dict[int, list[Prompt]] = {}
    for p in prompts:
        by_length.setdefault(lengths[p.line], []).append(p)
    return [group[i:i + batch] for group in by_length.values() for i in range(0, len(group), batch)]


def _shared_maps(model: Model, group: list[Prompt]) -> tuple[list[Linearization | None], float]:
    """The final detached maps of a group of prompts of equal length from one vmapped call, and its seconds
    ([None] per prompt, one at a time, for a group of one, or if the batch does not fit the memory budget)."""
    if len(group) == 1:
        return [None], 0.0
    start = time.perf_counter()
    try:
        b = jax.block_until_ready(detached_jacobians(model, [p.text for p in group]))
    except MemoryBudgetError:
        return [None] * len(group), 0.0
    maps = [Linearization(b.jacobian[i], b.inputs[i], b.output[i], b.contributions[i], b.relative_error[i], b.ids[i],
                          b.constant[i]) for i in range(len(group))]
    return maps, time.perf_counter() - start


def run_prompt_set(prompts: PromptFile, out: Path, request: SetRequest, *, config: ModelConfig, folder: Path,
                   load: Callable[[], Model], batch: int = 1, quiet: bool | None = None) -> SetRun:
    """Analyse every prompt of `prompts` that reports.jsonl in `out` does not hold yet, appending each
    report as it is made, and write set.json (module docstring). `load` gives the model, and is called
    only if a prompt needs it; `folder`'s tokenizer checks lengths first. Progress on stderr: see
    `eqlin.progress.shown`."""
    quiet = not shown(quiet)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    out = claim_folder(out, SET_KIND, SET_FILES)
    clean_temps(out)
    skipped = list(prompts.skipped)
    timing = {"model_load_s": 0.0, "analysis_s": 0.0}
    with open_log(out / REPORTS) as log:
        if log.repaired:
            _note(log.repaired + "; its prompt is analysed again")
        texts = {p.text for p in prompts.prompts}
        reusable = reusable_reports(log, request, config.num_layers, texts)
        done = reusable.digests
        sources = reusable.sources - {request.source}
        if sources:
            _note(f"reports in {log.path} were made from {', '.join(sorted(sources))}: the same checkpoint content "
                  f"as {request.source}, so they are reused")
        todo = [p for p in prompts.prompts if p.text not in done]
        reused = len(prompts.prompts) - len(todo)
        lengths = _lengths(todo, folder, config, skipped) if todo else {}
        todo = [p for p in todo if p.line in lengths]
        if not quiet:
            print(f"eqlin: {len(prompts.prompts)} prompts in {prompts.name}: {reused} already in {log.path}, "
                  f"{len(todo)} to analyse", file=sys.stderr, flush=True)
        model, analysed = None, 0
        if todo:
            t = time.perf_counter()
            model = load()
            timing["model_load_s"] = time.perf_counter() - t
        with steps("prompts", len(prompts.prompts), quiet, initial=len(prompts.prompts) - len(todo)) as bar:
            for group in _groups(todo, lengths, batch):
                t = time.perf_counter()
                maps, shared = _shared_maps(model, group)
                for p, lin in zip(group, maps):
                    one = time.perf_counter()
                    try:
                        result = analyze(model, p.text, layers=request.layers_for(config.num_layers, lengths[p.line]),
                                         top_k=request.top_k, tap=request.tap, engine=request.engine,
                                         checkpoint=request.checkpoint, lin=lin, analysis="full", quiet=True)
                        if lin is not None:
                            result.report["timings_s"][f"detached Jacobian (vmapped over {len(group)} prompts; "
                                                       "this prompt's share)"] = round(shared / len(group), 3)
                        log.append(result.report)
                    except OutputError:
                        raise
                    except EqlinError as e:  # this prompt only: too large for memory, non-finite, ...
                        skipped.append(_skip(p.line, p.text, str(e)))
                        bar.write(f"eqlin: line {p.line} skipped: {e}", file=sys.stderr)
                    else:
                        done[p.text] = digest(result.report)
                        analysed += 1
                        if not quiet:
                            r = result.report
                            bar.write(f"  line {p.line:>4} {p.text[:40]!r:<42} → {r['next_token']['text']!r} "
                                      f"(p = {r['next_token']['probability']:.3f}), relative error "
                                      f"{r['relative_error']:.1e}, {time.perf_counter() - one:.1f} s", file=sys.stderr)
                    bar.update()
                timing["analysis_s"] += time.perf_counter() - t
        repaired = log.repaired
    skipped.sort(key=lambda s: s["line"])
    this_run = {"prompts_file": prompts.name, "started": started.isoformat(timespec="seconds"), "analysed": analysed,
                "reused": reused, "skipped": len(skipped), "seconds": round(time.perf_counter() - start, 3),
                "model_load_s": round(timing["model_load_s"], 3), "analysis_s": round(timing["analysis_s"], 3),
                "prompts_per_minute": round(60 * analysed / timing["analysis_s"], 3) if analysed else None,
                "batch": batch, "repaired": repaired, "load_average": [round(v, 2) for v in os.getloadavg()]}
    record = {
        "schema": SET_SCHEMA, "prompts_file": prompts.name, "request": request.to_dict(),
        "prompts": len(prompts.prompts), "reports": sum(p.text in done for p in prompts.prompts),
        "skipped": skipped, "other_reports": reusable.others, "runs": [*_earlier_runs(out / SET_FILE), this_run],
    }
    write_json_atomic(out / SET_FILE, record)
    reported = [p for p in prompts.prompts if p.text in done]
    return SetRun([done[p.text] for p in reported], [p.line for p in reported], record)


def set_summary(run: SetRun, out: Path) -> str:
    """The terminal summary of a set run."""
    rec, last = run.record, run.record["runs"][-1]
    lines = [f"prompts: {rec['prompts']} in {rec['prompts_file']}: {last['analysed']} analysed now, {last['reused']} "
             f"reused from {out / REPORTS}, {len(rec['skipped'])} lines skipped"
             + (f" (reasons in {out / SET_FILE})" if rec["skipped"] else "")]
    if run.reports:
        errors = [r["relative_error"] for r in run.reports]
        lines.append(f"relative reconstruction error of the detached maps: max {max(errors):.2e} over "
                     f"{len(errors)} reports, {sum(e <= EXACT for e in errors)} of them ≤ {EXACT:.0e}")
    if last["analysed"]:
        lines.append(f"throughput: {last['prompts_per_minute']:.2f} prompts per minute of analysis; model loaded in "
                     f"{last['model_load_s']:.1f} s; the whole run {last['seconds']:.1f} s")
    else:
        lines.append(f"nothing to analyse: the model was not loaded; the whole run {last['seconds']:.1f} s")
    lines.append(f"reports: {out / REPORTS} (and {SET_FILE})")
    return "\n".join(lines)

"""The `eqlin` command line end to end: analyze (tiny model, its predictions graded by transformers, and, once,
the embedded Gemma 3 270M in float64), info (its figures against hand computation and transformers' parameter
count), convert, help, and every exit code: 2 for bad input and bad usage (a message naming the fix, nothing
half-written), 1 for an internal error and 130 for an interrupt, in fresh processes."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import jax

import numpy as np
import pytest
import torch

import eqlin
from eqlin.analysis import SCHEMA
from eqlin.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, INTERRUPTED, main
from eqlin.memory import estimate_jacobian_bytes, estimate_top_k_bytes, format_bytes
from eqlin.outputs import MARKER
from eqlin.report import summary
from tests.conftest import TEXT
from eqlin.reference import load_transformers

REPORT_KEYS = {"schema", "next_token", "relative_error", "plain_relative_error", "model", "dtype", "tokens",
               "per_token", "layer_maps", "homogeneity_error", "logit", "top_predictions", "timings_s", "text",
               "layers", "layer_analysis", "constant"}


def test_analyze_on_a_tiny_model(tiny_report, checkpoint, capsys):
    code, out = tiny_report
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "dimensionality.png", "emergence.png", "jacobian.png",
                                                     "reconstruction.png", "report.html", "report.json", "spectra.png"]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["schema"] == SCHEMA
    assert report["dtype"] == "float64" and report["model"]["family"] == "gemma3"
    # measured: reconstruction 5.9e-16, homogeneity 0, logit 4.9e-16, layer maps at most 8.9e-16
    assert report["relative_error"] <= 1e-14 and report["plain_relative_error"] >= 1e-3
    assert report["homogeneity_error"] <= 1e-14 and report["logit"]["relative_error"] <= 1e-14
    assert [t["text"] for t in report["tokens"]][:2] == ["<bos>", "The"]
    assert report["next_token"]["id"] == report["top_predictions"][0]["id"]
    assert len(report["per_token"]) == len(report["tokens"]) and len(report["per_token"][0]["singular_values"]) == 3
    maps = report["layer_maps"]
    assert maps["layers"] == [0, 1, 2, 3]
    for part in ("residual", "attn", "mlp"):
        assert len(maps[part]["stable_rank"]) == 4 and max(maps[part]["relative_error"]) <= 1e-14
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2, 3]
    for row in report["layers"]:
        for scope in ("cumulative", "single"):
            for part in ("residual", "attn", "mlp"):
                entry = row[scope][part]
                assert entry["relative_error"] <= 1e-13 and len(entry["singular_values"]) == 3
                assert len(entry["top_tokens"]) == 3 and entry["next_token_rank"] >= 0
        assert row["cumulative"]["residual"]["stable_rank"] == maps["residual"]["stable_rank"][row["layer"]]
    first = report["layers"][0]  # layer 0's input is x itself: both scopes are the same maps
    for part in ("residual", "attn", "mlp"):
        one, other = first["single"][part], first["cumulative"][part]
        assert one["top_tokens"] == other["top_tokens"]
        assert one["stable_rank"] == pytest.approx(other["stable_rank"], rel=1e-12)
    info = report["layer_analysis"]
    assert info["tap"] == "post" and info["engines"]["single"] == "rev" and info["max_relative_error"] <= 1e-13
    total = sum(p["logit_contribution"] for p in report["per_token"])
    assert abs(total - report["logit"]["value"]) <= 1e-14 * abs(report["logit"]["value"])  # measured 4.9e-16
    # The prediction itself, graded by stock transformers (float32 inside: measured 2.6e-7 on the probabilities,
    # 2.9e-8 on the logit).
    ids = [t["id"] for t in report["tokens"]]
    with torch.no_grad():
        logits = load_transformers(checkpoint("gemma3"))(input_ids=torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits, -1).numpy()
    top = np.argsort(-probs)[:len(report["top_predictions"])]
    assert [p["id"] for p in report["top_predictions"]] == top.tolist()
    np.testing.assert_allclose([p["probability"] for p in report["top_predictions"]], probs[top], rtol=2e-6)
    np.testing.assert_allclose(report["next_token"]["logit"], float(logits[top[0]]), rtol=5e-7)
    assert report["constant"] == {"norm": 0.0, "relative_norm": 0.0, "logit": 0.0, "tokens": []}  # no biases


def test_analyze_falls_back_to_the_matrix_free_analysis_and_says_so(matrix_free_report, tiny_report):
    code, out, stdout, stderr, limit = matrix_free_report
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "reconstruction.png", "report.html", "report.json",
                                                     "spectrum.png"]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["analysis"] == "matrix-free"
    plan = report["plan"]
    assert plan["full_bytes"] > plan["limit"] >= plan["top_k_bytes"] and plan["basis"] == "EQLIN_MEMORY_LIMIT_GB"
    assert stderr.count("\n") == 1 and stderr.startswith("eqlin: the full J does not fit the memory budget: the full J")
    assert "(EQLIN_MEMORY_LIMIT_GB); longest input whose full J fits: T=" in stderr
    assert report["relative_error"] <= 1e-14 and report["homogeneity_error"] <= 1e-14  # measured 4.2e-17, 0
    full = json.loads((tiny_report[1] / "report.json").read_text())  # the same text, analysed in full
    assert full["analysis"] == "full" and full["plan"]["reason"] == "the full J fits the memory budget"
    assert report["logit"]["value"] == pytest.approx(full["logit"]["value"], rel=1e-14)
    lines = stdout.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("analysis: "))
    assert lines[at].startswith("analysis: matrix-free (J never built): the full J does not fit the memory budget; "
                                f"the full J at T={plan['length']} needs about {format_bytes(plan['full_bytes'])}")
    assert lines[at + 2].startswith("token-combined map [J_0 … J_{T−1}]: top singular values")
    assert len([l for l in lines if re.match(r"  +\d \s+[\d.]+ \[", l)]) == 3
    assert "  (no J built: per-token contributions and spectra, J's picture and layer maps are absent)" in lines
    assert any(l.startswith("layer maps: layers [0, 1, 2, 3] asked, not computed in a matrix-free analysis") for l in lines)


@pytest.mark.parametrize("args, message", [
    (["--analysis", "full"], "the full analysis at T=10 needs about"),
    (["--layers", "none"], "neither analysis fits the 1.0 KiB budget (EQLIN_MEMORY_LIMIT_GB) at T=10"),
])
def test_analyze_refuses_what_does_not_fit(matrix_free_report, checkpoint, tmp_path, capsys, monkeypatch, args,
                                           message):
    """--analysis full where J does not fit, and a budget where nothing fits: exit 2, nothing written."""
    limit = matrix_free_report[4] if args[0] == "--analysis" else 1024
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", repr(limit / 2**30))
    err = _bad(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(tmp_path / "o"), *args], capsys)
    assert message in err and not (tmp_path / "o").exists()
    assert ("or a higher limit (memory_limit or EQLIN_MEMORY_LIMIT_GB)" in err
            and ("use the matrix-free analysis" in err if args[0] == "--analysis" else "--dtype float32" in err))


def test_json_flag_prints_the_report_and_the_constant_of_a_model_with_biases(checkpoint, tmp_path, capsys):
    """Qwen 2: y = Σ_t J_t x_t + c, with ‖c‖/‖y‖, c's share of the next token's logit and c decoded through
    the unembedding in report.json, its own row in report.html and a line of the summary."""
    assert main(["analyze", TEXT, "--model", str(checkpoint("qwen2")), "--out", str(tmp_path), "--layers", "none",
                 "--top-k", "3", "--json", "-q", "--no-compile-cache"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "report.json").read_text())
    assert printed["layer_maps"]["layers"] == [] and printed["tokens"][0]["text"] == "The"  # Qwen adds no BOS
    c = printed["constant"]
    assert c["relative_norm"] > 0.1 and len(c["tokens"]) == 3 and c["norm"] > 0
    assert printed["relative_error"] <= 1e-13 and printed["homogeneity_error"] <= 1e-13
    logit = printed["logit"]
    assert logit["relative_error"] <= 1e-13 and logit["constant"] == c["logit"] != 0
    total = sum(p["logit_contribution"] for p in printed["per_token"]) + c["logit"]
    assert abs(total - logit["value"]) <= 1e-12 * abs(logit["value"])
    assert abs(logit["reconstructed"] - logit["value"]) <= 1e-12 * abs(logit["value"])
    assert "<td>(constant: biases)</td>" in (tmp_path / "report.html").read_text()
    text = summary(printed, tmp_path)
    assert "‖y − (Σ_t J_t x_t + c)‖/‖y‖" in text and f"‖c‖/‖y‖ = {c['relative_norm']:.3g}" in text


def test_analyze_the_embedded_model_in_float64(tmp_path, eqlin_cache_dir):
    """The main job as a user runs it (default model, compilation cache on), in a fresh process; its GGUF
    conversion and compilation cache land in the session's temporary EQLIN_CACHE_DIR, not in ~/.cache/eqlin."""
    out = subprocess.run([sys.executable, "-m", "eqlin.cli", "analyze", "The bridge out of Marin is the",
                          "--out", str(tmp_path), "--layers", "none", "--top-k", "3"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["next_token"]["text"] == " only"
    assert report["relative_error"] <= 2e-14 and report["plain_relative_error"] >= 1e-3  # measured 1.7e-15, 1.04
    assert report["model"]["family"] == "gemma3" and report["model"]["num_layers"] == 18
    assert "next token: ' only'" in out.stdout
    assert "load model" in out.stderr and "detached Jacobian" in out.stderr  # progress is shown
    assert any(p.name.startswith("gemma-3-270m") for p in (eqlin_cache_dir / "gguf").iterdir())
    assert any((eqlin_cache_dir / "xla").iterdir())


def _info_rows(args: list[str], capsys) -> dict[str, str]:
    assert main(["info", *args, "-q", "--no-compile-cache"]) == EXIT_OK
    printed = capsys.readouterr().out
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in printed.strip().splitlines())


@pytest.mark.parametrize("variant", ["llama_gqa", "gpt2", "gemma3"])
def test_info(variant, checkpoint, loaded, capsys, monkeypatch):
    """The figures, not only the labels, from config.json and the tensor headers alone (no weight is read):
    parameters as transformers counts them, J's size by hand, the peak as eqlin.memory estimates it (and at
    least J itself), and what fits under a budget set by EQLIN_MEMORY_LIMIT_GB."""
    from eqlin import model as eqlin_model
    from eqlin.memory import largest_fitting
    from eqlin.safetensors_io import SafetensorsFile

    config = loaded(variant).config
    d = config.hidden_size

    def peak(length: int, chunk: int | None = None) -> int:
        return estimate_jacobian_bytes(config, length, itemsize=8, chunk=chunk)

    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", str((peak(16, 2) + 0.5) / 2**30))  # 2 basis vectors per pass

    def no_weights(*args, **kwargs):
        raise AssertionError("eqlin info read weights")

    monkeypatch.setattr(SafetensorsFile, "read", no_weights)
    monkeypatch.setattr(eqlin_model, "load_params", no_weights)
    rows = _info_rows([str(checkpoint(variant)), "--tokens", "16"], capsys)
    assert rows["family"] == config.family and rows["dtype"] == "float64"
    assert rows["layers"] == str(config.num_layers) and rows["hidden size d"] == str(d)
    torch_model = load_transformers(checkpoint(variant))
    parameters = sum(p.numel() for p in torch_model.parameters())  # llama_gqa: 174,272
    assert rows["parameters"] == f"{parameters:,}" and rows["weights in float64"] == format_bytes(8 * parameters)
    assert rows["J at T=16 (d x T x d)"] == format_bytes(d * 16 * d * 8)
    assert rows["peak for J at T=16"] == f"{format_bytes(peak(16))} (estimate)" and peak(16) >= d * 16 * d * 8
    assert rows["memory budget"] == f"{format_bytes(peak(16, 2))} (EQLIN_MEMORY_LIMIT_GB)"
    assert rows["J at T=16 here"] == "fits, 2 basis vectors per pass"
    longest = largest_fitting(lambda t: peak(t, 1), config.max_position_embeddings, peak(16, 2))
    assert longest >= 16 and rows["longest input whose J fits"] == f"T={longest:,} (one basis vector per pass)"
    held = sum(a.nbytes for a in jax.tree_util.tree_leaves(loaded(variant).params))  # float32 checkpoints: stored
    assert rows["weights as loaded"].startswith(f"{format_bytes(held)} (weights='stored'") and held < 8 * parameters
    top_k = estimate_top_k_bytes(config, 16, itemsize=8)
    assert rows["peak for top-10 at T=16"].startswith(format_bytes(top_k)) and top_k < peak(16)
    assert rows["top-10 at T=16 here"] == ("fits" if top_k <= peak(16, 2) else "does not fit")
    longest = largest_fitting(lambda t: estimate_top_k_bytes(config, t, itemsize=8), config.max_position_embeddings,
                              peak(16, 2))
    assert rows["longest input whose top-10 fits"] == f"T={longest:,}"


def test_info_says_what_the_default_budget_is(checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("EQLIN_MEMORY_LIMIT_GB", raising=False)
    rows = _info_rows([str(checkpoint("llama_gqa"))], capsys)
    assert rows["memory budget"].endswith("(80 % of physical memory less the weights; set EQLIN_MEMORY_LIMIT_GB "
                                          "to change it)")
    assert rows["J at T=64 here"] == "fits, all basis vectors in one pass"
    assert rows["longest input whose J fits"] == "T=64 (one basis vector per pass)"


@pytest.mark.slow
def test_info_on_the_embedded_model_reads_only_headers(eqlin_cache_dir):
    """Under 1 GB peak (measured 0.87 GB, most of it gguf-py's reader of the 250 MB file; loading the weights
    took 4.3 GB): the GGUF header alone (test_gguf.py: nothing converted). The peak is the process's own
    VmHWM: getrusage's ru_maxrss would also count the RSS of this pytest process, which it was forked from."""
    script = ("import re, sys; from eqlin.cli import main; code = main(['info', '-q']); "
              "print(1024 * int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))); "
              "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert run.returncode == EXIT_OK, run.stderr
    lines = run.stdout.strip().splitlines()
    assert any(re.fullmatch(r"parameters +268,098,176", line) for line in lines) and int(lines[-1]) < 2**30


def test_convert_round_trip(checkpoint, loaded, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(checkpoint("gemma3_multimodal")), str(dst), "-q"]) == EXIT_OK
    converted = eqlin.load(dst)
    ids = loaded("gemma3_multimodal").encode(TEXT)
    np.testing.assert_array_equal(converted.logits(ids), loaded("gemma3_multimodal").logits(ids))


def test_analyze_saves_the_jacobian_with_the_report(checkpoint, loaded, tmp_path, capsys):
    """--save-jacobian adds jacobian.safetensors to the report's set: the detached map bit for bit (affine
    here: the constant too) with its token strings and checkpoint; a rerun without it replaces the whole set."""
    from eqlin.persistence import saved_metadata

    out = tmp_path / "o"
    run = ["analyze", TEXT, "--model", str(checkpoint("qwen2")), "--out", str(out), "--layers", "none", "-q",
           "--no-compile-cache"]
    assert main([*run, "--save-jacobian"]) == EXIT_OK
    assert f"detached Jacobian: {out / 'jacobian.safetensors'}" in capsys.readouterr().out
    saved = eqlin.Linearization.load(out / "jacobian.safetensors")
    lin = eqlin.detached_jacobian(loaded("qwen2"), TEXT)
    for name in ("jacobian", "inputs", "output", "contributions", "relative_error", "ids", "constant"):
        np.testing.assert_array_equal(getattr(saved, name), getattr(lin, name), err_msg=name)
    meta = saved_metadata(out / "jacobian.safetensors")
    report = json.loads((out / "report.json").read_text())
    assert meta["model"]["checkpoint"] == report["model"]["checkpoint"] is not None
    assert meta["tokens"] == [t["text"] for t in report["tokens"]]
    assert main(run) == EXIT_OK
    assert not (out / "jacobian.safetensors").exists()
    err = _bad(["analyze", "--prompts", str(tmp_path / "p.txt"), "--save-jacobian"], capsys)
    assert "--save-jacobian saves one text's map; with --prompts, save maps from Python" in err


@pytest.mark.parametrize("args, message", [
    (["analyze", TEXT, "--dtype"], "argument --dtype: expected one argument"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate' (choose from"),
    (["analyze", TEXT, "--dtype", "float16"], "argument --dtype: invalid choice: 'float16' (choose from"),
    (["info", "--tokens", "many"], "argument --tokens: invalid int value: 'many'"),
])
def test_bad_usage_exits_2_with_the_usage(args, message, capsys):
    """argparse's own errors: exit code 2 (EXIT_BAD_INPUT), the usage line and what to change."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: eqlin") and message in err


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import eqlin.cli, eqlin.convert
    mode, src, dst = sys.argv[1:]
    real = eqlin.convert.write_safetensors

    def broken(*args, **kwargs):
        real(*args, **kwargs)  # a file is written, then the run is interrupted or fails before it is moved in place
        if mode == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python raises KeyboardInterrupt here
            signal.pause()
        raise RuntimeError("a bug in eqlin")

    eqlin.convert.write_safetensors = broken
    sys.exit(eqlin.cli.console_main(["convert", src, dst, "-q"]))
""")


@pytest.mark.parametrize("mode, code", [("interrupt", EXIT_INTERRUPTED), ("bug", EXIT_INTERNAL)])
def test_interrupt_exits_130_and_an_internal_error_1_leaving_nothing(mode, code, checkpoint, tmp_path):
    """In a fresh process, as the console script runs: Ctrl-C during convert exits 130 (EXIT_INTERRUPTED) and an
    unexpected exception 1 (EXIT_INTERNAL, with its traceback); neither leaves a destination or temporary files."""
    dst = tmp_path / "out" / "converted"
    run = subprocess.run([sys.executable, "-c", _CHILD, mode, str(checkpoint("llama_mha")), str(dst)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == code, run.stderr[-2000:]
    if mode == "interrupt":
        assert "eqlin: interrupted; outputs are written whole or not at all, nothing partial was left" in run.stderr
    else:
        assert "Traceback" in run.stderr and "RuntimeError: a bug in eqlin" in run.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("command", [[], ["analyze"], ["study"], ["info"], ["convert"], ["validate"]])
def test_help_is_clear(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: eqlin" in capsys.readouterr().out


def _bad(args: list[str], capsys) -> str:
    assert main([*args, "-q", "--no-compile-cache"]) == EXIT_BAD_INPUT
    return capsys.readouterr().err


def test_unknown_model_path(tmp_path, capsys):
    err = _bad(["analyze", TEXT, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert f"{tmp_path / 'nowhere'} does not exist; pass a checkpoint folder, a .gguf file or a repo id" in err


def test_a_missing_gguf_file_names_what_to_pass(tmp_path, capsys):
    err = _bad(["analyze", TEXT, "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")], capsys)
    assert (f"GGUF file not found: {tmp_path / 'missing.gguf'}; pass the path of an existing .gguf file, a checkpoint "
            "folder, or a repo id in the local Hugging Face cache (`hf download ORG/NAME` puts one there)") in err


@pytest.mark.parametrize("command", ["info", "analyze"])
@pytest.mark.parametrize("name, message", [
    ("model", "model is a FIFO (named pipe), not a checkpoint folder or a .gguf file; pass the folder holding "
              "config.json, a .gguf file or a repo id"),
    ("model.gguf", "model.gguf is a FIFO (named pipe), not a GGUF file; pass the path of an existing .gguf file"),
])
def test_a_model_that_is_a_fifo_is_refused_without_opening_it(tmp_path, capsys, command, name, message):
    """Opening a FIFO blocks until a writer comes: `--model FIFO` once hung forever. If it ever opens it again, a
    writer comes after 60 s and the test fails instead of hanging."""
    fifo = tmp_path / name
    os.mkfifo(fifo)

    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing is blocked
            pass

    watchdog = threading.Timer(60, unblock)
    watchdog.start()
    try:
        args = ["info", str(fifo)] if command == "info" else ["analyze", TEXT, "--model", str(fifo), "--out",
                                                              str(tmp_path / "o")]
        err = _bad(args, capsys)
    finally:
        watchdog.cancel()
    assert message in err and not (tmp_path / "o").exists()


def test_non_gguf_file_named_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 10)
    err = _bad(["analyze", TEXT, "--model", str(fake), "--out", str(tmp_path / "o")], capsys)
    assert f"eqlin: error: {fake} is not a GGUF file" in err
    assert "(a truncated download, or a different format renamed to .gguf?)" in err


def test_empty_text(tmp_path, capsys):
    err = _bad(["analyze", "  ", "--out", str(tmp_path / "o")], capsys)
    assert "empty text: give the text whose next-token prediction to analyse, e.g. \"The bridge out of Marin is the\"" \
        in err


def test_layers_out_of_range(checkpoint, tmp_path, capsys):
    """Checked against config.json before any weight is read (here there are none), nothing created."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(checkpoint("gemma3") / "config.json", folder)
    out = tmp_path / "o"
    err = _bad(["analyze", TEXT, "--model", str(folder), "--out", str(out), "--layers", "2,9"], capsys)
    assert "--layers '2,9' out of range: the model has layers 0..3" in err
    assert not out.exists()  # not even an empty folder


def test_unwritable_out(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _bad(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(blocker / "sub")], capsys)
    assert "cannot write to output folder" in err and "choose another --out" in err
    assert blocker.read_text() == ""


# --- bad input: exit 2 with a message naming the fix, checked before the model loads, nothing left ----------

CONCEPT = "The bridge out of Marin is the Golden"


@pytest.mark.parametrize("args, message", [
    (["analyze", TEXT, "--top-k", "100000"], "--top-k must be in 1..64"),
    (["analyze", TEXT, "--layers", ""], "--layers is empty: give 'auto', 'all', 'none' or comma-separated"),
    (["analyze", TEXT, "--layers", "-1"], "layer indices are 0-based and non-negative"),
    (["analyze", "abc\udcff def"], "text is not valid UTF-8 \\(an undecodable byte at character 3\\); pass UTF-8"),
    (["info", "--tokens", "-5"], "--tokens must be at least 1"),
    (["analyze", TEXT, "--analysis", "matrix-free", "--save-jacobian"],
     "--save-jacobian saves J, which --analysis matrix-free never builds; leave out one of them"),
    (["analyze", "--prompts", "p.txt", "--analysis", "matrix-free"],
     "--analysis matrix-free takes one text apart; a prompt set is analysed in full"),
    (["steer", "--concept", CONCEPT, "--text", TEXT, "--strengths", "nan,inf"], "--strengths must be finite numbers"),
    (["steer", "--concept", CONCEPT, "--text", TEXT, "--seed", "-1"], "--seed must be in 0..4294967295"),
    (["steer", "--concept", CONCEPT, "--text", TEXT, "--layers", "none"], "--layers none: give at least one layer"),
])
def test_bad_arguments_are_refused_before_the_model_is_found(tmp_path, capsys, args, message):
    """--model names nothing: the argument is refused first, and no --out folder is created."""
    out = tmp_path / "o"
    extra = ["--out", str(out)] if args[0] != "info" else []
    err = _bad([*args, *extra, "--model" if args[0] != "info" else str(tmp_path / "nowhere"),
                *([str(tmp_path / "nowhere")] if args[0] != "info" else [])], capsys)
    assert re.search(message, err), err
    assert not out.exists()


@pytest.fixture()
def config_only(checkpoint, tmp_path):
    """A copy of the tiny Gemma 3's config.json alone: whatever is checked against it is checked before any
    weight is read (there are none)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(checkpoint("gemma3") / "config.json", folder)
    return folder


@pytest.mark.parametrize("args, message", [
    (["steer", "--concept", CONCEPT, "--text", TEXT, "--max-new-tokens", "1000"],
     "--max-new-tokens 1000 does not fit the model's 64 positions"),
    (["info", "--tokens", "1000"], "--tokens 1000 is more than the model's max_position_embeddings (64)"),
])
def test_model_dependent_arguments_are_checked_before_the_weights(config_only, tmp_path, capsys, args, message):
    where = ["--model", str(config_only), "--out", str(tmp_path / "o")] if args[0] == "steer" else [str(config_only)]
    assert message in _bad([*args, *where], capsys)
    assert not (tmp_path / "o").exists()


def _edit_config(folder, edit) -> None:
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(edit(text) if callable(edit) else json.dumps({**json.loads(text), **edit}))


@pytest.mark.parametrize("edit, message", [
    ({"rms_norm_eps": float("nan")}, "config.json 'rms_norm_eps' must be a finite number > 0 .*got nan"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "'rope_theta' must be a finite number > 0"),
    ({"num_hidden_layers": "3"}, "'num_hidden_layers' must be an integer in 1..10000 .*got '3'"),
    ({"max_position_embeddings": "64"}, "'max_position_embeddings' must be an integer"),
    ({"rope_parameters": "default"}, "'rope_parameters' must be a JSON object"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 48}}, "type 'llama3' need 'low_freq_factor'"),
    ({"rope_skew": 0.1}, "keys eqlin does not know for llama: rope_skew=0.1"),
    ({"hidden_act": "swish2"}, "unsupported hidden_act 'swish2'; supported: silu"),
    ({"rope_parameters": {"rope_type": "ntk_by_parts", "rope_theta": 1e4}},
     "unsupported RoPE type 'ntk_by_parts'; supported: default, linear, llama3, longrope, yarn"),
    (lambda text: f"[{text}]", "config.json must hold a JSON object .*got a list"),
    (lambda text: "[" * 100_000, "config.json is nested too deeply"),
    (lambda text: text[:40], "config.json is not valid JSON"),
])
def test_bad_config_json(checkpoint, tmp_path, capsys, edit, message):
    folder = shutil.copytree(checkpoint("llama_gqa"), tmp_path / "m")
    _edit_config(folder, edit)
    assert re.search(message, _bad(["info", str(folder)], capsys))


def test_allow_key_loads_a_refused_key_and_the_report_records_it(checkpoint, tmp_path, capsys):
    """--allow-key KEY: the key the refusal names loads (info and analyze), and report.json's model section, the
    summary and report.html say it was allowed; a key config.json lacks is refused, naming it."""
    folder = shutil.copytree(checkpoint("qwen2"), tmp_path / "m")
    _edit_config(folder, {"lm_logit_shift": 0.0})
    assert "keys eqlin does not know for qwen2: lm_logit_shift=0.0" in _bad(["info", str(folder)], capsys)
    assert main(["info", str(folder), "--allow-key", "lm_logit_shift", "-q"]) == EXIT_OK
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["analyze", TEXT, "--model", str(folder), "--out", str(out), "--layers", "none", "--top-k", "2",
                 "--allow-key", "lm_logit_shift", "--no-compile-cache"]) == EXIT_OK
    assert json.loads((out / "report.json").read_text())["model"]["allowed_keys"] == ["lm_logit_shift"]
    said = "config keys allowed by the user (--allow-key): lm_logit_shift"
    assert said in capsys.readouterr().out and said in (out / "report.html").read_text()
    err = _bad(["info", str(folder), "--allow-key", "lm_logit_shift", "--allow-key", "rope_skew"], capsys)
    assert "allow_keys is for keys config.json has and eqlin refuses (its message names them); config.json has " \
           "no rope_skew" in err


@pytest.mark.parametrize("setting", ["abc", "nan", "inf"])
def test_bad_memory_limit_setting(tmp_path, capsys, monkeypatch, setting):
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", setting)
    err = _bad(["analyze", TEXT, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert f"EQLIN_MEMORY_LIMIT_GB='{setting}' is not a positive number of GiB" in err


def test_a_huge_memory_limit_setting_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", "1e308")  # was an OverflowError, exit 1
    err = _bad(["analyze", TEXT, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert "EQLIN_MEMORY_LIMIT_GB='1e308' is more than any machine has" in err and not (tmp_path / "o").exists()


def _console(args: list[str], **env: str | None) -> subprocess.CompletedProcess:
    """`python -m eqlin.cli ARGS` (the console script) in a fresh process, with `env` set (None: unset)."""
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "eqlin.cli", *args], capture_output=True, text=True, timeout=300,
                          env=environ)


def test_unwritable_compile_cache_is_said_not_fatal(checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    run = _console(["info", str(checkpoint("llama_mha")), "-q"], EQLIN_CACHE_DIR=str(tmp_path / "file" / "cache"),
                   EQLIN_NO_COMPILE_CACHE=None, JAX_COMPILATION_CACHE_DIR=None)
    assert run.returncode == EXIT_OK, run.stderr
    assert "JAX's compilation cache is off: cannot write" in run.stderr


def test_a_users_own_compile_cache_is_left_alone(checkpoint, tmp_path):
    """JAX reads $JAX_COMPILATION_CACHE_DIR itself (at import): the console script neither replaces it with its
    own folder nor creates that folder."""
    run = _console(["info", str(checkpoint("llama_mha")), "-q"], JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"),
                   EQLIN_CACHE_DIR=str(tmp_path / "eqlin-cache"), EQLIN_NO_COMPILE_CACHE=None)
    assert run.returncode == EXIT_OK, run.stderr
    assert not (tmp_path / "eqlin-cache").exists()


_GUEST = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax, jax.numpy as jnp
    import eqlin.cli, eqlin.convert
    checkpoint, out, dst = sys.argv[1:]
    KEYS = ("jax_enable_x64", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    state = lambda: ([getattr(jax.config, k) for k in KEYS], str(jnp.ones(2).dtype),
                     [str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)])
    before = state()
    code = eqlin.cli.main(["analyze", "the cat", "--model", checkpoint, "--layers", "none", "--out", out, "-q"])
    print("guest:", json.dumps({"code": code, "before": before, "after": state(),
                      "error": json.load(open(os.path.join(out, "report.json")))["relative_error"]}))
    real = eqlin.convert.write_safetensors

    def ctrl_c(*args, **kwargs):
        real(*args, **kwargs)  # a file is written, then Ctrl-C before the folder is moved in place
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("guest: not interrupted")

    eqlin.convert.write_safetensors = ctrl_c
    try:
        try:
            eqlin.cli.main(["convert", checkpoint, dst, "-q"])
        finally:
            print("guest: finally ran")
    except KeyboardInterrupt:
        print("guest: KeyboardInterrupt caught")
    print("guest:", json.dumps({"left": os.listdir(os.path.dirname(dst)), "after": state()}))
""")


def test_main_in_process_is_a_good_guest(checkpoint, tmp_path):
    """eqlin.cli.main() in a host process whose x64 mode is off: the float64 analysis is exact all the same,
    and JAX's config (x64, compilation cache folder, min compile time), the default dtype and the signal
    handlers are as the host left them; Ctrl-C during a command reaches the host's finally and except as
    KeyboardInterrupt (the host lives on) and leaves no output or temporary entry."""
    (tmp_path / "dst").mkdir()
    run = subprocess.run([sys.executable, "-c", _GUEST, str(checkpoint("llama_gqa")), str(tmp_path / "o"),
                          str(tmp_path / "dst" / "converted")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EQLIN_CACHE_DIR": str(tmp_path / "cache"), "JAX_ENABLE_X64": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line.removeprefix("guest: ") for line in run.stdout.splitlines() if line.startswith("guest: ")]
    analyzed, *host, interrupted = lines
    analyzed, interrupted = json.loads(analyzed), json.loads(interrupted)
    assert analyzed["code"] == EXIT_OK and analyzed["error"] <= 1e-14
    assert analyzed["before"][:2] == [[False, None, 1.0], "float32"]
    assert analyzed["after"] == analyzed["before"] == interrupted["after"]
    assert host == ["finally ran", "KeyboardInterrupt caught"]
    assert interrupted["left"] == [] and not (tmp_path / "cache" / "xla").exists()


def test_out_with_other_files_is_left_alone(checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _bad(["analyze", TEXT, "--model", str(checkpoint("qwen3")), "--out", str(out)], capsys)
    assert "is not empty and eqlin did not create it (it holds no .eqlin-output.json: notes.txt)" in err
    assert "choose an empty or new --out" in err and "earlier eqlin version" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command, name", [("analyze", "report.json"), ("steer", "steering.json")])
def test_a_folder_holding_a_report_eqlin_did_not_write_is_left_alone(checkpoint, tmp_path, capsys, command, name):
    """Issue 29, item 1: a folder holding a report.json (steer: a steering.json) and only .json, .html, .png and
    .safetensors files was taken for an earlier output and replaced whole: a user's results, or a whole
    checkpoint folder (no hint to delete it: it is not an earlier version's output by its names)."""
    results, model = tmp_path / "results", tmp_path / "model"
    results.mkdir()
    (results / name).write_text('{"accuracy": 0.93}')
    (results / "metrics.json").write_text('{"run": 42}')
    (results / "loss_curve.png").write_bytes(b"\x89PNG")
    shutil.copytree(checkpoint("qwen3"), model)
    (model / name).write_text('{"eval": 1}')
    args = (["analyze", TEXT] if command == "analyze" else ["steer", "--concept", "Golden", "--text", TEXT])
    for out in (results, model):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        err = _bad([*args, "--model", str(checkpoint("qwen3")), "--layers", "0", "--out", str(out)], capsys)
        assert f"output folder {out} is not empty and eqlin did not create it (it holds no {MARKER}: " in err
        assert "choose an empty or new --out.\n" in err and "earlier eqlin version" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("how", ["TEXT", "--text-file"])
def test_a_text_too_long_to_fit_is_refused_by_its_length(checkpoint, tmp_path, capsys, how):
    """Issue 29, item 12 (the bound: test_tokenizer.py): refused before it is tokenized, nothing written."""
    from eqlin.tokenizer import Tokenizer

    limit, _ = Tokenizer.from_folder(checkpoint("qwen3")).text_limit(64)
    (tmp_path / "t.txt").write_text("a" * (limit + 1))
    given = ["a" * (limit + 1)] if how == "TEXT" else ["--text-file", str(tmp_path / "t.txt")]
    err = _bad(["analyze", *given, "--model", str(checkpoint("qwen3")), "--out", str(tmp_path / "o")], capsys)
    assert f"eqlin: error: the text has {limit + 1:,} characters, more than any text that fits the model's 64 " in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", [".", ""])
def test_out_naming_the_current_folder_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch, out):
    """Issue 29, item 7: --out . and --out "" passed the checks, ran the whole analysis, then ValueError."""
    monkeypatch.chdir(tmp_path)
    for args in (["analyze", TEXT], ["analyze", "--prompts", str(checkpoint("qwen3") / "config.json")],
                 ["steer", "--concept", "Golden", "--text", TEXT]):
        err = _bad([*args, "--model", str(checkpoint("qwen3")), "--out", out], capsys)
        assert "--out '.' names no folder of its own (it is the current or a parent folder, which eqlin cannot " \
               "replace); give a new folder's name, e.g. --out eqlin-report" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model.GGUF", "model.Gguf"])
def test_a_gguf_name_in_any_case_is_read_as_gguf(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"not a gguf file" * 10)
    err = _bad(["info", str(tmp_path / name)], capsys)
    assert f"{name} is not a GGUF file" in err and "not a checkpoint folder" not in err


def test_repo_id_not_in_the_cache_names_a_fix_the_cli_can_use(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    err = _bad(["info", "tiny-org/not-there"], capsys)
    assert "download it first with `hf download tiny-org/not-there`" in err and "download=True" not in err


def test_a_rewrite_replaces_the_whole_report_or_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    """A --layers none run leaves no emergence.png of an earlier run; a disk-full rewrite leaves the earlier
    report whole (no new figure beside the old report.json) and no temporary entries; JSON is strict."""
    from eqlin import outputs

    out = tmp_path / "o"

    def run(*extra) -> int:
        return main(["analyze", TEXT, "--model", str(checkpoint("qwen3")), "--out", str(out), "-q",
                     "--no-compile-cache", *extra])

    assert run("--layers", "1") == EXIT_OK
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "emergence.png" in before
    json.loads(before["report.json"], parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    real = outputs.write_file_durable

    def disk_full(path, data):
        if path.name == "report.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    with monkeypatch.context() as m:
        m.setattr(outputs, "write_file_durable", disk_full)
        assert run("--layers", "none") == EXIT_BAD_INPUT
    assert "No space left on device; nothing was changed there; free space" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run("--layers", "none") == EXIT_OK
    assert "emergence.png" not in {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# A child that runs the console script (eqlin.cli.console_main) on a slow disk: each unlink takes 0.1 s (so removing a folder takes a while), and
# the step named by argv[1] prints "now" and sleeps 0.5 s first: fsync_dir of the new set's temporary folder (just
# before its swap) or the swap itself (outputs._exchange).
_SLOW_SWAP = """
import os, sys, time
from eqlin import cli, outputs
unlink, fsync_dir, exchange = os.unlink, outputs.fsync_dir, outputs._exchange
def slow_unlink(*a, **k):
    time.sleep(0.1)
    unlink(*a, **k)
def slow(real, *a):
    if sys.argv[1] == real.__name__ and ".eqlin-tmp-" in str(a[0]):
        print("now", flush=True)
        time.sleep(0.5)
    return real(*a)
os.unlink = slow_unlink
outputs.fsync_dir = lambda *a: slow(fsync_dir, *a)
outputs._exchange = lambda *a: slow(exchange, *a)
sys.exit(cli.console_main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where, kept", [("fsync_dir", "old"), ("_exchange", "new")])
def test_sigterm_at_the_final_swap_leaves_the_old_or_the_new_report_whole(checkpoint, tmp_path, where, kept):
    """Issue 29, item 2: `_stop` removed the temporary folder while the worker was swapping it into place; the
    removal went on inside the swapped-in folder and --out ended empty. Now a signal just before the swap keeps
    the old report, one during the swap waits for it and keeps the new one; either is whole, no debris."""
    out, texts = tmp_path / "o", {"old": "The old report", "new": "The new report"}
    args = ["analyze", "--model", str(checkpoint("qwen3")), "--layers", "none", "--out", str(out), "-q",
            "--no-compile-cache"]
    assert main([*args, texts["old"]]) == EXIT_OK
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SWAP, where, *args, texts["new"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "now\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_TERMINATED
    assert proc.stderr.read() == f"eqlin: stopping…\neqlin: {INTERRUPTED}\n"
    marker = json.loads((out / MARKER).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["files"]])
    assert json.loads((out / "report.json").read_text())["text"] == texts[kept]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_a_signal_stops_at_once_and_leaves_nothing(checkpoint, tmp_path, signum, code):
    """SIGTERM is handled like SIGINT: "stopping…" at once, the process ends without waiting for the running
    XLA computation, and no --out folder or temporary entry is left."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "eqlin.cli", "analyze", TEXT, "--model", str(checkpoint("gemma3")),
                             "--out", str(out), "--layers", "all", "--no-compile-cache"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "detached Jacobian" in line:  # compiling and running, in XLA
            break
    start = time.perf_counter()
    proc.send_signal(signum)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code
    assert time.perf_counter() - start < 5
    assert rest.startswith("eqlin: stopping…") and "nothing partial was left" in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == []

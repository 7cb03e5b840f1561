"""The `eqlin` command line end to end: analyze (tiny model, its predictions graded by transformers, and, once,
the embedded Gemma 3 270M in float64), info (its figures against hand computation and transformers' parameter
count), convert, help, and every exit code: 2 for bad input and bad usage (a message naming the fix, nothing
half-written), 1 for an internal error and 130 for an interrupt, in fresh processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import eqlin
from eqlin.analysis import SCHEMA
from eqlin.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, main
from eqlin.memory import estimate_jacobian_bytes
from tests.conftest import TEXT
from tests.fixtures import load_torch_model

REPORT_KEYS = {"schema", "next_token", "relative_error", "plain_relative_error", "model", "dtype", "tokens",
               "per_token", "layer_maps", "homogeneity_error", "logit", "top_predictions", "timings_s", "text"}


def test_analyze_on_a_tiny_model(tiny_report, checkpoint, capsys):
    code, out = tiny_report
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.png", "layers.png", "reconstruction.png",
                                                     "report.html", "report.json", "spectra.png"]
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
    total = sum(p["logit_contribution"] for p in report["per_token"])
    assert abs(total - report["logit"]["value"]) <= 1e-14 * abs(report["logit"]["value"])  # measured 4.9e-16
    # The prediction itself, graded by stock transformers (float32 inside: measured 2.6e-7 on the probabilities,
    # 2.9e-8 on the logit).
    ids = [t["id"] for t in report["tokens"]]
    with torch.no_grad():
        logits = load_torch_model(checkpoint("gemma3"))(input_ids=torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits, -1).numpy()
    top = np.argsort(-probs)[:len(report["top_predictions"])]
    assert [p["id"] for p in report["top_predictions"]] == top.tolist()
    np.testing.assert_allclose([p["probability"] for p in report["top_predictions"]], probs[top], rtol=2e-6)
    np.testing.assert_allclose(report["next_token"]["logit"], float(logits[top[0]]), rtol=5e-7)


def test_json_flag_prints_the_report(checkpoint, tmp_path, capsys):
    assert main(["analyze", TEXT, "--model", str(checkpoint("qwen3")), "--out", str(tmp_path), "--layers", "none",
                 "--json", "-q", "--no-compile-cache"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "report.json").read_text())
    assert printed["layer_maps"]["layers"] == [] and printed["tokens"][0]["text"] == "The"  # Qwen adds no BOS


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


def test_info(checkpoint, capsys):
    """The figures, not only the labels: parameters as transformers counts them, J's size by hand, the peak as
    eqlin.memory estimates it (and at least J itself)."""
    assert main(["info", str(checkpoint("llama_gqa")), "--tokens", "16", "-q", "--no-compile-cache"]) == EXIT_OK
    printed = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in printed.strip().splitlines())
    assert rows["family"] == "llama" and rows["dtype"] == "float64" and rows["tied embeddings"] == "False"
    assert rows["layers"] == "2" and rows["hidden size d"] == "64" and rows["heads (q / kv) x head_dim"] == "4 / 2 x 16"
    torch_model = load_torch_model(checkpoint("llama_gqa"))
    assert rows["parameters"] == f"{sum(p.numel() for p in torch_model.parameters()):,}"  # 174,272
    assert rows["J at T=16 (d x T x d)"] == "0.5 MiB"  # 64 · 16 · 64 float64 = 524,288 bytes
    peak = estimate_jacobian_bytes(eqlin.load(checkpoint("llama_gqa")).config, 16, itemsize=8)
    assert rows["peak for J at T=16"] == f"{peak / 2**30:,.2f} GiB (estimate)" and peak >= 64 * 16 * 64 * 8


def test_convert_round_trip(checkpoint, loaded, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(checkpoint("gemma3_multimodal")), str(dst), "-q"]) == EXIT_OK
    converted = eqlin.load(dst)
    ids = loaded("gemma3_multimodal").encode(TEXT)
    np.testing.assert_array_equal(converted.logits(ids), loaded("gemma3_multimodal").logits(ids))


@pytest.mark.parametrize("args, message", [
    (["analyze"], "the following arguments are required: TEXT"),
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
    sys.exit(eqlin.cli.main(["convert", src, dst, "-q"]))
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
        assert "eqlin: interrupted; files already written are complete, nothing partial was left" in run.stderr
    else:
        assert "Traceback" in run.stderr and "RuntimeError: a bug in eqlin" in run.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("command", [[], ["analyze"], ["info"], ["convert"]])
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
    out = tmp_path / "o"
    err = _bad(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(out), "--layers", "2,9"], capsys)
    assert "--layers '2,9' out of range: the model has layers 0..3" in err
    assert not any(p.is_file() for p in out.iterdir())  # nothing written


def test_unwritable_out(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _bad(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(blocker / "sub")], capsys)
    assert "cannot write to output folder" in err and "choose another --out" in err
    assert blocker.read_text() == ""

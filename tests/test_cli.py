"""The `eqlin` command line end to end: analyze (tiny model and, once, the embedded Gemma 3 270M in
float64), info, convert, help, and bad input (clear message, exit code 2, nothing half-written)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import eqlin
from eqlin.analysis import SCHEMA
from eqlin.cli import EXIT_BAD_INPUT, EXIT_OK, main
from tests.conftest import TEXT

REPORT_KEYS = {"schema", "next_token", "relative_error", "plain_relative_error", "model", "dtype", "tokens",
               "per_token", "layer_maps", "homogeneity_error", "logit", "top_predictions", "timings_s", "text"}


def test_analyze_on_a_tiny_model(tiny_report, capsys):
    code, out = tiny_report
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.png", "layers.png", "reconstruction.png",
                                                     "report.html", "report.json", "spectra.png"]
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["schema"] == SCHEMA
    assert report["dtype"] == "float64" and report["model"]["family"] == "gemma3"
    assert report["relative_error"] <= 1e-13 and report["plain_relative_error"] >= 1e-3
    assert report["homogeneity_error"] <= 1e-13 and report["logit"]["relative_error"] <= 1e-13
    assert [t["text"] for t in report["tokens"]][:2] == ["<bos>", "The"]
    assert report["next_token"]["id"] == report["top_predictions"][0]["id"]
    assert len(report["per_token"]) == len(report["tokens"]) and len(report["per_token"][0]["singular_values"]) == 3
    maps = report["layer_maps"]
    assert maps["layers"] == [0, 1, 2, 3]
    for part in ("residual", "attn", "mlp"):
        assert len(maps[part]["stable_rank"]) == 4 and max(maps[part]["relative_error"]) <= 1e-13
    total = sum(p["logit_contribution"] for p in report["per_token"])
    assert abs(total - report["logit"]["value"]) <= 1e-12 * abs(report["logit"]["value"])


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
    assert report["relative_error"] <= 1e-13 and report["plain_relative_error"] >= 1e-3
    assert report["model"]["family"] == "gemma3" and report["model"]["num_layers"] == 18
    assert "next token: ' only'" in out.stdout
    assert "load model" in out.stderr and "detached Jacobian" in out.stderr  # progress is shown
    assert any(p.name.startswith("gemma-3-270m") for p in (eqlin_cache_dir / "gguf").iterdir())
    assert any((eqlin_cache_dir / "xla").iterdir())


def test_info(checkpoint, capsys):
    assert main(["info", str(checkpoint("llama_gqa")), "--tokens", "16", "-q", "--no-compile-cache"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "family" in printed and "llama" in printed and "J at T=16 (d x T x d)" in printed


def test_convert_round_trip(checkpoint, loaded, tmp_path):
    dst = tmp_path / "converted"
    assert main(["convert", str(checkpoint("gemma3_multimodal")), str(dst), "-q"]) == EXIT_OK
    converted = eqlin.load(dst)
    ids = loaded("gemma3_multimodal").encode(TEXT)
    np.testing.assert_array_equal(converted.logits(ids), loaded("gemma3_multimodal").logits(ids))


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
    assert "eqlin: error:" in err and "GGUF" in err


def test_empty_text(tmp_path, capsys):
    err = _bad(["analyze", "  ", "--out", str(tmp_path / "o")], capsys)
    assert "empty text" in err


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

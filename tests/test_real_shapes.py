"""benchmarks/random_checkpoint.py and benchmarks/real_shapes_bench.py at tiny shapes: the real configs
shrunk (same families, keys and RoPE settings), written as sharded bf16 checkpoints that eqlin loads and
analyzes, and the benchmark run end to end (its `default` weights: eqlin.load without `weights=`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import chex
import ml_dtypes
import numpy as np
import pytest

import eqlin
from eqlin.cli import main
from eqlin.loading import open_weight_files

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from random_checkpoint import random_bf16_bits, write_checkpoint  # noqa: E402

REAL = {"llama": "llama-3.2-3b", "qwen3": "qwen3-8b", "gemma3_text": "gemma-3-12b-text"}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": 600}


def tiny_config(tmp_path: Path, name: str) -> Path:
    """The real config `name` at TINY's sizes, its special token ids moved into the small vocabulary."""
    cfg = json.loads((BENCHMARKS / "real_configs" / f"{name}.json").read_text()) | TINY
    cfg |= {key: cfg[key] % 64 + 512 for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in cfg}
    cfg |= {"max_window_layers": 3} if "max_window_layers" in cfg else {}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_real_configs_hold_the_published_shapes():
    configs = {p.stem: json.loads(p.read_text()) for p in (BENCHMARKS / "real_configs").glob("*.json")}
    shapes = {name: (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                     c["num_key_value_heads"], c["vocab_size"]) for name, c in configs.items()}
    assert shapes == {"llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256), "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256),
                      "qwen3-8b": (36, 4096, 12288, 32, 8, 151936), "qwen3-14b": (40, 5120, 17408, 40, 8, 151936),
                      "gemma-3-12b-text": (48, 3840, 15360, 16, 8, 262208)}


@pytest.mark.parametrize("std", [1 / 64, 1 / np.sqrt(14336), 0.3])
def test_random_bits_have_the_asked_scale(std):
    values = random_bf16_bits(np.random.default_rng(0), 200_000, std).view(ml_dtypes.bfloat16).astype(np.float64)
    assert np.isfinite(values).all()
    assert abs(values.std() / std - 1) < 0.01 and abs(values.mean()) < 0.01 * std


@pytest.mark.parametrize("family", sorted(REAL))
def test_a_written_checkpoint_is_sharded_bf16_and_eqlin_loads_it(tmp_path, family):
    out = tmp_path / "ckpt"
    made = write_checkpoint(tiny_config(tmp_path, REAL[family]), out, shard_gib=40_000 / 2**30)
    files = open_weight_files(out)
    assert made["shards"] > 1 and len({f.path for f in files.values()}) == made["shards"]
    assert {files[n].header[n][0] for n in files} == {np.dtype(ml_dtypes.bfloat16)}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == made["bytes"] == 2 * made["parameters"]
    assert not (tmp_path / "ckpt.partial").exists()
    model = eqlin.load(out)  # every tensor name and shape checked against the config
    chex.assert_equal(model.config.num_layers, 3)
    norms = np.asarray(model.params.layers.attn_in_norm)  # as stored: Gemma's (1 + w) keeps w near 0
    assert np.abs(norms - (0.0 if family == "gemma3_text" else 1.0)).max() <= 1 / 16


def test_eqlin_analyze_runs_on_a_written_checkpoint(tmp_path):
    """Gemma: the byte-level tokenizer with BOS, (1 + w) norms, sliding and full layers."""
    out = tmp_path / "ckpt"
    write_checkpoint(tiny_config(tmp_path, "gemma-3-12b-text"), out)
    code = main(["analyze", "The bridge out of Marin is the", "--model", str(out), "--out", str(tmp_path / "report"),
                 "--layers", "none", "-q", "--no-compile-cache"])
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["relative_error"] <= 1e-13, report["relative_error"]  # random weights of sane scale: no overflow


def test_a_written_checkpoint_refuses_an_existing_folder(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(SystemExit, match=f"{out} exists; remove it or choose another folder"):
        write_checkpoint(tiny_config(tmp_path, "llama-3.2-3b"), out)


def test_the_benchmark_runs_end_to_end_and_writes_json(tmp_path):
    out = tmp_path / "ckpt"
    write_checkpoint(tiny_config(tmp_path, "qwen3-8b"), out)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "real_shapes_bench.py"), str(out), "--tokens", "6",
                           "--k", "3", "--engines", "topk,full", "--weights", "default", "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("*-real-shapes-ckpt.json")
    data = json.loads(result.read_text())
    assert data["machine"]["float64_gemm_gflops"] > 0 and data["machine"]["cpu"]
    topk, full = data["cases"]
    assert (topk["engine"], full["engine"]) == ("topk", "full") and len(topk["singular_values"]) == 3
    for case in (topk, full):
        assert case["relative_error"] <= 1e-13 and case["peak_rss"] >= case["rss_after_load"] > 0, case
    assert f"results: {result}" in done.stdout


def test_the_writer_refuses_a_family_it_does_not_know(tmp_path):
    config = tmp_path / "phi3.json"
    config.write_text(json.dumps({"model_type": "phi3"}))
    with pytest.raises(SystemExit, match="model_type 'phi3' is not one of llama, qwen3, gemma3_text"):
        write_checkpoint(config, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_the_benchmark_refuses_an_unknown_engine_or_placement(tmp_path):
    for option, value in (("--engines", "topk,dense"), ("--weights", "stored,float16")):
        done = subprocess.run([sys.executable, str(BENCHMARKS / "real_shapes_bench.py"), str(tmp_path), option, value],
                              capture_output=True, text=True, timeout=60)
        allowed = "topk, full" if option == "--engines" else "default, stored, cast"
        assert done.returncode == 2 and f"{value}: choose from {allowed}" in done.stderr, done.stderr

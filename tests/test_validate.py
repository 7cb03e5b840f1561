"""`eqlin validate`: passes on every family's tiny checkpoint (text or ids), names the first layer that
differs when eqlin reads a checkpoint wrongly (exit 1), and refuses bad input before loading (exit 2), also
when PyTorch is missing."""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest

from eqlin.cli import EXIT_BAD_INPUT, EXIT_MISMATCH, EXIT_OK, main
from eqlin.validate import TOLERANCES
from tests.conftest import AFFINE_VARIANTS, CORE_VARIANTS, MORE_VARIANTS


def _rows(out: str) -> dict[str, list[float]]:
    """{check label: its relative differences} from the printed table."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"  (\S.*?)  +((?:\d\.\d\de[+-]\d\d  ?)+) *(ok|MISMATCH.*)$", line)
        if match:
            rows[match[1]] = [float(v) for v in match[2].split()]
    return rows


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + AFFINE_VARIANTS)
def test_every_family_passes(variant, checkpoint, capsys):
    assert main(["validate", "--model", str(checkpoint(variant)), "-q", "--no-compile-cache"]) == EXIT_OK
    out = capsys.readouterr().out
    rows = _rows(out)
    assert out.strip().endswith("checks within tolerance")
    stock = rows["logits vs stock transformers (float32 norms, RoPE, softmax)"][0]
    assert 0 < stock < TOLERANCES["float64"]["stock"]  # transformers' float32 intermediates show
    exact = [v for label, values in rows.items() if not label.startswith("logits vs stock") for v in values]
    assert len(exact) >= 3 * 2 + 4 and max(exact) <= 1e-14  # measured at most 2.7e-15 (phi3; J: the same)
    assert rows["detached J vs eqlin.detach of the plain forward"][0] <= 1e-14  # a second implementation of J


def test_token_ids_and_float32(checkpoint, capsys):
    folder = checkpoint("llama_gqa")
    assert main(["validate", "--model", str(folder), "--ids", "2,5,9,14", "--dtype", "float32", "-q",
                 "--no-compile-cache"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "input: ['<bos>'," in out and "dtype float32" in out
    assert max(v for values in _rows(out).values() for v in values) <= TOLERANCES["float32"]["faithful"]


def test_a_checkpoint_read_wrongly_fails_naming_the_first_layer(checkpoint, capsys, monkeypatch):
    """eqlin made to read layer 1's MLP down-projection wrongly (one weight changed by 1e-6 of its size): exit 1,
    naming layer 1's MLP as the first difference; layer 0 still agrees."""
    from eqlin import model as eqlin_model

    load_params = eqlin_model.load_params

    def altered(*args, **kwargs):
        params = load_params(*args, **kwargs)
        down = params.layers.down_proj
        return dataclasses.replace(params, layers=dataclasses.replace(
            params.layers, down_proj=down.at[1, 0, 0].add(1e-6 * float(np.abs(down[1]).max()))))

    monkeypatch.setattr(eqlin_model, "load_params", altered)
    assert main(["validate", "--model", str(checkpoint("qwen3")), "-q", "--no-compile-cache"]) == EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "the first that differs: layer 1 (mlp)" in out
    assert re.search(r"layer 0 \(attn, mlp, residual\) .* ok", out)
    assert re.search(r"layer 1 \(attn, mlp, residual\) .* MISMATCH: mlp, residual", out)


def _bad(args: list[str], capsys) -> str:
    assert main(["validate", *args, "-q", "--no-compile-cache"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("eqlin: error: ") and "Traceback" not in err
    return err


def test_bad_input_is_refused_before_the_weights(checkpoint, tmp_path, capsys, monkeypatch):
    folder = checkpoint("llama_gqa")
    assert "give the input as --text or as --ids, not both" in _bad(["--text", "a", "--ids", "1"], capsys)
    assert "--ids must be comma-separated token ids, e.g. 2,651,9565, got 'a,b'" in _bad(["--ids", "a,b"], capsys)
    assert "--ids is empty" in _bad(["--ids", ","], capsys)
    assert "empty --text" in _bad(["--text", " "], capsys)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(folder / "config.json", config_only)
    assert "token ids outside the vocabulary [0, 96): [96]" in _bad(["--model", str(config_only), "--ids", "2,96"],
                                                                   capsys)
    assert "has no tokenizer.json to encode --text with; give token ids: --ids 1,2,3" in _bad(
        ["--model", str(config_only)], capsys)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    assert 'torch is not installed: pip install "eqlin[torch]"' in _bad(["--model", str(folder)], capsys)


@pytest.mark.slow
def test_the_embedded_model_passes(capsys):
    """Gemma 3 270M, 8 tokens: measured 2.0e-7 from stock transformers, at most 5.8e-15 in every other check
    (J: 4.8e-15)."""
    assert main(["validate", "-q"]) == EXIT_OK
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 18 + 6 and 0 < rows["logits vs stock transformers (float32 norms, RoPE, softmax)"][0] < 1e-5
    assert max(v for label, values in rows.items() if not label.startswith("logits vs stock") for v in values) <= 5e-14

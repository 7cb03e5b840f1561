"""Concept steering: where the map comes from (checked against PyTorch: the Jacobian of transformers' hidden state
entering the layer; where it goes in: tests/test_generation.py), strength 0 is the unsteered run, bad input, the
sweep and the CLI, and once on the embedded Gemma 3 270M: the concept lifts its token above the baseline and above
random controls of the same norm, in every cell and for several control seeds."""

from __future__ import annotations

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from eqlin.cli import EXIT_BAD_INPUT, EXIT_OK, main
from eqlin.decoder import embed, forward, layer_slice, run_layers
from eqlin.outputs import MARKER
from eqlin.steering import concept_maps, steer, steering_sweep
from eqlin.steering_report import summary
from eqlin import reference as ref
from tests.conftest import VS_TORCH, relative

CONCEPT = "The bridge out of Marin is the Golden"
TEXT = "the cat sees the red boat on the old bridge and the"  # longer than the concept (T_c = 9)


def test_concept_map_is_the_stream_entering_the_layer(loaded, reference):
    model = loaded("gemma3")
    p, c = model.params, model.config
    ids = model.encode(CONCEPT)
    x = embed(p, c, jnp.asarray(ids))
    J, h = concept_maps(p, c, x, layers=(0, 2, 3))
    for i, l in enumerate((0, 2, 3)):  # transformers' hidden_states[l] at the last position, and its Jacobian
        J_torch, h_torch = ref.stream_entering(reference("gemma3"), torch.tensor(ids), l)
        assert relative(J[i], J_torch) <= VS_TORCH and relative(h[i], h_torch) <= VS_TORCH, l
    chex.assert_shape(J, (3, c.hidden_size, x.shape[0], c.hidden_size))
    np.testing.assert_array_equal(J[0, :, -1], np.eye(c.hidden_size))  # layer 0: identity on the last embedding
    np.testing.assert_array_equal(J[0, :, :-1], 0)
    for i, l in enumerate((0, 2, 3)):  # h: raw residual entering layer l (output of l-1, no final norm)
        want = run_layers(layer_slice(p.layers, 0, l), c, x, detach=False)[0][-1] if l else x[-1]
        np.testing.assert_allclose(h[i], want, rtol=1e-14, atol=1e-14)  # measured 0
        assert relative(jnp.einsum("ots,ts->o", J[i], x), h[i]) <= 1e-14  # measured at most 8.3e-16


def test_strength_zero_is_the_unsteered_greedy_run(loaded):
    model = loaded("llama_gqa")
    r = steer(model, CONCEPT, TEXT, layer=1, strength=0.0, max_new_tokens=5)
    np.testing.assert_array_equal(r.steered_ids, r.baseline_ids)
    np.testing.assert_array_equal(r.steered_logits, r.baseline_logits)
    assert r.logprob_lift == 0.0
    ids = list(model.encode(TEXT))  # naive unsteered greedy decoding with the plain forward
    for step in range(5):
        logits = np.asarray(forward(model.params, model.config, embed(model.params, model.config,
                                                                      jnp.asarray(ids))).logits[-1])
        np.testing.assert_allclose(r.baseline_logits[step], logits, rtol=0, atol=5e-14)  # measured <= 8.9e-15
        ids.append(int(np.argmax(logits)))
    np.testing.assert_array_equal(r.baseline_ids, ids[-5:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(concept=" ", text=TEXT, layer=0), 'empty concept: give the concept prompt, e.g. "The bridge out of Marin'),
    (dict(concept=CONCEPT, text="", layer=0), 'empty text: give the unrelated text to steer, e.g. "Here is a painting'),
    (dict(concept=CONCEPT, text=TEXT, layer=4),
     r"layer \[4\] out of range: steering injects into the residual stream entering layer l, l in 0\.\.3"),
    (dict(concept=CONCEPT, text=TEXT, layer=-1), r"layer \[-1\] out of range: .* l in 0\.\.3"),
    (dict(concept=CONCEPT, text=TEXT, layer=0, max_new_tokens=-2), "max_new_tokens must be at least 1, got -2"),
    (dict(concept=CONCEPT, text=TEXT, layer=0, max_new_tokens=100),
     r"the text's 13 tokens and max_new_tokens=100 make 113 positions, more than the model's "
     r"max_position_embeddings \(64\); use max_new_tokens \(--max-new-tokens\) of at most 51"),
    (dict(concept=CONCEPT, text=TEXT, layer=0, concept_tokens=[10**6]),
     r"token ids outside the vocabulary \[0, 96\): \[1000000\]"),
])
def test_bad_input(loaded, kwargs, message):
    with pytest.raises(eqlin.InputError, match=message):
        steer(loaded("gemma3"), strength=1.0, **kwargs)


def test_sweep_and_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "steer"

    def cli(concept=CONCEPT, layers="0,2", max_new="4", *extra):
        return main(["steer", "--concept", concept, "--text", TEXT, "--model", str(checkpoint("gemma3")),
                     "--layers", layers, "--strengths", "1,4", "--max-new-tokens", max_new, "--out", str(out), "-q",
                     "--no-compile-cache", *extra])

    assert cli(CONCEPT, "0,2", "4", "--json") == EXIT_OK
    table = json.loads(capsys.readouterr().out)
    assert table == json.loads((out / "steering.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "steering.json", "steering.png"]
    assert table["layers"] == [0, 2] and table["strengths"] == [1.0, 4.0]
    assert np.shape(table["lift"]) == np.shape(table["control_lift"]) == (2, 2) and len(table["cells"]) == 4
    assert table["concept_tokens"][0]["text"] == "Golden" and max(table["map_relative_error"]) <= 1e-14
    printed = summary(table, out)  # both continuations of every cell
    assert all(repr(c["steered_text"]) in printed and repr(c["control_text"]) in printed for c in table["cells"])
    assert cli(" ") == EXIT_BAD_INPUT
    assert "empty --concept" in capsys.readouterr().err
    assert cli(CONCEPT, "0", "-1") == EXIT_BAD_INPUT
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert cli(CONCEPT, "9") == EXIT_BAD_INPUT
    assert "out of range" in capsys.readouterr().err


def test_concept_lifts_its_token_on_the_embedded_model():
    """Gemma 3 270M (float32 for speed), layer 6, 8 new tokens: every strength lifts log p(" Golden") well above
    the baseline (measured +3.97 and +4.36 nats) and above the random control of the same Frobenius norm for each
    of three control seeds (measured controls -3.3 to -30)."""
    from eqlin.gguf import default_model_path

    model = eqlin.load(default_model_path(), dtype="float32")
    tables = [steering_sweep(model, CONCEPT, "Here is a painting of the", layers=[6], strengths=[0.5, 1.0],
                             max_new_tokens=8, seed=seed) for seed in (0, 1, 2)]
    assert [t["text"] for t in tables[0]["concept_tokens"]] == [" Golden"]
    for table in tables:
        assert table["lift"] == tables[0]["lift"]  # the steered runs do not depend on the control's seed
        for cell in table["cells"]:
            assert cell["lift"] > 2 and cell["lift"] > cell["control_lift"] + 2, table["cells"]
        assert max(table["map_relative_error"]) <= 2e-6  # float32: measured 5.1e-7


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer=0, strength=float("nan")), "strength must be a finite number"),
    (dict(layer=True, strength=1.0), "layers must be a sequence of layer indices"),
    (dict(layer=0, strength=1.0, max_new_tokens=2.5), "max_new_tokens must be at least 1, got 2.5"),
    (dict(layer=0, strength=1.0, max_new_tokens=60),
     r"make \d+ positions, more than the model's max_position_embeddings \(64\); use max_new_tokens "
     r"\(--max-new-tokens\) of at most \d+"),
])
def test_bad_numbers_are_refused(loaded, kwargs, message):
    with pytest.raises(eqlin.InputError, match=message):
        steer(loaded("gemma3"), CONCEPT, TEXT, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strengths=[1.0, float("inf")]), "each strength must be a finite number"),
    (dict(strengths="1,2"), "give at least one strength"),
    (dict(strengths=[1.0], seed=-1), r"seed must be an integer in 0..4294967295"),
])
def test_bad_sweep_arguments(loaded, kwargs, message):
    with pytest.raises(eqlin.InputError, match=message):
        steering_sweep(loaded("gemma3"), CONCEPT, TEXT, layers=[0], max_new_tokens=2, **kwargs)

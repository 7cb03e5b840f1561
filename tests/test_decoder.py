"""The pure JAX decoder equals transformers: stock at float32 level, float64-faithful at <= 1e-10,
block by block (embeddings, every layer's residual stream, final hidden state, logits); longrope below and
above its original context."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from tests import torch_reference as ref
from tests.conftest import AFFINE_VARIANTS, CORE_VARIANTS, LONGROPE_TEXTS, MORE_VARIANTS, TEXT, relative
from tests.fixtures import load_torch_model

LONG_TEXT = TEXT + " . the fog goes over the bay and the red bridge"  # > the 4-token sliding window


def _torch_run(folder, ids: np.ndarray, *, faithful: bool):
    """(embeddings (T, d), per-layer hidden states (L, T, d), logits (T, V)) from transformers in float64."""
    model = load_torch_model(folder)
    if faithful:
        ref.make_float64_faithful(model)
    t_ids = torch.tensor(ids)[None]
    with torch.no_grad():
        out = model(input_ids=t_ids, output_hidden_states=True, use_cache=False)
    hidden = [h[0].numpy() for h in out.hidden_states]
    return hidden[0], np.stack(hidden[1:-1]), out.logits[0].numpy()


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + AFFINE_VARIANTS)
def test_logits_match_stock_transformers(variant, checkpoint, loaded):
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    _, _, logits = _torch_run(checkpoint(variant), ids, faithful=False)
    assert relative(model.logits(ids), logits) < 2e-6  # stock computes norms, RoPE, softmax in float32


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + AFFINE_VARIANTS)
def test_every_block_matches_float64_faithful_transformers(variant, checkpoint, loaded):
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    emb, layers, logits = _torch_run(checkpoint(variant), ids, faithful=True)
    out = model.forward(ids, collect=True)
    assert relative(model.embed(ids), emb) < 1e-14
    # transformers' hidden_states: the residual stream after each layer but the last, then the final norm.
    for layer in range(model.config.num_layers - 1):
        assert relative(out.residuals[layer], layers[layer]) < 1e-12, f"layer {layer}"
    assert relative(out.logits, logits) < 1e-12


@pytest.mark.parametrize("text", LONGROPE_TEXTS, ids=["short", "long"])
def test_longrope_matches_transformers_below_and_above_the_original_context(text, checkpoint, loaded):
    """Phi-3.5 / Phi-4-mini longrope: 9 tokens (<= original_max_position_embeddings = 16) take the short
    factors, 20 tokens the long ones, as transformers chooses; both with the attention factor on cos/sin.
    The choice matters: the other factors give other logits."""
    model = loaded("phi3_longrope")
    spec = model.config.rope_full
    ids = model.encode(text)
    assert spec.uses_long(len(ids)) == (len(ids) > 16) == (text == LONGROPE_TEXTS[1])
    _, _, stock = _torch_run(checkpoint("phi3_longrope"), ids, faithful=False)
    assert relative(model.logits(ids), stock) < 2e-6
    emb, layers, logits = _torch_run(checkpoint("phi3_longrope"), ids, faithful=True)
    out = model.forward(ids, collect=True)
    assert relative(out.residuals[0], layers[0]) < 1e-12
    assert relative(out.logits, logits) < 1e-12
    if len(ids) > 16:  # the choice matters: the short factors give other logits
        other = dataclasses.replace(spec, original_max_position_embeddings=64)
        swapped = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_full=other,
                                                                        rope_sliding=other))
        assert relative(swapped.logits(ids), logits) > 1e-3


def test_longrope_rows_follow_the_sequence_they_belong_to(loaded):
    """With a traced context (a ragged prompt's length, or a KV-cached generation's prompt length), row k
    takes the long factors when max(context, k + 1) > original_max_position_embeddings (16)."""
    from eqlin.decoder import rope_stack

    config = loaded("phi3_longrope").config
    cos, sin = jax.jit(lambda n: rope_stack(config, 24, jnp.float64, context=n))(9)
    short, long = rope_stack(config, 16, jnp.float64), rope_stack(config, 24, jnp.float64)
    for got, s, l in zip((cos, sin), short, long):
        np.testing.assert_array_equal(got[:, :16], s)
        np.testing.assert_array_equal(got[:, 16:], l[:, 16:])
    assert np.abs(np.asarray(short[0]) - np.asarray(long[0][:, :16])).max() > 0.1
    np.testing.assert_array_equal(jax.jit(lambda n: rope_stack(config, 24, jnp.float64, context=n))(20)[0], long[0])


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + AFFINE_VARIANTS)
def test_detach_changes_no_value(variant, loaded):
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    plain, detached = model.forward(ids, collect=True), model.forward(ids, detach=True, collect=True)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(detached)):
        np.testing.assert_array_equal(a, b)


def test_branches_add_up_to_the_residual_stream(loaded):
    model = loaded("gemma3")
    out = model.forward(model.encode(TEXT), collect=True)
    before = jnp.concatenate([model.embed(model.encode(TEXT))[None], out.residuals[:-1]])
    np.testing.assert_allclose(before + out.attn_outputs + out.mlp_outputs, out.residuals, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", ["gemma3", "mistral"])
def test_sliding_window_is_applied(variant, loaded):
    """With T longer than the window, removing the window changes the output (and stays causal)."""
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    assert len(ids) > model.config.sliding_window
    unwindowed = dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=10_000))
    assert relative(unwindowed.logits(ids)[-1], model.logits(ids)[-1]) > 1e-3
    w = model.config.sliding_window
    np.testing.assert_array_equal(unwindowed.logits(ids)[:w], model.logits(ids)[:w])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 0.1)])
def test_lower_precisions_run_and_stay_close(dtype, tol, checkpoint, loaded):
    variant = "gemma3"
    reference = loaded(variant)
    model = eqlin.load(checkpoint(variant), dtype=dtype)
    assert model.dtype == jnp.dtype(dtype)
    ids = reference.encode(LONG_TEXT)
    logits = model.logits(ids)
    assert logits.dtype == jnp.dtype(dtype)
    assert relative(logits, reference.logits(ids)) < tol


def test_pure_forward_under_jit_vmap_grad(loaded):
    model = loaded("qwen3")
    x = model.embed(model.encode(TEXT))
    f = jax.jit(lambda x: eqlin.forward(model.params, model.config, x).logits[-1].sum())
    batched = jax.vmap(lambda x: eqlin.final_hidden(model.params, model.config, x))(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(batched[0], eqlin.final_hidden(model.params, model.config, x), rtol=1e-14)
    g = jax.grad(f)(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))

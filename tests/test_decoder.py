"""The pure JAX decoder equals transformers: stock at float32 level, float64-faithful to float64 rounding, block
by block (embeddings; every layer's attention branch, MLP branch and residual stream, hooked off transformers' own
modules; logits); sliding windows and softcapping are applied; longrope below and above its original context; YaRN beyond it;
jit, vmap and grad work (grad against PyTorch's)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from eqlin.blocks import attention_mask, attention_probs
from eqlin import reference as ref
from tests.conftest import AFFINE_VARIANTS, CORE_VARIANTS, LONGROPE_TEXTS, MORE_VARIANTS, OPTION_VARIANTS, TEXT, relative
from tests.fixtures import ATTN_SOFTCAP, FINAL_SOFTCAP

ALL_VARIANTS = CORE_VARIANTS + MORE_VARIANTS + OPTION_VARIANTS + AFFINE_VARIANTS

LONG_TEXT = TEXT + " . the fog goes over the bay and the red bridge"  # > the 4-token sliding window


def _torch_run(folder, ids: np.ndarray, *, faithful: bool):
    """(embeddings (T, d), every layer's {"residual", "attn", "mlp"} (L, T, d), logits (T, V)) from transformers in
    float64; the layer outputs are hooked off its own modules (eqlin/reference.py, `layer_outputs`)."""
    model = ref.load_transformers(folder)
    if faithful:
        ref.make_float64_faithful(model)
    t_ids = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=t_ids[None], use_cache=False).logits[0].numpy()
        emb = ref.embed(model, t_ids)
        layers = {k: v.numpy() for k, v in ref.layer_outputs(model, emb).items()}
    return emb.numpy(), layers, logits


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_logits_match_stock_transformers(variant, checkpoint, loaded):
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    _, _, logits = _torch_run(checkpoint(variant), ids, faithful=False)
    # stock transformers computes norms, RoPE and softmax in float32: measured 1.8e-7 to 3.5e-7
    assert relative(model.logits(ids), logits) < 2e-6


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_block_matches_float64_faithful_transformers(variant, checkpoint, loaded):
    """Which branch is attention and which the MLP is pinned down by transformers' modules, not by their sum."""
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    emb, layers, logits = _torch_run(checkpoint(variant), ids, faithful=True)
    out = model.forward(ids, collect=True)
    assert relative(model.embed(ids), emb) < 1e-15  # measured 0 (a row lookup, times √d for Gemma)
    ours = {"residual": out.residuals, "attn": out.attn_outputs, "mlp": out.mlp_outputs}
    for layer in range(model.config.num_layers):  # measured at most 2.2e-15 (llama_gqa)
        for part, values in ours.items():
            assert relative(values[layer], layers[part][layer]) < 1e-14, (part, layer)
    assert relative(out.logits, logits) < 1e-14  # measured at most 2.2e-15


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
    assert relative(out.residuals, layers["residual"]) < 1e-12
    assert relative(out.logits, logits) < 1e-12
    if len(ids) > 16:  # the choice matters: the short factors give other logits
        other = dataclasses.replace(spec, original_max_position_embeddings=64)
        swapped = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_full=other,
                                                                        rope_sliding=other))
        assert relative(swapped.logits(ids), logits) > 1e-3


def test_yarn_matches_transformers_beyond_the_original_context(checkpoint, loaded):
    """DeepSeek-R1-0528-Qwen3-8B's YaRN layout (original context shrunk to 16) on 20 tokens: transformers' stock
    logits at float32 level, its float64-faithful blocks to float64 rounding; the attention factor on cos/sin
    matters (without it, other logits)."""
    model = loaded("qwen3_yarn")
    ids = model.encode(LONGROPE_TEXTS[1])
    assert len(ids) > model.config.rope_full.original_max_position_embeddings
    _, _, stock = _torch_run(checkpoint("qwen3_yarn"), ids, faithful=False)
    assert relative(model.logits(ids), stock) < 2e-6
    _, layers, logits = _torch_run(checkpoint("qwen3_yarn"), ids, faithful=True)
    out = model.forward(ids, collect=True)
    for part, values in {"residual": out.residuals, "attn": out.attn_outputs, "mlp": out.mlp_outputs}.items():
        assert relative(values, layers[part]) < 1e-14, part
    assert relative(out.logits, logits) < 1e-14
    unscaled = dataclasses.replace(model.config.rope_full, attention_factor=1.0)
    other = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_full=unscaled,
                                                                  rope_sliding=unscaled))
    assert relative(other.logits(ids), logits) > 1e-3


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


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_detach_changes_no_value(variant, loaded):
    model = loaded(variant)
    ids = model.encode(LONG_TEXT)
    plain, detached = model.forward(ids, collect=True), model.forward(ids, detach=True, collect=True)
    chex.assert_trees_all_equal(plain, detached)


def test_branches_add_up_to_the_residual_stream(loaded):
    model = loaded("gemma3")
    out = model.forward(model.encode(TEXT), collect=True)
    before = jnp.concatenate([model.embed(model.encode(TEXT))[None], out.residuals[:-1]])
    # measured 0 (the layer adds exactly these, in this order); a few ulps of the stream allowed for another order
    np.testing.assert_allclose(before + out.attn_outputs + out.mlp_outputs, out.residuals, rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant, windows", [("gemma3", [4, 4, 0, 4]), ("mistral", [4, 4]), ("phi3_sliding", [4, 4]),
                                              ("qwen3_sliding", [0, 4])])
def test_sliding_window_is_applied(variant, windows, loaded, reference):
    """The layers transformers' config makes sliding (Qwen 3: use_sliding_window from max_window_layers on; Phi-3:
    every layer) slide in eqlin too; with T longer than the window, removing it changes the output (and stays
    causal)."""
    model = loaded(variant)
    torch_config = ref.decoder(reference(variant)).config
    torch_types = getattr(torch_config, "layer_types", None) or ["sliding_attention"] * torch_config.num_hidden_layers
    assert list(model.config.layer_types) == torch_types
    assert model.config.layer_windows().tolist() == windows
    ids = model.encode(LONG_TEXT)
    assert len(ids) > model.config.sliding_window == torch_config.sliding_window
    unwindowed = dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=10_000))
    assert relative(unwindowed.logits(ids)[-1], model.logits(ids)[-1]) > 1e-3
    w = model.config.sliding_window
    np.testing.assert_array_equal(unwindowed.logits(ids)[:w], model.logits(ids)[:w])


def test_softcapping_follows_transformers(loaded):
    """gemma3_softcap sets both softcaps. transformers' Gemma 3 applies the final one (graded against stock
    transformers above) and ignores the attention one, and so does eqlin; the final cap bends only the logits."""
    model = loaded("gemma3_softcap")
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (None, FINAL_SOFTCAP)
    x = model.embed(model.encode(LONG_TEXT))
    out = eqlin.forward(model.params, model.config, x)
    uncapped = eqlin.forward(model.params, dataclasses.replace(model.config, final_logit_softcapping=None), x)
    np.testing.assert_array_equal(uncapped.hidden, out.hidden)
    assert relative(uncapped.logits, out.logits) > 1e-3
    capped = np.tanh(uncapped.logits / FINAL_SOFTCAP) * FINAL_SOFTCAP
    np.testing.assert_allclose(out.logits, capped, rtol=3e-15)  # measured 4.4e-16


def test_attention_softcap_block_is_the_closed_form(loaded):
    """The attention-logit softcap of `attention_probs` (for a config that sets one by hand): softmax over the
    visible keys of cap·tanh(q·k·s / cap), written out in NumPy."""
    config = dataclasses.replace(loaded("gemma3").config, attn_logit_softcapping=ATTN_SOFTCAP)
    rng = np.random.default_rng(0)
    T, H, K, hd = 6, config.num_heads, config.num_kv_heads, config.head_dim
    q, k = 2 * rng.normal(size=(T, H, hd)), 2 * rng.normal(size=(T, K, hd))
    mask = np.asarray(attention_mask(T, jnp.asarray(3)))
    probs = np.asarray(attention_probs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(mask), config))  # (K, G, T, S)
    G = H // K
    for h in range(H):
        scores = q[:, h] @ k[:, h // G].T * config.query_scale
        capped = np.where(mask, np.tanh(scores / ATTN_SOFTCAP) * ATTN_SOFTCAP, -np.inf)
        expected = np.exp(capped - capped.max(-1, keepdims=True))
        np.testing.assert_allclose(probs[h // G, h % G], expected / expected.sum(-1, keepdims=True), rtol=1e-14,
                                   atol=1e-15)  # measured 1.7e-16 absolute


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 5e-2)])  # measured 4.0e-7, 1.5e-2
def test_lower_precisions_run_and_stay_close(dtype, tol, checkpoint, loaded):
    variant = "gemma3"
    reference = loaded(variant)
    model = eqlin.load(checkpoint(variant), dtype=dtype)
    assert model.dtype == jnp.dtype(dtype)
    ids = reference.encode(LONG_TEXT)
    logits = model.logits(ids)
    assert logits.dtype == jnp.dtype(dtype)
    assert relative(logits, reference.logits(ids)) < tol


def test_pure_forward_under_jit_vmap_grad(loaded, reference):
    """Every batch member of a vmap equals its own unbatched run; jax.grad equals PyTorch's autograd gradient of
    the same scalar (float64-faithful transformers, not detached)."""
    model = loaded("qwen3")
    ids = model.encode(TEXT)
    x = model.embed(ids)
    f = jax.jit(lambda x: eqlin.forward(model.params, model.config, x).logits[-1].sum())
    inputs = jnp.stack([x, 2 * x, x[::-1]])
    batched = jax.vmap(lambda x: eqlin.final_hidden(model.params, model.config, x))(inputs)
    for member, one in zip(batched, inputs):  # measured 0: bit for bit
        np.testing.assert_allclose(member, eqlin.final_hidden(model.params, model.config, one), rtol=1e-14, atol=0)
    torch_model = reference("qwen3", detached=False)
    xt = ref.embed(torch_model, torch.tensor(ids)).detach().requires_grad_(True)
    torch_model(inputs_embeds=xt[None], use_cache=False).logits[0, -1].sum().backward()
    assert relative(jax.grad(f)(x), xt.grad.numpy()) < 2e-14  # measured 4.2e-15

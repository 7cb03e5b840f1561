"""The layer story (`eqlin.layer_story`): every layer map's spectrum from its Gram matrix equals the dense
SVD of the same map built by `detached_jacobian` (itself graded against PyTorch in test_linear_maps), for
both cumulative engines, both scopes and every part; the logit lens matches a direct computation; memory
and bad arguments are refused with messages that name the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqlin
from eqlin.analysis import auto_layers
from eqlin.layer_story import layer_map_flops, layer_spectra
from eqlin.selection import PARTS, SCOPES
from tests.conftest import TEXT

EXACT = 1e-13
K = 4


@pytest.fixture(scope="module")
def dense(loaded):
    """dense(variant, scope, part, tap) -> (Linearization, Spectrum): the dense SVD of every layer's map,
    computed once per module."""
    made = {}

    def get(variant, scope, part, tap="post"):
        key = (variant, scope, part, tap)
        if key not in made:
            lin = eqlin.detached_jacobian(loaded(variant), TEXT, layer="all", part=part, scope=scope, tap=tap)
            made[key] = lin, eqlin.spectrum(lin, per_token=False)
        return made[key]

    return get


@pytest.mark.parametrize("variant, engine, groups", [
    ("gemma3", "fwd", 1), ("gemma3", "fwd", 3), ("gemma3", "rev", None), ("llama_gqa", "fwd", 2),
    ("qwen3", "rev", None), ("mistral", "fwd", 4), ("phi3", "rev", None), ("olmo2", "fwd", 1)])
def test_gram_spectra_equal_the_dense_svd(variant, engine, groups, loaded, dense):
    """Forward engine with 1 to 4 causal position groups (Gemma 3 and Mistral: sliding windows of 4
    against 10 tokens, so held prefixes cross window edges), reverse engine, both scopes, three parts."""
    model = loaded(variant)
    story = layer_spectra(model, TEXT, k=K, engine=engine, groups=groups)
    assert story.layers == tuple(range(model.config.num_layers))
    assert story.engines == {"cumulative": engine, "single": "rev"}
    for scope in SCOPES:
        for part in PARTS:
            lin, svd = dense(variant, scope, part)
            got = story.maps[scope][part]
            s = np.asarray(svd.singular_values)
            # measured <= 2e-15 relative to σ_1 (eigh of J Jᵀ: absolute error ~ ε σ_1²)
            np.testing.assert_allclose(got.singular_values, s[:, :K], rtol=0, atol=1e-13 * s.max())
            overlap = np.abs(np.einsum("ndk,ndk->nk", got.U, np.asarray(svd.U)[:, :, :K]))
            np.testing.assert_allclose(overlap, 1, atol=1e-10)  # same u_i up to sign (measured 3e-15)
            assert np.all(np.einsum("ndk,nd->nk", got.U, got.output) >= 0)  # aligned with y
            for name in ("stable_rank", "participation_ratio"):  # measured <= 7e-14 absolute
                np.testing.assert_allclose(getattr(got.effective, name), getattr(svd.effective, name), rtol=1e-12)
            for name in ("rank_90", "rank_99"):
                np.testing.assert_array_equal(getattr(got.effective, name), getattr(svd.effective, name))
            np.testing.assert_allclose(got.frobenius_sq, svd.frobenius_sq, rtol=1e-12)
            np.testing.assert_allclose(got.output, lin.output, rtol=0, atol=1e-13 * np.abs(lin.output).max())
            assert got.relative_error.max() <= EXACT


@pytest.mark.parametrize("engine", ["fwd", "rev"])
def test_reconstruction_errors_include_the_constant(engine, loaded):
    """Qwen 2's maps are affine: every engine's reconstruction carries each map's constant c (without it
    the errors would be of order 1; the spectra are J's, unchanged by c)."""
    story = layer_spectra(loaded("qwen2"), TEXT, k=2, top=2, engine=engine,
                          scopes=SCOPES if engine == "fwd" else ("cumulative",))
    assert story.engines["cumulative"] == engine and story.max_relative_error <= EXACT


def test_logit_lens_and_decoding_match_a_direct_computation(loaded):
    model = loaded("gemma3")
    story = layer_spectra(model, TEXT, layers=[1, 3], k=2, top=3, scopes=("cumulative",))
    out = model.forward(TEXT, collect=True)
    W = np.asarray(model.params.unembedding)
    assert story.next_token == int(np.argmax(np.asarray(out.logits[-1])))
    for part, stacked in zip(PARTS, (out.residuals, out.attn_outputs, out.mlp_outputs)):
        maps = story.maps["cumulative"][part]
        y = np.asarray(eqlin.decoder.final_norm(model.params, model.config, stacked[jnp.array([1, 3]), -1],
                                                detach=False))
        np.testing.assert_allclose(maps.output, y, rtol=1e-13)
        logits = y @ W.T
        target = logits[:, story.next_token]
        np.testing.assert_array_equal(maps.next_token_rank, (logits > target[:, None]).sum(-1))
        p = np.exp(target - logits.max(-1)) / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
        np.testing.assert_allclose(maps.next_token_probability, p, rtol=1e-12)
        scores = np.einsum("vd,ndk->nkv", W, maps.U)
        best = np.argsort(-scores, axis=-1, kind="stable")[..., :3]
        np.testing.assert_array_equal(maps.top_token_ids, best)
        assert maps.top_tokens[0][0] == model.token_strings(best[0, 0])
        u1 = scores[:, 0]
        np.testing.assert_array_equal(maps.u1_next_token_rank, (u1 > u1[:, [story.next_token]]).sum(-1))


def test_branch_taps(loaded, dense):
    """Gemma's branches read before their post-norms differ from after them; Llama has no post-norms."""
    gemma = loaded("gemma3")
    pre = layer_spectra(gemma, TEXT, layers=[2], k=2, tap="pre")
    post = layer_spectra(gemma, TEXT, layers=[2], k=2, tap="post")
    assert pre.tap == "pre"
    for scope in SCOPES:
        np.testing.assert_array_equal(pre.maps[scope]["residual"].singular_values,
                                      post.maps[scope]["residual"].singular_values)
        for part in ("attn", "mlp"):
            assert np.abs(pre.maps[scope][part].singular_values - post.maps[scope][part].singular_values).max() > 1e-3
            _, svd = dense("gemma3", scope, part, tap="pre")
            s = np.asarray(svd.singular_values)[2, :2]
            np.testing.assert_allclose(pre.maps[scope][part].singular_values[0], s, rtol=1e-12)
            assert pre.maps[scope][part].relative_error.max() <= EXACT
    out = gemma.forward(TEXT, collect=True)
    o_proj_out = eqlin.detached_jacobian(gemma, TEXT, layer=2, part="attn", tap="pre").output
    post_norm = eqlin.decoder.final_norm(gemma.params, gemma.config, out.attn_outputs[2, -1], detach=False)
    assert float(jnp.linalg.norm(o_proj_out - post_norm)) > 1e-3 * float(jnp.linalg.norm(post_norm))
    llama = loaded("llama_gqa")
    a, b = (layer_spectra(llama, TEXT, layers=[1], k=2, tap=t, scopes=("single",)) for t in ("pre", "post"))
    np.testing.assert_array_equal(a.maps["single"]["mlp"].singular_values, b.maps["single"]["mlp"].singular_values)


def test_engine_choice_and_auto_layers(loaded):
    from eqlin.layer_story import auto_groups, causal_work, split_positions

    config = loaded("gemma3").config
    short, long = (layer_map_flops(config, T, tuple(range(4)), 3) for T in (4, 400))
    assert short["fwd"] < short["rev"] and long["rev"] < long["fwd"]
    assert layer_map_flops(config, 400, tuple(range(4)), 3, groups=4)["fwd"] < long["fwd"]
    assert split_positions(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)] and split_positions(3, 4) == [(0, 1), (1, 2), (2, 3)]
    assert causal_work(8, split_positions(8, 4)) == (8 * 2 + 6 * 2 + 4 * 2 + 2 * 2) / 64 == 0.625
    assert auto_groups(config, 10, range(4)) == 1  # tiny work: one compilation
    assert auto_groups(config, 4000, range(4)) == 4
    model = loaded("gemma3")
    ids = model.encode(TEXT)  # 10 tokens: forward pushes T·d tangents through layers 0..3 for every map at once,
    assert layer_spectra(model, ids, k=1, scopes=("cumulative",)).engines == {"cumulative": "fwd"}
    # reverse d cotangents per map through 0..l: for layers 0 and 3 only, 3·(1 + 4) passes against 10·4
    assert layer_spectra(model, ids, layers=[0, 3], k=1, scopes=("cumulative",)).engines == {"cumulative": "rev"}
    assert auto_layers(18, 16) == tuple(range(18))
    assert auto_layers(18, 17) == (2, 5, 8, 11, 14, 17)


def test_memory_is_checked_before_allocating(loaded):
    model = loaded("gemma3")
    with pytest.raises(eqlin.MemoryBudgetError, match=r"forward pass of 12 layer maps at T=10 needs about .* over the .* limit; "
                                                      r"use fewer tokens or fewer layers, or raise memory_limit"):
        layer_spectra(model, TEXT, engine="fwd", memory_limit=10_000)
    small = layer_spectra(model, TEXT, engine="fwd", k=2, memory_limit=1_500_000)  # forces several chunks
    full = layer_spectra(model, TEXT, engine="fwd", k=2)
    for scope in SCOPES:
        for part in PARTS:
            np.testing.assert_allclose(small.maps[scope][part].singular_values,
                                       full.maps[scope][part].singular_values, rtol=1e-13)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": 4}, r"layer \[4\] out of range: the model has layers 0..3"),
    ({"layers": None}, "layer_spectra needs layers"),
    ({"k": 49}, r"k must be an integer in 1..48 \(at most d = 48"),
    ({"scopes": ("both",)}, "scopes must be a non-empty subset of"),
    ({"tap": "middle"}, r"tap must be one of \('post', 'pre'\)"),
    ({"engine": "sideways"}, "engine must be 'auto', 'fwd' or 'rev'"),
    ({"groups": 0}, r"groups must be an integer >= 1 \(causal position groups"),
])
def test_bad_arguments(kwargs, message, loaded):
    with pytest.raises(eqlin.InputError, match=message):
        layer_spectra(loaded("gemma3"), TEXT, **kwargs)


def test_is_exported_and_spectra_serialise(loaded):
    story = eqlin.layer_spectra(loaded("qwen3"), TEXT, k=2, top=2)
    rows = story.to_list()
    assert [r["layer"] for r in rows] == [0, 1]
    entry = rows[1]["single"]["mlp"]
    assert set(entry) >= {"relative_error", "stable_rank", "participation_ratio", "singular_values", "top_tokens",
                          "next_token_rank", "next_token_probability", "u1_next_token_rank"}
    assert len(entry["singular_values"]) == 2 and len(entry["top_tokens"]) == 2
    assert jax.tree_util.tree_leaves(story.maps["single"]["mlp"].effective)  # a pytree of arrays

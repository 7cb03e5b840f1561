"""Detached Jacobians equal the PyTorch reference (eqlin/reference.py: transformers' own modules, float64,
detached in memory) for the final output, for every cumulative and single-layer map and part, for the plain
Jacobian and for logit maps, tied and untied, at <= VS_TORCH (3e-14; measured <= 6.8e-15); they reconstruct the
output exactly (float64: <= 1e-14) and the plain Jacobian does not; models with biases are affine,
y = Σ_t J_t x_t + c, with c computed as the frozen map at zero input (exactly 0 without biases) and equal to
PyTorch's; jacrev, jacfwd and chunking agree; memory is estimated before anything is allocated."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from eqlin.linear_maps import (
    detached_jacobian,
    jacobian,
    logit_map,
    matrix_free_check,
)
from eqlin.memory import estimate_jacobian_bytes
from eqlin import reference as ref
from tests.conftest import (AFFINE_VARIANTS, CORE_VARIANTS, LONGROPE_TEXTS, MORE_VARIANTS, OPTION_VARIANTS, TEXT,
                            VS_TORCH, relative)
from tests.fixtures import FINAL_SOFTCAP

EXACT = 1e-14  # reconstruction errors: measured at most 1.7e-15 (every tiny model, map, part and scope)


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + OPTION_VARIANTS)
def test_final_map_and_plain_jacobian_equal_pytorch(variant, loaded, reference):
    """The detached J reconstructs y exactly, the plain one does not, and both are PyTorch's (transformers made
    detached, or only float64-faithful, in memory) to float64 rounding."""
    model = loaded(variant)
    ids = model.encode(TEXT)
    lin = detached_jacobian(model, TEXT)
    T, d = len(ids), model.config.hidden_size
    chex.assert_shape([lin.jacobian, lin.contributions], [(d, T, d), (T, d)])
    assert float(lin.relative_error) <= EXACT
    assert relative(lin.reconstruction, lin.output) <= EXACT
    assert relative(lin.output, model.forward(TEXT).hidden[-1]) <= 1e-14
    assert relative(lin.jacobian, ref.final_jacobian(reference(variant), torch.tensor(ids))) <= VS_TORCH
    np.testing.assert_array_equal(lin.constant, np.zeros_like(lin.output))  # no biases: c = 0 exactly
    plain = jacobian(model, TEXT)
    assert relative(plain.output, lin.output) <= 1e-14
    assert float(plain.relative_error) >= 1e-3
    expected = ref.final_jacobian(reference(variant, detached=False), torch.tensor(ids))
    assert relative(plain.jacobian, expected) <= VS_TORCH
    np.testing.assert_array_equal(plain.constant, np.zeros_like(plain.output))


def test_yarn_final_map_reconstructs_and_equals_pytorch(loaded, reference):
    """DeepSeek-R1-0528-Qwen3-8B's YaRN layout (tests/fixtures.py), 20 tokens past its original context of 16:
    the detached J reconstructs y to float64 rounding and is the float64 PyTorch reference's."""
    model = loaded("qwen3_yarn")
    ids = model.encode(LONGROPE_TEXTS[1])
    lin = detached_jacobian(model, ids)
    assert len(ids) > model.config.rope_full.original_max_position_embeddings
    assert float(lin.relative_error) <= EXACT
    assert relative(lin.jacobian, ref.final_jacobian(reference("qwen3_yarn"), torch.tensor(ids))) <= VS_TORCH


@pytest.mark.parametrize("variant", ["llama_mha", "llama_gqa", "qwen3", "gemma3", *MORE_VARIANTS])
@pytest.mark.parametrize("scope", ["cumulative", "single"])
def test_every_layer_map_and_part_equals_pytorch(variant, scope, loaded, reference):
    """Every layer's residual, attention and MLP map, cumulative (input embeddings -> layer output) and single
    (layer input -> layer output), read at the last position through the final norm: inputs, outputs and J equal
    the maps hooked off transformers' own modules (attention and MLP outputs, after Gemma's and OLMo 2's branch
    post-norms), layer by layer; each reconstructs exactly; the plain layer maps equal PyTorch's and do not."""
    model = loaded(variant)
    ids = model.encode(TEXT)
    L, d, T = model.config.num_layers, model.config.hidden_size, len(ids)
    layers = list(range(L))
    J, inputs, outputs = ref.layer_maps(reference(variant), torch.tensor(ids), layers, scope=scope)
    for i, part in enumerate(ref.PARTS):
        lin = detached_jacobian(model, TEXT, layer="all", part=part, scope=scope)
        chex.assert_shape(lin.jacobian, (L, d, T, d))
        assert lin.layer == tuple(layers)
        assert float(jnp.max(lin.relative_error)) <= EXACT, (part, lin.relative_error)
        assert relative(lin.inputs, inputs) <= VS_TORCH, part
        for l in layers:
            assert relative(lin.output[l], outputs[i, l]) <= VS_TORCH, (part, l)
            assert relative(lin.jacobian[l], J[i, l]) <= VS_TORCH, (part, l)
    plain = jacobian(model, TEXT, layer="all", scope=scope)
    expected, _, _ = ref.layer_maps(reference(variant, detached=False), torch.tensor(ids), layers, scope=scope,
                                    parts=["residual"])
    for l in layers:
        assert relative(plain.jacobian[l], expected[0, l]) <= VS_TORCH, l
    assert float(jnp.min(plain.relative_error)) >= 1e-3, plain.relative_error


@pytest.mark.parametrize("scope, part", [("cumulative", "attn"), ("single", "mlp")])
def test_layer_maps_of_a_model_with_biases_are_exact(scope, part, loaded):
    """Qwen 2: every layer's map carries its own constant (stacked like the outputs), cumulative and single."""
    model = loaded("qwen2")
    lin = detached_jacobian(model, TEXT, layer="all", part=part, scope=scope)
    chex.assert_shape([lin.constant, lin.output], (2, model.config.hidden_size))
    assert float(jnp.max(lin.relative_error)) <= EXACT
    assert float(jnp.min(jnp.linalg.norm(lin.constant, axis=-1) / jnp.linalg.norm(lin.output, axis=-1))) > 0.1
    one = lin.select(1)
    chex.assert_equal_shape([one.constant, one.output])
    assert relative(one.reconstruction, one.output) <= EXACT


def test_layer_maps_read_the_right_activations(loaded):
    model = loaded("gemma3")
    out = model.forward(TEXT, collect=True)
    ids = model.encode(TEXT)
    last = eqlin.decoder.final_norm(model.params, model.config, out.residuals[:, -1], detach=False)
    lin = detached_jacobian(model, ids, layer=[1, 3])
    np.testing.assert_allclose(lin.output, last[jnp.array([1, 3])], rtol=1e-14)
    np.testing.assert_allclose(lin.select(1).output, last[3], rtol=1e-14)
    single = detached_jacobian(model, ids, layer=2, scope="single", part="attn")
    np.testing.assert_allclose(single.inputs, out.residuals[1], rtol=1e-14)  # layer 2's input
    np.testing.assert_allclose(
        single.output, eqlin.decoder.final_norm(model.params, model.config, out.attn_outputs[2, -1], detach=False),
        rtol=1e-14)
    np.testing.assert_allclose(detached_jacobian(model, ids, layer=3).jacobian,
                               detached_jacobian(model, ids).jacobian, rtol=0, atol=0)


@pytest.mark.parametrize("variant, text", [
    *[pytest.param(v, TEXT, id=v) for v in AFFINE_VARIANTS],
    pytest.param("phi3_longrope", LONGROPE_TEXTS[1], id="phi3_longrope-long"),  # short factors: test_decoder
])
def test_affine_and_longrope_maps_equal_pytorch(variant, text, checkpoint, loaded):
    """Models with biases and Phi's longrope (the others: test_final_map_and_plain_jacobian_equal_pytorch): J
    equals PyTorch's detached J, and c (computed as the frozen map at zero input) equals PyTorch's
    y − Σ_t J_t x_t, the outside reference the constant may be compared with here, relative to ‖y‖; y is
    reconstructed exactly with c, and not without it."""
    model = loaded(variant)
    ids = model.encode(text)
    torch_model = ref.make_detached(ref.load_transformers(checkpoint(variant)))
    expected = ref.detached_jacobian(torch_model, torch.tensor(ids))
    x = ref.embed(torch_model, torch.tensor(ids)).detach()
    with torch.no_grad():
        y = ref.final_hidden(torch_model, x).numpy()
    lin = detached_jacobian(model, ids)
    assert relative(lin.jacobian, expected) <= VS_TORCH
    torch_constant = y - np.einsum("otd,td->o", expected, x.numpy())
    assert np.linalg.norm(lin.constant - torch_constant) / np.linalg.norm(y) <= VS_TORCH
    assert relative(lin.output, y) <= VS_TORCH
    assert float(lin.relative_error) <= EXACT
    if model.config.has_biases:  # an affine map: the constant matters
        assert relative(lin.constant, lin.output) > 0.1 and relative(lin.contributions.sum(0), lin.output) > 0.1


def test_the_map_at_embeddings_is_detached_jacobians_under_jit_and_vmap(loaded, reference):
    """detached_jacobian_at(params, config, x) at x = embed(ids) is detached_jacobian bit for bit (the same
    jitted core); it jits (bit for bit), and vmaps over several x: soft prompts halfway between two texts'
    embeddings and a perturbed one, each exact, each its own call's map, and each PyTorch's detached J at
    that x (Qwen 2: affine, so the constant too)."""
    model = loaded("qwen2")
    params, config = model.params, model.config
    ids = model.encode(TEXT)
    x = model.embed(ids)
    lin = detached_jacobian(model, TEXT, fold=False)
    at = eqlin.detached_jacobian_at(params, config, x)
    assert at.ids is None and (at.layer, at.part, at.scope, at.detach) == (None, "residual", "cumulative", True)
    for name in ("jacobian", "inputs", "output", "contributions", "relative_error", "constant"):
        np.testing.assert_array_equal(getattr(at, name), getattr(lin, name), err_msg=name)
    jitted = jax.jit(eqlin.detached_jacobian_at, static_argnames=("config", "layer", "part"))
    maps = jitted(params, config, x, layer=(0, 1), part="mlp")
    np.testing.assert_array_equal(maps.jacobian, detached_jacobian(model, TEXT, layer=[0, 1], part="mlp",
                                                                   fold=False).jacobian)
    other = model.embed(model.encode("The red bridge over the cold water of the bay"))[:len(ids)]
    xs = jnp.stack([x, (x + other) / 2, x + 0.01 * jax.random.normal(jax.random.key(0), x.shape, x.dtype)])
    batch = jax.vmap(lambda v: eqlin.detached_jacobian_at(params, config, v))(xs)
    d, T = config.hidden_size, len(ids)
    chex.assert_shape([batch.jacobian, batch.constant, batch.relative_error], [(3, d, T, d), (3, d), (3,)])
    torch_model = reference("qwen2")
    for b in range(3):
        one = eqlin.detached_jacobian_at(params, config, xs[b])
        assert relative(batch.jacobian[b], one.jacobian) <= 1e-14 and float(batch.relative_error[b]) <= EXACT
        assert relative(batch.output[b], eqlin.forward(params, config, xs[b]).hidden[-1]) <= 1e-14
        e = torch.tensor(np.asarray(xs[b]))
        expected = torch.autograd.functional.jacobian(lambda v: ref.final_hidden(torch_model, v), e, vectorize=True)
        assert relative(batch.jacobian[b], expected.numpy()) <= VS_TORCH


@pytest.mark.parametrize("x, kwargs, message", [
    (lambda x: x[None], {}, r"x must be input embeddings of shape \(T, 64\) with 1 <= T <= 64 .*got \(1, 10, 64\)"),
    (lambda x: x[:, :8], {}, r"x must be input embeddings of shape \(T, 64\)"),
    (lambda x: x.astype(jnp.float32), {}, "x is float32 but the model computes in float64: cast x to the model's dtype"),
    (lambda x: x, {"fold": "auto"}, "fold must be True or False, got 'auto' .*use detached_jacobian"),
    (lambda x: x, {"chunk": 0}, "chunk must be an integer >= 1"),
])
def test_bad_embeddings_are_refused(x, kwargs, message, loaded):
    model = loaded("llama_gqa")
    with pytest.raises(eqlin.InputError, match=message):
        eqlin.detached_jacobian_at(model.params, model.config, x(model.embed(TEXT)), **kwargs)


def test_the_constant_is_the_frozen_map_at_zero_input(loaded):
    """c is computed from the frozen network g(v, u) (linear path v, every coefficient frozen at u), not from
    y and J: g(v, x) = Σ_t J_t v_t + c for an arbitrary v, g(x, x) = y, and without biases g(0, x) = 0
    exactly (Gemma 3: sandwich norms, (1 + w) scales, q/k norms; its computation is skipped in use)."""
    from eqlin.blocks import PAIR_AXIS, PAIRED
    from eqlin.linear_maps import cumulative_fn, frozen_at_zero

    model = loaded("qwen2")
    lin = detached_jacobian(model, TEXT)
    x = lin.inputs
    g = jax.jit(jax.vmap(cumulative_fn(model.params, model.config, None, "residual", PAIRED), axis_name=PAIR_AXIS))
    v = jax.random.normal(jax.random.key(0), x.shape, x.dtype)
    at_v, at_x = g(jnp.stack([v, x]))
    assert relative(at_x, lin.output) <= 1e-14
    assert relative(at_v, jnp.einsum("otd,td->o", lin.jacobian, v) + lin.constant) <= EXACT
    np.testing.assert_array_equal(g(jnp.stack([jnp.zeros_like(x), x]))[0], lin.constant)
    bias_free = loaded("gemma3")
    c = jax.jit(lambda x: frozen_at_zero(cumulative_fn(bias_free.params, bias_free.config, None, "residual", PAIRED),
                                         x))(bias_free.embed(TEXT))
    chex.assert_shape(c, (bias_free.config.hidden_size,))
    assert not np.any(np.asarray(c))


def test_matrix_free_checks_and_logit_maps_carry_the_constant(loaded):
    model = loaded("qwen2")
    lin = detached_jacobian(model, TEXT)
    check = matrix_free_check(model, TEXT)
    assert float(check.homogeneity_error) <= EXACT and float(check.relative_error) <= EXACT
    assert relative(check.constant, lin.constant) <= 1e-14
    single = matrix_free_check(model, TEXT, layer=1, scope="single", part="attn")
    assert float(single.homogeneity_error) <= EXACT and float(single.relative_error) <= EXACT
    assert relative(single.constant, single.output) > 0.1  # the v bias, through o_proj
    lm = logit_map(model, lin, [3, 5, 7])
    logits = model.logits(TEXT)[-1][jnp.array([3, 5, 7])]
    np.testing.assert_allclose(lm.logits, logits, rtol=1e-13)
    np.testing.assert_allclose(lm.constant, model.params.unembedding[jnp.array([3, 5, 7])] @ lin.constant, rtol=1e-13)
    assert float(jnp.max(lm.relative_error)) <= 1e-12


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS)
def test_the_folded_mlp_gives_the_same_map(variant, loaded):
    """Differentiating the MLP through one folded matrix per position changes rounding only (measured
    <= 1.1e-15 relative); the value is computed unfolded, bit for bit. (GPT-2's biased MLP folds in
    its final map, "auto" at this size, graded against PyTorch below.)"""
    model = loaded(variant)
    unfolded = detached_jacobian(model, TEXT, fold=False)
    folded = detached_jacobian(model, TEXT, fold=True)
    assert relative(folded.jacobian, unfolded.jacobian) <= 1e-13
    np.testing.assert_array_equal(folded.output, unfolded.output)
    assert float(folded.relative_error) <= EXACT
    for kwargs in ({"layer": "all", "part": "mlp", "mode": "fwd"}, {"layer": "all", "scope": "single"}):
        a, b = (detached_jacobian(model, TEXT, fold=f, **kwargs) for f in (False, True))
        assert relative(b.jacobian, a.jacobian) <= 1e-13


def test_fold_choice_follows_flops_and_memory(loaded, monkeypatch):
    from eqlin.linear_maps import plan_fold
    from eqlin.memory import fold_pays

    config = loaded("gemma3").config  # d = 48, F = 128: pays from m > 48·128 / 208 = 29.5 vectors
    assert not fold_pays(config, 29) and fold_pays(config, 30)
    assert plan_fold(config, "auto", detach=True, vectors=48, fits=lambda f: True)
    assert not plan_fold(config, "auto", detach=True, vectors=48, fits=lambda f: not f)  # M does not fit
    assert not plan_fold(config, "auto", detach=True, vectors=8, fits=lambda f: True)  # a few vectors: unfolded
    assert not plan_fold(config, True, detach=False, vectors=48, fits=lambda f: True)  # only detached maps fold
    with pytest.raises(eqlin.InputError, match="fold must be True, False or 'auto'"):
        detached_jacobian(loaded("gemma3"), TEXT, fold="yes")


def test_folded_mlp_is_correct_under_any_differentiation():
    """Derivatives with respect to the gate or the weights fall back to the unfolded rule."""
    from eqlin.blocks import folded_mlp, mlp_product

    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(s)) for s in ((3, 5), (3, 7), (7, 5), (5, 7))]
    for argnums in (0, 1, 2, 3, (0, 2)):
        want = jax.jacrev(lambda *a: mlp_product(*a).sum(), argnums=argnums)(*args)
        got = jax.jacrev(lambda *a: folded_mlp(*a).sum(), argnums=argnums)(*args)
        chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(jax.jacfwd(folded_mlp)(*args), jax.jacfwd(mlp_product)(*args), rtol=1e-13, atol=1e-13)
    biased = [*args, jnp.asarray(rng.standard_normal(7))]  # GPT-2's up bias: inside the product, no x-derivative
    np.testing.assert_array_equal(folded_mlp(*biased), mlp_product(*biased))
    for argnums in ((0, 4),):
        want = jax.jacrev(lambda *a: mlp_product(*a).sum(), argnums=argnums)(*biased)
        got = jax.jacrev(lambda *a: folded_mlp(*a).sum(), argnums=argnums)(*biased)
        chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-13)


def test_jacrev_jacfwd_and_chunks_agree(loaded):
    model = loaded("qwen3")
    rev = detached_jacobian(model, TEXT, mode="rev")
    for other in (detached_jacobian(model, TEXT, mode="fwd"), detached_jacobian(model, TEXT, chunk=7),
                  detached_jacobian(model, TEXT, mode="fwd", chunk=13)):
        assert relative(other.jacobian, rev.jacobian) <= 5e-15  # measured at most 9.1e-16
    many = detached_jacobian(model, TEXT, layer="all", part="mlp", mode="rev", chunk=5)
    assert relative(detached_jacobian(model, TEXT, layer="all", part="mlp", mode="fwd").jacobian,
                    many.jacobian) <= 5e-15


@pytest.mark.parametrize("layer, scope, part", [(None, "cumulative", "residual"), (1, "cumulative", "attn"),
                                                (2, "single", "mlp")])
def test_matrix_free_checks_match_pytorch_and_the_dense_map(layer, scope, part, loaded, reference):
    model = loaded("gemma3")
    check = matrix_free_check(model, TEXT, layer=layer, scope=scope, part=part)
    assert float(check.homogeneity_error) <= EXACT and float(check.relative_error) <= EXACT
    ids = torch.tensor(model.encode(TEXT))
    if layer is None:
        J, x = ref.final_jacobian(reference("gemma3"), ids), ref.embed(reference("gemma3"), ids).detach().numpy()
    else:
        Js, xs, _ = ref.layer_maps(reference("gemma3"), ids, [layer], scope=scope, parts=[part])
        J, x = Js[0, 0], (xs if scope == "cumulative" else xs[0])
    expected = np.einsum("otd,td->to", J, x)  # PyTorch's J_t x_t
    assert relative(check.contributions, expected) <= VS_TORCH
    assert relative(check.output, expected.sum(0)) <= VS_TORCH
    dense = detached_jacobian(model, TEXT, layer=layer, scope=scope, part=part)
    # measured max |difference| 2.4e-15 against contributions up to 3.1
    np.testing.assert_allclose(check.contributions, dense.contributions, rtol=0, atol=2e-14)
    plain = matrix_free_check(model, TEXT, layer=layer, scope=scope, part=part, detach=False)
    assert float(plain.homogeneity_error) >= 1e-3


def test_float32_reports_its_larger_error(checkpoint):
    model = eqlin.load(checkpoint("gemma3"), dtype="float32")
    lin = detached_jacobian(model, TEXT)
    assert lin.jacobian.dtype == jnp.float32
    assert 1e-9 < float(lin.relative_error) <= 1e-5  # float32-sized: honest, neither hidden nor exact


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_mha", "llama_tied_head", "gemma3_softcap"])
def test_logit_map_equals_pytorch_and_reconstructs_the_predicted_logit(variant, loaded, reference):
    """Untied (llama_gqa), tied (llama_mha), tied with a stored copy of lm_head, and Gemma with final logit
    softcapping: W_U[k] J equals the Jacobian of transformers' own output embedding applied to the final hidden
    state (softcapping comes after it), and the logits are the model's, before the final softcap."""
    model = loaded(variant)
    ids = model.encode(TEXT)
    lin = detached_jacobian(model, TEXT)
    logits = np.asarray(model.logits(TEXT)[-1])
    lm = logit_map(model, lin)
    assert int(lm.token_ids[0]) == int(np.argmax(logits))
    assert float(lm.relative_error[0]) <= EXACT
    chosen = logit_map(model, lin, [3, 5, 7])
    chex.assert_shape(chosen.jacobian, (3, len(ids), model.config.hidden_size))
    J, expected = ref.logit_jacobian(reference(variant), torch.tensor(ids), [3, 5, 7])
    assert relative(chosen.jacobian, J) <= VS_TORCH
    assert relative(chosen.logits, expected) <= VS_TORCH
    assert relative(chosen.contributions.sum(0), expected) <= VS_TORCH
    cap = model.config.final_logit_softcapping
    assert cap == (FINAL_SOFTCAP if variant == "gemma3_softcap" else None)
    capped = np.tanh(np.asarray(chosen.logits) / cap) * cap if cap else chosen.logits
    np.testing.assert_allclose(capped, logits[[3, 5, 7]], rtol=2e-14)  # measured 2.6e-15


def test_absurd_length_is_refused_before_allocating(loaded):
    model = loaded("gemma3")
    roomy = dataclasses.replace(model, config=dataclasses.replace(model.config, max_position_embeddings=10**6))
    with pytest.raises(eqlin.MemoryBudgetError, match=r"T=100000 needs about .* GiB .* use at most T=\d+ tokens"):
        detached_jacobian(roomy, np.zeros(100_000, dtype=np.int32))


def test_chunk_over_the_limit_names_one_that_fits(loaded):
    model = loaded("gemma3")
    T = len(model.encode(TEXT))
    limit = estimate_jacobian_bytes(model.config, T, chunk=4)
    with pytest.raises(eqlin.MemoryBudgetError, match=r"chunk=48 needs .* use chunk=4 or less"):
        detached_jacobian(model, TEXT, chunk=48, memory_limit=limit)
    auto = detached_jacobian(model, TEXT, memory_limit=limit)  # picks a chunk that fits
    assert float(auto.relative_error) <= EXACT


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 4}, r"layer \[4\] out of range: the model has layers 0..3"),
    ({"layer": "every"}, r"layer must be an int, a sequence of ints, 'all' or None, got 'every'"),
    ({"layer": 1, "part": "ffn"}, r"part must be one of \('residual', 'attn', 'mlp'\), got 'ffn'"),
    ({"layer": 1, "scope": "local"}, r"scope must be one of \('cumulative', 'single'\), got 'local'"),
    ({"scope": "single"}, r"scope='single' needs a layer \(an int, a list or 'all'\)"),
    ({"part": "attn"}, r"part='attn' needs a layer; the final output \(layer=None\) is the residual stream"),
    ({"mode": "sideways"}, "mode must be 'auto', 'rev' or 'fwd', got 'sideways'"),
])
def test_bad_arguments(kwargs, message, loaded):
    with pytest.raises(eqlin.InputError, match=message):
        detached_jacobian(loaded("gemma3"), TEXT, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": [1, 2]}, r"matrix_free_check takes one layer \(an int\) or None, got \[1, 2\]"),
    ({"layer": 1, "part": "ffn"}, r"part must be one of \('residual', 'attn', 'mlp'\), got 'ffn'"),
    ({"scope": "single"}, r"scope='single' needs a layer$"),
    ({"part": "attn"}, r"part='attn' needs a layer; the final output \(layer=None\) is the residual stream"),
])
def test_matrix_free_check_bad_arguments(kwargs, message, loaded):
    """The same selection checks as detached_jacobian (`resolve_selection`), for a one-layer caller."""
    with pytest.raises(eqlin.InputError, match=message):
        matrix_free_check(loaded("gemma3"), TEXT, **kwargs)


def test_any_integer_sequence_selects_those_layers(loaded):
    """An integer array or a range gives every listed layer's map (not only the first one's)."""
    model = loaded("gemma3")
    listed = detached_jacobian(model, TEXT, layer=[0, 2], part="mlp")
    for layer in (np.array([0, 2]), jnp.array([0, 2]), range(0, 3, 2), (np.int64(0), 2)):
        other = detached_jacobian(model, TEXT, layer=layer, part="mlp")
        assert other.layer == (0, 2)
        np.testing.assert_array_equal(other.jacobian, listed.jacobian)
    assert detached_jacobian(model, TEXT, layer=np.int64(2), part="mlp").layer == 2


@pytest.mark.parametrize("layer", [True, 1.0, [1, True], [1.5], "1", {1: 2}, [[0, 1]], []])
def test_bools_floats_and_other_layers_are_refused(loaded, layer):
    with pytest.raises(eqlin.InputError, match="layer must be an int, a sequence of ints|layer is empty"):
        detached_jacobian(loaded("gemma3"), TEXT, layer=layer)


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk": -1}, "chunk must be an integer >= 1"), ({"chunk": 0}, "chunk must be an integer >= 1"),
    ({"chunk": 1.5}, "chunk must be an integer >= 1"), ({"chunk": "8"}, "chunk must be an integer >= 1"),
    ({"memory_limit": 0}, "memory_limit must be an integer >= 1"),
])
def test_chunk_and_memory_limit_are_never_silently_ignored(loaded, kwargs, message):
    with pytest.raises(eqlin.InputError, match=message):
        detached_jacobian(loaded("gemma3"), TEXT, **kwargs)


@pytest.mark.parametrize("scope", ["cumulative", "single"])
def test_select_is_the_one_layer_map(scope, loaded):
    """select(i) of a multi-layer Linearization is the map of that layer alone, inputs included (cumulative maps
    share the input embeddings, single-layer maps each have their own input), and logit_map takes it."""
    model = loaded("gemma3")
    many = detached_jacobian(model, TEXT, layer=[1, 2], scope=scope, part="mlp")
    with pytest.raises(eqlin.InputError, match=r"logit_map needs a single map; use lin\.select\(i\)"):
        logit_map(model, many)
    picked, one = many.select(1), detached_jacobian(model, TEXT, layer=2, scope=scope, part="mlp")
    assert (picked.layer, picked.scope, picked.part) == (one.layer, one.scope, one.part) == (2, scope, "mlp")
    fields = ("jacobian", "inputs", "output", "contributions", "relative_error")
    chex.assert_trees_all_close({f: getattr(picked, f) for f in fields}, {f: getattr(one, f) for f in fields},
                                rtol=1e-14, atol=1e-15)  # shapes included
    np.testing.assert_allclose(logit_map(model, picked).logits, logit_map(model, one).logits, rtol=1e-14)

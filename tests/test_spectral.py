"""Spectra: dense SVDs are NumPy's SVDs of J_t and of the token-combined map, sign-aligned with y; matrix-free
top-k (Lanczos, randomized) equals NumPy's SVD of the PyTorch reference's map and the dense top-k on tiny models
(a known spectrum: tests/test_lanczos.py); all to float64 rounding (measured <= 3.6e-15); decoding returns the
known tokens of constructed maps; effective dimensions match closed forms; results survive a JSON round trip;
long-input top_singular reports progress."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from eqlin.linear_maps import Linearization, detached_jacobian
from eqlin.params import widen
from eqlin.spectral import (
    _map_jvp,
    decode_spectrum,
    effective_dimension,
    norm_analysis,
    score_summary,
    spectrum,
    top_singular,
)
from eqlin import reference as ref
from tests.conftest import TEXT, subspace_cosines

K = 4  # one k for the tiny models: one compiled Lanczos shape
SVD = 2e-14  # singular values, vectors and rebuilt maps against NumPy's SVD: measured at most 1.9e-15
TOP_K = 3e-14  # matrix-free top-k: measured at most 3.6e-15 (Lanczos at its default steps included)


@pytest.fixture(scope="module")
def model(loaded) -> eqlin.Model:
    return loaded("gemma3")


@pytest.fixture(scope="module")
def lin(model) -> Linearization:
    return detached_jacobian(model, TEXT)


def fake_linearization(J: np.ndarray, y: np.ndarray) -> Linearization:
    """A Linearization around a given J (d_out, T, d_in) and output y, for constructed cases."""
    T, d_out = J.shape[1], J.shape[0]
    zeros = jnp.zeros((T, d_out))
    return Linearization(jnp.asarray(J), jnp.zeros((T, J.shape[2])), jnp.asarray(y), zeros, jnp.asarray(0.0),
                         jnp.arange(T))


def test_dense_spectra_are_the_svds_of_each_token_and_of_the_combined_map(lin):
    J = np.asarray(lin.jacobian)
    d, T, _ = J.shape
    per = spectrum(lin)
    chex.assert_shape([per.singular_values, per.U, per.V], [(T, d), (T, d, d), (T, d, d)])
    for t in (0, T - 1):
        np.testing.assert_allclose(per.singular_values[t], np.linalg.svd(J[:, t], compute_uv=False), rtol=SVD)
        rebuilt = np.einsum("ok,k,ik->oi", per.U[t], per.singular_values[t], per.V[t])
        np.testing.assert_allclose(rebuilt, J[:, t], rtol=0, atol=SVD)  # |J| <= 0.6
    combined = spectrum(lin, K, per_token=False)
    chex.assert_shape([combined.singular_values, combined.U, combined.V], [(K,), (d, K), (T, d, K)])
    np.testing.assert_allclose(combined.singular_values, np.linalg.svd(J.reshape(d, -1), compute_uv=False)[:K],
                               rtol=SVD)
    np.testing.assert_allclose(np.einsum("otd,tdk->ok", J, combined.V), combined.U * combined.singular_values,
                               rtol=0, atol=SVD)  # J v = σ u, with V[t] token t's block
    assert np.all(np.einsum("ok,o->k", combined.U, lin.output) >= 0)  # aligned with y
    assert np.all(np.einsum("tok,o->tk", per.U, lin.output) >= 0)
    np.testing.assert_allclose(combined.frobenius_sq, np.sum(J**2), rtol=SVD)
    assert float(combined.relative_error) <= 1e-14 and combined.method == "dense" and combined.layer is None


def test_a_multi_layer_spectrum_is_the_stack_of_its_layers(model):
    many = detached_jacobian(model, TEXT, layer=[1, 3], part="attn")
    stacked = spectrum(many, K, per_token=False)
    chex.assert_shape([stacked.singular_values, stacked.effective.stable_rank], [(2, K), (2,)])
    one = spectrum(many.select(1), K, per_token=False)
    picked = stacked.select(1)
    assert picked.layer == one.layer == 3 and picked.part == "attn"
    np.testing.assert_allclose(picked.singular_values, one.singular_values, rtol=SVD)  # measured 0
    np.testing.assert_allclose(np.abs(picked.U.T @ one.U), np.eye(K), rtol=0, atol=SVD)  # measured 1.7e-15
    np.testing.assert_allclose(picked.effective.stable_rank, one.effective.stable_rank, rtol=SVD)


@pytest.mark.parametrize("layer, scope, part, method", [
    (None, "cumulative", "residual", "lanczos"),
    (2, "single", "mlp", "lanczos"),
    (1, "cumulative", "attn", "randomized"),
])
def test_matrix_free_top_k_equals_numpys_svd_of_the_pytorch_map(layer, scope, part, method, model, reference):
    # Randomized with the full output dimension as its sample is exact; Lanczos at its default steps.
    steps = model.config.hidden_size if method == "randomized" else None
    free = top_singular(model, TEXT, K, layer=layer, scope=scope, part=part, method=method, steps=steps)
    ids = torch.tensor(model.encode(TEXT))
    if layer is None:
        J = ref.final_jacobian(reference("gemma3"), ids)
    else:
        J = ref.layer_maps(reference("gemma3"), ids, [layer], scope=scope, parts=[part])[0][0, 0]
    U, s, Vt = np.linalg.svd(J.reshape(J.shape[0], -1))
    np.testing.assert_allclose(free.singular_values, s[:K], rtol=TOP_K)
    assert np.all(np.abs(subspace_cosines(U[:, :K], free.U) - 1) <= TOP_K)
    assert np.all(np.abs(subspace_cosines(Vt[:K].T, free.V.reshape(-1, K)) - 1) <= TOP_K)
    dense = spectrum(detached_jacobian(model, TEXT, layer=layer, scope=scope, part=part), K, per_token=False)
    np.testing.assert_allclose(free.singular_values, dense.singular_values, rtol=TOP_K)
    np.testing.assert_allclose(free.U, dense.U, rtol=0, atol=TOP_K)  # both aligned with y: same signs
    np.testing.assert_allclose(free.V, dense.V, rtol=0, atol=TOP_K)
    np.testing.assert_allclose(free.output, dense.output, rtol=1e-15)  # measured 0: the same forward
    assert float(free.relative_error) <= 1e-14
    assert (free.layer, free.scope, free.part, free.method, free.per_token) == (layer, scope, part, method, False)
    assert free.frobenius_sq is None and free.effective is None


def _known_tokens(model) -> tuple[int, np.ndarray, int, np.ndarray]:
    """(j, u, i, v): u the unit unembedding row of the largest norm (so W_U u peaks at j), v the input
    embedding of token i as the model consumes it (Gemma: × √d, which does not change cosines)."""
    W = np.asarray(widen(model.params.unembedding, model.dtype))  # stored (float32 here), widened
    j = int(np.argmax(np.linalg.norm(W, axis=1)))
    i = 17
    return j, W[j] / np.linalg.norm(W[j]), i, np.asarray(model.embed([i])[0])


@pytest.mark.parametrize("per_token", [True, False])
def test_decoding_a_rank_one_map_returns_its_tokens_and_sign_alignment_flips_back(per_token, model):
    j, u, i, v = _known_tokens(model)
    T = 3
    J = np.einsum("o,t,i->oti", u, np.arange(1.0, T + 1), v)  # J_t = t·u vᵀ
    spec = decode_spectrum(model, spectrum(fake_linearization(J, 2 * u), 1, per_token=per_token), top=3)
    left, right = spec.left_tokens, spec.right_tokens
    chex.assert_shape([left.ids, right.ids], [(T, 1, 3) if per_token else (1, 3), (T, 1, 3)])
    assert np.all(left.ids[..., 0, 0] == j) and np.all(right.ids[:, 0, 0] == i)
    np.testing.assert_allclose(right.scores[:, 0, 0], 1, rtol=1e-12)  # cosine of v with its own row
    assert left.tokens == np.array(model.token_strings(left.ids.reshape(-1)), dtype=object).reshape(
        left.ids.shape).tolist()
    np.testing.assert_allclose(spec.U[..., 0], np.broadcast_to(u, spec.U[..., 0].shape), atol=1e-12)
    # With y = −u the SVD's arbitrary sign is flipped to u·y >= 0: (−u, −v), decoded accordingly.
    flipped = decode_spectrum(model, spectrum(fake_linearization(J, -u), 1, per_token=per_token), top=3)
    np.testing.assert_allclose(flipped.U[..., 0], np.broadcast_to(-u, spec.U[..., 0].shape), atol=1e-12)
    np.testing.assert_allclose(flipped.V, -spec.V, atol=1e-12)
    anti = int(np.argmax(-np.asarray(model.params.unembedding) @ u))
    assert np.all(flipped.left_tokens.ids[..., 0, 0] == anti) and anti != j


@pytest.mark.parametrize("space", ["output", "input"])
def test_score_summary_over_vocabulary_chunks_is_numpys_over_the_whole_table(space, model):
    """Chunks of 7 and 64 rows (the target in a later chunk than the first) give the ids and target rank of
    one chunk holding the whole vocabulary, the scores bit for bit in output space on JAX 0.10 (cosines,
    whose row norms XLA sums per chunk, and the log-partition to float64 rounding); all equal NumPy's over the whole
    table (cosines with the embeddings in input space)."""
    table = np.asarray(widen(model.params.unembedding if space == "output" else model.params.embed, jnp.float64))
    vectors = np.random.default_rng(0).standard_normal((5, table.shape[1]))
    target, top = table.shape[0] - 10, 4
    whole = score_summary(model, jnp.asarray(vectors), space, top, target, chunk=table.shape[0])
    scores = vectors @ table.T
    if space == "input":
        scores /= np.linalg.norm(vectors, axis=1)[:, None] * np.linalg.norm(table, axis=1)[None]
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    np.testing.assert_array_equal(whole.ids, ids)
    np.testing.assert_allclose(whole.values, np.take_along_axis(scores, ids, axis=1), rtol=1e-13)
    np.testing.assert_array_equal(whole.target_rank, (scores > scores[:, target:target + 1]).sum(1))
    lse = np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
    np.testing.assert_allclose(whole.log_partition, lse, rtol=1e-14)
    for chunk in (7, 64):
        part = score_summary(model, jnp.asarray(vectors), space, top, target, chunk=chunk)
        np.testing.assert_array_equal(part.ids, whole.ids)
        np.testing.assert_array_equal(part.target_rank, whole.target_rank)
        # Output space: bit for bit on JAX 0.10; the 0.8 floor's XLA blocks a chunk's dot product differently
        # (a last-bit difference, measured). Cosines: the row norms are summed per chunk.
        exact = 0 if space == "output" and jax.__version_info__ >= (0, 10) else 1e-14
        for field in ("values", "target_score", "log_partition"):
            np.testing.assert_allclose(getattr(part, field), getattr(whole, field), rtol=exact if field != "log_partition"
                                       else 1e-15, atol=0, err_msg=f"{field}, chunk {chunk}")


def test_norm_analysis_finds_and_decodes_the_largest_column_and_row(model):
    j, u, i, v = _known_tokens(model)
    d, c, r = model.config.hidden_size, 5, 11
    J = np.zeros((d, 2, d))
    J[:, 0, c] = 3 * u  # token 0: one nonzero column, the unembedding direction of j
    J[r, 1, :] = 3 * v  # token 1: one nonzero row, the embedding of i
    result = norm_analysis(model, fake_linearization(J, u), count=2, top=3)
    chex.assert_shape([result.columns, result.rows, result.column_tokens.ids], [(2, 2), (2, 2), (2, 2, 3)])
    assert int(result.columns[0, 0]) == c and int(result.column_tokens.ids[0, 0, 0]) == j
    assert int(result.rows[1, 0]) == r and int(result.row_tokens.ids[1, 0, 0]) == i
    np.testing.assert_allclose(result.column_norms[0, c], 3, rtol=1e-12)
    np.testing.assert_allclose(result.row_norms[1, r], 3 * np.linalg.norm(v), rtol=1e-12)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"column_norms", "columns", "column_tokens", "row_norms", "rows", "row_tokens"}
    assert data["columns"][0][0] == c and data["rows"][1][0] == r
    assert data["column_tokens"]["ids"][0][0][0] == j and data["row_tokens"]["ids"][1][0][0] == i
    np.testing.assert_array_equal(data["column_norms"], result.column_norms)
    np.testing.assert_array_equal(data["row_norms"], result.row_norms)
    assert data["column_tokens"]["tokens"][0][0][0] == model.token_strings([j])[0]


@pytest.mark.parametrize("s, stable, participation, r90, r99", [
    (np.ones(5), 5, 5, 5, 5),  # identity
    (np.ones(10), 10, 10, 9, 10),  # 9 of 10 hold exactly 90 %
    ([2.0, 0, 0, 0], 1, 1, 1, 1),  # rank 1
    ([3.0, 2, 1], 14 / 9, 14**2 / 98, 2, 3),  # σ² = 9, 4, 1: 9 < 12.6 <= 13, 13 < 13.86 <= 14
    (np.zeros(3), 0, 0, 0, 0),  # the zero map
])
def test_effective_dimension_closed_forms(s, stable, participation, r90, r99):
    e = effective_dimension(jnp.asarray(s, dtype=jnp.float64))
    np.testing.assert_allclose([e.stable_rank, e.participation_ratio], [stable, participation], rtol=1e-14)
    assert (int(e.rank_90), int(e.rank_99)) == (r90, r99)


def test_effective_dimension_of_spectra_per_token():
    d = 6
    J = np.stack([np.eye(d), np.diag([3.0, 2, 1, 0, 0, 0])], axis=1)  # (d, T, d)
    e = spectrum(fake_linearization(J, np.ones(d))).effective
    np.testing.assert_allclose(e.stable_rank, [d, 14 / 9], rtol=1e-12)
    np.testing.assert_allclose(e.participation_ratio, [d, 2], rtol=1e-12)
    assert e.rank_90.tolist() == [6, 2] and e.rank_99.tolist() == [6, 3]


def test_spectra_survive_a_json_round_trip(model, lin):
    spec = decode_spectrum(model, spectrum(lin, 2), top=2)
    data = json.loads(spec.to_json())
    assert data == json.loads(json.dumps(spec.to_dict()))
    assert set(data) == {"map", "input_ids", "k", "singular_values", "relative_error", "output_norm",
                         "frobenius_sq", "effective_dimension", "left_tokens", "right_tokens"}
    assert data["map"] == {"layer": None, "part": "residual", "scope": "cumulative", "detach": True,
                           "per_token": True, "method": "dense"}
    T = len(model.encode(TEXT))
    assert data["input_ids"] == model.encode(TEXT).tolist() and data["k"] == 2
    assert np.shape(data["singular_values"]) == (T, 2) and data["relative_error"] <= 1e-14
    assert np.shape(data["left_tokens"]["ids"]) == (T, 2, 2)
    assert isinstance(data["left_tokens"]["tokens"][0][0][0], str)
    assert set(data["effective_dimension"]) == {"stable_rank", "participation_ratio", "rank_90", "rank_99"}
    assert len(data["effective_dimension"]["rank_90"]) == T


def test_the_matrix_free_linearization_holds_the_models_weights_not_copies(model):
    """The residuals shaped like a weight stack are the model's own buffers (a jit returning the
    linearization would return copies), and none is one layer's matrix sliced out of a stack."""
    x = model.embed(model.encode(TEXT))
    _, jvp, _, _ = _map_jvp(model.params, model.config, x, layer=None, part="residual", scope="cumulative",
                            detach=True)
    leaves = jax.tree_util.tree_leaves(model.params.layers)
    stacks = {(a.shape, a.dtype) for a in leaves}
    buffers = {a.unsafe_buffer_pointer() for a in leaves}
    matrices = {(a.shape[1:], a.dtype) for a in leaves if a.ndim == 3}
    residuals = jax.tree_util.tree_leaves(jvp)
    held = [r for r in residuals if (r.shape, r.dtype) in stacks]
    assert len(held) >= 4  # v, o, up, down at least
    assert all(r.unsafe_buffer_pointer() in buffers for r in held)
    assert not [r.shape for r in residuals if (r.shape, r.dtype) in matrices]


def test_top_singular_at_moderate_length_reports_progress_and_matches_dense(model):
    ids = np.random.default_rng(1).integers(7, model.config.vocab_size, size=60)
    calls = []
    free = top_singular(model, ids, K, block=8, progress=lambda done, total: calls.append((done, total)))
    steps = 2 * K + 20
    assert calls == [(min(2 * s, 2 * steps), 2 * steps) for s in range(8, steps + 8, 8)]
    chex.assert_shape(free.V, (60, model.config.hidden_size, K))
    dense = spectrum(detached_jacobian(model, ids), K, per_token=False)
    np.testing.assert_allclose(free.singular_values, dense.singular_values, rtol=TOP_K)  # measured 1.6e-15
    data = json.loads(decode_spectrum(model, free, top=2).to_json())
    assert data["map"]["method"] == "lanczos" and data["effective_dimension"] is None
    assert np.shape(data["right_tokens"]["ids"]) == (60, K, 2)


@pytest.mark.parametrize("call, message", [
    (lambda m, lin: spectrum(lin, 0), r"k must be an integer in 1\.\.48 \(the rank bound of J_t\), got 0"),
    (lambda m, lin: spectrum(lin, 49), r"k must be an integer in 1\.\.48 \(the rank bound of J_t\), got 49"),
    (lambda m, lin: spectrum(lin, 49, per_token=False),
     r"k must be an integer in 1\.\.48 \(the rank bound of the token-combined map\), got 49"),
    (lambda m, lin: top_singular(m, TEXT, 100),
     r"k must be an integer in 1\.\.48 \(the rank bound of a 48 × 480 map\)"),
    (lambda m, lin: top_singular(m, TEXT, 3, steps=2),
     r"steps must be an integer in 3\.\.48 \(at least k, at most min\(d_out, n\)\), got 2"),
    (lambda m, lin: top_singular(m, TEXT, 3, block=0), r"block must be an integer >= 1"),
    (lambda m, lin: top_singular(m, TEXT, 3, method="power"), r"method must be one of \('lanczos', 'randomized'\)"),
    (lambda m, lin: top_singular(m, TEXT, 3, layer=[1, 2]), r"top_singular takes one layer \(an int\) or None"),
    (lambda m, lin: top_singular(m, TEXT, 3, layer=9), r"layer \[9\] out of range: the model has layers 0\.\.3"),
    (lambda m, lin: top_singular(m, TEXT, 3, part="attn"), "part='attn' needs a layer; the final output"),
    (lambda m, lin: decode_spectrum(m, spectrum(lin, 1), top=0),
     r"top must be an integer in 1\.\.96 \(the vocabulary size\), got 0"),
    (lambda m, lin: norm_analysis(m, lin, count=0), r"count must be an integer in 1\.\.48"),
    (lambda m, lin: spectrum(lin, 2).select(0), "select\\(\\) needs a Spectrum over several layers"),
])
def test_bad_arguments(call, message, model, lin):
    with pytest.raises(eqlin.InputError, match=message):
        call(model, lin)

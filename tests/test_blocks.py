"""The shared blocks against values written out by hand: the causal / sliding-window mask, RoPE as a rotation
of each (i, i + r/2) pair, masked softmax probabilities with GQA and softcapping, RMSNorm, and the folded MLP
matrix M_t = D·diag(g_t)·U."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from eqlin.blocks import apply_rope, attention_mask, attention_probs, fold_matrices, rms_norm, rope_tables, visible
from eqlin.config import ModelConfig, RopeSpec


def test_sliding_window_mask_written_out():
    causal = np.tril(np.ones((5, 5), bool))
    np.testing.assert_array_equal(attention_mask(5, jnp.asarray(0)), causal)
    window_2 = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1]], bool)  # key s visible from query t iff t − 2 < s <= t
    np.testing.assert_array_equal(attention_mask(5, jnp.asarray(2)), window_2)
    assert bool(visible(jnp.asarray(7), jnp.asarray(4), jnp.asarray(4)))  # t − s = 3 < 4
    assert not bool(visible(jnp.asarray(7), jnp.asarray(3), jnp.asarray(4)))  # t − s = 4: outside


def test_rope_rotates_each_half_split_pair_by_position_times_frequency():
    rng = np.random.default_rng(0)
    T, heads, hd, r = 4, 2, 8, 6  # partial rotary: 6 of 8 features rotate
    inv_freq = RopeSpec(theta=100.0).inv_freq(r)  # (3,)
    cos, sin = rope_tables(jnp.asarray(inv_freq), jnp.arange(T), jnp.float64)
    x = rng.standard_normal((T, heads, hd))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = x.copy()
    for t in range(T):
        for i in range(r // 2):
            z = (x[t, :, i] + 1j * x[t, :, i + r // 2]) * np.exp(1j * t * inv_freq[i])
            want[t, :, i], want[t, :, i + r // 2] = z.real, z.imag
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(got[..., r:], x[..., r:])


def _config(**changes) -> ModelConfig:
    spec = RopeSpec(theta=10_000.0)
    base = ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=2, rms_norm_eps=1e-6, norm_offset=0.0,
                       qk_norm=None, activation="silu", embed_scale=1.0, query_scale=0.5,
                       layer_types=("full_attention",), sliding_window=None, rope_full=spec, rope_sliding=spec,
                       tie_word_embeddings=True, max_position_embeddings=16)
    return dataclasses.replace(base, **changes)


def test_attention_probabilities_by_hand():
    rng = np.random.default_rng(1)
    T, H, K, hd = 5, 4, 2, 2
    q, k = rng.standard_normal((T, H, hd)), rng.standard_normal((T, K, hd))
    mask = np.asarray(attention_mask(T, jnp.asarray(3)))
    for cap in (None, 1.5):
        config = _config(attn_logit_softcapping=cap)
        got = np.asarray(attention_probs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(mask), config))
        for h in range(H):
            kv = h // (H // K)  # query heads 0, 1 share kv head 0; 2, 3 share kv head 1
            scores = q[:, h] @ k[:, kv].T * 0.5
            if cap is not None:
                scores = np.tanh(scores / cap) * cap
            scores = np.where(mask, scores, -np.inf)
            want = np.exp(scores - scores.max(-1, keepdims=True))
            want /= want.sum(-1, keepdims=True)
            np.testing.assert_allclose(got[kv, h % (H // K)], want, rtol=1e-14, atol=0)
            assert np.all(got[kv, h % (H // K)][~mask] == 0)


def test_rms_norm_and_folded_mlp_by_hand():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((3, 6)), rng.standard_normal(6)
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), eps=1e-6, offset=1.0, detach=True)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    gate, up, down = rng.standard_normal((3, 5)), rng.standard_normal((5, 6)), rng.standard_normal((6, 5))
    M = np.asarray(fold_matrices(jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down)))
    for t in range(3):
        np.testing.assert_allclose(M[t], down @ np.diag(gate[t]) @ up, rtol=1e-13)

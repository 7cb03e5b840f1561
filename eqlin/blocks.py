"""Shared decoder blocks, each written as A(x)·x with one `detach` switch.

With `detach=True` the input-dependent coefficient A(x) goes behind `jax.lax.stop_gradient`, so the
block's Jacobian is the frozen linear map A(x) and block(x) == J·x exactly (DESIGN.md §1):

- RMSNorm: A = rsqrt(mean(x²) + eps), a per-row scalar.
- GLU MLP: A = act(gate(x)), the activated gate; up and down stay linear.
- attention: A = softmax(q·kᵀ·s + mask), the probabilities; q and k only reach the output through
  them, so v_proj and o_proj carry the linear path.

With `detach=False` every block is the model's ordinary forward. Values are identical either way.
Detached, the q, k and gate projections also read a frozen copy of their input: they only reach the
output through the frozen coefficients, so this changes no derivative, but it keeps tangents and
cotangents out of work that cannot contribute (no reliance on dead-code elimination).
All matrix products use `precision=HIGHEST` so float32 on accelerators is not silently bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eqlin.config import ModelConfig

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
einsum = functools.partial(jnp.einsum, precision=HIGHEST)


def frozen(a: Array, detach: bool) -> Array:
    """The one place a nonlinear coefficient is frozen: `stop_gradient(a)` when detaching."""
    return jax.lax.stop_gradient(a) if detach else a


def rms_norm(x: Array, weight: Array, *, eps: float, offset: float, detach: bool) -> Array:
    """RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · (offset + w). x (..., n), w (n,)."""
    coeff = frozen(jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps), detach)
    return x * coeff * (offset + weight)


def rope_tables(inv_freq: Array, positions: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """cos and sin tables, each (T, r) with r = 2·len(inv_freq), in the HF (half-split) layout."""
    angles = positions.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (T, r/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (T, r)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first r features of every head. x (T, heads, hd); cos, sin (T, r)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def attention_mask(length: int, window: Array) -> Array:
    """Boolean (T, T) mask: key s visible from query t iff s <= t and (window == 0 or t - s < window)."""
    t = jnp.arange(length)[:, None]
    s = jnp.arange(length)[None, :]
    return (s <= t) & ((window == 0) | (t - s < window))


def attention(
    x: Array,
    p,
    cos: Array,
    sin: Array,
    window: Array,
    config: ModelConfig,
    *,
    detach: bool,
    queries: int | None = None,
) -> Array:
    """Causal GQA self-attention of one layer. x (T, d) -> (Q, d): the outputs at the last Q = `queries`
    positions (default all T; keys and values always at every position).

    `p` holds one layer's slice of LayerParams; `window` is this layer's sliding window (0: none).
    """
    T = x.shape[0]
    Q = queries or T  # query positions T-Q..T-1
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    x_frozen = frozen(x, detach)  # q and k only feed the (frozen) probabilities
    q = einsum("td,ed->te", x_frozen, p.q_proj)  # (T, H·hd)
    k = einsum("td,ed->te", x_frozen, p.k_proj)  # (T, K·hd)
    v = einsum("td,ed->te", x, p.v_proj).reshape(T, K, hd)  # (T, K, hd)
    norm = functools.partial(rms_norm, eps=config.rms_norm_eps, offset=config.norm_offset, detach=detach)
    if config.qk_norm == "full":
        q, k = norm(q, p.q_norm), norm(k, p.k_norm)
    q, k = q.reshape(T, H, hd), k.reshape(T, K, hd)  # (T, H, hd), (T, K, hd)
    if config.qk_norm == "head":
        q, k = norm(q, p.q_norm), norm(k, p.k_norm)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    q = q.reshape(T, K, H // K, hd)  # (T, K, G, hd): G query heads share each kv head
    scores = einsum("tkgh,skh->kgts", q, k) * config.query_scale  # (K, G, T, T)
    if config.attn_logit_softcapping is not None:
        cap = config.attn_logit_softcapping
        scores = jnp.tanh(scores / cap) * cap
    scores = jnp.where(attention_mask(T, window), scores, jnp.finfo(scores.dtype).min)
    # The probabilities carry no cotangent: computing them for every query costs no backward work.
    probs = frozen(jax.nn.softmax(scores, axis=-1), detach)[:, :, T - Q:]  # (K, G, Q, T)
    out = einsum("kgts,skh->tkgh", probs, v).reshape(Q, H * hd)  # (Q, H·hd)
    return einsum("te,de->td", out, p.o_proj)


def glu_mlp(x: Array, p, config: ModelConfig, *, detach: bool) -> Array:
    """Gated MLP: down(act(gate(x)) ⊙ up(x)), SwiGLU or GeGLU (tanh GELU). x (T, d) -> (T, d)."""
    pre = einsum("td,fd->tf", frozen(x, detach), p.gate_proj)  # (T, F); only feeds the frozen gate
    gate = jax.nn.silu(pre) if config.activation == "silu" else jax.nn.gelu(pre, approximate=True)
    up = einsum("td,fd->tf", x, p.up_proj)  # (T, F)
    return einsum("tf,df->td", frozen(gate, detach) * up, p.down_proj)

"""Shared decoder blocks, each written as A(x)·x with one `detach` switch.

With `detach=True` the input-dependent coefficient A(x) goes behind `jax.lax.stop_gradient`, so the
block's Jacobian is the frozen linear map A(x) and block(x) == J·x exactly (docs/method.md §1):

- RMSNorm: A = rsqrt(mean(x²) + eps), a per-row scalar (LayerNorm: rsqrt(var(x) + eps); its mean
  subtraction is linear).
- GLU MLP: A = act(gate(x)), the activated gate; up and down stay linear (GPT-2's MLP: GELU(z) = z·Φ(z),
  A = Φ(z)).
- attention: A = softmax(q·kᵀ·s + mask), the probabilities; q and k only reach the output through
  them, so v_proj and o_proj carry the linear path.

With `detach=False` every block is the model's ordinary forward. Values are identical either way.
Detached, the q, k and gate projections also read a frozen copy of their input: they only reach the
output through the frozen coefficients, so this changes no derivative, but it keeps tangents and
cotangents out of work that cannot contribute (no reliance on dead-code elimination).
All matrix products use `precision=HIGHEST` so float32 on accelerators is not silently bf16.

Biases (Qwen 2's q, k, v; GPT-2's everywhere) are added where the family has them: the q and k biases
feed the frozen probabilities, the others ride the linear path, which is then affine (`eqlin.linear_maps`).
`detach="paired"` evaluates the frozen map at another input: inside `jax.vmap(..., axis_name=PAIR_AXIS)`
over a pair (x_lin, x_frozen), every `frozen` coefficient of both members is member 1's, so member 0
runs the linear path on x_lin with the coefficients frozen at x_frozen (`eqlin.linear_maps.frozen_at_zero`).

The folded MLP. With the activated gate g_t frozen, the MLP at position t is the linear map
    m_t = D · diag(g_t) · U · x_t = M_t x_t,    U = up_proj (F, d), D = down_proj (d, F).
Pushing m tangents (or cotangents) through U and D costs 4·m·d·F flops per position; forming M_t costs
2·d²·F once and applying it 2·m·d², so folding pays when m·(2F − d) > d·F (`eqlin.memory.fold_pays`):
m > 380 for Gemma 3 270M (d = 640, F = 2048); the full detached J pushes m = d cotangents, the
all-layer forward pass m = T·d tangents. `folded_mlp` has the unfolded product's value bit for bit;
only its derivative differs: a `jax.custom_jvp` whose tangent is M_t · dx_t with M_t formed from the
primals, so `jax.linearize` / `jax.vjp` form it once per linearization (stored with it: T·d² numbers
per layer), never once per chunk of basis vectors, and reverse mode is JAX's transpose of the rule,
M_tᵀ · ct_t. A derivative with respect to the gate or the weights falls back to the unfolded rule.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from eqlin.config import ModelConfig

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
einsum = functools.partial(jnp.einsum, precision=HIGHEST)
PAIRED = "paired"
PAIR_AXIS = "eqlin_pair"  # the vmapped axis of (x_lin, x_frozen) pairs under detach=PAIRED
Detach = bool | Literal["paired"]
FROZEN_NAME = "eqlin_frozen"  # `checkpoint_name` of every frozen coefficient: kept, not recomputed, by derivatives
FOLD_NAME = "eqlin_fold"  # `checkpoint_name` of the folded MLP's matrices M_t


def frozen(a: Array, detach: Detach) -> Array:
    """The one place a nonlinear coefficient is frozen: `stop_gradient(a)` when detaching. With
    detach=PAIRED (inside a vmap over PAIR_AXIS), the coefficient of the pair's member 1, x_frozen."""
    if detach == PAIRED:
        a = jax.lax.all_gather(a, PAIR_AXIS)[1]
    return checkpoint_name(jax.lax.stop_gradient(a), FROZEN_NAME) if detach else a


def rms_norm(x: Array, weight: Array, *, eps: float, offset: float, detach: Detach) -> Array:
    """RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · (offset + w). x (..., n), w (n,)."""
    coeff = frozen(jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps), detach)
    return x * coeff * (offset + weight)


def layer_norm(x: Array, weight: Array, bias: Array | None, *, eps: float, detach: Detach) -> Array:
    """LayerNorm over the last axis: (x − mean(x)) · rsqrt(var(x) + eps) · w + b. The mean subtraction is
    linear and stays on the path; only the scale rsqrt(var + eps) is frozen, as RMSNorm's. x (..., n)."""
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    coeff = frozen(jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps), detach)
    out = centered * coeff * weight
    return out if bias is None else out + bias


def rope_tables(inv_freq: Array, positions: Array, dtype: jnp.dtype, scale: float = 1.0) -> tuple[Array, Array]:
    """cos and sin tables, each (T, r) with r = 2·len(inv_freq), in the HF (half-split) layout, times
    `scale` (longrope's attention factor)."""
    angles = positions.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]  # (T, r/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (T, r)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first r features of every head. x (T, heads, hd); cos, sin (T, r)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def visible(t: Array, s: Array, window: Array) -> Array:
    """Boolean mask, broadcast over query positions t and key positions s: key s is visible from query t
    iff s <= t and (window == 0 or t - s < window)."""
    return (s <= t) & ((window == 0) | (t - s < window))


def attention_mask(length: int, window: Array) -> Array:
    """Boolean (T, T) causal (and sliding-window) mask: `visible` for every query and key position."""
    positions = jnp.arange(length)
    return visible(positions[:, None], positions[None, :], window)


def linear(x: Array, weight: Array, bias: Array | None) -> Array:
    """x (T, n) through a linear layer with weight (m, n) and optional bias (m,): (T, m)."""
    y = einsum("td,ed->te", x, weight)
    return y if bias is None else y + bias


def project_qkv(x: Array, p, cos: Array, sin: Array, config: ModelConfig, *, detach: Detach
                ) -> tuple[Array, Array, Array]:
    """q (T, H, hd), k (T, K, hd) after q/k norm and RoPE, and v (T, K, hd), from x (T, d).

    q and k read a frozen copy of x: they only reach the output through the (frozen) probabilities."""
    T = x.shape[0]
    H, K, hd = config.num_heads, config.num_kv_heads, config.head_dim
    x_frozen = frozen(x, detach)
    q = linear(x_frozen, p.q_proj, p.q_bias)  # (T, H·hd)
    k = linear(x_frozen, p.k_proj, p.k_bias)  # (T, K·hd)
    v = linear(x, p.v_proj, p.v_bias).reshape(T, K, hd)  # (T, K, hd)
    norm = functools.partial(rms_norm, eps=config.rms_norm_eps, offset=config.norm_offset, detach=detach)
    if config.qk_norm == "full":
        q, k = norm(q, p.q_norm), norm(k, p.k_norm)
    q, k = q.reshape(T, H, hd), k.reshape(T, K, hd)
    if config.qk_norm == "head":
        q, k = norm(q, p.q_norm), norm(k, p.k_norm)
    if config.positions == "learned":  # GPT-2: positions are in the embeddings, no RoPE
        return q, k, v
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_probs(q: Array, k: Array, mask: Array, config: ModelConfig) -> Array:
    """Softmax probabilities (K, G, Tq, S) of queries q (Tq, H, hd) over keys k (S, K, hd) where `mask`
    (Tq, S) is True; G = H / K query heads share each kv head. Logit softcap as configured."""
    Tq, H, hd = q.shape
    K = k.shape[1]
    scores = einsum("tkgh,skh->kgts", q.reshape(Tq, K, H // K, hd), k) * config.query_scale
    if config.attn_logit_softcapping is not None:
        cap = config.attn_logit_softcapping
        scores = jnp.tanh(scores / cap) * cap
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def attend(probs: Array, v: Array, o_proj: Array, o_bias: Array | None = None) -> Array:
    """Σ_s probs · v_s per head, heads concatenated, through o_proj (and its bias, GPT-2): probs
    (K, G, Q, S), v (S, K, hd), o_proj (d, H·hd), o_bias (d,) or None -> (Q, d)."""
    Q = probs.shape[2]
    out = einsum("kgts,skh->tkgh", probs, v).reshape(Q, -1)  # (Q, H·hd)
    return linear(out, o_proj, o_bias)


def attention(
    x: Array,
    p,
    cos: Array,
    sin: Array,
    window: Array,
    config: ModelConfig,
    *,
    detach: Detach,
    queries: int | None = None,
) -> Array:
    """Causal GQA self-attention of one layer. x (T, d) -> (Q, d): the outputs at the last Q = `queries`
    positions (default all T; keys and values always at every position).

    `p` holds one layer's slice of LayerParams; `window` is this layer's sliding window (0: none).
    """
    T = x.shape[0]
    with jax.named_scope("qkv"):
        q, k, v = project_qkv(x, p, cos, sin, config, detach=detach)
    with jax.named_scope("probabilities"):  # no cotangent: every query's row costs no backward work
        probs = frozen(attention_probs(q, k, attention_mask(T, window), config), detach)
    with jax.named_scope("attend"):
        return attend(probs[:, :, T - (queries or T):], v, p.o_proj, p.o_bias)


def mlp_product(x: Array, gate: Array, up: Array, down: Array, up_bias: Array | None = None) -> Array:
    """down(gate ⊙ (up(x) + up_bias)): x (T, d), gate (T, F), up (F, d), down (d, F), up_bias (F,) or None
    -> (T, d)."""
    return einsum("tf,df->td", gate * linear(x, up, up_bias), down)


def fold_matrices(gate: Array, up: Array, down: Array) -> Array:
    """M_t = D · diag(g_t) · U for every position, (T, d, d): one (T·d, F) @ (F, d) product."""
    scaled = down[None] * gate[:, None, :]  # (T, d, F): D · diag(g_t)
    return einsum("tdf,fe->tde", scaled, up)


@jax.custom_jvp
def folded_mlp(x: Array, gate: Array, up: Array, down: Array, up_bias: Array | None = None) -> Array:
    """`mlp_product` whose tangent in x applies the folded M_t (module docstring; the bias adds no
    derivative in x)."""
    return mlp_product(x, gate, up, down, up_bias)


def _zero(t) -> bool:
    """Whether a tangent is a known zero (symbolic, or of an absent bias)."""
    return t is None or type(t) is SymbolicZero


def _folded_jvp(primals: tuple[Array, ...], tangents: tuple) -> tuple[Array, Array]:
    x, gate, up, down, up_bias = primals
    dx = tangents[0]
    if not all(_zero(t) for t in tangents[1:]):  # gate, weights or bias perturbed: no fold
        dense = tuple(jnp.zeros(p.shape, p.dtype) if type(t) is SymbolicZero else t for p, t in zip(primals, tangents))
        return jax.jvp(mlp_product, primals, dense)
    y = mlp_product(x, gate, up, down, up_bias)
    if type(dx) is SymbolicZero:
        return y, jnp.zeros_like(y)
    with jax.named_scope("fold"):
        return y, einsum("tde,te->td", checkpoint_name(fold_matrices(gate, up, down), FOLD_NAME), dx)


folded_mlp.defjvp(_folded_jvp, symbolic_zeros=True)


def gelu_coefficient(z: Array, approximate: bool) -> Array:
    """s(z) with GELU(z) = z·s(z): Φ(z) = (1 + erf(z/√2)) / 2, or with `approximate` its tanh form
    (1 + tanh(√(2/π)·(z + 0.044715·z³))) / 2 (GPT-2's gelu_new)."""
    if approximate:
        return 0.5 * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z * z * z)))
    return 0.5 * (1 + jax.lax.erf(z / math.sqrt(2)))


def glu_mlp(x: Array, p, config: ModelConfig, *, detach: Detach, fold: bool = False) -> Array:
    """The MLP, x (T, d) -> (T, d). Gated (`config.gated_mlp`): down(act(gate(x)) ⊙ up(x)), SwiGLU or GeGLU
    (tanh GELU), the activated gate frozen. Not gated (GPT-2): down(GELU(up(x) + b_up)) + b_down written
    down(s(z) ⊙ (up(x) + b_up)) + b_down with z = up(x) + b_up and s = `gelu_coefficient` frozen, so the
    same product serves both.

    `fold` (with `detach`): the same value, differentiated through one folded matrix per position
    (`eqlin.fold`), cheaper when many vectors share one linearization."""
    with jax.named_scope("gate"):  # only feeds the frozen gate
        if config.gated_mlp:
            pre = einsum("td,fd->tf", frozen(x, detach), p.gate_proj)  # (T, F)
            gate = jax.nn.silu(pre) if config.activation == "silu" else jax.nn.gelu(pre, approximate=True)
        else:
            pre = linear(frozen(x, detach), p.up_proj, p.up_bias)  # (T, F): z, read on the frozen path
            gate = gelu_coefficient(pre, approximate=config.activation == "gelu_tanh")
        gate = frozen(gate, detach)
    with jax.named_scope("up_down"):
        if fold and detach:
            out = folded_mlp(x, gate, p.up_proj, p.down_proj, p.up_bias)
        else:
            out = mlp_product(x, gate, p.up_proj, p.down_proj, p.up_bias)
        return out if p.down_bias is None else out + p.down_bias

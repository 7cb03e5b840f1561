"""Steered greedy generation with a KV cache, as one compiled program (the steering rule: `eqlin.steering`).

The cache has B slots (B = `bucket(len(text) + max_new_tokens)`, a power of two, so texts of different
lengths share the compilation). Positions go through the layers one token at a time (the text's, then
each generated one) with the same blocks as the full forward, carrying the running sum S_k of the
concept map's terms; v_k is added to the residual stream entering the injection layer. The injection
layer and strength are traced values, so one compilation also serves a whole layer × strength sweep.
longrope (Phi) picks its factors as transformers' KV cache does: the text's positions by the text's
length, each generated position by the length up to it (`eqlin.decoder.rope_stack`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eqlin.blocks import attend, attention_probs, einsum, project_qkv, visible
from eqlin.config import ModelConfig
from eqlin.decoder import embed, final_norm, layer_tail, optional_norm, rope_stack, unembed
from eqlin.model import Model
from eqlin.params import LayerParams, Params, widen_tree

Array = jax.Array


def cached_layer(h: Array, p: LayerParams, keys: Array, values: Array, pos: Array, cos: Array, sin: Array,
                 window: Array, config: ModelConfig) -> tuple[Array, Array, Array]:
    """`eqlin.decoder.decoder_layer` for the one token at position `pos`, its keys and values written into
    the layer's cache. h (d,); keys, values (B, K, hd) hold positions < pos; cos, sin (r,) at pos.
    Returns (h_out (d,), keys, values). The same blocks as the full forward (projections, q/k norms,
    RoPE, probabilities, layer tail), with row `pos` of the mask against the cached keys. `p` is widened to
    h's dtype here, as `decoder_layer` does."""
    p = widen_tree(p, h.dtype)
    x = optional_norm(h, p.attn_in_norm, config, detach=False, bias=p.attn_in_norm_bias)[None]  # (1, d)
    q, k, v = project_qkv(x, p, cos[None], sin[None], config, detach=False)  # (1, H, hd), (1, K, hd) ×2
    keys = jax.lax.dynamic_update_index_in_dim(keys, k[0], pos, 0)  # (B, K, hd)
    values = jax.lax.dynamic_update_index_in_dim(values, v[0], pos, 0)
    mask = visible(pos, jnp.arange(keys.shape[0]), window)[None]  # (1, B): row `pos` of attention_mask
    attn = attend(attention_probs(q, keys, mask, config), values, p.o_proj, p.o_bias)  # (1, d)
    h_out, _, _ = layer_tail(h[None], attn, p, config, detach=False)
    return h_out[0], keys, values


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate(params: Params, config: ModelConfig, ids: Array, length: Array, J: Array, layer: Array,
             strength: Array, *, max_new_tokens: int) -> tuple[Array, Array]:
    """Greedy steered generation: (new token ids (N,), logits (N, V)) for N = max_new_tokens.

    ids (B,): the text's ids in the first `length` slots of a buffer with B ≥ length + N (the KV cache
    has B slots). Positions k = 0 … length+N−2 go through the layers one at a time; at each, S_k (the
    running sum) is carried and v_k = λ/2 ‖h_k‖ S_k/‖S_k‖ is added entering `layer` (traced, like
    `strength`: one compilation serves a sweep). At strength 0, v = 0 exactly: the unsteered run."""
    B, d = ids.shape[0], config.hidden_size
    dtype = params.dtype
    cos_all, sin_all = rope_stack(config, B, dtype, context=length)  # (2, B, r)
    windows, ropes = jnp.asarray(config.layer_windows()), jnp.asarray(config.layer_rope_index())
    cache = jnp.zeros((config.num_layers, B, config.num_kv_heads, config.head_dim), dtype)
    scale = jnp.asarray(strength, dtype) / 2
    length = jnp.asarray(length, jnp.int32)

    def position(k: Array, carry):
        buf, keys, values, S, tokens, logits = carry
        x = embed(params, config, buf[k][None], positions=k[None])[0]  # (d,)
        S = S + einsum("oe,e->o", J[:, k % J.shape[1], :], x)
        norm_S = jnp.linalg.norm(S)
        direction = jnp.where(norm_S > 0, S / jnp.where(norm_S > 0, norm_S, 1), 0)

        def layer_step(h, xs):
            p, ck, cv, window, rope, i = xs
            h = jnp.where(i == layer, h + scale * jnp.linalg.norm(h) * direction, h)
            h, ck, cv = cached_layer(h, p, ck, cv, k, cos_all[rope, k], sin_all[rope, k], window, config)
            return h, (ck, cv)

        h, (keys, values) = jax.lax.scan(
            layer_step, x, (params.layers, keys, values, windows, ropes, jnp.arange(config.num_layers)))

        def emit(state):  # generated step: logits, greedy token, written after position k
            buf, tokens, logits = state
            step_logits = unembed(params, config, final_norm(params, config, h, detach=False))  # (V,)
            token = jnp.argmax(step_logits).astype(buf.dtype)
            j = k - (length - 1)
            return buf.at[k + 1].set(token), tokens.at[j].set(token), logits.at[j].set(step_logits)

        buf, tokens, logits = jax.lax.cond(k >= length - 1, emit, lambda state: state, (buf, tokens, logits))
        return buf, keys, values, S, tokens, logits

    init = (ids, cache, cache, jnp.zeros(d, dtype), jnp.zeros(max_new_tokens, ids.dtype),
            jnp.zeros((max_new_tokens, config.vocab_size), dtype))
    *_, tokens, logits = jax.lax.fori_loop(0, length + max_new_tokens - 1, position, init)
    return tokens, logits


def bucket(length: int) -> int:
    """The buffer size for `length` tokens: the next power of two, at least 16."""
    return max(16, 1 << (length - 1).bit_length())


def steered_greedy(model: Model, ids: np.ndarray, J: Array, layer: int, strength: float, max_new_tokens: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`generate` for the text `ids` (T,) in a bucketed buffer: (new token ids (N,), logits (N, V)) as host arrays.
    J (d, T_c, d): the concept's map."""
    buf = np.zeros(bucket(len(ids) + max_new_tokens), np.int32)
    buf[:len(ids)] = ids
    tokens, logits = generate(model.params, model.config, jnp.asarray(buf), jnp.int32(len(ids)), J,
                              jnp.int32(layer), jnp.asarray(strength, model.dtype), max_new_tokens=max_new_tokens)
    return np.asarray(tokens), np.asarray(logits)

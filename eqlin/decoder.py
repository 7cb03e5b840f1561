"""The decoder forward pass as pure functions of (params, config, x), scanned over stacked layers.

`x` is always the input embedding sequence (T, d) as the model consumes it (Gemma: already scaled by
√d); that is the input space of every linear map eqlin builds. `detach` freezes every nonlinear
coefficient (see `eqlin.blocks`) without changing any value.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from eqlin.blocks import FOLD_NAME, FROZEN_NAME, Detach, attention, einsum, glu_mlp, layer_norm, rms_norm, rope_tables
from eqlin.config import ModelConfig
from eqlin.params import LayerParams, Params, weight_leaves, widen, widen_tree

Array = jax.Array
# Rows a last-position readout keeps in its last layer: 2, not 1, because XLA CPU's matrix-vector kernel
# sums in another order than its matrix-matrix one; two rows give the full forward's last row bit for bit.
LAST_ROWS = 2
# Vocabulary rows the unembedding widens at a time (`unembed`): 16384 float64 rows of d = 4096 are 512 MiB.
VOCAB_CHUNK = 16384
# What the checkpointed layer body keeps for derivatives besides its input: the frozen coefficients
# (`eqlin.blocks.frozen`) and the folded MLP's matrices (`eqlin.blocks.folded_mlp`). All else, the
# widened weights above all, is recomputed from the stored leaves.
SAVED = jax.checkpoint_policies.save_only_these_names(FROZEN_NAME, FOLD_NAME)
# How every layer is differentiated (the scan body, a last layer run alone, a single layer's map).
remat = functools.partial(jax.checkpoint, policy=SAVED, prevent_cse=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """Result of `forward`.

    hidden: (T, d) final-normed residual stream (what the unembedding reads).
    logits: (T, V).
    residuals: (L, T, d) residual stream after each layer (before the final norm), or None.
    attn_outputs, mlp_outputs: (L, T, d) what each layer's attention / MLP branch adds to the
        residual stream (after Gemma's post-norms), or None.
    """

    hidden: Array
    logits: Array
    residuals: Array | None = None
    attn_outputs: Array | None = None
    mlp_outputs: Array | None = None


def embed(params: Params, config: ModelConfig, ids: Array, positions: Array | None = None) -> Array:
    """Input embeddings (T, d) for token ids (T,): rows of the table (gathered stored, then widened) times
    `embed_scale` (Gemma √d), plus the learned position embeddings of `positions` (default 0 … T−1) where
    the family has them (GPT-2)."""
    rows = widen(params.embed[ids], params.dtype)
    rows = rows * jnp.asarray(config.embed_scale, rows.dtype) if config.embed_scale != 1.0 else rows
    if params.position_embed is None:
        return rows
    return rows + widen(params.position_embed[jnp.arange(ids.shape[0]) if positions is None else positions],
                        params.dtype)


def _rope_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """RoPE angles in float64 for float64 models, float32 otherwise (never below float32)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def rope_stack(config: ModelConfig, length: int, dtype: jnp.dtype, *, context: Array | None = None
               ) -> tuple[Array, Array]:
    """cos, sin tables for both RoPE specs, each (2, T, rope_dim): index 0 full attention, 1 sliding.

    longrope takes its short or long factors by the sequence length, as transformers does: `context` (an
    int or a traced value; default `length`, the whole sequence) is the length of the sequence the
    positions belong to, and row k takes the long factors when max(context, k + 1) >
    original_max_position_embeddings (so a KV-cached generation, context = the prompt's length, switches
    as transformers' cache does, and a ragged prompt's padding rows never reach its readout)."""
    angle_dtype = _rope_dtype(dtype)
    positions = jnp.arange(length)
    tables = []
    for spec in (config.rope_full, config.rope_sliding):
        def table(long: bool, spec=spec) -> tuple[Array, Array]:
            inv = jnp.asarray(spec.inv_freq(config.rope_dim, long=long), angle_dtype)
            return rope_tables(inv, positions, dtype, spec.attention_factor)

        if not spec.switches:
            tables.append(table(False))
        elif context is None:  # every row: max(T, k + 1) = T
            tables.append(table(spec.uses_long(length)))
        else:
            long = (jnp.maximum(context, positions + 1) > spec.original_max_position_embeddings)[:, None]
            tables.append(tuple(jnp.where(long, a, b) for a, b in zip(table(True), table(False))))
    return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])


def optional_norm(v: Array, weight: Array | None, config: ModelConfig, *, detach: Detach, bias: Array | None = None
                  ) -> Array:
    """The family's norm (RMSNorm, or LayerNorm with `bias`) of v with `weight`, or v itself where the family
    has no such norm (weight None)."""
    if weight is None:
        return v
    if config.norm_kind == "layer":
        return layer_norm(v, weight, bias, eps=config.rms_norm_eps, detach=detach)
    return rms_norm(v, weight, eps=config.rms_norm_eps, offset=config.norm_offset, detach=detach)


def decoder_layer(
    h: Array,
    p: LayerParams,
    cos: Array,
    sin: Array,
    window: Array,
    config: ModelConfig,
    *,
    detach: Detach,
    queries: int | None = None,
    fold: bool = False,
    tap: str = "post",
) -> tuple[Array, Array, Array]:
    """One decoder layer on the residual stream h (T, d), with one layer's slice of the weights.

    Returns (h_out, attn_branch, mlp_branch), each (Q, d), at the last Q = `queries` positions (default
    all T). Fewer queries skip the other positions' attention outputs and MLPs, all of which a readout
    of the last Q positions cannot see. `fold` and `tap`: see `layer_tail`. `p` may be stored narrower
    than h: it is widened to h's dtype here (`eqlin.params.widen`), one layer at a time.
    """
    p = widen_tree(p, h.dtype)
    with jax.named_scope("attention"):
        attn = attention(optional_norm(h, p.attn_in_norm, config, detach=detach, bias=p.attn_in_norm_bias), p, cos,
                         sin, window, config, detach=detach, queries=queries)
    return layer_tail(h[h.shape[0] - (queries or h.shape[0]):], attn, p, config, detach=detach, fold=fold, tap=tap)


def layer_tail(h: Array, attn: Array, p: LayerParams, config: ModelConfig, *, detach: Detach, fold: bool = False,
               tap: str = "post") -> tuple[Array, Array, Array]:
    """A layer after its attention: h (Q, d) residual rows, attn (Q, d) attention output (o_proj applied)
    -> (h_out, attn_branch, mlp_branch), with the family's post-norms (sandwich/post layouts).

    The branches are tapped after their post-norms (`tap="post"`: exactly what each adds to the residual
    stream, h_out = h + attn_branch + mlp_branch) or before them (`"pre"`: the attention's o_proj output
    and the MLP's down_proj output, as the paper's code reads Gemma); the two agree where the family has
    no post-norms. `fold`: the MLP's derivative through one matrix per position (`blocks.glu_mlp`)."""
    a = optional_norm(attn, p.attn_out_norm, config, detach=detach)
    h = h + a
    with jax.named_scope("mlp"):
        m_pre = glu_mlp(optional_norm(h, p.mlp_in_norm, config, detach=detach, bias=p.mlp_in_norm_bias), p, config,
                        detach=detach, fold=fold)
    m = optional_norm(m_pre, p.mlp_out_norm, config, detach=detach)
    return (h + m, a, m) if tap == "post" else (h + m, attn, m_pre)


def run_layers(
    layers: LayerParams,
    config: ModelConfig,
    h: Array,
    *,
    detach: Detach,
    first_layer: int = 0,
    count: int | None = None,
    collect: bool | str = False,
    fold: bool = False,
    tap: str = "post",
    stop: Array | None = None,
    prefix: Array | None = None,
    context: Array | None = None,
) -> tuple[Array, tuple[Array, Array, Array] | None]:
    """Run the first l = `count` layers of a stack (default all) on h (T, d) with `lax.scan`.

    The scan runs over layer indices and reads each layer's slice from the stack inside its body (a
    slice of the stack outside it would copy every weight); the body is `jax.checkpoint`-ed (policy
    `SAVED`): a derivative keeps each layer's input and frozen coefficients and the stored weights, never
    float64 copies of the weights. `first_layer` is the index of the stack's first layer in the model (it
    selects the per-layer attention type, window and RoPE table). With `collect`, also returns (residuals, attn, mlp),
    each (l, T, d), or only their last positions, each (l, d), with `collect="last"` (what a
    last-position readout needs: far less to carry per tangent or cotangent). `fold`, `tap`: see
    `layer_tail`. `stop` (a traced int): stack layers from index `stop` on are skipped (`lax.cond`: no
    work forward or backward; their branches read 0), so one compilation serves every depth.

    `prefix` (l, s, d): the residual streams entering each layer at the first s positions, held fixed;
    h (T − s, d) is then the stream at the positions after them, and every output covers those only.
    Causal attention makes this the same computation for those positions, and a derivative with respect
    to h then never touches the first s positions (forward-mode tangents from positions >= s are zero
    before them). `context`: the sequence length that picks longrope's factors (a
    traced value; default the full length, see `rope_stack`).
    """
    n = jax.tree_util.tree_leaves(layers)[0].shape[0] if count is None else count
    length = h.shape[0] + (0 if prefix is None else prefix.shape[1])
    cos_all, sin_all = rope_stack(config, length, h.dtype, context=context)
    windows = jnp.asarray(config.layer_windows()[first_layer:first_layer + n])
    rope_index = jnp.asarray(config.layer_rope_index()[first_layer:first_layer + n])

    @remat
    def step(h, xs):
        window, r, i, before = xs
        p = jax.tree_util.tree_map(lambda a: a[i], layers)

        def layer(h: Array) -> tuple[Array, Array, Array]:
            full, rows = (h, None) if before is None else (jnp.concatenate([before, h]), h.shape[0])
            return decoder_layer(full, p, cos_all[r], sin_all[r], window, config, detach=detach, queries=rows,
                                 fold=fold, tap=tap)

        if stop is None:
            h, a, m = layer(h)
        else:
            h, a, m = jax.lax.cond(i < stop, layer, lambda h: (h, jnp.zeros_like(h), jnp.zeros_like(h)), h)
        if collect == "last":
            return h, (h[-1], a[-1], m[-1])
        return h, ((h, a, m) if collect else None)

    h, stacked = jax.lax.scan(step, h, (windows, rope_index, jnp.arange(n), prefix))
    return h, stacked


def run_layers_last(
    layers: LayerParams,
    config: ModelConfig,
    h: Array,
    *,
    detach: Detach,
    count: int | None = None,
    collect: bool = False,
    fold: bool = False,
    tap: str = "post",
    prefix: Array | None = None,
) -> tuple[Array, tuple[Array, Array, Array] | None]:
    """The residual stream at the last position after the model's first l = `count` >= 1 layers (default
    all of the stack) on h (T, d): (d,). The last layer computes only the last `LAST_ROWS` queries and MLP
    rows, so cotangents of a last-position readout skip work that cannot reach them. With `collect`,
    also every layer's (residual, attn, mlp) at the last position, each (l, d). `fold`, `tap`, `prefix`:
    see `run_layers`."""
    n = jax.tree_util.tree_leaves(layers)[0].shape[0] if count is None else count
    h, stacked = run_layers(layers, config, h, detach=detach, count=n - 1, collect=collect and "last",
                            fold=fold, tap=tap, prefix=None if prefix is None else prefix[:n - 1])
    full = h if prefix is None else jnp.concatenate([prefix[n - 1], h])
    cos_all, sin_all = rope_stack(config, full.shape[0], h.dtype)
    r, window = config.layer_rope_index()[n - 1], config.layer_windows()[n - 1]

    @remat
    def last_layer(full: Array) -> tuple[Array, Array, Array]:  # each (Q, d)
        p = jax.tree_util.tree_map(lambda a: a[n - 1], layers)  # sliced inside: a derivative keeps the stack
        return decoder_layer(full, p, cos_all[r], sin_all[r], jnp.asarray(window), config, detach=detach,
                             queries=min(LAST_ROWS, full.shape[0]), fold=fold, tap=tap)

    last = last_layer(full)
    if not collect:
        return last[0][-1], None
    return last[0][-1], tuple(jnp.concatenate([s, l[-1:]]) for s, l in zip(stacked, last))


def streams_entering(params: Params, config: ModelConfig, x: Array, top: int, *, detach: Detach) -> Array:
    """The residual streams entering layers 0 … top−1 for input embeddings x (T, d): (top, T, d), where
    stream[0] = x and stream[i] is layer i−1's output (no final norm)."""
    if top == 1:
        return x[None]
    _, (res, _, _) = run_layers(params.layers, config, x, detach=detach, count=top - 1, collect=True)
    return jnp.concatenate([x[None], res])


def final_norm(params: Params, config: ModelConfig, h: Array, *, detach: Detach) -> Array:
    """The model's final norm (RMSNorm, or GPT-2's LayerNorm), over the last axis of h (..., d)."""
    return optional_norm(h, widen(params.final_norm, h.dtype), config, detach=detach,
                         bias=widen(params.final_norm_bias, h.dtype))


def unembed(params: Params, config: ModelConfig, hidden: Array) -> Array:
    """Logits (..., V) from final-normed hidden states (..., d), with final softcapping if configured. The
    stored unembedding is widened `VOCAB_CHUNK` rows at a time, never whole."""
    table = params.unembedding
    logits = jnp.concatenate([einsum("...d,vd->...v", hidden, widen(table[start:start + VOCAB_CHUNK], hidden.dtype))
                              for start in range(0, table.shape[0], VOCAB_CHUNK)], axis=-1)
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


def final_hidden(params: Params, config: ModelConfig, x: Array, *, detach: bool = False) -> Array:
    """Final-normed hidden states (T, d) for input embeddings x (T, d)."""
    h, _ = run_layers(params.layers, config, x, detach=detach)
    return final_norm(params, config, h, detach=detach)


def forward(
    params: Params, config: ModelConfig, x: Array, *, detach: bool = False, collect: bool = False
) -> ForwardOutput:
    """The decoder on input embeddings x (T, d): final hidden states, logits and, with `collect`,
    every layer's residual stream and attention and MLP branch outputs (see ForwardOutput)."""
    h, stacked = run_layers(params.layers, config, x, detach=detach, collect=collect)
    hidden = final_norm(params, config, h, detach=detach)
    extras = stacked if collect else (None, None, None)
    return ForwardOutput(hidden, unembed(params, config, hidden), *extras)


def layer_slice(layers: LayerParams, start: int, stop: int) -> LayerParams:
    """Layers [start, stop) of a stacked LayerParams (a static slice)."""
    return jax.tree_util.tree_map(lambda a: a[start:stop], layers)


def num_params(params: Params) -> int:
    """Total number of weights."""
    return int(sum(np.prod(a.shape) for a in weight_leaves(params)))

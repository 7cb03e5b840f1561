"""Concept steering with the detached Jacobian (docs/method.md; arXiv 2505.24293).

Where the map comes from and where it goes in, for `layer = l` (0 ≤ l < L):

- h⁽ˡ⁾ (T, d) is the raw residual stream *entering* layer l, i.e. the output of layer l−1 with no final
  norm; for l = 0 it is the input embeddings themselves.
- J_c (d, T_c, d) is the detached Jacobian of h⁽ˡ⁾ at the concept prompt's last position with respect to
  the concept's input embeddings x_c (T_c, d), so h⁽ˡ⁾_{T_c−1} = Σ_t J_c[:, t, :] x_c,t exactly. For l = 0
  it is the identity on the last embedding (J_c[:, t, :] = δ_{t,T_c−1} I).
- For a sequence with embeddings x (the text, then the tokens generated so far), at every position k:
      s_k = J_c[:, k mod T_c, :] x_k,   S_k = Σ_{j≤k} s_j,   v_k = λ/2 · ‖h⁽ˡ⁾_k‖ · S_k / ‖S_k‖  (0 if S_k = 0)
  and the forward continues from h⁽ˡ⁾ + v into layer l. Generated positions k ≥ len(text) follow the same
  rule over their own embeddings, so v_k depends on positions ≤ k only and generation stays causal.
- J_c is computed once per (concept, layer), from the concept alone (it is the concept's map, so it
  cannot go stale); every position of the steered sequence, text and generated, gets its own v_k.
- For l = 0, s_k ≠ 0 only where k ≡ T_c−1 (mod T_c): nothing is added before position T_c−1.
- For a model with biases the concept's map is affine, h⁽ˡ⁾_{T_c−1} = Σ_t J_c[:, t, :] x_c,t + c_c
  (`eqlin.linear_maps`): only the linear part J_c is applied to the steered text; c_c depends on no
  input, so it carries nothing of the concept's tokens and is not injected (it enters only the
  exactness check of the concept's map).

Unlike the paper's reference code, the map ends at the very residual stream the vector is added to (the
reference takes J at a layer's output but adds the vector at that layer's input: off by one), and the effect is measured, not eyeballed.

Generation is greedy and runs as one compiled program with a KV cache of B slots (B = the next power of
two ≥ len(text) + max_new_tokens, so texts of different lengths share the compilation): positions go
through the layers one token at a time (the text's, then each generated one), carrying S_k. The injection
layer and strength are traced values, so one compilation also serves a whole layer × strength sweep.
longrope (Phi) picks its factors as transformers' KV cache does: the text's positions by the text's
length, each generated position by the length up to it (`eqlin.decoder.rope_stack`).

The lift is the mean over generated steps and concept tokens of log p(concept token), steered minus
unsteered, each run scored on its own greedy continuation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.checks import check_int, check_real
from eqlin.config import ModelConfig
from eqlin.blocks import attend, attention_probs, einsum, project_qkv, visible
from eqlin.decoder import embed, final_norm, layer_tail, optional_norm, rope_stack, streams_entering, unembed
from eqlin.errors import InputError
from eqlin.linear_maps import constant_term, jacobian_of, relative_error
from eqlin.model import Model
from eqlin.params import Params
from eqlin.progress import stage, steps

Array = jax.Array
SCHEMA = "eqlin.steering/1"
CONVENTION = ("J_c: detached Jacobian from the concept's input embeddings to the raw residual stream entering "
              "layer l (output of layer l-1, no final norm; identity for l = 0) at the concept's last position; "
              "v_k = strength/2 * |h_k| * S_k/|S_k|, S_k = sum_{j<=k} J_c[:, j mod T_c, :] x_j, added to the "
              "residual stream h entering layer l at every position, generated ones included")


# --------------------------------------------------------------------------------------------------
# The concept's map.


@functools.partial(jax.jit, static_argnames=("config", "layers", "chunk"))
def concept_maps(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...], chunk: int | None = 128
                 ) -> tuple[Array, Array]:
    """Detached Jacobians of the residual stream entering each of `layers` at the last position, with
    respect to the input embeddings x (T_c, d), in one reverse pass.

    Returns (J, h): J (n, d, T_c, d) and h (n, d), the residual streams themselves (h = Σ_t J_t x_t).
    """
    index = jnp.asarray(layers)

    def streams(v: Array) -> Array:  # (n, d): what enters each listed layer, at the last position
        return streams_entering(params, config, v, max(layers) + 1, detach=True)[index, -1]

    h, J = jacobian_of(streams, x, mode="rev", chunk=chunk)
    return J, h


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def concept_constants(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...]) -> Array:
    """The constants c (n, d) of `concept_maps`' maps (h = Σ_t J_t x_t + c; 0 without biases)."""
    index = jnp.asarray(layers)

    def make(detach):
        return lambda v: streams_entering(params, config, v, max(layers) + 1, detach=detach)[index, -1]

    return constant_term(make, x, jnp.zeros((len(layers), config.hidden_size), x.dtype), config, True)


# --------------------------------------------------------------------------------------------------
# Steered greedy generation with a KV cache: one token per step through every layer.


def cached_layer(h: Array, p, keys: Array, values: Array, pos: Array, cos: Array, sin: Array, window: Array,
                 config: ModelConfig) -> tuple[Array, Array, Array]:
    """`eqlin.decoder.decoder_layer` for the one token at position `pos`, its keys and values written into
    the layer's cache. h (d,); keys, values (B, K, hd) hold positions < pos; cos, sin (r,) at pos.
    Returns (h_out (d,), keys, values). The same blocks as the full forward (projections, q/k norms,
    RoPE, probabilities, layer tail), with row `pos` of the mask against the cached keys."""
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
    dtype = params.embed.dtype
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


# --------------------------------------------------------------------------------------------------
# Public API.


@dataclasses.dataclass(frozen=True)
class SteeringResult:
    """One steered greedy run beside the unsteered one.

    steered_ids, baseline_ids: generated ids (N,); steered_text, baseline_text: those continuations decoded
        (the generated tokens only, without the text).
    steered_logits, baseline_logits: (N, V), the logits each step's token was chosen from.
    concept_tokens: ids (k,) scored; steered_logprobs, baseline_logprobs: (N, k) their log-probabilities.
    logprob_lift: mean(steered_logprobs) − mean(baseline_logprobs).
    map_relative_error: ‖h − (Σ_t J_c,t x_c,t + c_c)‖ / ‖h‖ of the concept's map (exactness check).
    """

    concept: str
    text: str
    layer: int
    strength: float
    concept_tokens: np.ndarray
    steered_ids: np.ndarray
    baseline_ids: np.ndarray
    steered_text: str
    baseline_text: str
    steered_logits: np.ndarray
    baseline_logits: np.ndarray
    steered_logprobs: np.ndarray
    baseline_logprobs: np.ndarray
    logprob_lift: float
    map_relative_error: float

    def __repr__(self) -> str:
        return display.steering_repr(self)

    def _repr_html_(self) -> str:
        return display.steering_html(self)


def _check(model: Model, concept: str, text: str, layers: Sequence[int], max_new_tokens: int,
           concept_tokens: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate inputs; returns (concept ids, text ids, concept token ids)."""
    if not isinstance(concept, str) or not concept.strip():
        raise InputError("empty concept: give the concept prompt, e.g. \"The bridge out of Marin is the Golden\"")
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty text: give the unrelated text to steer, e.g. \"Here is a painting of the\"")
    L = model.config.num_layers
    bad = [l for l in layers if not 0 <= l < L]
    if bad or not len(layers):
        raise InputError(f"layer {bad or list(layers)} out of range: steering injects into the residual stream "
                         f"entering layer l, l in 0..{L - 1}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    c_ids, t_ids = model.encode(concept), model.encode(text)
    room = model.config.max_position_embeddings - len(t_ids)
    if max_new_tokens > room:  # the generated sequence must fit too
        raise InputError(f"the text's {len(t_ids)} tokens and max_new_tokens={max_new_tokens} make "
                         f"{len(t_ids) + max_new_tokens} positions, more than the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings}); use max_new_tokens (--max-new-tokens) "
                         + (f"of at most {room}" if room >= 1 else "of 1 with a shorter text"))
    targets = c_ids[-1:] if concept_tokens is None else model.check_ids(list(concept_tokens))
    return c_ids, t_ids, targets


def _layers(layers) -> tuple[int, ...]:
    """The sweep's layers as sorted unique ints; bools and floats are refused."""
    if isinstance(layers, (str, bytes)) or not all(
            isinstance(l, (int, np.integer)) and not isinstance(l, (bool, np.bool_)) for l in layers):
        raise InputError(f"layers must be a sequence of layer indices (ints), got {layers!r:.80}")
    return tuple(sorted({int(l) for l in layers}))


def _maps(model: Model, c_ids: np.ndarray, layers: tuple[int, ...]) -> tuple[Array, Array]:
    """(J (n, d, T_c, d), relative errors (n,)) of the concept's maps at `layers`."""
    x = embed(model.params, model.config, jnp.asarray(c_ids))
    J, h = concept_maps(model.params, model.config, x, layers=layers)
    recon = jnp.einsum("nots,ts->no", J, x, precision=jax.lax.Precision.HIGHEST)
    recon = recon + concept_constants(model.params, model.config, x, layers=layers)
    return J, relative_error(h, recon)


def _run(model: Model, t_ids: np.ndarray, J: Array, layer: int, strength: float, max_new_tokens: int
         ) -> tuple[np.ndarray, np.ndarray]:
    buf = np.zeros(bucket(len(t_ids) + max_new_tokens), np.int32)
    buf[:len(t_ids)] = t_ids
    tokens, logits = generate(model.params, model.config, jnp.asarray(buf), jnp.int32(len(t_ids)), J,
                              jnp.int32(layer), jnp.asarray(strength, model.dtype), max_new_tokens=max_new_tokens)
    return np.asarray(tokens), np.asarray(logits)


def _logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p (N, k) of the target ids under logits (N, V)."""
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))[:, targets]


def steer(model: Model, concept: str, text: str, *, layer: int, strength: float, max_new_tokens: int = 24,
          concept_tokens: Sequence[int] | None = None) -> SteeringResult:
    """Insert `concept` into the greedy continuation of `text`: J_c of the concept at `layer`, the vector
    v (module docstring) added to the residual stream entering `layer`. concept_tokens: ids whose
    log-probability lift is measured (default: the concept prompt's last token)."""
    (layer,) = _layers([layer])
    strength = check_real("strength", strength, "the vector's norm is strength/2 · ‖h_k‖")
    c_ids, t_ids, targets = _check(model, concept, text, [layer], max_new_tokens, concept_tokens)
    J, err = _maps(model, c_ids, (layer,))
    steered = _run(model, t_ids, J[0], layer, strength, max_new_tokens)
    baseline = _run(model, t_ids, J[0], layer, 0.0, max_new_tokens)
    lp_s, lp_b = _logprobs(steered[1], targets), _logprobs(baseline[1], targets)
    return SteeringResult(concept, text, layer, strength, targets, steered[0], baseline[0],
                          model.decode(steered[0]), model.decode(baseline[0]), steered[1], baseline[1], lp_s, lp_b,
                          float(lp_s.mean() - lp_b.mean()), float(err[0]))


def random_control(J: Array, seed: int) -> Array:
    """A Gaussian operator shaped like J (…, d, T_c, d), each map rescaled to J's Frobenius norm."""
    R = jax.random.normal(jax.random.key(seed), J.shape, J.dtype)
    def frobenius(A: Array) -> Array:
        return jnp.sqrt(jnp.sum(A * A, axis=(-3, -2, -1), keepdims=True))

    return R * (frobenius(J) / frobenius(R))


class SteeringSweep(dict):
    """The table `steering_sweep` returns: a plain dict (exactly steering.json's content) that also shows
    itself as a table in a notebook."""

    def _repr_html_(self) -> str:
        return display.sweep_html(self)


def steering_sweep(model: Model, concept: str, text: str, *, layers: Sequence[int], strengths: Sequence[float],
                   max_new_tokens: int = 24, concept_tokens: Sequence[int] | None = None, seed: int = 0,
                   quiet: bool = True) -> dict[str, Any]:
    """Steer over layers × strengths, beside a control: a random operator of J_c's Frobenius norm (seeded
    by `seed`) in place of J_c. Returns the table, a `SteeringSweep` (a JSON-serializable dict; `lift[i][j]`,
    `control_lift[i][j]` for layers[i], strengths[j]; `cells` with texts). Write it with `write_sweep`."""
    layers = _layers(layers)
    c_ids, t_ids, targets = _check(model, concept, text, layers, max_new_tokens, concept_tokens)
    if isinstance(strengths, (str, bytes)) or not len(strengths):
        raise InputError(f"give at least one strength (a sequence of numbers), got {strengths!r:.80}")
    strengths = [check_real("each strength", lam, "the vector's norm is strength/2 · ‖h_k‖") for lam in strengths]
    seed = check_int("seed", seed, 0, 2**32 - 1, "the random control's seed")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with stage("concept maps (detached Jacobians)", quiet):
        J, errs = jax.block_until_ready(_maps(model, c_ids, layers))
        controls = random_control(J, seed)
    timings["concept maps"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    with stage("baseline generation (compile + run)", quiet):
        base_ids, base_logits = _run(model, t_ids, J[0], layers[0], 0.0, max_new_tokens)
    timings["baseline generation"] = round(time.perf_counter() - start, 3)
    base_lp = float(_logprobs(base_logits, targets).mean())
    lift = np.zeros((len(layers), len(strengths)))
    control_lift = np.zeros_like(lift)
    cells = []
    start = time.perf_counter()
    with steps("steered generation", 2 * lift.size, quiet) as bar:
        for i, l in enumerate(layers):
            for j, lam in enumerate(strengths):
                runs = {}
                for name, op in (("steered", J[i]), ("control", controls[i])):
                    ids, logits = _run(model, t_ids, op, l, float(lam), max_new_tokens)
                    runs[name] = (model.decode(ids), float(_logprobs(logits, targets).mean()) - base_lp)
                    bar.update()
                lift[i, j], control_lift[i, j] = runs["steered"][1], runs["control"][1]
                cells.append({"layer": l, "strength": float(lam), "lift": float(lift[i, j]),
                              "control_lift": float(control_lift[i, j]), "steered_text": runs["steered"][0],
                              "control_text": runs["control"][0]})
    timings["steered generation"] = round(time.perf_counter() - start, 3)
    return SteeringSweep({
        "schema": SCHEMA,
        "model": {"source": model.source, "family": model.config.family, "num_layers": model.config.num_layers},
        "dtype": str(model.dtype),
        "concept": concept,
        "text": text,
        "convention": CONVENTION,
        "concept_tokens": [{"id": int(t), "text": s} for t, s in zip(targets, model.token_strings(targets))],
        "max_new_tokens": max_new_tokens,
        "control_seed": seed,
        "layers": list(layers),
        "strengths": [float(s) for s in strengths],
        "map_relative_error": np.asarray(errs).tolist(),
        "baseline": {"text": model.decode(base_ids), "mean_logprob": base_lp},
        "lift": lift.tolist(),
        "control_lift": control_lift.tolist(),
        "best": max(cells, key=lambda c: c["lift"]),
        "cells": cells,
        "timings_s": timings,
    })


def heatmap_png(table: dict[str, Any]) -> bytes:
    """Two heat maps side by side (steered lift, random-control lift) on one shared colour scale that
    holds every value of both (symmetric logarithmic beyond ±1 nat, so lifts of a few nats and control
    losses of a hundred both show), every cell annotated with its value."""
    from eqlin.report import render_png

    return render_png(_heatmap(table), (11, 0.55 * len(table["layers"]) + 2.8))


def _heatmap(table: dict[str, Any]):
    """heatmap_png's drawing, `draw(fig)`."""
    from matplotlib.colors import SymLogNorm

    lift, control = np.asarray(table["lift"]), np.asarray(table["control_lift"])
    lim = max(float(np.abs(lift).max()), float(np.abs(control).max()), 1.0)
    norm = SymLogNorm(linthresh=1.0, vmin=-lim, vmax=lim, base=10)
    tokens = " ".join(repr(t["text"]) for t in table["concept_tokens"])

    def draw(fig):
        axes = fig.subplots(1, 2, sharey=True)
        for ax, values, title in ((axes[0], lift, "concept map J_c"),
                                  (axes[1], control, "control: random operator with J_c's Frobenius norm")):
            im = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
            ax.set_xticks(range(len(table["strengths"])), [f"{s:g}" for s in table["strengths"]])
            ax.set_yticks(range(len(table["layers"])), [str(l) for l in table["layers"]])
            ax.set_xlabel("strength λ (‖v‖ = λ/2 · ‖h‖)")
            ax.set_title(title, fontsize=10)
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(norm(v) - 0.5) > 0.3 else "black")
        axes[0].set_ylabel("layer l (v added to the stream entering it)")
        bar = fig.colorbar(im, ax=list(axes), fraction=0.04)
        bar.set_label(f"lift of mean log p({tokens}) over the unsteered run, nats\n(one scale for both panels; "
                      "linear within ±1, logarithmic beyond)", fontsize=8)
        fig.suptitle(f"Steering {table['text']!r} with the concept {table['concept']!r}\n"
                     f"greedy, {table['max_new_tokens']} new tokens, {table['dtype']}", fontsize=10)

    return draw


def write_sweep(table: dict[str, Any], out: Path) -> list[Path]:
    """Write steering.json and steering.png as the whole content of `out`, swapped into place as one set."""
    from eqlin.outputs import json_text, write_folder_atomic

    return write_folder_atomic(out, {"steering.json": json_text(table).encode(), "steering.png": heatmap_png(table)})


def summary(table: dict[str, Any], out: Path) -> str:
    """The terminal summary of a sweep: lift and control lift per (layer, strength), both continuations each."""
    tokens = " ".join(repr(t["text"]) for t in table["concept_tokens"])
    lines = [
        f"model: {table['model']['source']} ({table['model']['family']}), dtype {table['dtype']}",
        f"concept: {table['concept']!r}   text: {table['text']!r}   scored tokens: {tokens}",
        f"baseline continuation: {table['baseline']['text']!r} (mean log p {table['baseline']['mean_logprob']:.3f})",
        "",
        "layer  strength      lift   control   continuations: steered, then control",
    ]
    for c in table["cells"]:
        lines += [f"{c['layer']:>5} {c['strength']:>9g} {c['lift']:>9.3f} {c['control_lift']:>9.3f}   {c['steered_text']!r}",
                  f"{'':>35}   {c['control_text']!r}"]
    lines += ["", f"table: {out / 'steering.json'}, heat map: {out / 'steering.png'}"]
    return "\n".join(lines)

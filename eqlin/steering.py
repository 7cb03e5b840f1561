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

Generation is greedy, KV-cached and steered by the rule above (`eqlin.generation`); one compilation
serves a whole layer × strength sweep.

The lift is the mean over generated steps and concept tokens of log p(concept token), steered minus
unsteered, each run scored on its own greedy continuation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.blocks import Detach
from eqlin.checks import check_int, check_real
from eqlin.config import ModelConfig
from eqlin.decoder import embed, streams_entering
from eqlin.errors import InputError
from eqlin.generation import steered_greedy
from eqlin.linear_maps import constant_term, jacobian_of, relative_error
from eqlin.model import Model
from eqlin.params import Params
from eqlin.progress import shown, stage, steps
from eqlin.selection import check_range, layer_indices

Array = jax.Array
SCHEMA = "eqlin.steering/1"
CONVENTION = ("J_c: detached Jacobian from the concept's input embeddings to the raw residual stream entering "
              "layer l (output of layer l-1, no final norm; identity for l = 0) at the concept's last position; "
              "v_k = strength/2 * |h_k| * S_k/|S_k|, S_k = sum_{j<=k} J_c[:, j mod T_c, :] x_j, added to the "
              "residual stream h entering layer l at every position, generated ones included")


# --------------------------------------------------------------------------------------------------
# The concept's map.


def _entering_last(params: Params, config: ModelConfig, layers: tuple[int, ...], detach: Detach
                   ) -> Callable[[Array], Array]:
    """x (T_c, d) -> (n, d): the residual streams entering each of `layers`, at the last position."""
    index = jnp.asarray(layers)
    return lambda v: streams_entering(params, config, v, max(layers) + 1, detach=detach)[index, -1]


@functools.partial(jax.jit, static_argnames=("config", "layers", "chunk"))
def concept_maps(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...], chunk: int | None = 128
                 ) -> tuple[Array, Array]:
    """Detached Jacobians of the residual stream entering each of `layers` at the last position, with
    respect to the input embeddings x (T_c, d), in one reverse pass.

    Returns (J, h): J (n, d, T_c, d) and h (n, d), the residual streams themselves (h = Σ_t J_t x_t).
    """
    h, J = jacobian_of(_entering_last(params, config, layers, True), x, mode="rev", chunk=chunk)
    return J, h


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def concept_constants(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...]) -> Array:
    """The constants c (n, d) of `concept_maps`' maps (h = Σ_t J_t x_t + c; 0 without biases)."""
    return constant_term(functools.partial(_entering_last, params, config, layers), x,
                         jnp.zeros((len(layers), config.hidden_size), x.dtype), config, True)


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


def _check(model: Model, concept: str, text: str, max_new_tokens: int, concept_tokens: Sequence[int] | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate inputs; returns (concept ids, text ids, concept token ids)."""
    if not isinstance(concept, str) or not concept.strip():
        raise InputError("empty concept: give the concept prompt, e.g. \"The bridge out of Marin is the Golden\"")
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty text: give the unrelated text to steer, e.g. \"Here is a painting of the\"")
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


def _layers(layers, num_layers: int) -> tuple[int, ...]:
    """The layers to inject into as sorted unique ints in 0..num_layers−1; bools and floats are refused."""
    listed = layer_indices(layers)
    if listed is None:
        raise InputError(f"layers must be a sequence of layer indices (ints), got {layers!r:.80}")
    if not listed:
        raise InputError(f"layers is empty: give at least one layer to inject into, in 0..{num_layers - 1}")
    check_range(listed, num_layers, "steering injects into the residual stream entering layer l, l in")
    return tuple(sorted(set(listed)))


def _maps(model: Model, c_ids: np.ndarray, layers: tuple[int, ...]) -> tuple[Array, Array]:
    """(J (n, d, T_c, d), relative errors (n,)) of the concept's maps at `layers`."""
    x = embed(model.params, model.config, jnp.asarray(c_ids))
    J, h = concept_maps(model.params, model.config, x, layers=layers)
    recon = jnp.einsum("nots,ts->no", J, x, precision=jax.lax.Precision.HIGHEST)
    recon = recon + concept_constants(model.params, model.config, x, layers=layers)
    return J, relative_error(h, recon)


def _logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p (N, k) of the target ids under logits (N, V)."""
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))[:, targets]


def steer(model: Model, concept: str, text: str, *, layer: int, strength: float, max_new_tokens: int = 24,
          concept_tokens: Sequence[int] | None = None) -> SteeringResult:
    """Insert `concept` into the greedy continuation of `text`: J_c of the concept at `layer`, the vector
    v (module docstring) added to the residual stream entering `layer`. concept_tokens: ids whose
    log-probability lift is measured (default: the concept prompt's last token)."""
    (layer,) = _layers([layer], model.config.num_layers)
    strength = check_real("strength", strength, "the vector's norm is strength/2 · ‖h_k‖")
    c_ids, t_ids, targets = _check(model, concept, text, max_new_tokens, concept_tokens)
    J, err = _maps(model, c_ids, (layer,))
    steered = steered_greedy(model, t_ids, J[0], layer, strength, max_new_tokens)
    baseline = steered_greedy(model, t_ids, J[0], layer, 0.0, max_new_tokens)
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
                   quiet: bool | None = None) -> dict[str, Any]:
    """Steer over layers × strengths, beside a control: a random operator of J_c's Frobenius norm (seeded
    by `seed`) in place of J_c. Returns the table, a `SteeringSweep` (a JSON-serializable dict; `lift[i][j]`,
    `control_lift[i][j]` for layers[i], strengths[j]; `cells` with texts). Write it with
    `eqlin.steering_report.write_sweep`."""
    quiet = not shown(quiet)
    layers = _layers(layers, model.config.num_layers)
    c_ids, t_ids, targets = _check(model, concept, text, max_new_tokens, concept_tokens)
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
        base_ids, base_logits = steered_greedy(model, t_ids, J[0], layers[0], 0.0, max_new_tokens)
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
                    ids, logits = steered_greedy(model, t_ids, op, l, float(lam), max_new_tokens)
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

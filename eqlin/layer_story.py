"""The paper's layer story: every layer's linear maps, both scopes and all three parts, each taken apart.

For one input and each analysed layer l there are six detached maps (`eqlin.selection`): two scopes
(cumulative: input embeddings x (T, d) → layer l's output; single: the residual stream entering layer l
(T, d) → its output) times three parts (the residual stream after the layer, its attention branch, its
MLP branch), each output read at the last position through the final norm, so that y = Σ_t J_t x_t with
J of shape (d, T, d) and y decodable by the unembedding.

Each map is reduced as it is computed to its Gram matrix G = J Jᵀ (d × d, summed over the T·d input
columns), its output y and its reconstruction Σ_t J_t x_t + c (d,; c the constant of a model with biases,
the frozen map at zero input, see `eqlin.linear_maps`), so no J of all layers is ever held.
eigh(G) gives σ_i² and the left singular vectors u_i (what the paper decodes); on d × T·d maps this is
cheaper than an SVD. σ_i² comes with an absolute error of about ε·σ_1²: the top of the spectrum, the
stable rank Σσ²/σ_1² and the participation ratio (Σσ²)²/Σσ⁴ keep float64 accuracy, tiny σ_i do not (the
tests compare with the dense SVD).

Engines:
- cumulative, "fwd": one `jax.linearize` of x ↦ every (part, layer) output; the T·d input basis vectors
  go through it in chunks, each chunk adding J_c J_cᵀ to every map's Gram matrix. Work ∝ T·d tangents
  through the layers up to the deepest analysed one, for all 3·n maps at once; the MLP is folded
  (`eqlin.blocks`), which pays most here (m = T·d).
- cumulative, "rev": one `jax.vjp` per (layer, part) map with d cotangents through layers 0..l only
  (`run_layers(stop=…)`: one compilation for every depth). Work ∝ d · Σ_l (l + 1) per part.
  "auto" picks the engine with fewer flops (`layer_map_flops`); forward wins for short inputs.
- single: per layer, the 3·d cotangents of its three parts through that one layer.
Memory is estimated before anything is allocated (`eqlin.memory`); chunks are chosen to fit, or the
request is refused naming what would fit. Each chunk or map is its own compiled call, so progress is
shown and an interrupt is seen between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.config import ModelConfig
from eqlin.decoder import embed, final_norm, run_layers, streams_entering
from eqlin.errors import InputError
from eqlin.linear_maps import constant_term, cumulative_fn, layer_fn, plan_fold, pull_back_rows, relative_error
from eqlin.memory import activation_elems, choose_chunk, fold_elems, fold_pays, format_bytes, memory_limit_bytes
from eqlin.model import Model
from eqlin.params import Params
from eqlin.progress import shown, steps
from eqlin.selection import PARTS, SCOPES, Scope, Tap, check_tap, resolve_layers
from eqlin.checks import check_int
from eqlin.spectral import EffectiveDimension, align_signs, effective_dimension, score_summary

Array = jax.Array
Engine = Literal["auto", "fwd", "rev"]
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class MapSpectra:
    """One (scope, part) at each analysed layer (leading axis n), from that map's Gram matrix.

    singular_values (n, k), U (n, d, k): the top k σ_i and left singular vectors, u_i·y >= 0;
    frobenius_sq (n,): ‖J‖_F² = Σσ²; effective: `EffectiveDimension` over the full spectrum, fields (n,);
    output y (n, d); relative_error (n,): ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ of the map;
    next_token_rank (n,): how many tokens the logit lens W_U y scores above the model's next token
    (0: on top); next_token_probability (n,): its softmax probability there; u1_next_token_rank (n,):
    how many tokens W_U u_1 scores above the next token (0: u_1 decodes to it);
    top_token_ids (n, k, top) and top_tokens (the strings, nested like the ids): u_i through the
    unembedding, best first.
    """

    singular_values: np.ndarray
    U: np.ndarray
    frobenius_sq: np.ndarray
    effective: EffectiveDimension
    output: np.ndarray
    relative_error: np.ndarray
    next_token_rank: np.ndarray
    next_token_probability: np.ndarray
    u1_next_token_rank: np.ndarray
    top_token_ids: np.ndarray
    top_tokens: list

    def entry(self, i: int) -> dict[str, Any]:
        """Layer i's numbers as plain Python types (the report's per-map dictionary)."""
        eff = self.effective.to_dict()
        return {
            "relative_error": float(self.relative_error[i]),
            "stable_rank": eff["stable_rank"][i],
            "participation_ratio": eff["participation_ratio"][i],
            "rank_90": eff["rank_90"][i],
            "rank_99": eff["rank_99"][i],
            "singular_values": self.singular_values[i].tolist(),
            "top_tokens": self.top_tokens[i][0],
            "singular_vector_tokens": self.top_tokens[i],
            "next_token_rank": int(self.next_token_rank[i]),
            "next_token_probability": float(self.next_token_probability[i]),
            "u1_next_token_rank": int(self.u1_next_token_rank[i]),
        }

    def __repr__(self) -> str:
        return display.map_spectra_repr(self)


@dataclasses.dataclass(frozen=True)
class LayerSpectra:
    """The layer story of one input: maps[scope][part] is a `MapSpectra` over `layers`.

    ids (T,): the input; next_token: the model's greedy next token id at the last position;
    tap: where attention/MLP branches were read ("post" or "pre" their post-norms);
    engines: {scope: the engine used, "fwd" or "rev" (cumulative), "rev" (single)};
    timings_s: seconds spent on each scope's maps and on the spectra and decoding.
    """

    layers: tuple[int, ...]
    maps: dict[str, dict[str, MapSpectra]]
    ids: np.ndarray
    next_token: int
    tap: str
    engines: dict[str, str]
    timings_s: dict[str, float]

    def to_list(self) -> list[dict[str, Any]]:
        """[{"layer": l, scope: {part: MapSpectra.entry}}] in layer order: report.json's "layers"."""
        return [{"layer": l, **{s: {p: m.entry(i) for p, m in parts.items()} for s, parts in self.maps.items()}}
                for i, l in enumerate(self.layers)]

    @property
    def max_relative_error(self) -> float:
        """The largest reconstruction error over every map."""
        return max(float(np.max(m.relative_error)) for parts in self.maps.values() for m in parts.values())

    def __repr__(self) -> str:
        return display.layer_spectra_repr(self)

    def _repr_html_(self) -> str:
        return display.layer_spectra_html(self)


# --------------------------------------------------------------------------------------------------
# Cost and memory, before anything is allocated.


def _per_vector_layer_flops(config: ModelConfig, length: int, folded: bool) -> float:
    """Flops of one tangent or cotangent through one layer at all T positions: v, o, the attention
    contraction and the MLP (U and D, or the folded d × d matrix)."""
    d, F, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attention = 2 * d * (config.num_heads + config.num_kv_heads) * hd + 2 * config.num_heads * length * hd
    return length * (attention + (2 * d * d if folded else 4 * d * F))


def layer_map_flops(config: ModelConfig, length: int, layers: Sequence[int], parts: int, groups: int = 1
                    ) -> dict[str, float]:
    """Estimated flops of the cumulative maps of `layers` × `parts`, per engine: "fwd" (T·d tangents
    through layers 0..max(layers), all maps at once, the input positions in `groups` causal groups) and
    "rev" (d cotangents per map through 0..l)."""
    d, F = config.hidden_size, config.intermediate_size
    form = 2 * length * d * d * F  # one layer's folded matrices
    depth = max(layers) + 1
    m_fwd, m_rev = length * d, d
    fwd_fold, rev_fold = fold_pays(config, m_fwd), fold_pays(config, m_rev)
    runs = split_positions(length, groups)
    tangents = m_fwd * causal_work(length, runs) * _per_vector_layer_flops(config, length, fwd_fold)
    fwd = depth * (tangents + (form * len(runs) if fwd_fold else 0))
    per_layer_rev = m_rev * _per_vector_layer_flops(config, length, rev_fold) + (form if rev_fold else 0)
    rev = parts * sum(l + 1 for l in layers) * per_layer_rev
    return {"fwd": float(fwd), "rev": float(rev)}


# The forward engine's input positions go in this many causal groups (`_cumulative_fwd`: 0.625 of one
# pass's tangent work, for 4 compilations) once its tangent work reaches GROUPS_FROM_FLOPS; below that the
# extra compilations would cost more than they save, and one group is used.
POSITION_GROUPS = 4
GROUPS_FROM_FLOPS = 2e11
# Vectors in flight are counted this many times over: XLA held 1.6× the counted tangent activations of
# the forward engine (86.4 GiB where 54.7 were counted; Gemma 3 270M, T = 32, float64, an H100).
IN_FLIGHT_MARGIN = 2


def _fwd_bytes(config: ModelConfig, length: int, n_maps: int, chunk: int, itemsize: int, fold: bool) -> int:
    """Peak of the forward engine: linearization (+ fold), Gram matrices, `chunk` tangents in flight."""
    d, act = config.hidden_size, activation_elems(config, length)
    stored = config.num_layers * act + (fold_elems(config, length) if fold else 0)
    return itemsize * (stored + n_maps * d * d + IN_FLIGHT_MARGIN * chunk * (act + length * d + n_maps * d))


def _rev_bytes(config: ModelConfig, length: int, rows: int, chunk: int, itemsize: int, fold: bool) -> int:
    """Peak of one reverse map (or one single-scope layer): linearization (+ fold), `rows` rows of J
    (T·d each), `chunk` cotangents in flight."""
    d, act = config.hidden_size, activation_elems(config, length)
    stored = config.num_layers * act + (fold_elems(config, length) if fold else 0)
    return itemsize * (stored + rows * (length * d + d) + IN_FLIGHT_MARGIN * chunk * (act + length * d))


def _chunk(cost: Callable[[int], int], most: int, limit: int, what: str) -> int:
    """The largest chunk in 1..most whose `cost` fits `limit`, or a MemoryBudgetError naming the need."""
    def nothing_fits() -> str:
        return (f"the {what} needs about {format_bytes(cost(1))} even one basis vector at a time, over the "
                f"{format_bytes(limit)} limit; use fewer tokens or fewer layers, or raise memory_limit / "
                "EQLIN_MEMORY_LIMIT_GB")

    return choose_chunk(lambda c: cost(most if c is None else c), None, most, limit, nothing_fits=nothing_fits) or most


# --------------------------------------------------------------------------------------------------
# Engines: each returns, per map, (y (d,), G = J Jᵀ (d, d), r = Σ_t J_t x_t + c (d,)).


def auto_groups(config: ModelConfig, length: int, layers: Sequence[int]) -> int:
    """The forward engine's causal position groups: `POSITION_GROUPS` when its tangent work in one group
    reaches `GROUPS_FROM_FLOPS`, else 1."""
    one_group = layer_map_flops(config, length, layers, len(PARTS))["fwd"]
    return min(POSITION_GROUPS, length) if one_group >= GROUPS_FROM_FLOPS else 1


def split_positions(length: int, groups: int) -> list[tuple[int, int]]:
    """At most `groups` runs of consecutive positions covering 0 … length−1, as even as possible:
    [(start, stop), …]."""
    bounds = sorted({round(length * g / groups) for g in range(groups + 1)})
    return list(zip(bounds[:-1], bounds[1:]))


def causal_work(length: int, groups: list[tuple[int, int]]) -> float:
    """The forward engine's tangent work with these position groups, as a fraction of one pass over all
    positions: a group starting at s runs positions s … T−1 only."""
    return sum((length - start) * (stop - start) for start, stop in groups) / length**2


@functools.partial(jax.jit, static_argnames=("config", "layers", "tap", "fold"))
def _all_maps_jvp(params: Params, config: ModelConfig, x: Array, prefix: Array | None, *, layers: tuple[int, ...],
                  tap: Tap, fold: bool) -> tuple[Array, Callable[[Array], Array]]:
    """y (P, n, d) and the linearized map x ↦ every (part, layer) output, for x the positions after the
    first s, whose streams are held at prefix (layers run, s, d) (None: s = 0)."""
    return jax.linearize(cumulative_fn(params, config, layers, PARTS, True, fold=fold, tap=tap, prefix=prefix), x)


@functools.partial(jax.jit, static_argnames=("config", "layers", "tap"))
def _constants_all(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...], tap: Tap) -> Array:
    """c (P, n, d) of every (part, layer) cumulative map: the frozen maps at zero input (0 without biases)."""
    y = jnp.zeros((len(PARTS), len(layers), config.hidden_size), x.dtype)
    return constant_term(lambda d: cumulative_fn(params, config, layers, PARTS, d, tap=tap), x, y, config, True)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _push_forward(jvp: Callable[[Array], Array], x: Array, start: Array, count: Array, *, chunk: int
                  ) -> tuple[Array, Array]:
    """Gram and reconstruction contributions (P, n, d, d), (P, n, d) of the input basis vectors
    start … start + count − 1 (of x's T'·d, count <= chunk), pushed through `jvp` as one chunk."""
    n = x.size
    index = start + jnp.arange(chunk)
    live = index < start + count
    basis = jax.nn.one_hot(jnp.where(live, index, -1), n, dtype=x.dtype).reshape(-1, *x.shape)  # (c, T, d)
    cols = jax.vmap(jvp)(basis)  # (c, P, n, d): columns of every map
    coeff = jnp.where(live, x.reshape(-1)[jnp.minimum(index, n - 1)], 0)
    gram = jnp.einsum("cpnd,cpne->pnde", cols, cols, precision=HIGHEST)
    return gram, jnp.einsum("cpnd,c->pnd", cols, coeff, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("config", "depth", "tap", "fold", "chunk"))
def _reverse_map(params: Params, config: ModelConfig, x: Array, layer: Array, part: Array, *, depth: int, tap: Tap,
                 fold: bool, chunk: int) -> tuple[Array, Array, Array]:
    """One cumulative map (traced layer and part index) by d cotangents through layers 0..layer."""
    def f(v: Array, detach=True) -> Array:
        _, outputs = run_layers(params.layers, config, v, detach=detach, count=depth, collect="last",
                                fold=fold, tap=tap, stop=layer + 1)
        picked = jnp.stack(outputs)[part, layer]  # (d,)
        return final_norm(params, config, picked, detach=detach)

    y, vjp = jax.vjp(f, x)
    rows = pull_back_rows(vjp, y, jnp.arange(y.size), chunk).reshape(y.size, -1)  # (d, T·d)
    c = constant_term(lambda d: functools.partial(f, detach=d), x, y, config, True)
    return y, _gram(rows), rows @ x.reshape(-1) + c


def _gram(rows: Array) -> Array:
    return jnp.einsum("ok,pk->op", rows, rows, precision=HIGHEST)


_streams = jax.jit(streams_entering, static_argnames=("config", "top", "detach"))


@functools.partial(jax.jit, static_argnames=("config", "tap", "fold", "chunk"))
def _single_layer(params: Params, config: ModelConfig, h_in: Array, layer: Array, *, tap: Tap, fold: bool, chunk: int
                  ) -> tuple[Array, Array, Array]:
    """The three single-scope maps of layer `layer` (traced) from its input stream h_in (T, d):
    y (P, d), G (P, d, d), r (P, d)."""
    y, vjp = jax.vjp(layer_fn(params, config, layer, PARTS, True, h_in.shape[0], fold=fold, tap=tap), h_in)
    rows = pull_back_rows(vjp, y, jnp.arange(y.size), chunk).reshape(*y.shape, -1)  # (P, d, T·d)
    c = constant_term(lambda d: layer_fn(params, config, layer, PARTS, d, h_in.shape[0], tap=tap), h_in, y, config,
                      True)
    return y, jax.vmap(_gram)(rows), jnp.einsum("pok,k->po", rows, h_in.reshape(-1), precision=HIGHEST) + c


# --------------------------------------------------------------------------------------------------
# Reduction to spectra.


@functools.partial(jax.jit, static_argnames=("k",))
def _reduce(G: Array, y: Array, r: Array, *, k: int) -> tuple[Array, ...]:
    """From G (..., d, d), y, r (..., d): the top-k σ and U (aligned with y), ‖J‖_F², the full spectrum's
    effective dimension and the relative error."""
    lam, vec = jnp.linalg.eigh(G)  # ascending
    lam, vec = lam[..., ::-1], vec[..., ::-1]
    sigma = jnp.sqrt(jnp.maximum(lam, 0))
    U, _ = align_signs(vec[..., :k], vec[..., :k], y)
    return sigma[..., :k], U, jnp.trace(G, axis1=-2, axis2=-1), effective_dimension(sigma), relative_error(y, r)


def _summaries(model: Model, reduced: dict[str, tuple[Array, Array, Array]], next_token: int, k: int, top: int
               ) -> dict[str, dict[str, MapSpectra]]:
    """MapSpectra for every scope from its (y, G, r), each with leading axes (P, n). One pass of
    unembedding scores serves every u_i's decoding, u_1's next-token rank and the logit lens of y
    (the same y for both scopes)."""
    out = {scope: _reduce(G, y, r, k=k) for scope, (y, G, r) in reduced.items()}
    y = next(iter(reduced.values()))[0]  # (P, n, d)
    U = jnp.stack([out[scope][1] for scope in reduced])  # (S, P, n, d, k)
    vectors = jnp.concatenate([jnp.moveaxis(U, -1, -2).reshape(-1, y.shape[-1]), y.reshape(-1, y.shape[-1])])
    n_u = U.size // y.shape[-1]
    found = score_summary(model, vectors, "output", top, target=next_token)
    u_ids = found.ids[:n_u].reshape(*U.shape[:3], k, top)  # (S, P, n, k, top)
    u1_rank = found.target_rank[:n_u].reshape(*U.shape[:3], k)[..., 0]
    lens_rank = found.target_rank[n_u:].reshape(y.shape[:2])
    lens_p = np.exp(found.target_score[n_u:] - found.log_partition[n_u:]).reshape(y.shape[:2])
    strings = np.array(model.token_strings(u_ids.reshape(-1)), dtype=object).reshape(u_ids.shape).tolist()
    maps = {}
    for i, scope in enumerate(reduced):
        s, Us, fro, eff, err = (jax.tree_util.tree_map(np.asarray, a) for a in out[scope])
        maps[scope] = {part: MapSpectra(s[p], Us[p], fro[p], jax.tree_util.tree_map(lambda a: a[p], eff),
                                        np.asarray(y[p]), err[p], lens_rank[p], lens_p[p], u1_rank[i, p],
                                        u_ids[i, p], strings[i][p])
                       for p, part in enumerate(PARTS)}
    return maps


# --------------------------------------------------------------------------------------------------
# Public entry point.


def layer_spectra(model: Model, inputs, *, layers="all", scopes: Sequence[Scope] = SCOPES, k: int = 5, top: int = 5,
                  tap: Tap = "post", engine: Engine = "auto", groups: int | None = None,
                  memory_limit: int | None = None, quiet: bool | None = None) -> LayerSpectra:
    """The layer story of `inputs` (text or ids): for each of `layers` (an int, a list or "all") and each
    scope (cumulative, single) and part (residual, attn, mlp), the top-k singular values and left
    singular vectors of the detached map (u_i decoded through the unembedding, `top` tokens each), its
    effective dimension, its reconstruction error, and where the model's next token stands in the logit
    lens of its output. `tap`: branch outputs "post" or "pre" their post-norms. `engine`: the cumulative
    engine, "fwd", "rev" or "auto" (fewer estimated flops). `groups`: the forward engine's causal position
    groups (None: `auto_groups`). Progress on stderr: see `eqlin.progress.shown`.
    See the module docstring for the method, its cost and memory."""
    quiet = not shown(quiet)
    config = model.config
    picked = resolve_layers(config, layers)
    if picked is None:
        raise InputError("layer_spectra needs layers: an int, a list of ints or 'all'")
    picked = tuple(sorted(set(picked)))
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InputError(f"scopes must be a non-empty subset of {SCOPES}, got {scopes!r}")
    check_tap(tap)
    if engine not in ("auto", "fwd", "rev"):
        raise InputError(f"engine must be 'auto', 'fwd' or 'rev', got {engine!r}")
    if groups is not None:
        groups = check_int("groups", groups, 1, None, "causal position groups of the forward engine")
    d = config.hidden_size
    k = check_int("k", k, 1, d, f"at most d = {d}, the rank bound of every layer map")
    top = check_int("top", top, 1, config.vocab_size, "the vocabulary size")
    ids = model.ids(inputs)
    T = len(ids)
    limit = memory_limit_bytes(memory_limit, params=model.params)
    x = embed(model.params, config, jnp.asarray(ids))
    next_token = int(jnp.argmax(model.logits(ids)[-1]))

    reduced, engines, timings = {}, {}, {}
    groups = groups or auto_groups(config, T, picked)
    if "cumulative" in scopes and engine == "auto":
        flops = layer_map_flops(config, T, picked, len(PARTS), groups)
        engine = "fwd" if flops["fwd"] <= flops["rev"] else "rev"
    forward = functools.partial(_cumulative_fwd, groups=groups)
    runs = {"cumulative": (forward if engine == "fwd" else _cumulative_rev, engine), "single": (_single, "rev")}
    for scope in SCOPES:
        if scope in scopes:
            start = time.perf_counter()
            run, engines[scope] = runs[scope]
            reduced[scope] = jax.block_until_ready(run(model, x, picked, tap, limit, quiet))
            timings[scope] = time.perf_counter() - start
    start = time.perf_counter()
    maps = _summaries(model, reduced, next_token, k, top)
    timings["spectra"] = time.perf_counter() - start
    return LayerSpectra(picked, maps, np.asarray(ids), next_token, tap, engines, timings)


def _cumulative_fwd(model: Model, x: Array, layers: tuple[int, ...], tap: Tap, limit: int, quiet: bool, *,
                    groups: int) -> tuple[Array, Array, Array]:
    """(y, G, r), each with leading axes (P, n), by the forward engine. The input positions go in `groups`
    groups: the tangents from a group starting at position s are zero before s in every layer (causal
    attention), so its linearization runs positions s … T−1 only, with the streams before s held fixed
    (`eqlin.decoder.run_layers`, `prefix`): (G + 1)/(2G) of the work of one pass for G equal groups, for G
    compilations."""
    config, T, d = model.config, x.shape[0], model.config.hidden_size
    n_maps, width = len(PARTS) * len(layers), x.size
    fold = plan_fold(config, "auto", detach=True, vectors=width, fits=lambda f: _fwd_bytes(
        config, T, n_maps, 1, x.dtype.itemsize, f) <= limit)
    chunk = _chunk(lambda c: _fwd_bytes(config, T, n_maps, c, x.dtype.itemsize, fold), width, limit,
                   f"forward pass of {n_maps} layer maps at T={T}")
    runs = split_positions(T, groups)
    streams = _streams(model.params, config, x, top=max(layers) + 1, detach=True) if len(runs) > 1 else None
    plan = []  # (first position, basis vectors of the group, chunk)
    for first, stop in runs:
        n = (stop - first) * d
        plan.append((first, n, -(-n // -(-n // chunk))))  # chunks as even as their count allows
    y = G = r = None
    with steps("cumulative layer maps (forward)", sum(-(-n // c) for _, n, c in plan), quiet) as bar:
        for first, n, c in plan:
            prefix = streams[:, :first] if first else None
            y_group, jvp = _all_maps_jvp(model.params, config, x[first:], prefix, layers=layers, tap=tap, fold=fold)
            if y is None:
                y, G = y_group, jnp.zeros((*y_group.shape, d), x.dtype)
                r = _constants_all(model.params, config, x, layers=layers, tap=tap)  # the chunks add Σ_t J_t x_t
            for start in range(0, n, c):
                g, contribution = _push_forward(jvp, x[first:], jnp.asarray(start), jnp.asarray(min(c, n - start)),
                                                chunk=c)
                G, r = jax.block_until_ready((G + g, r + contribution))
                bar.update()
    return y, G, r


def _cumulative_rev(model: Model, x: Array, layers: tuple[int, ...], tap: Tap, limit: int, quiet: bool
                    ) -> tuple[Array, Array, Array]:
    """(y, G, r), each with leading axes (P, n), by the reverse engine: one compiled map at a time."""
    config, d, T = model.config, model.config.hidden_size, x.shape[0]
    fold = plan_fold(config, "auto", detach=True, vectors=d, fits=lambda f: _rev_bytes(
        config, T, d, 1, x.dtype.itemsize, f) <= limit)
    chunk = _chunk(lambda c: _rev_bytes(config, T, d, c, x.dtype.itemsize, fold), d, limit,
                   f"reverse pass of one layer map at T={T}")
    out = []
    with steps("cumulative layer maps (reverse)", len(PARTS) * len(layers), quiet) as bar:
        for part in range(len(PARTS)):
            for layer in layers:
                out.append(jax.block_until_ready(_reverse_map(
                    model.params, config, x, jnp.asarray(layer), jnp.asarray(part), depth=max(layers) + 1, tap=tap,
                    fold=fold, chunk=chunk)))
                bar.update()
    return tuple(jnp.stack([o[i] for o in out]).reshape(len(PARTS), len(layers), *out[0][i].shape) for i in range(3))


def _single(model: Model, x: Array, layers: tuple[int, ...], tap: Tap, limit: int, quiet: bool
            ) -> tuple[Array, Array, Array]:
    """(y, G, r), each with leading axes (P, n): every layer's three single-scope maps."""
    config, d, T = model.config, model.config.hidden_size, x.shape[0]
    rows = len(PARTS) * d
    fold = plan_fold(config, "auto", detach=True, vectors=rows, fits=lambda f: _rev_bytes(
        config, T, rows, 1, x.dtype.itemsize, f) <= limit)
    chunk = _chunk(lambda c: _rev_bytes(config, T, rows, c, x.dtype.itemsize, fold), rows, limit,
                   f"single-layer maps at T={T}")
    streams = _streams(model.params, config, x, top=max(layers) + 1, detach=True)  # (l+1, T, d)
    out = []
    with steps("single-layer maps", len(layers), quiet) as bar:
        for layer in layers:
            out.append(jax.block_until_ready(_single_layer(model.params, config, streams[layer], jnp.asarray(layer),
                                                            tap=tap, fold=fold, chunk=chunk)))
            bar.update()
    return tuple(jnp.moveaxis(jnp.stack([o[i] for o in out]), 0, 1) for i in range(3))

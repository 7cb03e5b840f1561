"""Detached Jacobians: the exact linear (or affine) map of a decoder (or of one layer) at one input.

With every nonlinear coefficient frozen (`detach=True`), the map f from input embeddings x (T, d) to
an output vector y (d,) is linear and homogeneous, so y = Σ_t J_t x_t exactly, with J = ∂f/∂x of
shape (d, T, d) (docs/method.md §1). Outputs are read at the last position through the final norm:

- `layer=None`: the model's final hidden state (what the unembedding turns into logits).
- `scope="cumulative"`: input embeddings → layer `l`'s output: the residual stream after it
  (`part="residual"`) or its attention / MLP branch alone (`"attn"`, `"mlp"`).
- `scope="single"`: layer `l`'s input (the residual stream entering it, all positions) → its output.

The Jacobian is computed by linearizing once (`jax.vjp` for reverse mode, `jax.linearize` for
forward mode) and pushing basis vectors through the linear map in chunks (`lax.map` with
`batch_size`), so peak memory is bounded and estimated before anything is allocated.

Biases: the affine map and its constant c. Write the detached network as f(x) = F(x; θ(x)), where θ(x)
collects every frozen coefficient (norm scales, activated gates or GPT-2's GELU factor Φ(z), attention
probabilities, and the frozen copies of the inputs of q, k and gate) and F(v; θ) is the network with those
coefficients held fixed. Along the non-frozen path F(·; θ) only multiplies by weights and by frozen
coefficients, subtracts means (LayerNorm), adds residual branches, and adds biases, so it is affine in v:
F(v; θ) = A(θ) v + c(θ). The stop_gradients make the
Jacobian of f the Jacobian of F in v: J = ∂f/∂x = A(θ(x)). With g(v, u) = F(v; θ(u)) (the linear path
reads v, every coefficient reads u),

    y = f(x) = g(x, x) = J x + c,    c = g(0, x) = F(0; θ(x)),

that is y = Σ_t J_t x_t + c exactly, and c is the frozen network at zero input: the biases carried
through the frozen path. eqlin computes c from g itself (`frozen_at_zero`: the detached forward vmapped
over the pair (0, x), detach="paired" handing every coefficient of member 1 to both members), never as
y − Σ_t J_t x_t, so `relative_error` = ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ is an honest check of exactness.
Without biases F(·; θ) is linear and maps 0 to 0 exactly, in floating point too: c = 0, and eqlin
skips its computation (bias-free families have no bias fields, `ModelConfig.biases`). The plain
(non-detached) Jacobian freezes nothing; its map is not affine and its constant is set to 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.blocks import PAIR_AXIS, PAIRED, Detach
from eqlin.config import ModelConfig
from eqlin.decoder import (LAST_ROWS, decoder_layer, embed, final_norm, remat, rope_stack, run_layers_last,
                           streams_entering, unembed)
from eqlin.errors import InputError
from eqlin.memory import check_chunk, estimate_jacobian_bytes, fold_pays, memory_limit_bytes, resolve_chunk
from eqlin.model import Model
from eqlin.params import Params, widen
from eqlin.selection import PARTS, Part, Scope, Tap, check_tap, resolve_selection, single_layer

Array = jax.Array
Mode = Literal["auto", "rev", "fwd"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Linearization:
    """One linear map y = Σ_t J_t x_t (or a stack of them, one per layer, on a leading axis n).

    jacobian: (d_out, T, d_in), or (n, d_out, T, d_in) for several layers.
    inputs: x, (T, d_in) or (n, T, d_in): the input embeddings (cumulative scope, the same for every
        layer) or each layer's input residual stream (single scope).
    output: y, (d_out,) or (n, d_out).
    contributions: rows J_t x_t, (T, d_out) or (n, T, d_out); with the constant they sum to the
        reconstruction.
    relative_error: ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖, () or (n,).
    ids: the token ids (T,); None for a map at embeddings given directly (`detached_jacobian_at`).
    constant: c, shaped like `output`: the frozen map at zero input (module docstring), exactly 0 for
        bias-free models and for the plain Jacobian; eqlin always sets it (None, from other
        constructors, reads as 0).
    The remaining fields say what was linearized.
    """

    jacobian: Array
    inputs: Array
    output: Array
    contributions: Array
    relative_error: Array
    ids: Array | None
    constant: Array | None = None
    layer: int | tuple[int, ...] | None = dataclasses.field(metadata=dict(static=True), default=None)
    part: str = dataclasses.field(metadata=dict(static=True), default="residual")
    scope: str = dataclasses.field(metadata=dict(static=True), default="cumulative")
    detach: bool = dataclasses.field(metadata=dict(static=True), default=True)
    tap: str = dataclasses.field(metadata=dict(static=True), default="post")

    @property
    def reconstruction(self) -> Array:
        """Σ_t J_t x_t + c, shaped like `output` (equal to it, to rounding, for a detached map)."""
        linear = self.contributions.sum(axis=-2)
        return linear if self.constant is None else linear + self.constant

    def select(self, i: int) -> Linearization:
        """The i-th map of a multi-layer Linearization."""
        if not isinstance(self.layer, tuple):
            raise InputError("select() needs a Linearization over several layers")
        stacked = ("jacobian", "output", "contributions", "relative_error", "constant")
        if self.scope == "single":  # each layer's own input; cumulative maps share the input embeddings (T, d)
            stacked += ("inputs",)
        arrays = {f: getattr(self, f)[i] for f in stacked if getattr(self, f) is not None}
        return dataclasses.replace(self, **arrays, layer=self.layer[i])

    def save(self, path: str | os.PathLike, model: Model | None = None, *, checkpoint: str | None = None
             ) -> Path:
        """Write this map to `path` as one safetensors file, bit for bit, atomically (`eqlin.persistence`);
        with `model`, its source, family, checkpoint identity (`checkpoint`, else computed from the source)
        and the input's token strings are recorded too. Returns the path."""
        from eqlin.persistence import save_linearization

        return save_linearization(self, path, model, checkpoint=checkpoint)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Linearization:
        """The Linearization saved at `path` by `save`, bit for bit; InputError for any other file
        (`eqlin.persistence.saved_metadata(path)` gives what was recorded with it)."""
        from eqlin.persistence import load_linearization

        return load_linearization(path)

    def __repr__(self) -> str:  # shapes and the error, never J itself
        return display.linearization_repr(self)

    def _repr_html_(self) -> str:
        return display.linearization_html(self)


def relative_error(y: Array, reconstruction: Array) -> Array:
    """‖y − ŷ‖ / ‖y‖ over the last axis."""
    return jnp.linalg.norm(y - reconstruction, axis=-1) / jnp.linalg.norm(y, axis=-1)


def frozen_at_zero(f_paired: Callable[[Array], Array], x: Array) -> Array:
    """c = g(0, x) (module docstring): `f_paired`, a detached map built with detach="paired", vmapped over
    the pair (0, x), so its linear path reads zeros while every frozen coefficient is taken at x.
    Shaped like f's output."""
    return jax.vmap(f_paired, axis_name=PAIR_AXIS)(jnp.stack([jnp.zeros_like(x), x]))[0]


def constant_term(make: Callable[[Detach], Callable[[Array], Array]], x: Array, y: Array, config: ModelConfig,
                  detach: bool) -> Array:
    """The constant c of the map `make(detach)` at x (`make` builds the map for a detach mode): the frozen
    map at zero input where the model has biases and the map is detached, else exactly 0 like y."""
    if detach and config.has_biases:
        return frozen_at_zero(make(PAIRED), x)
    return jnp.zeros_like(y)


# --------------------------------------------------------------------------------------------------
# The functions being linearized.


def _read_out(params: Params, config: ModelConfig, v: Array, detach: Detach) -> Array:
    """Last position of v (..., T, d) through the final norm: (..., d)."""
    return final_norm(params, config, v[..., -1, :], detach=detach)


def cumulative_fn(params: Params, config: ModelConfig, layers: tuple[int, ...] | None, part: Part | tuple[Part, ...],
                  detach: Detach, *, fold: bool = False, tap: Tap = "post", prefix: Array | None = None
                  ) -> Callable[[Array], Array]:
    """x (T, d) -> y: the final output (d,) when `layers` is None, else each listed layer's output `part`
    read through the final norm, (n, d), or (P, n, d) for a tuple of P parts. Runs only the layers
    needed. `fold`, `tap`: see `eqlin.decoder.layer_tail`. With `prefix` (layers run, s, d), the
    function of the positions after the first s, whose streams are held at `prefix`
    (`eqlin.decoder.run_layers`)."""
    if layers is None:
        def f(x: Array) -> Array:
            h, _ = run_layers_last(params.layers, config, x, detach=detach, fold=fold, prefix=prefix)
            return final_norm(params, config, h, detach=detach)
        return f
    top = max(layers) + 1
    index = jnp.asarray(layers)

    def f(x: Array) -> Array:
        _, outputs = run_layers_last(params.layers, config, x, detach=detach, count=top, collect=True,
                                     fold=fold, tap=tap, prefix=prefix)
        picked = _parts(outputs, part)[..., index, :]  # (n, d) or (P, n, d)
        return final_norm(params, config, picked, detach=detach)
    return f


def _parts(outputs: tuple[Array, Array, Array], part: Part | tuple[Part, ...]) -> Array:
    """One part of (residual, attn, mlp) outputs, or a tuple of parts stacked on a leading axis."""
    by_name = dict(zip(PARTS, outputs))
    return by_name[part] if isinstance(part, str) else jnp.stack([by_name[p] for p in part])


def single_layer_fn(params: Params, config: ModelConfig, part: Part | tuple[Part, ...], detach: Detach, length: int,
                    *, fold: bool = False, tap: Tap = "post") -> Callable[..., Array]:
    """(layer weights, window, rope index, h_in (T, d)) -> that layer's `part` output at the last
    position through the final norm, (d,) (or (P, d) for a tuple of parts). Linear in h_in once detached."""
    cos_all, sin_all = rope_stack(config, length, params.dtype)

    def f(p, window: Array, rope_index: Array, h_in: Array) -> Array:
        outputs = remat(lambda h: decoder_layer(h, p, cos_all[rope_index], sin_all[rope_index], window, config,
                                                detach=detach, queries=min(LAST_ROWS, h.shape[0]), fold=fold,
                                                tap=tap))(h_in)  # each (Q, d)
        return _read_out(params, config, _parts(outputs, part), detach)
    return f


def layer_fn(params: Params, config: ModelConfig, layer: int | Array, part: Part | tuple[Part, ...], detach: Detach,
             length: int, *, fold: bool = False, tap: Tap = "post") -> Callable[[Array], Array]:
    """`single_layer_fn` bound to layer `layer` (an int or a traced index): h_in (T, d) -> (d,) or (P, d)."""
    f = single_layer_fn(params, config, part, detach, length, fold=fold, tap=tap)
    p = jax.tree_util.tree_map(lambda a: a[layer], params.layers)
    window, rope = jnp.asarray(config.layer_windows())[layer], jnp.asarray(config.layer_rope_index())[layer]
    return lambda h_in: f(p, window, rope, h_in)


# --------------------------------------------------------------------------------------------------
# Jacobian of a function R^(T×d) -> R^(...×d_out), linearized once, basis pushed through in chunks.


def pull_back_rows(vjp: Callable[[Array], tuple[Array]], y: Array, indices: Array, chunk: int | None) -> Array:
    """Rows J[i] = vjpᵀ(e_i) for the flat output indices (n,), `chunk` at a time (None: all): (n, *x.shape)."""
    def row(i: Array) -> Array:
        return vjp(jax.nn.one_hot(i, y.size, dtype=y.dtype).reshape(y.shape))[0]

    return jax.lax.map(row, indices, batch_size=chunk or indices.shape[0])


def jacobian_of(f: Callable[[Array], Array], x: Array, *, mode: Literal["rev", "fwd"], chunk: int | None
                ) -> tuple[Array, Array]:
    """(y, J) with J of shape y.shape + x.shape. `chunk` basis vectors go through the linearized map at
    a time (None: all at once)."""
    if mode == "rev":
        y, vjp = jax.vjp(f, x)
        rows = pull_back_rows(vjp, y, jnp.arange(y.size), chunk)  # (m, T, d)
        return y, rows.reshape(y.shape + x.shape)
    y, jvp = jax.linearize(f, x)
    n = x.size

    def col(i: Array) -> Array:
        return jvp(jax.nn.one_hot(i, n, dtype=x.dtype).reshape(x.shape))

    cols = jax.lax.map(col, jnp.arange(n), batch_size=chunk or n)  # (T·d, *y.shape)
    cols = cols.reshape((n,) + y.shape)
    return y, jnp.moveaxis(cols, 0, -1).reshape(y.shape + x.shape)


def finish(y: Array, J: Array, x: Array, constant: Array | None = None) -> tuple[Array, Array]:
    """contributions (..., T, d_out) = J_t x_t and the relative reconstruction error
    ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ (`constant` c shaped like y; None: 0)."""
    contributions = jnp.einsum("...otd,...td->...to", J, x, precision=jax.lax.Precision.HIGHEST)
    reconstruction = contributions.sum(axis=-2)
    return contributions, relative_error(y, reconstruction if constant is None else reconstruction + constant)


@functools.partial(jax.jit, static_argnames=("config", "layers", "part", "scope", "detach", "mode", "chunk", "fold",
                                             "tap"))
def jacobian_arrays(params: Params, config: ModelConfig, x: Array, *, layers: tuple[int, ...] | None, part: Part,
                    scope: Scope, detach: bool, mode: str, chunk: int | None, fold: bool = False, tap: Tap = "post"
                    ) -> tuple[Array, ...]:
    """The jitted core of `linearize` for input embeddings x (T, d): (J, inputs, y, contributions,
    relative_error, constant), shaped as `Linearization`'s fields with a leading layer axis when `layers`
    is given."""
    if scope == "cumulative":
        f = cumulative_fn(params, config, layers, part, detach, fold=fold, tap=tap)
        y, J = jacobian_of(f, x, mode=mode, chunk=chunk)
        c = constant_term(lambda d: cumulative_fn(params, config, layers, part, d, tap=tap), x, y, config, detach)
        contributions, err = finish(y, J, x[None] if layers is not None else x, c)
        return J, x, y, contributions, err, c
    # Single scope: each layer's own input, then one vmapped Jacobian over the selected layers.
    index = jnp.asarray(layers)
    h_in = streams_entering(params, config, x, max(layers) + 1, detach=detach)[index]  # (n, T, d)
    f = single_layer_fn(params, config, part, detach, x.shape[0], fold=fold, tap=tap)
    selected = jax.tree_util.tree_map(lambda a: a[index], params.layers)
    windows = jnp.asarray(config.layer_windows())[index]
    ropes = jnp.asarray(config.layer_rope_index())[index]

    def one(p, w, r, h):
        y, J = jacobian_of(lambda v: f(p, w, r, v), h, mode=mode, chunk=chunk)
        def make(d: Detach) -> Callable[[Array], Array]:
            g = single_layer_fn(params, config, part, d, x.shape[0], tap=tap)
            return lambda v: g(p, w, r, v)
        return y, J, constant_term(make, h, y, config, detach)

    y, J, c = jax.vmap(one)(selected, windows, ropes, h_in)
    contributions, err = finish(y, J, h_in, c)
    return J, h_in, y, contributions, err, c


def plan_fold(config: ModelConfig, fold: bool | str, *, detach: bool, vectors: int, fits: Callable[[bool], bool]
              ) -> bool:
    """Whether to differentiate through the folded MLP: `fold` as asked (True/False), or with "auto" when
    the `vectors` pushed through one linearization make it pay (`fold_pays`) and its stored matrices fit
    (`fits(True)`). Only a detached map folds."""
    if fold not in (True, False, "auto"):
        raise InputError(f"fold must be True, False or 'auto', got {fold!r}")
    if fold == "auto":
        return detach and fold_pays(config, vectors) and fits(True)
    return bool(fold) and detach


def auto_mode(scope: Scope, n_maps: int, length: int) -> Literal["rev", "fwd"]:
    """What mode="auto" picks: reverse pushes n·d cotangents, forward T·d tangents (per map in single scope)."""
    return "rev" if scope == "single" or n_maps <= length else "fwd"


def detached_jacobian_at(params: Params, config: ModelConfig, x: Array, *, layer=None, part: Part = "residual",
                         scope: Scope = "cumulative", mode: Mode = "auto", chunk: int | None = None,
                         fold: bool = False, tap: Tap = "post", detach: bool = True, ids: Array | None = None
                         ) -> Linearization:
    """The detached Jacobian at input embeddings x (T, d) given directly (soft prompts, perturbed or
    interpolated embeddings): the exact map y = Σ_t J_t x_t (+ c with biases) of the decoder
    `(params, config)` at x, computed as `detached_jacobian` computes it (the same jitted core; it is
    `detached_jacobian` once the text is embedded). A pure function of (params, x): it works under `jit`
    (config and the keyword arguments static) and `vmap` over x (a batch of inputs (B, T, d) gives every
    array of the result a leading B axis).

    layer, part, scope, mode, tap: as in `detached_jacobian`. chunk: basis vectors per pass; None pushes
    them all at once: nothing is planned against a memory budget here (`eqlin.estimate_jacobian_bytes`
    says what a call needs). fold: True or False (`detached_jacobian`'s "auto" plans memory).
    detach=False gives the plain Jacobian. ids (T,): the tokens x came from, if any, recorded in the result.
    """
    x = jnp.asarray(x)
    layers = resolve_selection(config, layer, part, scope)
    check_tap(tap)
    if fold not in (True, False):
        raise InputError(f"fold must be True or False, got {fold!r} ('auto' plans memory: use detached_jacobian)")
    if x.ndim != 2 or x.shape[1] != config.hidden_size or not 1 <= x.shape[0] <= config.max_position_embeddings:
        raise InputError(f"x must be input embeddings of shape (T, {config.hidden_size}) with 1 <= T <= "
                         f"{config.max_position_embeddings} (vmap over a leading batch axis), got {x.shape}")
    if x.dtype != params.dtype:
        raise InputError(f"x is {x.dtype} but the model computes in {params.dtype}: cast x to the model's dtype "
                         "(a mixed computation would not be the model's map)")
    n_maps = 1 if layers is None else len(layers)
    if mode == "auto":
        mode = auto_mode(scope, n_maps, x.shape[0])
    if mode not in ("rev", "fwd"):
        raise InputError(f"mode must be 'auto', 'rev' or 'fwd', got {mode!r}")
    J, xs, y, contributions, err, c = jacobian_arrays(params, config, x, layers=layers, part=part, scope=scope,
                                                      detach=detach, mode=mode, chunk=check_chunk(chunk),
                                                      fold=fold and detach, tap=tap)
    layer_meta = layers[0] if layers is not None and single_layer(layer) else layers
    if not isinstance(layer_meta, tuple) and layers is not None:  # one layer: drop the stacking axis
        J, y, contributions, err, c = J[0], y[0], contributions[0], err[0], c[0]
        xs = xs[0] if scope == "single" else xs
    return Linearization(J, xs, y, contributions, err, None if ids is None else jnp.asarray(ids), c,
                         layer=layer_meta, part=part, scope=scope, detach=detach, tap=tap)


def linearize(model: Model, inputs, *, detach: bool, layer=None, part: Part = "residual",
              scope: Scope = "cumulative", mode: Mode = "auto", chunk: int | None = None,
              memory_limit: int | None = None, fold: bool | str = "auto", tap: Tap = "post") -> Linearization:
    """The Jacobian J = ∂f/∂x of the map selected by (layer, part, scope) at `inputs` (text or ids),
    with (`detach=True`) or without the nonlinear coefficients frozen, its chunk and fold planned against
    the memory budget; then `detached_jacobian_at` the input embeddings. See the module docstring."""
    config = model.config
    layers = resolve_selection(config, layer, part, scope)
    check_tap(tap)
    ids = model.ids(inputs)
    length, n_maps = len(ids), 1 if layers is None else len(layers)
    if mode == "auto":
        mode = auto_mode(scope, n_maps, length)
    if mode not in ("rev", "fwd"):
        raise InputError(f"mode must be 'auto', 'rev' or 'fwd', got {mode!r}")
    limit, itemsize = memory_limit_bytes(memory_limit, params=model.params), model.dtype.itemsize

    def fits(folded: bool) -> bool:
        return estimate_jacobian_bytes(config, length, n_maps=n_maps, mode=mode, chunk=1, itemsize=itemsize,
                                       fold=folded) <= limit

    vectors = config.hidden_size * (n_maps if mode == "rev" and scope == "cumulative" else 1)
    fold = plan_fold(config, fold, detach=detach, vectors=vectors if mode == "rev" else length * config.hidden_size,
                     fits=fits)
    chunk = resolve_chunk(config, length, n_maps, mode, chunk, itemsize, limit, fold=fold)
    x = embed(model.params, config, jnp.asarray(ids))
    return detached_jacobian_at(model.params, config, x, layer=layer, part=part, scope=scope, mode=mode, chunk=chunk,
                                fold=fold, tap=tap, detach=detach, ids=ids)


def detached_jacobian(model: Model, inputs, *, layer=None, part: Part = "residual", scope: Scope = "cumulative",
                      mode: Mode = "auto", chunk: int | None = None, memory_limit: int | None = None,
                      fold: bool | str = "auto", tap: Tap = "post") -> Linearization:
    """The detached Jacobian: the exact linear map y = Σ_t J_t x_t of the model at `inputs` (affine,
    y = Σ_t J_t x_t + c, for models with biases: `Linearization.constant`, module docstring).

    layer: None (final output), an int, a list of ints or "all" (maps stacked on a leading axis).
    part: "residual", "attn" or "mlp" (with a layer). scope: "cumulative" or "single".
    tap: where an "attn"/"mlp" part is read: "post" (after the family's branch post-norms, what the branch
    adds to the residual stream) or "pre" (before them; the paper's code reads Gemma there).
    mode: "rev" (jacrev), "fwd" (jacfwd) or "auto". chunk: basis vectors per pass (None: the largest
    that fits `memory_limit` bytes; default: $EQLIN_MEMORY_LIMIT_GB, or what the device holding the weights
    can still take, `eqlin.memory.memory_limit_bytes`).
    fold: differentiate the MLP through one folded matrix per position (`eqlin.blocks`): True, False or
    "auto" (when it saves flops and its T·d² numbers per layer fit the memory limit). J is the same
    map either way (to float64 rounding).
    """
    return linearize(model, inputs, detach=True, layer=layer, part=part, scope=scope, mode=mode, chunk=chunk,
                     memory_limit=memory_limit, fold=fold, tap=tap)


def jacobian(model: Model, inputs, *, detach: bool = False, layer=None, part: Part = "residual",
             scope: Scope = "cumulative", mode: Mode = "auto", chunk: int | None = None,
             memory_limit: int | None = None, tap: Tap = "post") -> Linearization:
    """The plain autograd Jacobian of the same function (detach=False by default). Its relative_error
    shows that, unlike the detached one, it does not reconstruct the output."""
    return linearize(model, inputs, detach=detach, layer=layer, part=part, scope=scope, mode=mode, chunk=chunk,
                     memory_limit=memory_limit, tap=tap)


# --------------------------------------------------------------------------------------------------
# Logits: the map to chosen vocabulary rows, W_U[k] J.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitMap:
    """Rows of the input → logits map for chosen tokens: jacobian (k, T, d) = W_U[token_ids] J.

    logits (k,) are the model's logits for those tokens (before final softcapping, if any);
    contributions (T, k) are W_U[k] J_t x_t; constant (k,) is W_U[k] c, the constant's share of each
    logit (0 for bias-free models); relative_error compares Σ_t contributions + constant with `logits`.
    """

    token_ids: Array
    jacobian: Array
    logits: Array
    contributions: Array
    relative_error: Array
    constant: Array | None = None


def logit_map(model: Model, lin: Linearization, token_ids=None) -> LogitMap:
    """Map from the inputs to the logits of `token_ids` (default: the predicted next token) for a
    single-output Linearization (the final output or one layer's map, read through the final norm)."""
    if lin.jacobian.ndim != 3:
        raise InputError("logit_map needs a single map; use lin.select(i) on a multi-layer Linearization")
    if token_ids is None:
        token_ids = [int(jnp.argmax(unembed(model.params, model.config, lin.output)))]
    ids = jnp.asarray(np.atleast_1d(np.asarray(token_ids, dtype=np.int32)))
    rows = widen(model.params.unembedding[ids], model.dtype)  # (k, d)
    hp = jax.lax.Precision.HIGHEST
    J = jnp.einsum("kd,dte->kte", rows, lin.jacobian, precision=hp)
    logits = jnp.einsum("kd,d->k", rows, lin.output, precision=hp)
    contributions = jnp.einsum("kte,te->tk", J, lin.inputs, precision=hp)
    constant = (jnp.zeros_like(logits) if lin.constant is None
                else jnp.einsum("kd,d->k", rows, lin.constant, precision=hp))
    err = jnp.abs(logits - (contributions.sum(0) + constant)) / jnp.maximum(jnp.abs(logits),
                                                                           jnp.finfo(logits.dtype).tiny)
    return LogitMap(ids, J, logits, contributions, err, constant)


# --------------------------------------------------------------------------------------------------
# Matrix-free checks: never build J (for long inputs).


def target_map(params: Params, config: ModelConfig, x: Array, layer: int | None, part: Part, scope: Scope,
               detach: bool) -> tuple[Callable[[Array], Array], Array]:
    """(f, v) with f: (T, d) -> (d,) the map selected by one layer (or None) and v its input at x."""
    f = target_fn(params, config, x.shape[0], layer, part, scope, detach)
    if scope == "cumulative":
        return f, x
    return f, streams_entering(params, config, x, layer + 1, detach=detach)[layer]


def target_fn(params: Params, config: ModelConfig, length: int, layer: int | None, part: Part, scope: Scope,
              detach: Detach) -> Callable[[Array], Array]:
    """The map selected by one layer (or None), (T, d) -> (d,), on inputs of `length` tokens."""
    if scope == "cumulative":
        f = cumulative_fn(params, config, None if layer is None else (layer,), part, detach)
        return f if layer is None else (lambda v: f(v)[0])
    return layer_fn(params, config, layer, part, detach, length)


def target_constant(params: Params, config: ModelConfig, v: Array, y: Array, layer: int | None, part: Part,
                    scope: Scope, detach: bool) -> Array:
    """The constant c (like y) of the map `target_map` selects, at its input v (`constant_term`)."""
    return constant_term(lambda d: target_fn(params, config, v.shape[0], layer, part, scope, d), v, y, config,
                         detach)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MatrixFreeCheck:
    """Matrix-free exactness checks of a detached map.

    output: y (d,); homogeneity: jvp(f, x; x) = J x (d,), equal to y − c for the detached map (y itself
    for a bias-free, homogeneous one); contributions: (T, d) with row t = jvp(f, x; e_t ⊙ x) = J_t x_t;
    constant: c (d,), the frozen map at zero input (`eqlin.linear_maps`; 0 without biases);
    homogeneity_error: ‖y − (jvp(f, x; x) + c)‖ / ‖y‖; relative_error: ‖y − (Σ_t rows + c)‖ / ‖y‖.
    contributions and relative_error are None from a check without per-token rows (one JVP).
    """

    output: Array
    homogeneity: Array
    contributions: Array | None
    homogeneity_error: Array
    relative_error: Array | None
    constant: Array | None = None


def matrix_free_check(model: Model, inputs, *, layer: int | None = None, part: Part = "residual",
                      scope: Scope = "cumulative", detach: bool = True, per_token: bool = True) -> MatrixFreeCheck:
    """Check y = J x + c and per-token contributions with T + 1 Jacobian-vector products, never forming J
    (c: one paired forward, only for models with biases); `per_token=False`: y = J x + c alone, one JVP."""
    layers = resolve_selection(model.config, layer, part, scope, one_layer="matrix_free_check")
    layer = None if layers is None else layers[0]
    x = embed(model.params, model.config, jnp.asarray(model.ids(inputs)))
    return _matrix_free(model.params, model.config, x, layer=layer, part=part, scope=scope, detach=detach,
                        per_token=per_token)


@functools.partial(jax.jit, static_argnames=("config", "layer", "part", "scope", "detach", "per_token"))
def _matrix_free(params: Params, config: ModelConfig, x: Array, *, layer: int | None, part: Part,
                 scope: Scope, detach: bool, per_token: bool) -> MatrixFreeCheck:
    f, x = target_map(params, config, x, layer, part, scope, detach)
    if not per_token:
        y, hom = jax.jvp(f, (x,), (x,))
        c = target_constant(params, config, x, y, layer, part, scope, detach)
        return MatrixFreeCheck(y, hom, None, relative_error(y, hom + c), None, c)
    y, jvp = jax.linearize(f, x)
    masks = jnp.eye(x.shape[0], dtype=x.dtype)[:, :, None] * x[None]  # (T, T, d): row t is e_t ⊙ x
    rows = jax.lax.map(jvp, masks)  # (T, d)
    hom = jvp(x)
    c = target_constant(params, config, x, y, layer, part, scope, detach)
    return MatrixFreeCheck(y, hom, rows, relative_error(y, hom + c), relative_error(y, rows.sum(0) + c), c)

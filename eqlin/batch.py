"""Detached Jacobians of many prompts at once, vmapped over a batch axis B.

Prompts of equal length T go through the single-prompt map unchanged (`cumulative_fn`, last-layer
shortcut and, where it pays and fits, the folded MLP included). Ragged prompts are right-padded to T_max with zero embeddings and read at their
own last position n_b − 1: under the causal mask that query sees keys s <= n_b − 1 only, so every key
beyond the prompt is masked from the readout, the padding never reaches y_b, and J_b[:, s, :] = 0
exactly for s >= n_b. Per prompt, y_b = Σ_{t<n_b} J_b[:, t, :] x_b[t] (+ c_b for models with biases) as
in `detached_jacobian`; longrope's factors are chosen by each prompt's own length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqlin.blocks import Detach
from eqlin.config import ModelConfig
from eqlin.decoder import embed, final_norm, run_layers
from eqlin.errors import InputError
from eqlin.linear_maps import constant_term, cumulative_fn, finish, jacobian_of, plan_fold
from eqlin.memory import estimate_jacobian_bytes, memory_limit_bytes, resolve_chunk
from eqlin.model import Model
from eqlin.params import Params

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchLinearization:
    """Detached maps of B prompts, padded to T = max length.

    jacobian: (B, d, T, d), zero at padded positions; inputs: x (B, T, d), zero at padded positions;
    output: y (B, d); contributions: (B, T, d) rows J_t x_t; relative_error: (B,), of Σ_t J_t x_t + c;
    lengths: n_b (B,); ids: (B, T) token ids, padded with 0; constant: c (B, d), each prompt's frozen map
    at zero input (0 without biases, see `eqlin.linear_maps`).
    """

    jacobian: Array
    inputs: Array
    output: Array
    contributions: Array
    relative_error: Array
    lengths: Array
    ids: Array
    constant: Array | None = None

    def prompt(self, b: int) -> tuple[Array, Array]:
        """(J_b (d, n_b, d), x_b (n_b, d)): prompt b's map and inputs without padding."""
        n = int(self.lengths[b])
        return self.jacobian[b, :, :n], self.inputs[b, :n]


def _ragged_fn(params: Params, config: ModelConfig, length: Array, detach: Detach = True):
    """x (T, d) -> y (d,): the final output read at position `length` − 1 (a traced index), with
    longrope's factors for a sequence of `length` tokens."""
    def f(x: Array) -> Array:
        h, _ = run_layers(params.layers, config, x, detach=detach, context=length)
        return final_norm(params, config, h[length - 1], detach=detach)
    return f


@functools.partial(jax.jit, static_argnames=("config", "ragged", "chunk", "fold"))
def _batched(params: Params, config: ModelConfig, x: Array, lengths: Array, *, ragged: bool,
             chunk: int | None, fold: bool) -> tuple[Array, Array, Array, Array, Array]:
    """vmap over prompts: (J (B, d, T, d), y (B, d), contributions (B, T, d), relative_error (B,),
    constant (B, d)). `fold`: the folded MLP for J (equal-length prompts only)."""
    def one(x_b: Array, n_b: Array):
        def make(detach: Detach, folded: bool = False):
            return _ragged_fn(params, config, n_b, detach) if ragged else cumulative_fn(params, config, None,
                                                                                        "residual", detach, fold=folded)
        y, J = jacobian_of(make(True, fold), x_b, mode="rev", chunk=chunk)
        c = constant_term(make, x_b, y, config, True)
        return (J, y, *finish(y, J, x_b, c), c)

    return jax.vmap(one)(x, lengths)


def detached_jacobians(model: Model, prompts: Sequence, *, chunk: int | None = None,
                       memory_limit: int | None = None) -> BatchLinearization:
    """Detached Jacobians of the final output for each of `prompts` (texts or id sequences), in one
    vmapped computation. Equal lengths use the single-prompt map; ragged ones are padded (module docstring).
    `chunk`: cotangents per pass per prompt (None: the largest that fits `memory_limit` / B)."""
    if not len(prompts):
        raise InputError("no prompts given")
    ids = [model.ids(p) for p in prompts]
    lengths = np.array([len(i) for i in ids], dtype=np.int32)
    T, B = int(lengths.max()), len(ids)
    padded = np.zeros((B, T), dtype=np.int32)
    for b, row in enumerate(ids):
        padded[b, :len(row)] = row
    limit = memory_limit_bytes(memory_limit, params=model.params) // B
    itemsize, config = model.dtype.itemsize, model.config
    ragged = bool((lengths != T).any())
    fold = not ragged and plan_fold(config, "auto", detach=True, vectors=config.hidden_size, fits=lambda f: (
        estimate_jacobian_bytes(config, T, chunk=1, itemsize=itemsize, fold=f) <= limit))
    chunk = resolve_chunk(config, T, 1, "rev", chunk, itemsize, limit, fold=fold)
    x = jax.vmap(lambda i: embed(model.params, config, i))(jnp.asarray(padded))
    x = x * (jnp.arange(T)[None, :, None] < jnp.asarray(lengths)[:, None, None])  # zero the padding
    J, y, contributions, err, c = _batched(model.params, config, x, jnp.asarray(lengths), ragged=ragged, chunk=chunk,
                                           fold=fold)
    return BatchLinearization(J, x, y, contributions, err, jnp.asarray(lengths), jnp.asarray(padded), c)

"""Spectra of detached Jacobians: SVDs, their decoding into tokens, effective dimension, and matrix-free
top singular triplets for long inputs.

A `Linearization` holds J (d_out, T, d_in): y = Σ_t J_t x_t. Two matrices are analysed:

- per token: each J_t (d_out × d_in);
- token-combined: [J_1 … J_T] (d_out × T·d_in), the whole map from the input sequence to y.

Singular vectors have an arbitrary sign; eqlin flips each pair (u, v) so that u·y >= 0 (the output
direction it contributes to). Left vectors live in the output space and are decoded through the
unembedding (logit lens: scores W_U u, final softcapping left out: it does not change the order); right
vectors live in the input space (the embedding as the model consumes it, for Gemma the rows × √d: the
scale does not change cosines) and are decoded by cosine nearest neighbours in the embedding table.

`spectrum` builds dense SVDs from a Linearization; `top_singular` computes the top-k triplets of the
token-combined map from the model without ever building J (`eqlin.lanczos`: Golub–Kahan–Lanczos with
full reorthogonalization, or a randomized SVD), from one `jax.linearize` (v ↦ J v) and its
`jax.linear_transpose` (u ↦ Jᵀu: one VJP gives every J_tᵀu).

For a model with biases the map is affine, y = Σ_t J_t x_t + c (`eqlin.linear_maps`): spectra and
decoding are those of J alone; c, which no input moves, is not part of them (report.json decodes it on
its own), and relative errors include it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.checks import check_int
from eqlin.config import ModelConfig
from eqlin.decoder import VOCAB_CHUNK, embed
from eqlin.errors import InputError
from eqlin.lanczos import Method, matrix_free_svd
from eqlin.linear_maps import Linearization, relative_error, target_constant, target_fn, target_map
from eqlin.model import Model
from eqlin.params import Params, widen
from eqlin.progress import steps as steps_bar
from eqlin.selection import Part, Scope, resolve_selection

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
_SCORE_BYTES = 2**29  # at most this many bytes of (vectors × vocabulary) scores at once


# --------------------------------------------------------------------------------------------------
# Result types.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EffectiveDimension:
    """Effective dimension of a map from its full spectrum σ, each of shape (...) (one per map):

    stable_rank: ‖J‖_F² / σ_max² = Σσ² / σ_1²;  participation_ratio: (Σσ²)² / Σσ⁴;
    rank_90, rank_99: the fewest singular values whose σ² sum to at least 90 % / 99 % of Σσ².
    All are 0 for the zero map.
    """

    stable_rank: Array
    participation_ratio: Array
    rank_90: Array
    rank_99: Array

    def to_dict(self) -> dict[str, Any]:
        return {f.name: np.asarray(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class TokenMatches:
    """The best `top` tokens for each of a stack of vectors.

    ids: (..., top) int; scores: (..., top), best first; tokens: the strings, nested like `ids`.
    Scores are unembedding scores W_U v (output-space vectors) or cosines (input-space vectors).
    """

    ids: np.ndarray
    scores: np.ndarray
    tokens: list

    def select(self, i: int) -> TokenMatches:
        return TokenMatches(self.ids[i], self.scores[i], self.tokens[i])

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "scores": self.scores.tolist(), "tokens": self.tokens}


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Top-k singular triplets of a map, sign-aligned with its output (u·y >= 0).

    Shapes (with a leading layer axis n for a multi-layer Linearization):

    ==================  ===========================  ===========================
    field               per token (`per_token`)      token-combined
    ==================  ===========================  ===========================
    singular_values     (T, k)                       (k,)
    U                   (T, d_out, k)                (d_out, k)
    V                   (T, d_in, k)                 (T, d_in, k): V[t] is token t's block
    frobenius_sq        (T,)                         ()
    effective           fields (T,)                  fields ()
    left_tokens         (T, k, top)                  (k, top)
    right_tokens        (T, k, top)                  (T, k, top): each token's block of v
    ==================  ===========================  ===========================

    output: y (d_out,); relative_error: ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ of the map (); ids: the input (T,) (None
    for a map at embeddings given directly).
    frobenius_sq (‖J‖_F²) and effective (`EffectiveDimension`) need the full spectrum: None from
    `top_singular`. left_tokens / right_tokens: None until `decode_spectrum`.
    layer, part, scope, detach say which map it is; method is "dense", "lanczos" or "randomized".
    """

    singular_values: Array
    U: Array
    V: Array
    output: Array
    relative_error: Array
    ids: Array | None
    frobenius_sq: Array | None
    effective: EffectiveDimension | None
    per_token: bool
    method: str
    layer: int | tuple[int, ...] | None
    part: str
    scope: str
    detach: bool
    left_tokens: TokenMatches | None = None
    right_tokens: TokenMatches | None = None

    def select(self, i: int) -> Spectrum:
        """The i-th map of a multi-layer Spectrum."""
        if not isinstance(self.layer, tuple):
            raise InputError("select() needs a Spectrum over several layers")
        arrays = {f: getattr(self, f)[i] for f in ("singular_values", "U", "V", "output", "relative_error")}
        pick = {f: None if getattr(self, f) is None else getattr(self, f).select(i)
                for f in ("left_tokens", "right_tokens")}
        return dataclasses.replace(
            self, **arrays, **pick, layer=self.layer[i],
            frobenius_sq=None if self.frobenius_sq is None else self.frobenius_sq[i],
            effective=None if self.effective is None else jax.tree_util.tree_map(lambda a: a[i], self.effective))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (lists for arrays, nested like the shapes in the class docstring):

        map: {layer, part, scope, detach, per_token, method}; input_ids; k; singular_values;
        relative_error; output_norm (‖y‖); frobenius_sq and effective_dimension ({stable_rank,
        participation_ratio, rank_90, rank_99}) or None; left_tokens and right_tokens ({ids, scores,
        tokens}) or None. The singular vectors themselves are not included (they are large).
        """
        def plain(a):
            return None if a is None else np.asarray(a).tolist()

        return {
            "map": {"layer": list(self.layer) if isinstance(self.layer, tuple) else self.layer, "part": self.part,
                    "scope": self.scope, "detach": self.detach, "per_token": self.per_token, "method": self.method},
            "input_ids": plain(self.ids),
            "k": int(self.singular_values.shape[-1]),
            "singular_values": plain(self.singular_values),
            "relative_error": plain(self.relative_error),
            "output_norm": plain(jnp.linalg.norm(self.output, axis=-1)),
            "frobenius_sq": plain(self.frobenius_sq),
            "effective_dimension": None if self.effective is None else self.effective.to_dict(),
            "left_tokens": None if self.left_tokens is None else self.left_tokens.to_dict(),
            "right_tokens": None if self.right_tokens is None else self.right_tokens.to_dict(),
        }

    def to_json(self, **kwargs) -> str:
        """`json.dumps(self.to_dict(), **kwargs)`."""
        return json.dumps(self.to_dict(), **kwargs)

    def save(self, path: str | os.PathLike, model: Model | None = None, *, checkpoint: str | None = None
             ) -> Path:
        """Write this spectrum (decoded tokens included) to `path` as one safetensors file, bit for bit,
        atomically; `model` and `checkpoint` as in `Linearization.save`. Returns the path."""
        from eqlin.persistence import save_spectrum

        return save_spectrum(self, path, model, checkpoint=checkpoint)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spectrum:
        """The Spectrum saved at `path` by `save`, bit for bit; InputError for any other file."""
        from eqlin.persistence import load_spectrum

        return load_spectrum(path)

    def __repr__(self) -> str:
        return display.spectrum_repr(self)

    def _repr_html_(self) -> str:
        return display.spectrum_html(self)


@dataclasses.dataclass(frozen=True)
class NormAnalysis:
    """Column and row norms of each J_t (leading layer axis n for a multi-layer Linearization).

    column_norms: (T, d_in), ‖J_t[:, j]‖; columns: (T, c) the largest, decoded through the unembedding
    (columns live in the output space) as column_tokens (T, c, top).
    row_norms: (T, d_out), ‖J_t[i, :]‖; rows: (T, c) the largest, decoded by cosine nearest input
    embeddings (rows live in the input space) as row_tokens (T, c, top).
    """

    column_norms: Array
    columns: Array
    column_tokens: TokenMatches
    row_norms: Array
    rows: Array
    row_tokens: TokenMatches

    def to_dict(self) -> dict[str, Any]:
        """{column_norms, columns, column_tokens, row_norms, rows, row_tokens} as plain lists."""
        return {
            "column_norms": np.asarray(self.column_norms).tolist(), "columns": np.asarray(self.columns).tolist(),
            "column_tokens": self.column_tokens.to_dict(),
            "row_norms": np.asarray(self.row_norms).tolist(), "rows": np.asarray(self.rows).tolist(),
            "row_tokens": self.row_tokens.to_dict(),
        }


# --------------------------------------------------------------------------------------------------
# Effective dimension.


def effective_dimension(singular_values: Array) -> EffectiveDimension:
    """Stable rank, participation ratio and 90 % / 99 % energy counts over the last axis of the full
    spectrum σ (..., m). A truncated spectrum gives the measures of the truncated map."""
    s2 = jnp.square(singular_values)
    total = s2.sum(-1)
    nonzero = total > 0
    safe = jnp.where(nonzero, total, 1)
    stable = jnp.where(nonzero, total / jnp.where(nonzero, s2.max(-1), 1), 0)
    participation = jnp.where(nonzero, total**2 / jnp.where(nonzero, jnp.square(s2).sum(-1), 1), 0)
    energy = jnp.cumsum(jnp.sort(s2, axis=-1)[..., ::-1], axis=-1) / safe[..., None]
    slack = 16 * jnp.finfo(energy.dtype).eps  # ties at the threshold (identity: 9 of 10 hold exactly 90 %)

    def count(q: float) -> Array:
        return jnp.where(nonzero, jnp.minimum((energy < q - slack).sum(-1) + 1, s2.shape[-1]), 0)

    return EffectiveDimension(stable, participation, count(0.9), count(0.99))


# --------------------------------------------------------------------------------------------------
# Dense spectra.


def align_signs(U: Array, V: Array, y: Array) -> tuple[Array, Array]:
    """Flip the pairs (U[..., :, i], V[..., :, i]) so that uᵢ·y >= 0. U (..., d_out, k), y (..., d_out)."""
    sign = jnp.where(jnp.einsum("...ok,...o->...k", U, y, precision=HIGHEST) < 0, -1, 1).astype(U.dtype)
    return U * sign[..., None, :], V * sign[..., None, :]


@functools.partial(jax.jit, static_argnames=("k", "per_token"))
def _dense(J: Array, y: Array, *, k: int, per_token: bool) -> tuple[Array, ...]:
    """(s, U, V, ‖J‖_F², EffectiveDimension) for J (..., d_out, T, d_in); see `spectrum`."""
    d_out, T, d_in = J.shape[-3:]
    if per_token:
        M, y = jnp.moveaxis(J, -2, -3), y[..., None, :]  # (..., T, d_out, d_in), y per token
    else:
        M = J.reshape(*J.shape[:-3], d_out, T * d_in)
    U, s, Vh = jnp.linalg.svd(M, full_matrices=False)  # batched over layers and tokens (≡ vmap)
    effective = effective_dimension(s)
    U, V = align_signs(U[..., :k], jnp.swapaxes(Vh, -1, -2)[..., :k], y)
    if not per_token:
        V = V.reshape(*V.shape[:-2], T, d_in, k)
    return s[..., :k], U, V, jnp.square(s).sum(-1), effective


def spectrum(lin: Linearization, k: int | None = None, *, per_token: bool = True) -> Spectrum:
    """SVD of each J_t (d_out × d_in) or, with `per_token=False`, of the token-combined matrix
    (d_out × T·d_in), top `k` triplets (None: all, min(d_out, d_in) or min(d_out, T·d_in)), sign-aligned
    with the output. A multi-layer Linearization gives every array a leading layer axis (use
    `Spectrum.select`). Computed in lin's dtype; shapes in `Spectrum`'s docstring."""
    d_out, T, d_in = lin.jacobian.shape[-3:]
    full = min(d_out, d_in) if per_token else min(d_out, T * d_in)
    k = full if k is None else check_int(
        "k", k, 1, full, "the rank bound of " + ("J_t" if per_token else "the token-combined map"))
    s, U, V, fro, effective = _dense(lin.jacobian, lin.output, k=k, per_token=per_token)
    return Spectrum(s, U, V, lin.output, lin.relative_error, lin.ids, fro, effective, per_token, "dense",
                    lin.layer, lin.part, lin.scope, lin.detach)


# --------------------------------------------------------------------------------------------------
# Decoding into tokens.


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """Scores of N vectors against every token, summarised (host arrays).

    values, ids (N, top): the best tokens, best first, ties by lower id; target_score (N,): the score of
    one chosen target token; target_rank (N,): how many tokens score above it; log_partition (N,):
    log Σ_v exp(score_v), so that exp(target_score − log_partition) is the target's softmax probability.
    """

    values: np.ndarray
    ids: np.ndarray
    target_score: np.ndarray
    target_rank: np.ndarray
    log_partition: np.ndarray


def _scores(table: Array, vectors: Array, space: str) -> Array:
    """(N, V) scores of vectors (N, d) against the rows of `table` (V, d): W v (output space) or cosines
    (input space). A stored `table` is widened to the vectors' dtype (`eqlin.params.widen`)."""
    table = widen(table, vectors.dtype)
    scores = jnp.einsum("vd,nd->nv", table, vectors, precision=HIGHEST)
    if space == "output":
        return scores
    tiny = jnp.finfo(table.dtype).tiny
    rows = jnp.maximum(jnp.linalg.norm(table, axis=-1), tiny)
    return scores / rows[None, :] / jnp.maximum(jnp.linalg.norm(vectors, axis=-1), tiny)[:, None]


@functools.partial(jax.jit, static_argnames=("space", "top"))
def _summarise(rows: Array, vectors: Array, target: Array, target_score: Array, *, space: str, top: int | None
               ) -> tuple[Array, ...]:
    """Scores of vectors (N, d) against one chunk of table rows (C, d), summarised: (scores (N, C), or with
    `top` the chunk's top-k values and indices; the target's score (N,); how many scores exceed it (N,);
    logsumexp (N,)). The target's score is read from these scores where `target` (an index into the
    chunk, or −1) is in the chunk, else `target_score` is given. With `top` None the scores themselves come
    back for a selection on the host (XLA's CPU TopK sorts the whole row, far slower than a partial
    selection)."""
    scores = _scores(rows, vectors, space)
    target_score = jnp.where(target >= 0, scores[:, jnp.maximum(target, 0)], target_score)
    stats = (target_score, (scores > target_score[:, None]).sum(-1), jax.scipy.special.logsumexp(scores, axis=-1))
    return ((scores,) if top is None else tuple(jax.lax.top_k(scores, top))) + stats


def top_of_rows(scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` largest entries of each row of scores (N, V), best first, ties by lower index:
    (values, ids), each (N, top). A partial selection (O(V) per row), then a sort of the few candidates."""
    kth = np.partition(scores, -top, axis=-1)[:, -top]
    ids = np.empty((scores.shape[0], top), np.int64)
    for row, (s, bound) in enumerate(zip(scores, kth)):
        candidates = np.flatnonzero(s >= bound)
        ids[row] = candidates[np.lexsort((candidates, -s[candidates]))][:top]
    return np.take_along_axis(scores, ids, axis=-1), ids


def score_summary(model: Model, vectors: Array, space: Literal["output", "input"], top: int, target: int = 0, *,
                  chunk: int = VOCAB_CHUNK) -> ScoreSummary:
    """`ScoreSummary` of vectors (N, d) through the unembedding (output space) or by cosines with the
    input embeddings (input space).

    The stored table is widened `chunk` rows at a time (never whole: 3 GiB at Llama-3.2-3B's
    vocabulary in float64), the chunk holding the target first, for batches of vectors whose scores against
    one chunk take at most `_SCORE_BYTES`. Each chunk's best tokens (selected on the device with
    `lax.top_k` on accelerators, on the host on CPUs) are merged by score, ties by lower id; the counts
    above the target add up; the chunks' log-partitions combine as m + log Σ_c exp(lse_c − m), m their
    maximum: equal to one logsumexp over the vocabulary to float64 rounding, not bit for bit."""
    table = model.params.unembedding if space == "output" else model.params.embed
    on_cpu = next(iter(jax.tree_util.tree_leaves(table)[0].devices())).platform == "cpu"  # a QuantizedTensor too
    vocab = table.shape[0]
    first = target // chunk * chunk
    starts = [first] + [s for s in range(0, vocab, chunk) if s != first]
    batch = max(1, _SCORE_BYTES // (min(vocab, chunk) * model.dtype.itemsize))
    vectors, parts = vectors.astype(model.dtype), []
    for b in range(0, vectors.shape[0], batch):
        v = vectors[b:b + batch]
        target_score, best, above, lse = jnp.zeros(v.shape[0], v.dtype), [], 0, []
        for start in starts:
            rows = table if len(starts) == 1 else table[start:start + chunk]  # one chunk copied at a time
            local = target - start if start == first else -1
            k = min(top, rows.shape[0])
            out = _summarise(rows, v, jnp.asarray(local), target_score, space=space, top=None if on_cpu else k)
            values, ids = top_of_rows(np.asarray(out[0]), k) if on_cpu else (np.asarray(out[0]), np.asarray(out[1]))
            best.append((values, ids + start))
            target_score, above, lse = out[-3], above + np.asarray(out[-2]), lse + [np.asarray(out[-1])]
        order = np.argsort(starts)  # the chunks' candidates in id order: ties between chunks go to lower ids
        values, picked = top_of_rows(np.concatenate([best[i][0] for i in order], axis=-1), top)
        ids = np.take_along_axis(np.concatenate([best[i][1] for i in order], axis=-1), picked, axis=-1)
        lse = np.stack(lse, axis=-1)
        m = lse.max(-1)
        parts.append((values, ids, np.asarray(target_score), above, m + np.log(np.exp(lse - m[:, None]).sum(-1))))
    return ScoreSummary(*(np.concatenate(column) for column in zip(*parts)))


def match_tokens(model: Model, vectors: Array, top: int, space: Literal["output", "input"]) -> TokenMatches:
    """Top tokens for vectors (..., d): through the unembedding (output space) or by cosine nearest
    input embeddings (input space)."""
    vocab = model.params.embed.shape[0] if space == "input" else model.params.unembedding.shape[0]
    top = check_int("top", top, 1, vocab, "the vocabulary size")
    found = score_summary(model, vectors.reshape(-1, vectors.shape[-1]), space, top)
    shape = vectors.shape[:-1] + (top,)
    values, ids = found.values.reshape(shape), found.ids.reshape(shape)
    strings = np.array(model.token_strings(ids.reshape(-1)), dtype=object).reshape(shape).tolist()
    return TokenMatches(ids, values, strings)


def decode_spectrum(model: Model, spec: Spectrum, top: int = 5) -> Spectrum:
    """`spec` with left_tokens (each u through the unembedding) and right_tokens (each token's block of
    v by cosine nearest input embeddings) filled in, `top` tokens each; shapes in `Spectrum`."""
    left = match_tokens(model, jnp.swapaxes(spec.U, -1, -2), top, "output")  # (..., k, d_out)
    right = match_tokens(model, jnp.swapaxes(spec.V, -1, -2), top, "input")  # (..., T, k, d_in)
    return dataclasses.replace(spec, left_tokens=left, right_tokens=right)


def norm_analysis(model: Model, lin: Linearization, count: int = 5, top: int = 5) -> NormAnalysis:
    """Column and row norms of every J_t; the `count` largest columns decoded through the unembedding
    and the `count` largest rows by cosine nearest input embeddings, `top` tokens each."""
    J = jnp.moveaxis(lin.jacobian, -2, -3)  # (..., T, d_out, d_in)
    count = check_int("count", count, 1, min(J.shape[-2:]), "at most the columns and rows of J_t")
    col_norms, row_norms = jnp.linalg.norm(J, axis=-2), jnp.linalg.norm(J, axis=-1)
    _, cols = jax.lax.top_k(col_norms, count)  # (..., T, c)
    _, rows = jax.lax.top_k(row_norms, count)
    col_vectors = jnp.take_along_axis(jnp.swapaxes(J, -1, -2), cols[..., None], axis=-2)  # (..., T, c, d_out)
    row_vectors = jnp.take_along_axis(J, rows[..., None], axis=-2)  # (..., T, c, d_in)
    return NormAnalysis(col_norms, cols, match_tokens(model, col_vectors, top, "output"),
                        row_norms, rows, match_tokens(model, row_vectors, top, "input"))


# --------------------------------------------------------------------------------------------------
# Matrix-free top singular triplets of a model's map.


_MAP_STATIC = ("config", "layer", "part", "scope", "detach")


@functools.partial(jax.jit, static_argnames=_MAP_STATIC)
def _map_input(params: Params, config: ModelConfig, x: Array, *, layer: int | None, part: Part, scope: Scope,
               detach: bool) -> Array:
    """The input (T, d) of the map selected by (layer, part, scope) for input embeddings x."""
    return target_map(params, config, x, layer, part, scope, detach)[1]


@functools.partial(jax.jit, static_argnames=_MAP_STATIC)
def _map_apply(params: Params, config: ModelConfig, v: Array, *, layer: int | None, part: Part, scope: Scope,
               detach: bool) -> Array:
    """The selected map f at its input v (T, d): (d,)."""
    return target_fn(params, config, v.shape[0], layer, part, scope, detach)(v)


@functools.partial(jax.jit, static_argnames=_MAP_STATIC)
def _map_error(params: Params, config: ModelConfig, v: Array, y: Array, jvp: Callable[[Array], Array], *,
               layer: int | None, part: Part, scope: Scope, detach: bool) -> Array:
    """‖y − (J v + c)‖ / ‖y‖ of the selected map at its input v, output y."""
    return relative_error(y, jvp(v) + target_constant(params, config, v, y, layer, part, scope, detach))


def _map_jvp(params: Params, config: ModelConfig, x: Array, *, layer: int | None, part: Part, scope: Scope,
             detach: bool) -> tuple[Array, Callable[[Array], Array], Array, Array]:
    """(y, v ↦ J v, the map's input, ‖y − (J x + c)‖ / ‖y‖) for the map selected by (layer, part, scope).

    `jax.linearize` runs outside jit, around the jitted map (`_map_apply`, the weights its argument): the
    linearization then holds the weight leaves it needs as the very buffers of `params` (a jit's partial
    evaluation forwards an input that is a residual), where a jit returning the linearization would return
    copies of them (every jit output is a new buffer): at Llama-3.2-3B's shapes 3.5 GB of stored weights."""
    where = dict(layer=layer, part=part, scope=scope, detach=detach)
    v = _map_input(params, config, x, **where)
    y, jvp = jax.linearize(lambda v: _map_apply(params, config, v, **where), v)
    return y, jvp, v, _map_error(params, config, v, y, jvp, **where)


def top_singular(model: Model, inputs, k: int, *, layer: int | None = None, part: Part = "residual",
                 scope: Scope = "cumulative", detach: bool = True, method: Method = "lanczos",
                 steps: int | None = None, power_iterations: int = 2, block: int = 10, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, quiet: bool | None = None) -> Spectrum:
    """Matrix-free top-k singular triplets of the token-combined map (d × T·d) selected by (layer, part,
    scope) as in `detached_jacobian` (one layer or None), without building J.

    Linearizes once (`jax.linearize`: v ↦ J v; its transpose u ↦ Jᵀu, one VJP for all J_tᵀu), then runs
    `matrix_free_svd` (method, steps, power_iterations, block, seed, progress: see there). Memory is the
    stored linearization plus (steps + 1) input-sized vectors, never T·d² (3.4 GB in float64 for Gemma 3
    270M at T = 1024). The relative reconstruction error ‖y − (J x + c)‖ / ‖y‖ comes from one more JVP (and,
    with biases, c from one paired forward). Without a `progress` callback, a bar on stderr counts the
    products (see `eqlin.progress.shown` for when it shows).
    Returns a token-combined Spectrum (per_token False, frobenius_sq and effective None), sign-aligned
    with y.
    """
    layers = resolve_selection(model.config, layer, part, scope, one_layer="top_singular")
    layer = None if layers is None else layers[0]
    ids = model.ids(inputs)
    x = embed(model.params, model.config, jnp.asarray(ids))
    y, jvp, x_in, err = _map_jvp(model.params, model.config, x, layer=layer, part=part, scope=scope, detach=detach)
    with steps_bar(f"matrix-free top-{k} ({method}): products with J and Jᵀ", None,
                   True if progress is not None else quiet) as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        s, U, V = matrix_free_svd(jvp, x_in, k, method=method, steps=steps, power_iterations=power_iterations,
                                  block=block, seed=seed, progress=progress or report)
    U, V = align_signs(U, V, y)
    return Spectrum(s, U, V, y, err, jnp.asarray(ids), None, None, False, method, layer, part, scope, detach)

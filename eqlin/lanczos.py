"""Top singular triplets of a linear map given only as a function, v ↦ J v: Golub–Kahan–Lanczos with full
reorthogonalization, or a randomized SVD. Jᵀ comes from `jax.linear_transpose`; J is never formed. Nothing
here knows about models (`eqlin.spectral.top_singular` applies it to a detached Jacobian)."""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from eqlin.checks import check_int
from eqlin.errors import InputError

Array = jax.Array
Method = Literal["lanczos", "randomized"]
METHODS = ("lanczos", "randomized")
HIGHEST = jax.lax.Precision.HIGHEST


def _transpose(jvp: Callable[[Array], Array], shape: tuple[int, ...], dtype) -> Callable[[Array], Array]:
    """u ↦ Jᵀu (shape) for the linear jvp: v (shape) ↦ J v."""
    t = jax.linear_transpose(jvp, jax.ShapeDtypeStruct(shape, dtype))
    return lambda u: t(u)[0]


def _orthogonalize(v: Array, basis: Array) -> Array:
    """v minus its projection on the orthonormal rows of `basis` (zero rows allowed), twice."""
    for _ in range(2):
        v = v - jnp.einsum("mn,m->n", basis, jnp.einsum("mn,n->m", basis, v, precision=HIGHEST), precision=HIGHEST)
    return v


def _normalize(v: Array) -> tuple[Array, Array]:
    """(v / ‖v‖, ‖v‖), with 0 for the zero vector (breakdown: an exact invariant subspace)."""
    norm = jnp.linalg.norm(v)
    return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1), 0), norm


@functools.partial(jax.jit, static_argnames=("shape",))
def _gkl_block(jvp: Callable[[Array], Array], state: tuple[Array, ...], start: Array, stop: Array, *,
               shape: tuple[int, ...]) -> tuple[Array, ...]:
    """Golub–Kahan–Lanczos steps j = start..stop−1 with full reorthogonalization.

    state (P (m, d_out), Q (m+1, n), α (m,), β (m+1,)), rows not yet reached are zero:
    p_j ∝ J q_j − β_j p_{j−1} (α_j its norm), q_{j+1} ∝ Jᵀp_j − α_j q_j (β_{j+1} its norm).
    """
    P, Q, alpha, beta = state
    jvp_t = _transpose(jvp, shape, Q.dtype)

    def step(j, state):
        P, Q, alpha, beta = state
        p, a = _normalize(_orthogonalize(jvp(Q[j].reshape(shape)) - beta[j] * P[j - 1], P))
        q, b = _normalize(_orthogonalize(jvp_t(p).reshape(-1) - a * Q[j], Q))
        return P.at[j].set(p), Q.at[j + 1].set(q), alpha.at[j].set(a), beta.at[j + 1].set(b)

    return jax.lax.fori_loop(start, stop, step, (P, Q, alpha, beta))


@functools.partial(jax.jit, static_argnames=("k", "shape"))
def _gkl_finish(state: tuple[Array, ...], *, k: int, shape: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """Top-k triplets from m Lanczos steps. With Jᵀ P_m = Q_{m+1} Cᵀ, C (m × m+1) has α on the diagonal
    and β_{j+1} at (j, j+1), and C Cᵀ = P_mᵀ J Jᵀ P_m: its SVD C = Ũ Σ Ṽᵀ gives u = P_mᵀŨ and
    v = Q_{m+1}ᵀṼ = Jᵀu / σ (exact once P_m spans the output space)."""
    P, Q, alpha, beta = state
    m = alpha.shape[0]
    C = jnp.zeros((m, m + 1), alpha.dtype).at[jnp.arange(m), jnp.arange(m)].set(alpha)
    C = C.at[jnp.arange(m), jnp.arange(1, m + 1)].set(beta[1:])
    Uc, s, Vch = jnp.linalg.svd(C, full_matrices=False)
    U = jnp.einsum("mo,mk->ok", P, Uc[:, :k], precision=HIGHEST)
    V = jnp.einsum("mn,km->nk", Q, Vch[:k], precision=HIGHEST)
    return s[:k], U, V.reshape(*shape, k)


@functools.partial(jax.jit, static_argnames=("shape",))
def _apply(jvp: Callable[[Array], Array], vectors: Array, *, shape: tuple[int, ...]) -> Array:
    """J v for each row of vectors (l, n): (l, d_out)."""
    return jax.lax.map(lambda v: jvp(v.reshape(shape)), vectors)


@functools.partial(jax.jit, static_argnames=("shape",))
def _apply_t(jvp: Callable[[Array], Array], vectors: Array, *, shape: tuple[int, ...]) -> Array:
    """Jᵀu for each row of vectors (l, d_out): (l, n)."""
    jvp_t = _transpose(jvp, shape, vectors.dtype)
    return jax.lax.map(lambda u: jvp_t(u).reshape(-1), vectors)


def _orthonormal_rows(rows: Array) -> Array:
    """An orthonormal basis (l, n) of the span of rows (l, n), by QR."""
    return jnp.linalg.qr(rows.T)[0].T


def matrix_free_svd(jvp: Callable[[Array], Array], x: Array, k: int, *, method: Method = "lanczos",
                    steps: int | None = None, power_iterations: int = 2, block: int = 10, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> tuple[Array, Array, Array]:
    """Top-k singular triplets (s (k,), U (d_out, k), V (*x.shape, k)) of a linear map J given only as
    v ↦ J v (`jvp`, a `jax.tree_util.Partial` such as `jax.linearize` returns; x gives the input shape),
    with Jᵀ from `jax.linear_transpose`. J is never formed.

    method "lanczos": `steps` Golub–Kahan–Lanczos steps (default min(d_out, n, 2k + 20)) with full
    reorthogonalization, run `block` steps per compiled call; cost 2·steps products with J or Jᵀ.
    method "randomized": a sample of `steps` vectors (same default), `power_iterations` power iterations
    and the projection B = Qᵀ J (not Qᵀ J Ω); cost steps·(2 + 2·power_iterations) products.
    progress(done, total), if given, is called after each block or pass, counting products with J or Jᵀ.
    Signs are as the SVD gives them (`eqlin.spectral.top_singular` aligns them with an output).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    shape, n = tuple(x.shape), int(x.size)
    d_out = int(jax.eval_shape(jvp, x).shape[0])
    full = min(d_out, n)
    k = check_int("k", k, 1, full, f"the rank bound of a {d_out} × {n} map")
    steps = min(full, 2 * k + 20) if steps is None else check_int("steps", steps, k, full,
                                                                     "at least k, at most min(d_out, n)")
    block = check_int("block", block, 1, None, "Lanczos steps per compiled call")
    power_iterations = check_int("power_iterations", power_iterations, 0, None, "randomized SVD")
    key = jax.random.key(seed)
    report = progress or (lambda done, total: None)
    if method == "lanczos":
        q0, _ = _normalize(jax.random.normal(key, (n,), x.dtype))
        state = (jnp.zeros((steps, d_out), x.dtype), jnp.zeros((steps + 1, n), x.dtype).at[0].set(q0),
                 jnp.zeros(steps, x.dtype), jnp.zeros(steps + 1, x.dtype))
        for start in range(0, steps, block):
            stop = min(start + block, steps)
            state = _gkl_block(jvp, state, jnp.asarray(start), jnp.asarray(stop), shape=shape)
            jax.block_until_ready(state)  # so that progress reports work done, not work dispatched
            report(2 * stop, 2 * steps)
        return _gkl_finish(state, k=k, shape=shape)
    total, done = steps * (2 + 2 * power_iterations), 0

    def sweep(fn, rows):
        nonlocal done
        out = jax.block_until_ready(fn(jvp, rows, shape=shape))
        done += steps
        report(done, total)
        return out

    Q = _orthonormal_rows(sweep(_apply, jax.random.normal(key, (steps, n), x.dtype)))  # (l, d_out)
    for _ in range(power_iterations):
        Q = _orthonormal_rows(sweep(_apply, _orthonormal_rows(sweep(_apply_t, Q))))
    B = sweep(_apply_t, Q)  # (l, n): rows Jᵀq_i, i.e. B = Qᵀ J
    Ub, s, Vbh = jnp.linalg.svd(B, full_matrices=False)
    U = jnp.einsum("lo,lk->ok", Q, Ub[:, :k], precision=HIGHEST)
    return s[:k], U, Vbh[:k].T.reshape(*shape, k)

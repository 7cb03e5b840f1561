"""Matrix-free top-k singular triplets (Lanczos, randomized) of a map given as v ↦ A v recover a known decaying
spectrum and its singular subspaces to float64 rounding."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqlin.lanczos import matrix_free_svd
from tests.conftest import subspace_cosines


def _matvec(A: jax.Array, v: jax.Array) -> jax.Array:
    return A @ v.reshape(-1)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_matrix_free_svd_recovers_a_known_decaying_spectrum(method):
    d_out, shape, k = 40, (6, 20), 5
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(d_out, d_out)))[0]
    V = np.linalg.qr(rng.normal(size=(120, d_out)))[0]
    s = 3 * 0.7 ** np.arange(d_out)
    A = jnp.asarray(U * s @ V.T)
    got_s, got_U, got_V = matrix_free_svd(jax.tree_util.Partial(_matvec, A), jnp.zeros(shape), k, method=method)
    chex.assert_shape([got_s, got_U, got_V], [(k,), (d_out, k), (*shape, k)])
    np.testing.assert_allclose(got_s, s[:k], rtol=1e-14)  # measured 1.7e-15
    assert np.all(np.abs(subspace_cosines(U[:, :k], got_U) - 1) <= 1e-14)  # measured 6.7e-16
    assert np.all(np.abs(subspace_cosines(V[:, :k], got_V.reshape(-1, k)) - 1) <= 1e-14)

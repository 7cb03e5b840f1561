"""Detached Jacobians over several devices: the cotangent (basis) axis sharded, the weights replicated.

Reverse mode pushes the d basis vectors e_i of the output through one linearization; the rows
J[i] = vjp(e_i) are independent, so a `Mesh` axis ("basis") splits them: device k linearizes the model
once (cheap: one forward) and pulls back its own d / n basis vectors, in chunks of `chunk`. The rows
come back sharded on that axis and are identical to one device's (same ops per row). Multi-host: call
`jax.distributed.initialize()` first on every host, then pass a mesh over `jax.devices()` (docs/scaling.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqlin.config import ModelConfig
from eqlin.decoder import embed
from eqlin.linear_maps import Linearization, _finish, cumulative_fn, pull_back_rows
from eqlin.model import Model
from eqlin.params import Params

Array = jax.Array
AXIS = "basis"


def basis_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named "basis" over `devices` (default: all, every host's included)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


@functools.partial(jax.jit, static_argnames=("config", "mesh", "chunk"))
def _sharded_rows(params: Params, config: ModelConfig, x: Array, *, mesh: Mesh, chunk: int | None
                  ) -> tuple[Array, Array]:
    """(y (d,), J (d, T, d) with rows sharded over the mesh's basis axis)."""
    d, n = config.hidden_size, mesh.shape[AXIS]
    index = jnp.arange(-(-d // n) * n) % d  # padded to a multiple of n with repeats, dropped below

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P(AXIS)),
                       check_vma=False)  # y is replicated; cotangents vary over the basis axis
    def rows(p: Params, x: Array, i: Array) -> tuple[Array, Array]:  # i: this device's basis indices
        y, vjp = jax.vjp(cumulative_fn(p, config, None, "residual", True), x)
        return y, pull_back_rows(vjp, y, i, chunk)  # (d/n, T, d)

    y, J = rows(params, x, index)
    J = jax.lax.with_sharding_constraint(J[:d], NamedSharding(mesh, P(AXIS)))
    return y, J


def detached_jacobian_sharded(model: Model, inputs, *, mesh: Mesh | None = None, chunk: int | None = None
                              ) -> Linearization:
    """`detached_jacobian(model, inputs)` (final output) with the d cotangents split over `mesh`'s
    "basis" axis (default: every device). Weights are replicated on each device. J (d, T, d) comes
    back sharded on its first axis; `chunk` bounds the cotangents per pass on each device."""
    mesh = mesh or basis_mesh()
    params = jax.device_put(model.params, NamedSharding(mesh, P()))
    ids = model.ids(inputs)
    x = jax.device_put(embed(model.params, model.config, jnp.asarray(ids)), NamedSharding(mesh, P()))
    y, J = _sharded_rows(params, model.config, x, mesh=mesh, chunk=chunk)
    contributions, err = _finish(y, J, x)
    return Linearization(J, x, y, contributions, err, jnp.asarray(ids))

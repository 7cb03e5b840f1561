"""Detached Jacobians over several devices: a 2-D mesh ("basis", "model").

- "basis": reverse mode pushes the d basis vectors e_i of the output through one linearization; the
  rows J[i] = vjp(e_i) are independent, so this axis splits them. Each basis group linearizes the model
  once (one forward) and pulls back its own d / n_basis rows, `chunk` at a time, through the unfolded
  MLP (so few cotangents per linearization rarely make the fold of `eqlin.blocks` pay). With weights
  replicated ("model" of size 1) the rows are bit-identical to one device's (same ops per row).
- "model": tensor parallelism for weights that do not fit one device. The weights are split Megatron
  style (`eqlin.params.partition_specs`); inside each basis group XLA's SPMD partitioner runs the
  heads and the F-slice of the MLP locally and joins the row-parallel products with all-reduces, in
  the forward and in every cotangent pass. Results equal one device's up to the reduction order
  (float64 rounding).

`jax.vjp` does not carry shardings by itself: the weights are constrained to their layout inside the
jitted function, and the basis axis is manual (`jax.shard_map` over "basis" only, "model" left to
the partitioner). Multi-host: call `jax.distributed.initialize()` first on every host, then build the
mesh over `jax.devices()` (docs/scaling.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from eqlin.config import ModelConfig
from eqlin.decoder import embed
from eqlin.errors import InputError
from eqlin.linear_maps import Linearization, constant_term, cumulative_fn, finish, pull_back_rows
from eqlin.memory import activation_elems, choose_chunk, format_bytes, memory_limit_bytes
from eqlin.model import Model
from eqlin.params import BASIS_AXIS, MODEL_AXIS, Params, check_mesh, param_shardings

Array = jax.Array


def device_mesh(devices: list | None = None, *, model: int = 1) -> Mesh:
    """A (n / model, model) mesh with axes ("basis", "model") over `devices` (default: all, every
    host's included), built by `jax.make_mesh`, which orders the devices by the physical topology where it
    knows one (TPU) and keeps the given order elsewhere. Devices that share a "basis" index hold one
    tensor-parallel copy of the weights. Both axes are `AxisType.Auto`: shardings are left to XLA's
    partitioner (the "model" axis) or made manual by `jax.shard_map` (the "basis" axis), not typed."""
    devs = list(devices) if devices is not None else jax.devices()
    if isinstance(model, bool) or not isinstance(model, int) or model < 1 or not devs or len(devs) % model:
        raise InputError(f"model={model!r} must be a positive divisor of the {len(devs)} devices")
    return jax.make_mesh((len(devs) // model, model), (BASIS_AXIS, MODEL_AXIS), (AxisType.Auto, AxisType.Auto),
                         devices=devs)


def basis_mesh(devices: list | None = None) -> Mesh:
    """`device_mesh` with the weights replicated: every device is its own basis group."""
    return device_mesh(devices, model=1)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "chunk"))
def _sharded_rows(params: Params, config: ModelConfig, x: Array, *, mesh: Mesh, chunk: int | None
                  ) -> tuple[Array, Array, Array]:
    """(y (d,), J (d, T, d) with rows sharded over the mesh's basis axis, the constant c (d,))."""
    params = jax.lax.with_sharding_constraint(params, param_shardings(params, config, mesh))
    d, n = config.hidden_size, mesh.shape[BASIS_AXIS]
    index = jnp.arange(-(-d // n) * n) % d  # padded to a multiple of n with repeats, dropped below

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P(BASIS_AXIS)),
                       out_specs=(P(), P(BASIS_AXIS)), axis_names={BASIS_AXIS},
                       check_vma=False)  # y is the same in every basis group
    def rows(p: Params, x: Array, i: Array) -> tuple[Array, Array]:  # i: this group's basis indices
        y, vjp = jax.vjp(cumulative_fn(p, config, None, "residual", True), x)
        return y, pull_back_rows(vjp, y, i, chunk)  # (d/n, T, d)

    y, J = rows(params, x, index)
    J = jax.lax.with_sharding_constraint(J[:d], NamedSharding(mesh, P(BASIS_AXIS)))
    return y, J, constant_term(lambda detach: cumulative_fn(params, config, None, "residual", detach), x, y, config,
                               True)


def device_memory_limit(mesh: Mesh) -> int:
    """Bytes one device of `mesh` may use, read on one of this process's devices (another process's devices
    report nothing here): its allocator's limit where it reports one (GPU, TPU), else (CPU devices share
    the host's RAM) `memory_limit_bytes()` split evenly over this host's devices."""
    device = next((d for d in mesh.devices.flat if d.process_index == jax.process_index()), None)
    if device is None:
        raise InputError(f"the mesh holds none of process {jax.process_index()}'s devices: every process of a "
                         "multi-host run builds the same mesh over jax.devices(), e.g. eqlin.device_mesh("
                         "jax.devices(), model=len(jax.local_devices())) (docs/scaling.md)")
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return memory_limit_bytes() // len(jax.local_devices())


def sharded_jacobian_bytes(config: ModelConfig, length: int, mesh: Mesh, *, chunk: int | None, itemsize: int,
                           param_bytes: int) -> int:
    """Peak bytes on one device (an upper estimate): its weights (`param_bytes`), its block of J's rows,
    the stored linearization and `chunk` cotangents in flight (activations counted unsplit)."""
    d, L = config.hidden_size, config.num_layers
    rows = -(-d // mesh.shape[BASIS_AXIS])
    in_flight = min(chunk or rows, rows)
    act = activation_elems(config, length)
    return param_bytes + itemsize * (rows * length * d + L * act + in_flight * (act + length * d + d))


def _resolve_sharded_chunk(config: ModelConfig, length: int, mesh: Mesh, chunk: int | None, itemsize: int,
                           param_bytes: int, limit: int) -> int | None:
    """`choose_chunk` against one device's `limit`: None means all of a basis group's rows at once."""
    def cost(c: int | None) -> int:
        return sharded_jacobian_bytes(config, length, mesh, chunk=c, itemsize=itemsize, param_bytes=param_bytes)

    def nothing_fits() -> str:
        return (f"a sharded Jacobian at T={length} needs about {format_bytes(cost(1))} per device even one basis "
                f"vector at a time, over the {format_bytes(limit)} per-device limit; add devices to the "
                "\"basis\" axis (J's rows) or the \"model\" axis (the weights), or use fewer tokens")

    return choose_chunk(cost, chunk, -(-config.hidden_size // mesh.shape[BASIS_AXIS]), limit,
                        nothing_fits=nothing_fits, per=" per device")


def detached_jacobian_sharded(model: Model, inputs, *, mesh: Mesh | None = None, chunk: int | None = None,
                              memory_limit: int | None = None) -> Linearization:
    """`detached_jacobian(model, inputs)` (final output) on `mesh` (default: `basis_mesh()`, every device).

    The d cotangents split over the "basis" axis; the weights split over the "model" axis (load the
    model with `eqlin.load(..., mesh=mesh)` so they are never whole on one device). J (d, T, d) comes
    back sharded on its first axis; `chunk` bounds the cotangents per pass in each basis group (None:
    the largest that fits `memory_limit` bytes per device, default `device_memory_limit`), checked
    before anything is allocated.
    """
    mesh = basis_mesh() if mesh is None else check_mesh(mesh)
    params = jax.device_put(model.params, param_shardings(model.params, model.config, mesh))
    ids = model.ids(inputs)
    param_bytes = sum(a.addressable_shards[0].data.nbytes for a in jax.tree_util.tree_leaves(params))
    chunk = _resolve_sharded_chunk(model.config, len(ids), mesh, chunk, model.dtype.itemsize, param_bytes,
                                   device_memory_limit(mesh) if memory_limit is None
                                   else memory_limit_bytes(memory_limit))
    x = jax.device_put(embed(params, model.config, jnp.asarray(ids)), NamedSharding(mesh, P()))
    y, J, c = _sharded_rows(params, model.config, x, mesh=mesh, chunk=chunk)
    contributions, err = finish(y, J, x, c)
    return Linearization(J, x, y, contributions, err, jnp.asarray(ids), c)

"""Memory budgets: estimate the peak bytes of a Jacobian computation before allocating anything, and pick
the largest chunk of basis vectors that fits.

Every estimate is an upper bound in bytes built from element counts (`activation_elems`) times the
dtype's item size. The limit is `memory_limit` or $EQLIN_MEMORY_LIMIT_GB (the computation's own budget,
the weights not counted) or, by default, what the device holding the weights can still take: its
allocator's limit on GPUs and TPUs, 80 % of physical memory on CPUs, minus the weights' own bytes.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax

from eqlin.checks import check_int
from eqlin.config import ModelConfig
from eqlin.errors import InputError, MemoryBudgetError

_MAX_LIMIT_GIB = 2**20  # 1 PiB: beyond any one machine's memory, and far inside what an int of bytes can count


def host_share() -> int:
    """80 % of this machine's physical memory, in bytes: what eqlin plans against on a CPU."""
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_limit_bytes(limit: int | None = None, *, params=None, weights: int | None = None) -> int:
    """The budget in bytes: `limit` if given (a positive integer), else $EQLIN_MEMORY_LIMIT_GB if set (a
    positive number of GiB), else `default_budget` for the device holding `params` (a pytree of arrays), or
    for JAX's default device once it holds `weights` bytes of weights not loaded yet (`eqlin info`); with
    neither, 80 % of physical memory."""
    if limit is not None:
        return check_int("memory_limit", limit, 1, None, "bytes; None: the default budget")
    setting = os.environ.get("EQLIN_MEMORY_LIMIT_GB", "").strip()
    if setting:
        try:
            gib = float(setting)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib * 2**30 >= 1):
            raise InputError(f"EQLIN_MEMORY_LIMIT_GB={setting!r} is not a positive number of GiB; set it to e.g. 16, "
                             "or unset it to use 80 % of physical memory")
        if gib > _MAX_LIMIT_GIB:
            raise InputError(f"EQLIN_MEMORY_LIMIT_GB={setting!r} is more than any machine has (at most "
                             f"{_MAX_LIMIT_GIB} GiB, 1 PiB, is accepted); set it to the memory eqlin may use, e.g. 16, "
                             "or unset it to use 80 % of physical memory")
        return int(gib * 2**30)
    host = host_share()
    if params is not None:
        device = jax.tree_util.tree_leaves(params)[0].addressable_shards[0].device  # one of this process's
        resident = resident_bytes(params, device)
    elif weights is not None:
        device, resident = jax.local_devices()[0], weights
    else:
        return host
    return default_budget(device.platform, device.memory_stats() or {}, host, resident)


def device_capacity_bytes(limit: int | None = None) -> int:
    """What one device can hold in all, weights included (what a load is planned against): `limit` if
    given, else this process's first device's allocator limit (GPU, TPU) or 80 % of physical memory (CPU)."""
    if limit is not None:
        return check_int("memory_limit", limit, 1, None, "bytes; None: the device's capacity")
    host = host_share()
    device = jax.local_devices()[0]  # one of this process's (another process's devices report no memory)
    return default_budget(device.platform, device.memory_stats() or {}, host, 0)


def budget_basis() -> str:
    """What `memory_limit_bytes(weights=…)` is taken from, in words."""
    if os.environ.get("EQLIN_MEMORY_LIMIT_GB", "").strip():
        return "EQLIN_MEMORY_LIMIT_GB"
    device = jax.local_devices()[0]
    if device.platform != "cpu" and "bytes_limit" in (device.memory_stats() or {}):
        return f"the {device.platform.upper()} allocator's limit less the weights"
    return "80 % of physical memory less the weights; set EQLIN_MEMORY_LIMIT_GB to change it"


def default_budget(platform: str, stats: dict, host: int, resident: int) -> int:
    """What a computation may still allocate on a device that holds `resident` bytes of weights: the
    allocator's `bytes_limit` (GPU, TPU: from `Device.memory_stats()`) or, on a CPU, `host` (80 % of
    physical memory), minus `resident`; at least 1."""
    total = int(stats["bytes_limit"]) if platform != "cpu" and "bytes_limit" in stats else host
    return max(1, total - resident)


def resident_bytes(tree, device) -> int:
    """Bytes that the arrays of `tree` hold on `device` (their shard there, for sharded arrays)."""
    return sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


def format_bytes(n: float) -> str:
    """`n` bytes in GiB, MiB or KiB, whichever shows it best: never "0.0 GiB" for a small size."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_chunk(chunk: int | None) -> int | None:
    """`chunk` (basis vectors per pass) as a positive int, or None (the largest that fits)."""
    return None if chunk is None else check_int("chunk", chunk, 1, None,
                                                "basis vectors per pass; None picks the largest that fits")


def activation_elems(config: ModelConfig, length: int) -> int:
    """Elements of one layer's activations for one input vector (a generous upper estimate)."""
    d, F = config.hidden_size, config.intermediate_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    return length * (8 * d + 3 * F + 3 * qkv + 2 * config.num_heads * length)


def tangent_elems(config: ModelConfig, length: int) -> int:
    """Elements one tangent or cotangent holds crossing a layer's linear path: T·(3d + 2F + q + 2·kv) (the
    residual, normed and attention-output streams, the MLP's two hidden streams, the projections; the
    attention probabilities are frozen, so no T² term)."""
    return length * (3 * config.hidden_size + 2 * config.intermediate_size + config.q_size + 2 * config.kv_size)


def layer_matrix_elems(config: ModelConfig) -> int:
    """Elements of one layer's weight matrices (projections and MLP)."""
    d, F = config.hidden_size, config.intermediate_size
    return d * (2 * config.q_size + 2 * config.kv_size) + (3 if config.gated_mlp else 2) * d * F


def widened_layer_bytes(config: ModelConfig, itemsize: int, layers: int = 3) -> int:
    """Bytes of `layers` layers' matrices widened to the compute dtype (`eqlin.params.widen`). A computation
    is charged three (the scanned body's forward and backward passes and a last layer run alone: measured
    with `compiled.memory_analysis()` at Llama-3.2-3B's shapes, T = 64, temporaries of 1.50 GiB (forward)
    and 2.10 GiB (vjp), one float64 layer being 0.75 GiB); a load one, the least any computation needs
    (what it computes is planned when it runs)."""
    return layers * layer_matrix_elems(config) * itemsize


def frozen_elems(config: ModelConfig, length: int) -> int:
    """Elements a linearization keeps per layer (the checkpointed body's saved frozen coefficients): norm
    scales, the frozen input of q/k, the activated gate, the attention probabilities."""
    return length * (4 + config.hidden_size + config.intermediate_size) + config.num_heads * length * length


def estimate_top_k_bytes(config: ModelConfig, length: int, *, k: int = 10, itemsize: int = 8) -> int:
    """Peak bytes of the matrix-free top-k (`eqlin.lanczos`, 2k + 20 Golub–Kahan–Lanczos steps): the
    Lanczos vectors (steps × (d + T·d)), the linearization (`frozen_elems` per layer), one layer's
    activations for the primal and one tangent, and `widened_layer_bytes`; the weights not counted."""
    steps = min(2 * k + 20, config.hidden_size)
    vectors = steps * config.hidden_size + (steps + 1) * length * config.hidden_size
    stored = config.num_layers * frozen_elems(config, length) + 2 * activation_elems(config, length)
    return itemsize * (vectors + stored) + widened_layer_bytes(config, itemsize)


def estimate_jacobian_bytes(config: ModelConfig, length: int, *, n_maps: int = 1, mode: str = "rev",
                            chunk: int | None = None, itemsize: int = 8, fold: bool = False) -> int:
    """Peak bytes of a Jacobian computation: the result (n·d·T·d) twice, the stored linearization (every
    layer's activations once per map, with `fold` also the folded MLP's T·d² per layer), `chunk`
    basis vectors in flight through one layer and the widened weights (`widened_layer_bytes`).
    The result counts twice because XLA builds J in a loop buffer and copies it out (measured compile-only
    at Llama-3.2-3B's shapes, T = 64, one basis vector per pass: 4.50 GiB of temporaries beside the 4.50 GiB
    J; forward mode transposes it too), so counted once the estimate was 0.85× of the compiled peak there."""
    d, L = config.hidden_size, config.num_layers
    outputs = n_maps * d
    inputs = length * d
    width = outputs if mode == "rev" else inputs
    in_flight = min(chunk or width, width) * n_maps
    stored = n_maps * L * activation_elems(config, length) + (fold_elems(config, length) if fold else 0)
    return (itemsize * (2 * outputs * inputs + stored + in_flight * (tangent_elems(config, length) + inputs + outputs))
            + widened_layer_bytes(config, itemsize))


def estimate_analysis_bytes(config: ModelConfig, length: int, *, itemsize: int = 8) -> int:
    """Peak bytes of the full analysis's final map (`eqlin.analyze`): the larger of J's computation one
    basis vector at a time (`estimate_jacobian_bytes`, chunk 1: the least it can take) and its per-token
    SVDs, which hold J, its per-token copy, U and Vᵀ (4·T·d² elements) and one d × d workspace."""
    d = config.hidden_size
    svd = itemsize * (4 * length * d * d + d * d)
    return max(estimate_jacobian_bytes(config, length, chunk=1, itemsize=itemsize), svd)


def jacobian_flops(config: ModelConfig, length: int) -> int:
    """Flops of the final map's J in reverse mode: d cotangents through every layer's linear path,
    2 · N_linear · T · d with N_linear = L · d · (kv + q + 2F) (docs/method.md §3; a lower bound:
    attention's value mixing and the linearization itself are left out)."""
    d, F = config.hidden_size, config.intermediate_size
    n_linear = config.num_layers * d * (config.kv_size + config.q_size + 2 * F)
    return 2 * n_linear * length * d


def fold_pays(config: ModelConfig, vectors: int) -> bool:
    """Whether the folded MLP (`eqlin.blocks.folded_mlp`) saves flops when `vectors` tangents or
    cotangents share one linearization: 2·d²·F + 2·m·d² < 4·m·d·F, i.e. m·(2F − d) > d·F."""
    d, F = config.hidden_size, config.intermediate_size
    return vectors * (2 * F - d) > d * F


def fold_elems(config: ModelConfig, length: int, layers: int | None = None) -> int:
    """Elements of the stored fold: T·d² per layer (`layers`, default all of the model's)."""
    return (config.num_layers if layers is None else layers) * length * config.hidden_size ** 2


def largest_fitting(cost: Callable[[int], int], most: int, limit: int) -> int:
    """The largest c in [1, most] with cost(c) <= limit (cost increasing; 1 if none fits)."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid - 1)
    return lo


def choose_chunk(cost: Callable[[int | None], int], chunk: int | None, most: int, limit: int, *,
                 nothing_fits: Callable[[], str], per: str = "", of: str = "") -> int | None:
    """The chunk to use under `limit` bytes, given `cost(chunk)` (increasing; None: all `most` at once):
    `chunk` as asked if it fits; with none asked, None if everything fits at once, else the largest that
    fits. InputError for a chunk that is not a positive integer; MemoryBudgetError when even a chunk of 1
    does not fit (message `nothing_fits()`) or the asked chunk does not (naming the largest that does);
    `per` and `of` qualify that message."""
    chunk = check_chunk(chunk)
    if cost(1) > limit:
        raise MemoryBudgetError(nothing_fits())
    if cost(chunk) <= limit:
        return chunk
    fit = largest_fitting(cost, most, limit)
    if chunk is not None:
        raise MemoryBudgetError(f"chunk={chunk} needs about {format_bytes(cost(chunk))}{per}, over the "
                                f"{format_bytes(limit)} limit; use chunk={fit} or less{of}")
    return fit


def resolve_chunk(config: ModelConfig, length: int, n_maps: int, mode: str, chunk: int | None, itemsize: int,
                  limit: int, *, fold: bool = False) -> int | None:
    """The chunk for `estimate_jacobian_bytes`'s computation: as asked if it fits, else (asked None) the
    largest that fits; refuse otherwise, suggesting only what does fit (fewer tokens, fewer layers)."""
    def cost(c: int | None) -> int:
        return estimate_jacobian_bytes(config, length, n_maps=n_maps, mode=mode, chunk=c, itemsize=itemsize,
                                       fold=fold)

    def nothing_fits() -> str:
        def at_length(t: int) -> int:
            return estimate_jacobian_bytes(config, t, n_maps=n_maps, mode=mode, chunk=1, itemsize=itemsize,
                                           fold=fold)

        def with_maps(n: int) -> int:
            return estimate_jacobian_bytes(config, length, n_maps=n, mode=mode, chunk=1, itemsize=itemsize,
                                           fold=fold)

        fixes = []
        if length > 1 and at_length(1) <= limit:
            fixes.append(f"at most T={largest_fitting(at_length, length - 1, limit)} tokens")
        if n_maps > 1 and with_maps(1) <= limit:
            fixes.append(f"at most {largest_fitting(with_maps, n_maps - 1, limit)} layer(s) at a time")
        fixes += ["the matrix-free methods (they never build J)", "a higher limit"]
        return (f"a Jacobian of {n_maps} map(s) at T={length} needs about {format_bytes(cost(1))} even one basis "
                f"vector at a time, over the {format_bytes(limit)} limit; use {', '.join(fixes[:-1])} or "
                f"{fixes[-1]} (memory_limit or EQLIN_MEMORY_LIMIT_GB)")

    width = n_maps * config.hidden_size if mode == "rev" else length * config.hidden_size
    per_map_width = config.hidden_size if mode == "rev" else length * config.hidden_size
    return choose_chunk(cost, chunk, per_map_width, limit, nothing_fits=nothing_fits,
                        of=f" (of {width} basis vectors)")

"""Memory budgets: estimate the peak bytes of a Jacobian computation before allocating anything, and pick
the largest chunk of basis vectors that fits.

Every estimate is an upper bound in bytes built from element counts (`activation_elems`) times the
dtype's item size; the default limit is 80 % of physical memory or $EQLIN_MEMORY_LIMIT_GB.
"""

from __future__ import annotations

import os
from typing import Callable

from eqlin.config import ModelConfig
from eqlin.errors import MemoryBudgetError


def memory_limit_bytes() -> int:
    """Default budget: $EQLIN_MEMORY_LIMIT_GB if set, else 80 % of physical memory."""
    if os.environ.get("EQLIN_MEMORY_LIMIT_GB"):
        return int(float(os.environ["EQLIN_MEMORY_LIMIT_GB"]) * 2**30)
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def activation_elems(config: ModelConfig, length: int) -> int:
    """Elements of one layer's activations for one input vector (a generous upper estimate)."""
    d, F = config.hidden_size, config.intermediate_size
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    return length * (8 * d + 3 * F + 3 * qkv + 2 * config.num_heads * length)


def estimate_jacobian_bytes(config: ModelConfig, length: int, *, n_maps: int = 1, mode: str = "rev",
                            chunk: int | None = None, itemsize: int = 8, fold: bool = False) -> int:
    """Peak bytes of a Jacobian computation: the result (n·d·T·d), the stored linearization (every
    layer's activations once per map, with `fold` also the folded MLP's T·d² per layer) and `chunk`
    basis vectors in flight through one layer."""
    d, L = config.hidden_size, config.num_layers
    outputs = n_maps * d
    inputs = length * d
    width = outputs if mode == "rev" else inputs
    in_flight = min(chunk or width, width) * n_maps
    act = activation_elems(config, length)
    stored = n_maps * L * act + (fold_elems(config, length) if fold else 0)
    return itemsize * (outputs * inputs + stored + in_flight * (act + inputs + outputs))


def fold_pays(config: ModelConfig, vectors: int) -> bool:
    """Whether the folded MLP (`eqlin.blocks.folded_mlp`) saves flops when `vectors` tangents or
    cotangents share one linearization: 2·d²·F + 2·m·d² < 4·m·d·F, i.e. m·(2F − d) > d·F."""
    d, F = config.hidden_size, config.intermediate_size
    return vectors * (2 * F - d) > d * F


def fold_elems(config: ModelConfig, length: int, layers: int | None = None) -> int:
    """Elements of the stored fold: T·d² per layer (`layers`, default all of the model's)."""
    return (config.num_layers if layers is None else layers) * length * config.hidden_size ** 2


def largest_fitting(cost: Callable[[int], int], most: int, limit: int) -> int:
    """The largest chunk c in [1, most] with cost(c) <= limit (cost increasing; 1 if none fits)."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid - 1)
    return lo


def choose_chunk(cost: Callable[[int | None], int], chunk: int | None, most: int, limit: int, *,
                 nothing_fits: Callable[[], str], per: str = "", of: str = "") -> int | None:
    """The chunk to use under `limit` bytes, given `cost(chunk)` (increasing; None: all `most` at once):
    `chunk` as asked if it fits; with none asked, None if everything fits at once, else the largest that
    fits. MemoryBudgetError when even a chunk of 1 does not fit (message `nothing_fits()`) or the asked
    chunk does not (naming the largest that does); `per` and `of` qualify that message."""
    if cost(1) > limit:
        raise MemoryBudgetError(nothing_fits())
    if cost(chunk) <= limit:
        return chunk
    fit = largest_fitting(cost, most, limit)
    if chunk is not None:
        raise MemoryBudgetError(f"chunk={chunk} needs about {cost(chunk) / 2**30:.1f} GiB{per}, over the "
                                f"{limit / 2**30:.1f} GiB limit; use chunk={fit} or less{of}")
    return fit


def resolve_chunk(config: ModelConfig, length: int, n_maps: int, mode: str, chunk: int | None, itemsize: int,
                  limit: int, *, fold: bool = False) -> int | None:
    """The chunk for `estimate_jacobian_bytes`'s computation: as asked if it fits, else (asked None) the
    largest that fits; refuse otherwise, naming a length that would fit."""
    def cost(c: int | None) -> int:
        return estimate_jacobian_bytes(config, length, n_maps=n_maps, mode=mode, chunk=c, itemsize=itemsize,
                                       fold=fold)

    def nothing_fits() -> str:
        fit = length
        while fit > 1 and estimate_jacobian_bytes(config, fit, n_maps=n_maps, mode=mode, chunk=1,
                                                  itemsize=itemsize, fold=fold) > limit:
            fit //= 2
        return (f"a Jacobian of {n_maps} map(s) at T={length} needs about {cost(1) / 2**30:.1f} GiB even one basis "
                f"vector at a time, over the {limit / 2**30:.1f} GiB limit; use at most T={fit} tokens, fewer "
                "layers, or the matrix-free methods (they never build J); the limit is set by memory_limit or "
                "EQLIN_MEMORY_LIMIT_GB")

    width = n_maps * config.hidden_size if mode == "rev" else length * config.hidden_size
    per_map_width = config.hidden_size if mode == "rev" else length * config.hidden_size
    return choose_chunk(cost, chunk, per_map_width, limit, nothing_fits=nothing_fits,
                        of=f" (of {width} basis vectors)")

"""Which map: the one check of a (layer, part, scope) selection, shared by every function that builds
or analyses a layer map, and the CLI's `--layers` syntax on top of it.

- layer: None (the final output), an int, a sequence of ints or "all";
- part: "residual" (the stream after the layer), "attn" or "mlp" (that branch's output alone);
- scope: "cumulative" (input embeddings → layer output) or "single" (layer input → layer output);
- tap: where an attn/mlp branch is read, "post" or "pre" its post-norm (`eqlin.decoder.layer_tail`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from eqlin.config import ModelConfig
from eqlin.errors import InputError

Part = Literal["residual", "attn", "mlp"]
Scope = Literal["cumulative", "single"]
Tap = Literal["post", "pre"]
PARTS: tuple[Part, ...] = ("residual", "attn", "mlp")
SCOPES: tuple[Scope, ...] = ("cumulative", "single")
TAPS: tuple[Tap, ...] = ("post", "pre")


def single_layer(layer) -> bool:
    """Whether `layer` names one layer (an int or a 0-d integer array; bools are not layers)."""
    arr = np.asarray(layer) if not isinstance(layer, (str, bool, np.bool_)) else None
    return arr is not None and arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer)


def layer_indices(layer) -> tuple[int, ...] | None:
    """The layer indices in an int, an integer array or a sequence of ints; None for anything else."""
    if isinstance(layer, (str, bytes, dict, set, frozenset, bool, np.bool_)):
        return None
    if hasattr(layer, "__array__"):  # NumPy and JAX arrays and scalars
        arr = np.asarray(layer).reshape(-1) if np.ndim(layer) == 0 else np.asarray(layer)
        ok = arr.ndim == 1 and (np.issubdtype(arr.dtype, np.integer) or arr.size == 0)
        return tuple(int(l) for l in arr) if ok else None
    if isinstance(layer, int):
        return (layer,)
    try:
        items = list(layer)
    except TypeError:
        return None
    ok = all(isinstance(l, (int, np.integer)) and not isinstance(l, (bool, np.bool_)) for l in items)
    return tuple(int(l) for l in items) if ok else None


def resolve_layers(config: ModelConfig, layer) -> tuple[int, ...] | None:
    """`layer` (None, an int, any sequence of ints such as a list, range or integer array, or "all") as a
    tuple of layer indices, range-checked; None stays None (the final output). Bools and floats are refused."""
    if layer is None:
        return None
    if isinstance(layer, str):
        if layer != "all":
            raise InputError(f"layer must be an int, a sequence of ints, 'all' or None, got {layer!r}")
        return tuple(range(config.num_layers))
    listed = layer_indices(layer)
    if listed is None:
        raise InputError(f"layer must be an int, a sequence of ints, 'all' or None (bools and floats are not layer "
                         f"indices), got {layer!r:.80}")
    if not listed:
        raise InputError(f"layer is empty: give at least one layer index in 0..{config.num_layers - 1}")
    check_range(listed, config.num_layers)
    return listed


def check_range(layers: Sequence[int], num_layers: int, meaning: str = "the model has layers",
                label: str | None = None) -> None:
    """The one layer-range check: refuse indices outside 0..num_layers−1, as
    "{label} out of range: {meaning} 0..num_layers−1" (label default: "layer [the bad indices]")."""
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise InputError(f"{label or f'layer {bad}'} out of range: {meaning} 0..{num_layers - 1}")


def check_tap(tap: str) -> None:
    """Branch outputs are tapped "post" (after the family's branch post-norms) or "pre" (before them)."""
    if tap not in TAPS:
        raise InputError(f"tap must be one of {TAPS} (branch outputs after or before their post-norms), got {tap!r}")


def resolve_selection(config: ModelConfig, layer, part: Part, scope: Scope, *, one_layer: str | None = None
                      ) -> tuple[int, ...] | None:
    """Check a (layer, part, scope) selection and return its layers (None: the final output).
    `one_layer` names a caller that takes one layer (an int) or None."""
    if part not in PARTS:
        raise InputError(f"part must be one of {PARTS}, got {part!r}")
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
    if one_layer and layer is not None and not single_layer(layer):
        raise InputError(f"{one_layer} takes one layer (an int) or None, got {layer!r}")
    layers = resolve_layers(config, layer)
    if scope == "single" and layers is None:
        raise InputError("scope='single' needs a layer" + ("" if one_layer else " (an int, a list or 'all')"))
    if layers is None and part != "residual":
        raise InputError(f"part={part!r} needs a layer; the final output (layer=None) is the residual stream")
    return layers


def evenly_spaced(num_layers: int, count: int) -> tuple[int, ...]:
    """At most `count` layers, evenly spaced, ending at the last one."""
    return tuple(sorted({max(0, round(num_layers * i / count) - 1) for i in range(1, count + 1)}))


def _layers_spec(spec: str) -> str | tuple[int, ...]:
    """--layers as 'auto', 'all', 'none' or a sorted tuple of non-negative indices (syntax only)."""
    words = spec.strip().lower()
    if not words:
        raise InputError("--layers is empty: give 'auto', 'all', 'none' or comma-separated layer indices, e.g. 0,5")
    if words in ("auto", "all", "none"):
        return words
    try:
        layers = tuple(sorted({int(p) for p in words.split(",") if p.strip()}))
    except ValueError:
        raise InputError(f"--layers must be 'auto', 'all', 'none' or comma-separated integers, got {spec!r}") from None
    if not layers or min(layers) < 0:
        raise InputError(f"--layers {spec!r}: layer indices are 0-based and non-negative, e.g. 0,5")
    return layers


def check_layers_spec(spec: str) -> None:
    """Check --layers' syntax before the model (and its number of layers) is known."""
    _layers_spec(spec)


def parse_layers(spec: str, num_layers: int, auto: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The CLI's --layers: 'auto' (the caller's `auto` choice; default three evenly spaced layers ending
    at the last), 'all', 'none' or comma-separated indices."""
    layers = _layers_spec(spec)
    if layers == "none":
        return ()
    if layers == "all":
        return tuple(range(num_layers))
    if layers == "auto":
        return evenly_spaced(num_layers, 3) if auto is None else auto
    check_range(layers, num_layers, label=f"--layers {spec!r}")
    return layers

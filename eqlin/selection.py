"""Which map: the one check of a (layer, part, scope) selection, shared by every function that builds
or analyses a layer map, and the CLI's `--layers` syntax on top of it.

- layer: None (the final output), an int, a sequence of ints or "all";
- part: "residual" (the stream after the layer), "attn" or "mlp" (that branch's output alone);
- scope: "cumulative" (input embeddings → layer output) or "single" (layer input → layer output);
- tap: where an attn/mlp branch is read, "post" or "pre" its post-norm (`eqlin.decoder.layer_tail`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from eqlin.config import ModelConfig
from eqlin.errors import InputError

Part = Literal["residual", "attn", "mlp"]
Scope = Literal["cumulative", "single"]
Tap = Literal["post", "pre"]
PARTS: tuple[Part, ...] = ("residual", "attn", "mlp")
SCOPES: tuple[Scope, ...] = ("cumulative", "single")
TAPS: tuple[Tap, ...] = ("post", "pre")


def resolve_layers(config: ModelConfig, layer) -> tuple[int, ...] | None:
    """`layer` (None, an int, a sequence of ints or "all") as a tuple of layer indices, range-checked;
    None stays None (the final output)."""
    if layer is None:
        return None
    if isinstance(layer, str):
        if layer != "all":
            raise InputError(f"layer must be an int, a list of ints, 'all' or None, got {layer!r}")
        return tuple(range(config.num_layers))
    listed = (layer,) if isinstance(layer, (int, np.integer)) else tuple(layer)
    bad = [l for l in listed if not 0 <= int(l) < config.num_layers]
    if bad or not listed:
        raise InputError(f"layer {bad or listed} out of range: the model has layers 0..{config.num_layers - 1}")
    return tuple(int(l) for l in listed)


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
    if one_layer and layer is not None and not isinstance(layer, (int, np.integer)):
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


def parse_layers(spec: str, num_layers: int, auto: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The CLI's --layers: 'auto' (the caller's `auto` choice; default three evenly spaced layers ending
    at the last), 'all', 'none' or comma-separated indices."""
    spec = spec.strip().lower()
    if spec == "none":
        return ()
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "auto":
        return evenly_spaced(num_layers, 3) if auto is None else auto
    try:
        layers = tuple(sorted({int(p) for p in spec.split(",") if p.strip()}))
    except ValueError:
        raise InputError(f"--layers must be 'auto', 'all', 'none' or comma-separated integers, got {spec!r}") from None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise InputError(f"--layers {spec!r} out of range: the model has layers 0..{num_layers - 1}")
    return layers

"""Mistral and Ministral decoders: Llama's layout with a sliding attention window, on every layer
(Mistral, when sliding_window is set) or on the layers that layer_types marks (Ministral)."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, config_int, config_layer_types
from eqlin.errors import ConfigError
from eqlin.families import llama

MODEL_TYPES = ("mistral", "ministral")
NORM_NAMES = llama.NORM_NAMES
HANDLED_KEYS = llama.HANDLED_KEYS | {"sliding_window", "layer_types"}
IGNORED_KEYS = llama.IGNORED_KEYS
DEFAULTS = {**llama.DEFAULTS, "max_position_embeddings": 131_072, "num_key_value_heads": 8}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf, defaults=DEFAULTS)
    window = config_int(hf, "sliding_window", 4096, optional=True)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    uniform = (kind,) * base.num_layers
    layer_types = config_layer_types(hf) or uniform
    if hf.get("model_type") == "mistral" and layer_types != uniform:
        raise ConfigError("model_type 'mistral' applies sliding_window to every layer (transformers ignores its "
                          "layer_types); for per-layer attention types the model_type is 'ministral'")
    return dataclasses.replace(base, family="mistral", layer_types=layer_types, sliding_window=window)

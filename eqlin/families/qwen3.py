"""Qwen 3 decoders: Llama's layout plus per-head q/k RMSNorm before RoPE; head_dim is set explicitly."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import (FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, config_bool, config_int,
                          config_layer_types)
from eqlin.families import llama

MODEL_TYPES = ("qwen3",)
NORM_NAMES = llama.NORM_NAMES
HANDLED_KEYS = llama.HANDLED_KEYS | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
IGNORED_KEYS = llama.IGNORED_KEYS
DEFAULTS = {**llama.DEFAULTS, "max_position_embeddings": 32_768, "head_dim": 128, "num_key_value_heads": 32}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf, defaults=DEFAULTS)
    layer_types, window = attention_layout(hf, base.num_layers)
    return dataclasses.replace(base, family="qwen3", qk_norm="head", layer_types=layer_types, sliding_window=window)


def attention_layout(hf: dict[str, Any], num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """(layer_types, sliding_window) as Qwen 2 and Qwen 3 configs define them: a window only with
    use_sliding_window, on the layers from max_window_layers on (or as layer_types says)."""
    window = config_int(hf, "sliding_window", 4096, optional=True) if config_bool(hf, "use_sliding_window", False) \
        else None
    first_sliding = config_int(hf, "max_window_layers", 28, low=0)
    layer_types = config_layer_types(hf) or tuple(
        SLIDING_ATTENTION if window is not None and i >= first_sliding else FULL_ATTENTION
        for i in range(num_layers)
    )
    return layer_types, window

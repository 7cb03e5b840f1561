"""Qwen 3 decoders: Llama's layout plus per-head q/k RMSNorm before RoPE; head_dim is set explicitly."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from eqlin.families import llama

MODEL_TYPES = ("qwen3",)
NORM_NAMES = llama.NORM_NAMES


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf)
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types") or [
        SLIDING_ATTENTION if window is not None and i >= hf.get("max_window_layers", 0) else FULL_ATTENTION
        for i in range(base.num_layers)
    ]
    return dataclasses.replace(
        base,
        family="qwen3",
        qk_norm="head",
        layer_types=tuple(layer_types),
        sliding_window=window,
    )

"""Mistral and Ministral decoders: Llama's layout with a sliding attention window, on every layer
(Mistral, when sliding_window is set) or on the layers that layer_types marks (Ministral)."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from eqlin.families import llama

MODEL_TYPES = ("mistral", "ministral")
NORM_NAMES = llama.NORM_NAMES


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf)
    window = hf.get("sliding_window")
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    layer_types = hf.get("layer_types") or [kind] * base.num_layers
    return dataclasses.replace(base, family="mistral", layer_types=tuple(layer_types), sliding_window=window)

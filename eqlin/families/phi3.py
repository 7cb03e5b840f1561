"""Phi-3 / Phi-4 decoders: Llama's layout with fused qkv_proj and gate_up_proj (split on loading, gate
first) and partial rotary embeddings. Phi-4-mini's `longrope` scaling is refused as unsupported."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from eqlin.families import llama

MODEL_TYPES = ("phi3",)
NORM_NAMES = llama.NORM_NAMES
FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf)
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    window = hf.get("sliding_window")
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    return dataclasses.replace(base, family="phi3", rotary_dim=int(base.head_dim * float(factor)),
                               layer_types=(kind,) * base.num_layers, sliding_window=window)

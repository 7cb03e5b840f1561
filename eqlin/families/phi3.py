"""Phi-3 / Phi-4 decoders: Llama's layout with fused qkv_proj and gate_up_proj (split on loading, gate
first) and partial rotary embeddings. Phi-4-mini's `longrope` scaling is refused as unsupported."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, config_int
from eqlin.families import llama

MODEL_TYPES = ("phi3",)
NORM_NAMES = llama.NORM_NAMES
FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
HANDLED_KEYS = llama.HANDLED_KEYS | {"sliding_window"}
# Dropout (training only), and longrope's original context (longrope itself is refused).
IGNORED_KEYS = llama.IGNORED_KEYS | {"resid_pdrop", "embd_pdrop", "original_max_position_embeddings"}
DEFAULTS = {**llama.DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "eos_token_id": 32000}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf, defaults=DEFAULTS, partial_rotary=True)
    window = config_int(hf, "sliding_window", None, optional=True)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    return dataclasses.replace(base, family="phi3", layer_types=(kind,) * base.num_layers, sliding_window=window)

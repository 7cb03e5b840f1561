"""Qwen 2 / 2.5 decoders (and the DeepSeek-R1-Distill-Qwen checkpoints): Llama's layout with biases on the
q, k and v projections, so every detached map is affine, y = Σ_t J_t x_t + c (`eqlin.linear_maps`).

The q and k biases sit on the frozen path (they only reach the output through the attention
probabilities); the v bias is carried by the linear path into the constant c.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import ModelConfig
from eqlin.families import llama, qwen3

MODEL_TYPES = ("qwen2",)
NORM_NAMES = llama.NORM_NAMES
BIASES = ("q_bias", "k_bias", "v_bias")
HANDLED_KEYS = (llama.HANDLED_KEYS - {"attention_bias", "mlp_bias"}) | {"use_sliding_window", "sliding_window",
                                                                         "max_window_layers", "layer_types"}
# transformers' Qwen2 always has q/k/v biases and a bias-free MLP and o_proj whatever these flags say.
IGNORED_KEYS = llama.IGNORED_KEYS | {"attention_bias", "mlp_bias"}
# Multimodal rotary sections (Qwen2-VL) are not a text decoder's.
DEFAULT_ONLY_KEYS = {"use_mrope": False}
DEFAULTS = {**llama.DEFAULTS, "max_position_embeddings": 32_768, "num_key_value_heads": 32}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf, defaults=DEFAULTS, biases=BIASES)
    layer_types, window = qwen3.attention_layout(hf, base.num_layers)
    return dataclasses.replace(base, family="qwen2", layer_types=layer_types, sliding_window=window)

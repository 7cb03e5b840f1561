"""OLMo 2 decoders: post-norm (RMSNorm on the attention and MLP outputs before each residual add, no
pre-norm) and q/k RMSNorm over the full projection width before the head split."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import ModelConfig
from eqlin.families import llama

MODEL_TYPES = ("olmo2",)
NORM_NAMES = {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
HANDLED_KEYS = llama.HANDLED_KEYS
IGNORED_KEYS = llama.IGNORED_KEYS
DEFAULTS = {**llama.DEFAULTS, "rms_norm_eps": 1e-5}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(hf, defaults=DEFAULTS)
    return dataclasses.replace(base, family="olmo2", qk_norm="full")

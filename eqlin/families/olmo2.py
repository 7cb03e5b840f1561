"""OLMo 2 decoders: post-norm (RMSNorm on the attention and MLP outputs before each residual add, no
pre-norm) and q/k RMSNorm over the full projection width before the head split."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import ModelConfig
from eqlin.families import llama

MODEL_TYPES = ("olmo2",)
NORM_NAMES = {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return dataclasses.replace(llama.config_from_hf(hf), family="olmo2", norm_layout="post", qk_norm="full")

"""Llama 3 (and Llama 2-style) decoders: pre-norm, SwiGLU, GQA, RoPE with optional llama3 scaling."""

from __future__ import annotations

from typing import Any

from eqlin.config import (
    FULL_ATTENTION,
    ModelConfig,
    activation_from_hf,
    refuse_biases,
    rope_specs_from_hf,
    single_token_id,
)

MODEL_TYPES = ("llama",)
NORM_NAMES = {"attn_in_norm": "input_layernorm", "mlp_in_norm": "post_attention_layernorm"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_biases(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope, _ = rope_specs_from_hf(hf, default_theta=10000.0)
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=0.0,
        norm_layout="pre",
        qk_norm=None,
        activation=activation_from_hf(hf, "hidden_act", {"silu": "silu"}),
        embed_scale=1.0,
        query_scale=head_dim**-0.5,
        layer_types=(FULL_ATTENTION,) * hf["num_hidden_layers"],
        sliding_window=None,
        rope_full=rope,
        rope_sliding=rope,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        bos_token_id=single_token_id(hf.get("bos_token_id")),
        eos_token_id=single_token_id(hf.get("eos_token_id")),
    )

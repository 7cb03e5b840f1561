"""Gemma 3 decoders: embeddings × √d, sandwich norms with (1+w) scales, GeGLU (tanh GELU), q/k norms,
query_pre_attn_scalar, and layers alternating sliding-window and global attention with their own RoPE."""

from __future__ import annotations

from typing import Any

from eqlin.config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    ModelConfig,
    activation_from_hf,
    refuse_biases,
    rope_specs_from_hf,
    single_token_id,
)

MODEL_TYPES = ("gemma3_text", "gemma3")
NORM_NAMES = {
    "attn_in_norm": "input_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "mlp_in_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The language-model config: multimodal `gemma3` checkpoints keep it under text_config."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
        if key in hf:
            text.setdefault(key, hf[key])
    return text


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_biases(hf, ("attention_bias",))
    d = hf.get("hidden_size", 2304)
    heads = hf.get("num_attention_heads", 8)
    layers = hf.get("num_hidden_layers", 26)
    pattern = hf.get("sliding_window_pattern", 6)
    layer_types = hf.get("layer_types") or [
        SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)
    ]
    rope_full, rope_sliding = rope_specs_from_hf(hf, default_theta=1_000_000.0, local_theta=10_000.0)
    return ModelConfig(
        family="gemma3",
        vocab_size=hf.get("vocab_size", 262_208),
        hidden_size=d,
        intermediate_size=hf.get("intermediate_size", 9216),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0,
        norm_layout="sandwich",
        qk_norm="head",
        activation=activation_from_hf(hf, "hidden_activation", {"gelu_pytorch_tanh": "gelu_tanh"}),
        embed_scale=float(d) ** 0.5,
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        layer_types=tuple(layer_types),
        sliding_window=hf.get("sliding_window", 4096),
        rope_full=rope_full,
        rope_sliding=rope_sliding,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (a Gemma 2 field its config keeps),
        # so a config that sets it runs uncapped there; eqlin computes the same function.
        attn_logit_softcapping=None,
        bos_token_id=single_token_id(hf.get("bos_token_id", 2)),
        eos_token_id=single_token_id(hf.get("eos_token_id", 1)),
    )

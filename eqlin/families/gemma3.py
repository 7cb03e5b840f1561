"""Gemma 3 decoders: embeddings × √d, sandwich norms with (1+w) scales, GeGLU (tanh GELU), q/k norms,
query_pre_attn_scalar, and layers alternating sliding-window and global attention with their own RoPE."""

from __future__ import annotations

from typing import Any

from eqlin.config import (
    FULL_ATTENTION,
    MAX_LAYERS,
    SLIDING_ATTENTION,
    ModelConfig,
    activation_from_hf,
    check_keys,
    check_token_ids,
    config_bool,
    config_float,
    config_int,
    config_layer_types,
    config_object,
    refuse_biases,
    rope_specs_from_hf,
    rotary_fraction,
)
from eqlin.errors import ConfigError

MODEL_TYPES = ("gemma3_text", "gemma3")
NORM_NAMES = {
    "attn_in_norm": "input_layernorm",
    "attn_out_norm": "post_attention_layernorm",
    "mlp_in_norm": "pre_feedforward_layernorm",
    "mlp_out_norm": "post_feedforward_layernorm",
}
HANDLED_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias", "query_pre_attn_scalar",
    "sliding_window", "sliding_window_pattern", "layer_types", "rope_parameters", "rope_scaling", "rope_theta",
    "rope_local_base_freq", "final_logit_softcapping", "attn_logit_softcapping", "partial_rotary_factor",
})
# transformers 5 writes the pattern it derived layer_types from; it never reads it back.
IGNORED_KEYS = frozenset({"_sliding_window_pattern"})
# Bidirectional attention (EmbeddingGemma) is not a causal decoder.
DEFAULT_ONLY_KEYS = {"use_bidirectional_attention": False}
# The top level of a multimodal `gemma3` config: the text part, and image settings eqlin leaves out.
MULTIMODAL_KEYS = frozenset({"model_type", "text_config", "tie_word_embeddings", "bos_token_id", "eos_token_id"})
IMAGE_KEYS = frozenset({"vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
                        "image_token_index", "image_token_id", "boi_token_id", "eoi_token_id"})
# Every 6th layer global: transformers' default (llama.cpp hard-codes it).
SLIDING_WINDOW_PATTERN = 6


def default_layer_types(num_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> tuple[str, ...]:
    """Every `pattern`-th layer full attention, the others sliding-window."""
    return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers))


def text_config(hf: dict[str, Any], allowed: frozenset[str] = frozenset()) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The language-model config (multimodal `gemma3` checkpoints keep it under text_config) and the keys of the
    top level that `allowed` let through (`eqlin.config.check_keys`)."""
    if hf.get("model_type") != "gemma3":
        return hf, ()
    overridden = check_keys(hf, "a multimodal gemma3 config", MULTIMODAL_KEYS, IMAGE_KEYS, allowed=allowed)
    text = dict(config_object(hf, "text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    if text["model_type"] != "gemma3_text":
        raise ConfigError(f"a multimodal gemma3 config needs a gemma3_text text_config, got {text['model_type']!r}")
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
        if key in hf:
            text.setdefault(key, hf[key])
    return text, overridden


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_biases(hf, ("attention_bias",))
    if rotary_fraction(hf) != 1.0:
        raise ConfigError("partial_rotary_factor: Gemma 3 rotates the whole head; this config is not supported")
    d = config_int(hf, "hidden_size", 2304)
    layers = config_int(hf, "num_hidden_layers", 26, high=MAX_LAYERS)
    pattern = config_int(hf, "sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    layer_types = config_layer_types(hf) or default_layer_types(layers, pattern)
    rope_full, rope_sliding = rope_specs_from_hf(hf, default_theta=1_000_000.0, local_theta=10_000.0)
    # transformers' Gemma 3 attention never applies attn_logit_softcapping (a Gemma 2 field its config keeps),
    # so a config that sets it runs uncapped there; eqlin checks the value and computes the same function.
    config_float(hf, "attn_logit_softcapping", None, optional=True)
    check_token_ids(hf)
    return ModelConfig(
        family="gemma3",
        vocab_size=config_int(hf, "vocab_size", 262_208),
        hidden_size=d,
        intermediate_size=config_int(hf, "intermediate_size", 9216),
        num_layers=layers,
        num_heads=config_int(hf, "num_attention_heads", 8),
        num_kv_heads=config_int(hf, "num_key_value_heads", 4),
        head_dim=config_int(hf, "head_dim", 256),
        rms_norm_eps=config_float(hf, "rms_norm_eps", 1e-6),
        norm_offset=1.0,
        qk_norm="head",
        activation=activation_from_hf(hf, "hidden_activation", {"gelu_pytorch_tanh": "gelu_tanh"}),
        embed_scale=float(d) ** 0.5,
        query_scale=config_float(hf, "query_pre_attn_scalar", 256) ** -0.5,
        layer_types=layer_types,
        sliding_window=config_int(hf, "sliding_window", 4096, optional=True),
        rope_full=rope_full,
        rope_sliding=rope_sliding,
        tie_word_embeddings=config_bool(hf, "tie_word_embeddings", True),
        max_position_embeddings=config_int(hf, "max_position_embeddings", 131_072),
        final_logit_softcapping=config_float(hf, "final_logit_softcapping", None, optional=True),
        attn_logit_softcapping=None,
    )

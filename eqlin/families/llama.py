"""Llama 3 (and Llama 2-style) decoders: pre-norm, SwiGLU, GQA, RoPE with optional llama3 scaling."""

from __future__ import annotations

from typing import Any

from eqlin.config import (
    FULL_ATTENTION,
    MAX_LAYERS,
    ModelConfig,
    activation_from_hf,
    check_token_ids,
    config_bool,
    config_float,
    config_int,
    refuse_biases,
    rope_specs_from_hf,
    rotary_fraction,
)
from eqlin.errors import ConfigError

MODEL_TYPES = ("llama",)
NORM_NAMES = {"attn_in_norm": "input_layernorm", "mlp_in_norm": "post_attention_layernorm"}
# config.json keys `config_from_hf` reads (the other Llama-layout families add theirs).
HANDLED_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias", "rope_parameters",
    "rope_scaling", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings",
})
# Llama 2's tensor-parallel pretraining split: the same products, summed in another order.
IGNORED_KEYS = frozenset({"pretraining_tp"})
# transformers' defaults for keys config.json may leave out, where the Llama-layout families differ (each
# family passes its own); None: head_dim = hidden_size / heads, num_key_value_heads = heads.
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "head_dim": None,
            "num_key_value_heads": None}


def config_from_hf(hf: dict[str, Any], *, defaults: dict[str, Any] = DEFAULTS, partial_rotary: bool = False,
                   biases: tuple[str, ...] = ()) -> ModelConfig:
    """`ModelConfig` of a Llama-layout config.json, with the family's `defaults` for absent keys;
    `partial_rotary` (Phi-3) allows partial_rotary_factor < 1; `biases`: the bias fields the family always
    has (Qwen 2), else the attention_bias / mlp_bias flags are refused."""
    if not biases:
        refuse_biases(hf)
    hidden, heads = config_int(hf, "hidden_size"), config_int(hf, "num_attention_heads")
    head_dim = config_int(hf, "head_dim", defaults["head_dim"], optional=True) or hidden // heads
    if head_dim < 1:
        raise ConfigError(f"hidden_size {hidden} over {heads} attention heads leaves no head_dim; set head_dim or fix "
                          "these values in config.json")
    layers = config_int(hf, "num_hidden_layers", high=MAX_LAYERS)
    fraction = rotary_fraction(hf)
    if fraction != 1.0 and not partial_rotary:
        raise ConfigError(f"partial_rotary_factor {fraction}: a {hf.get('model_type')} model rotates the whole head "
                          "(only phi3 supports partial rotary embeddings); this config is not supported")
    rope, _ = rope_specs_from_hf(hf, default_theta=10000.0)
    check_token_ids(hf)
    return ModelConfig(
        family="llama",
        vocab_size=config_int(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=config_int(hf, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config_int(hf, "num_key_value_heads", defaults["num_key_value_heads"], optional=True) or heads,
        head_dim=head_dim,
        rms_norm_eps=config_float(hf, "rms_norm_eps", defaults["rms_norm_eps"]),
        norm_offset=0.0,
        qk_norm=None,
        activation=activation_from_hf(hf, "hidden_act", {"silu": "silu"}),
        embed_scale=1.0,
        query_scale=head_dim**-0.5,
        layer_types=(FULL_ATTENTION,) * layers,
        sliding_window=None,
        rope_full=rope,
        rope_sliding=rope,
        tie_word_embeddings=config_bool(hf, "tie_word_embeddings", False),
        max_position_embeddings=config_int(hf, "max_position_embeddings", defaults["max_position_embeddings"]),
        rotary_dim=int(head_dim * fraction) if fraction != 1.0 else None,
        biases=biases,
    )

"""Config mapping from HF config.json, old and transformers-5 formats, and the RoPE frequencies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import eqlin
from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, RopeSpec
from eqlin.families import config_from_hf


def test_llama3_rope_matches_transformers():
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 48, "rope_theta": 500000.0}
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(params))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    spec = config_from_hf(json.loads(hf.to_json_string())).rope_full
    assert spec.kind == "llama3"
    got = spec.inv_freq(16)
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-6)  # transformers: float32
    plain = RopeSpec(theta=500000.0).inv_freq(16)
    assert (got == plain).any() and (got == plain / 8).any() and ((got != plain) & (got != plain / 8)).any()


def test_old_format_gemma3_config():
    """Hub configs from before transformers 5: rope_theta, rope_scaling, rope_local_base_freq."""
    hf = {"model_type": "gemma3_text", "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 256, "num_hidden_layers": 7, "intermediate_size": 2048, "vocab_size": 262144,
          "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 256,
          "sliding_window": 512, "sliding_window_pattern": 6, "max_position_embeddings": 32768}
    config = config_from_hf(hf)
    assert config.rope_full == RopeSpec(theta=1e6, kind="linear", factor=8.0)
    assert config.rope_sliding == RopeSpec(theta=1e4)
    assert config.layer_types == (SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION, SLIDING_ATTENTION)
    assert config.embed_scale == 640**0.5 and config.query_scale == 256**-0.5
    np.testing.assert_array_equal(config.layer_windows(), [512] * 5 + [0, 512])
    np.testing.assert_array_equal(config.layer_rope_index(), [1] * 5 + [0, 1])


def test_multimodal_config_uses_text_config():
    hf = {"model_type": "gemma3", "text_config": {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                                  "num_hidden_layers": 2, "layer_types": [SLIDING_ATTENTION, FULL_ATTENTION]},
          "vision_config": {"model_type": "siglip_vision_model"}}
    config = config_from_hf(hf)
    assert config.family == "gemma3" and config.hidden_size == 64 and config.num_layers == 2


def test_configs_are_hashable_and_frozen():
    hf = {"model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 8, "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10}
    config = config_from_hf(hf)
    assert config.head_dim == 8 and config.qk_norm == "head"
    assert hash(config) == hash(config_from_hf(dict(hf))) and config == config_from_hf(dict(hf))
    with pytest.raises(AttributeError):
        config.hidden_size = 3


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'; supported: silu"),
    ({"mlp_bias": True}, "mlp_bias=true: biases on the linear path break the homogeneity f(x) = Σ_t J_t x_t that the "
                         "detached Jacobian relies on; eqlin supports bias-free checkpoints only"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
])
def test_unsupported_options_are_named(change, message):
    hf = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 64, "vocab_size": 10, **change}
    with pytest.raises(eqlin.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(hf)


def test_phi3_partial_rotary_and_refused_longrope():
    hf = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 128, "vocab_size": 10, "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 1e4,
                                                                          "partial_rotary_factor": 0.75}}
    assert config_from_hf(hf).rope_dim == 12
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}
    with pytest.raises(eqlin.ConfigError, match="unsupported RoPE type 'longrope'; supported: default, linear, llama3"):
        config_from_hf(hf)


def test_ministral_layer_types_and_olmo2_full_qk_norm():
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
            "vocab_size": 10}
    ministral = config_from_hf({**base, "model_type": "ministral", "sliding_window": 8,
                                "layer_types": [SLIDING_ATTENTION, FULL_ATTENTION]})
    np.testing.assert_array_equal(ministral.layer_windows(), [8, 0])
    olmo = config_from_hf({**base, "model_type": "olmo2"})
    assert olmo.qk_norm == "full" and olmo.norm_layout == "post"

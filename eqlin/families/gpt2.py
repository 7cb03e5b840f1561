"""GPT-2 decoders: learned absolute position embeddings (added to the token embeddings, no RoPE), pre-norm
LayerNorm with bias, fused Conv1D projections (stored (in, out): transposed on loading; c_attn holds q, k
and v side by side), a non-gated GELU MLP and biases on every projection, tied embeddings.

Detached, LayerNorm keeps its mean subtraction on the linear path (it is linear) and freezes only the
scale rsqrt(var + eps), as RMSNorm's; the MLP's GELU(z) = z·s(z) freezes s (`eqlin.blocks.gelu_coefficient`);
every bias rides into the constant c of the affine map y = Σ_t J_t x_t + c (`eqlin.linear_maps`).
The input space is the embedding-layer output the first block reads: token plus position embedding.
"""

from __future__ import annotations

from typing import Any

from eqlin.config import (FULL_ATTENTION, MAX_LAYERS, ModelConfig, RopeSpec, activation_from_hf, check_token_ids,
                          config_bool, config_float, config_int)
from eqlin.errors import ConfigError

MODEL_TYPES = ("gpt2",)
NORM_NAMES = {"attn_in_norm": "ln_1", "mlp_in_norm": "ln_2"}
BIASES = ("q_bias", "k_bias", "v_bias", "o_bias", "up_bias", "down_bias", "attn_in_norm_bias", "mlp_in_norm_bias",
          "final_norm_bias")
HANDLED_KEYS = frozenset({
    "model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "bos_token_id", "eos_token_id", "tie_word_embeddings",
})
# Dropout (training only); the sequence-summary head of GPT2DoubleHeadsModel; n_ctx, a GPT-2 config's old name
# for the context that transformers no longer reads; reorder_and_upcast_attn: the same products in another
# order and precision (float32 upcasting of half-precision runs).
IGNORED_KEYS = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_ctx", "reorder_and_upcast_attn",
})
DEFAULT_ONLY_KEYS = {"scale_attn_by_inverse_layer_idx": False}
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Tensor names: transformers' GPT2LMHeadModel ("transformer." prefix) or the original GPT-2 files (none).
PREFIXES = (("transformer.", "lm_head."), ("", "lm_head."))
TOP_TENSORS = {"embed": "wte.weight", "position_embed": "wpe.weight", "final_norm": "ln_f.weight",
               "final_norm_bias": "ln_f.bias"}
LAYER_TENSORS = {"o_proj": "attn.c_proj.weight", "o_bias": "attn.c_proj.bias", "up_proj": "mlp.c_fc.weight",
                 "up_bias": "mlp.c_fc.bias", "down_proj": "mlp.c_proj.weight", "down_bias": "mlp.c_proj.bias",
                 "attn_in_norm_bias": "ln_1.bias", "mlp_in_norm_bias": "ln_2.bias"}
FUSED = {"attn.c_attn.weight": ("q_proj", "k_proj", "v_proj"), "attn.c_attn.bias": ("q_bias", "k_bias", "v_bias")}
TRANSPOSED = frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"})
# The causal-mask buffers older GPT-2 files carry (transformers leaves them out too).
BUFFERS = frozenset({"attn.bias", "attn.masked_bias"})


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    d, heads = config_int(hf, "n_embd", 768), config_int(hf, "n_head", 12)
    if d % heads:
        raise ConfigError(f"n_embd ({d}) must be a multiple of n_head ({heads}); fix these values in config.json")
    layers = config_int(hf, "n_layer", 12, high=MAX_LAYERS)
    head_dim = d // heads
    unused = RopeSpec(theta=10_000.0)  # learned positions: no RoPE
    check_token_ids(hf)
    return ModelConfig(
        family="gpt2",
        vocab_size=config_int(hf, "vocab_size", 50257),
        hidden_size=d,
        intermediate_size=config_int(hf, "n_inner", None, optional=True) or 4 * d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        rms_norm_eps=config_float(hf, "layer_norm_epsilon", 1e-5),
        norm_offset=0.0,
        qk_norm=None,
        activation=activation_from_hf(hf, "activation_function", ACTIVATIONS),
        embed_scale=1.0,
        query_scale=head_dim**-0.5 if config_bool(hf, "scale_attn_weights", True) else 1.0,
        layer_types=(FULL_ATTENTION,) * layers,
        sliding_window=None,
        rope_full=unused,
        rope_sliding=unused,
        tie_word_embeddings=config_bool(hf, "tie_word_embeddings", True),
        max_position_embeddings=config_int(hf, "n_positions", 1024),
        biases=BIASES,
        norm_kind="layer",
        positions="learned",
        gated_mlp=False,
    )

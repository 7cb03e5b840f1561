"""Phi-3 / Phi-4 decoders: Llama's layout with fused qkv_proj and gate_up_proj (split on loading, gate
first), partial rotary embeddings and `longrope` scaling (Phi-3.5-mini, Phi-4-mini: short or long
per-frequency factors chosen by the sequence length, cos and sin scaled by the attention factor)."""

from __future__ import annotations

import dataclasses
from typing import Any

from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, config_int, config_object
from eqlin.families import llama

MODEL_TYPES = ("phi3",)
NORM_NAMES = llama.NORM_NAMES
FUSED = {"self_attn.qkv_proj.weight": ("q_proj", "k_proj", "v_proj"),
         "mlp.gate_up_proj.weight": ("gate_proj", "up_proj")}
HANDLED_KEYS = llama.HANDLED_KEYS | {"sliding_window"}
# Dropout (training only).
IGNORED_KEYS = llama.IGNORED_KEYS | {"resid_pdrop", "embd_pdrop"}
# Keys Phi-4-mini's hub config carries for its own modeling code (trust_remote_code), which transformers' Phi3
# never reads, supported at the values that leave that code computing transformers' model: full_attn_mod 1
# (every layer's attention is full attention, or the hub's sliding_window), interpolate_factor 1 (positions
# not interpolated), lm_head_bias false (no bias on the output head).
DEFAULT_ONLY_KEYS = {"full_attn_mod": 1, "interpolate_factor": 1, "lm_head_bias": False}
DEFAULTS = {**llama.DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
# transformers' Phi3Config: its own default for the pretraining context, and the legacy RoPE type names it
# reads as longrope.
ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096
LONGROPE_ALIASES = ("su", "yarn")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    base = llama.config_from_hf(_as_transformers_reads_it(hf), defaults=DEFAULTS, partial_rotary=True)
    window = config_int(hf, "sliding_window", None, optional=True)
    kind = SLIDING_ATTENTION if window is not None else FULL_ATTENTION
    return dataclasses.replace(base, family="phi3", layer_types=(kind,) * base.num_layers, sliding_window=window)


def _as_transformers_reads_it(hf: dict[str, Any]) -> dict[str, Any]:
    """The config with Phi3Config's defaults for the context lengths (a top-level
    original_max_position_embeddings always takes precedence for longrope) and 'su' / 'yarn' read as
    'longrope'."""
    out = {"max_position_embeddings": DEFAULTS["max_position_embeddings"],
           "original_max_position_embeddings": ORIGINAL_MAX_POSITION_EMBEDDINGS, **hf}
    for key in ("rope_scaling", "rope_parameters"):
        rope = config_object(hf, key)
        if rope and rope.get("rope_type", rope.get("type")) in LONGROPE_ALIASES:
            out[key] = {k: v for k, v in rope.items() if k != "type"} | {"rope_type": "longrope"}
    return out

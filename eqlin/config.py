"""Model configuration: one frozen, hashable dataclass for every supported decoder.

The config is static under `jax.jit` (it is hashable), so everything in it is Python scalars and
tuples. Per-layer choices (attention type, RoPE table, window) are exposed as NumPy arrays that the
forward pass scans over together with the stacked layer weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from eqlin.errors import ConfigError

Family = Literal["llama", "qwen3", "gemma3", "mistral", "phi3", "olmo2"]
NormLayout = Literal["pre", "sandwich", "post"]
Activation = Literal["silu", "gelu_tanh"]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding frequencies for one attention type.

    `kind` is "default" (theta^(-2i/r)), "linear" (frequencies divided by `factor`) or "llama3"
    (Llama 3.1's wavelength-dependent interpolation between the two).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, rotary_dim: int) -> np.ndarray:
        """Inverse frequencies, shape (rotary_dim // 2,), computed in float64."""
        inv = 1.0 / self.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return inv / self.factor
        # llama3: long wavelengths divided by factor, short kept, a smooth blend in between.
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure forward pass needs to know about one decoder.

    Norms: `norm_offset` is 1.0 for Gemma's `x·(1+w)` RMSNorm and 0.0 for `x·w`. `norm_layout` is
    "pre" (Llama, Qwen, Mistral, Phi: norm before attention and MLP), "sandwich" (Gemma 3: also a norm
    on each branch output before the residual add) or "post" (OLMo 2: only the branch-output norms).
    `qk_norm` is "head" for per-head q/k RMSNorm over head_dim (Qwen 3, Gemma 3), "full" for RMSNorm
    over the whole q/k projection before the head split (OLMo 2), or None. RoPE rotates the first
    `rotary_dim` features of each head (Phi's partial rotary; None: all of head_dim).
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    norm_offset: float
    norm_layout: NormLayout
    qk_norm: Literal["head", "full"] | None
    activation: Activation
    embed_scale: float
    query_scale: float
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope_full: RopeSpec
    rope_sliding: RopeSpec
    tie_word_embeddings: bool
    max_position_embeddings: int
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    rotary_dim: int | None = None

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise ConfigError(
                f"unsupported layer types {sorted(unknown)}; supported: {FULL_ATTENTION}, {SLIDING_ATTENTION}"
            )
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def rope_dim(self) -> int:
        """Features of each head that RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_windows(self) -> np.ndarray:
        """Attention window per layer, shape (L,): the sliding window, or 0 for full attention."""
        return np.array(
            [self.sliding_window if t == SLIDING_ATTENTION else 0 for t in self.layer_types], dtype=np.int32
        )

    def layer_rope_index(self) -> np.ndarray:
        """Which RoPE table each layer uses, shape (L,): 0 = `rope_full`, 1 = `rope_sliding`."""
        return np.array([int(t == SLIDING_ATTENTION) for t in self.layer_types], dtype=np.int32)


def rope_specs_from_hf(hf: dict[str, Any], *, default_theta: float, local_theta: float | None = None) -> tuple[
    RopeSpec, RopeSpec
]:
    """(full, sliding) RopeSpecs from an HF config, old format (rope_theta, rope_scaling,
    rope_local_base_freq) or transformers 5 format (rope_parameters, flat or nested by layer type)."""
    params = hf.get("rope_parameters")
    if params and (FULL_ATTENTION in params or SLIDING_ATTENTION in params):
        full = _rope_spec(params.get(FULL_ATTENTION) or {}, default_theta, hf)
        sliding = _rope_spec(params.get(SLIDING_ATTENTION) or {}, local_theta or default_theta, hf)
        return full, sliding
    merged = dict(params or {})
    merged.update(hf.get("rope_scaling") or {})
    merged.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    full = _rope_spec(merged, default_theta, hf)
    if local_theta is None:
        return full, full
    return full, RopeSpec(theta=float(hf.get("rope_local_base_freq", local_theta)))


def _rope_spec(p: dict[str, Any], default_theta: float, hf: dict[str, Any]) -> RopeSpec:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported RoPE type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = float(p.get("rope_theta", default_theta))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind=kind, factor=float(p["factor"]))
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=float(p["factor"]),
        low_freq_factor=float(p["low_freq_factor"]),
        high_freq_factor=float(p["high_freq_factor"]),
        original_max_position_embeddings=int(
            p.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        ),
    )


def refuse_biases(hf: dict[str, Any], keys: tuple[str, ...] = ("attention_bias", "mlp_bias")) -> None:
    """Biases on the linear path break homogeneity (f(x) = Σ_t J_t x_t); refuse them early."""
    on = [k for k in keys if hf.get(k)]
    if on:
        raise ConfigError(
            f"config sets {', '.join(f'{k}=true' for k in on)}: biases on the linear path break the "
            "homogeneity f(x) = Σ_t J_t x_t that the detached Jacobian relies on; eqlin supports "
            "bias-free checkpoints only"
        )


def activation_from_hf(hf: dict[str, Any], key: str, supported: dict[str, Activation]) -> Activation:
    """Map the HF activation name under `key` to eqlin's, or refuse it naming the supported ones."""
    name = hf.get(key, next(iter(supported)))
    if name not in supported:
        raise ConfigError(f"unsupported {key} {name!r}; supported: {', '.join(supported)}")
    return supported[name]


def single_token_id(value: Any) -> int | None:
    """HF configs give eos_token_id as an int or a list; keep the first."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)

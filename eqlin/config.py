"""Model configuration: one frozen, hashable dataclass for every supported decoder.

The config is static under `jax.jit` (it is hashable), so everything in it is Python scalars and
tuples. Per-layer choices (attention type, RoPE table, window) are exposed as NumPy arrays that the
forward pass scans over together with the stacked layer weights.

Reading config.json is strict: every value is type- and range-checked (`config_int`, `config_float`, ...),
and `check_keys` refuses any key a family neither handles nor knowingly ignores (`HARMLESS_KEYS` and the
families' ignored keys, each with its reason), so that no option that changes the computation is ever dropped
silently, unless the user declares it harmless (`eqlin.load(..., allow_keys=...)`; docs/config_keys.md).
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import numpy as np

from eqlin.checks import check_int, check_real
from eqlin.errors import ConfigError, name_list

Family = Literal["llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "olmo2", "gpt2"]
NormKind = Literal["rms", "layer"]
Activation = Literal["silu", "gelu_tanh", "gelu"]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
MAX_SIZE = 2**31 - 1  # sizes, windows and ids live in int32 arrays
MAX_LAYERS = 10_000
FIX = "fix that value in config.json"
_REQUIRED = object()  # sentinel default of the config readers: the key must be present


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding frequencies for one attention type.

    `kind` is "default" (theta^(-2i/r)), "linear" (frequencies divided by `factor`), "llama3" (Llama
    3.1's wavelength-dependent interpolation between the two) or "longrope" (Phi-3.5 / Phi-4-mini: each
    frequency divided by its own factor, `short_factor` for sequences of at most
    `original_max_position_embeddings` tokens and `long_factor` beyond, and cos and sin multiplied by
    `attention_factor`, as transformers does) or "yarn" (YaRN: frequencies blended between θ^(-2i/r) and
    θ^(-2i/r)/factor by a linear ramp over the dimensions from beta_fast to beta_slow rotations in
    `original_max_position_embeddings`, and cos and sin multiplied by `attention_factor`).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def inv_freq(self, rotary_dim: int, *, long: bool = False) -> np.ndarray:
        """Inverse frequencies, shape (rotary_dim // 2,), computed in float64. `long`: longrope's long
        factors (sequences longer than original_max_position_embeddings); other kinds ignore it."""
        inv = 1.0 / self.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "longrope":
            return inv / np.asarray(self.long_factor if long else self.short_factor, dtype=np.float64)
        if self.kind == "yarn":
            return self._yarn(inv, rotary_dim)
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

    def _yarn(self, inv: np.ndarray, rotary_dim: int) -> np.ndarray:
        """YaRN (transformers' `_compute_yarn_parameters`, in float64): dimension d of r rotates
        n(d) = L / (2π·θ^(d/r)) times in L = original_max_position_embeddings positions, so n(d) = β at
        d(β) = r·ln(L / (2πβ)) / (2 ln θ). The ramp over frequency index i, clip((i − lo) / (hi − lo), 0, 1)
        with lo = max(d(beta_fast), 0), hi = min(d(beta_slow), r − 1) (floored and ceiled if `truncate`; hi
        nudged by 0.001 where equal), weighs inv/factor (interpolation, ramp 1) against inv (ramp 0)."""
        def dim(rotations: float) -> float:
            return rotary_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = dim(self.beta_fast), dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        return inv / self.factor * ramp + inv * (1 - ramp)

    @property
    def switches(self) -> bool:
        """Whether the frequencies depend on the sequence length (longrope)."""
        return self.kind == "longrope"

    def uses_long(self, length: int) -> bool:
        """Whether a sequence of `length` tokens takes longrope's long factors (transformers: the number of
        positions, max(position_ids) + 1, exceeds original_max_position_embeddings)."""
        return self.switches and length > self.original_max_position_embeddings


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure forward pass needs to know about one decoder.

    Norms: `norm_offset` is 1.0 for Gemma's `x·(1+w)` RMSNorm and 0.0 for `x·w`. Which norms a layer has
    (its layout: pre, sandwich, post) is the family's `NORM_NAMES` (`eqlin.families`): the LayerParams
    norm fields present.
    `qk_norm` is "head" for per-head q/k RMSNorm over head_dim (Qwen 3, Gemma 3), "full" for RMSNorm
    over the whole q/k projection before the head split (OLMo 2), or None. RoPE rotates the first
    `rotary_dim` features of each head (Phi's partial rotary; None: all of head_dim).
    `biases` names the bias fields the family has (`LayerParams`' and Params.final_norm_bias; Qwen 2:
    q_bias, k_bias, v_bias); with none, every detached map is linear, y = Σ_t J_t x_t; with some, it is
    affine, y = Σ_t J_t x_t + c (`eqlin.linear_maps`).
    GPT-2's layout: `norm_kind` "layer" (LayerNorm: mean subtracted, scale and bias; `rms_norm_eps` is its
    epsilon; "rms" otherwise), `positions` "learned" (a position embedding added to the token embedding,
    no RoPE: the rope specs are then unused; "rope" otherwise), `gated_mlp` False (down(act(up(x))), the
    activation written z·s(z) with s frozen; True: the GLU MLP).
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
    rotary_dim: int | None = None
    biases: tuple[str, ...] = ()
    norm_kind: NormKind = "rms"
    positions: Literal["rope", "learned"] = "rope"
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                 "intermediate_size": self.intermediate_size, "num_heads": self.num_heads,
                 "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "max_position_embeddings": self.max_position_embeddings}
        bad = {k: v for k, v in sizes.items() if not 1 <= v <= MAX_SIZE}
        if bad:
            raise ConfigError(f"sizes must be in 1..{MAX_SIZE}, got {bad}; fix config.json")
        scales = {"rms_norm_eps": self.rms_norm_eps, "embed_scale": self.embed_scale, "query_scale": self.query_scale,
                  "final_logit_softcapping": self.final_logit_softcapping,
                  "attn_logit_softcapping": self.attn_logit_softcapping}
        bad = {k: v for k, v in scales.items() if v is not None and not (math.isfinite(v) and v > 0)}
        if bad:
            raise ConfigError(f"{bad} must be finite and positive; fix config.json")
        if not 2 <= self.rope_dim <= self.head_dim or self.rope_dim % 2:
            raise ConfigError(f"RoPE rotates {self.rope_dim} features of each head, which must be even and in "
                              f"2..head_dim ({self.head_dim}); fix partial_rotary_factor or head_dim in config.json")
        for spec in {self.rope_full, self.rope_sliding}:
            lengths = {len(spec.short_factor), len(spec.long_factor)}
            if spec.switches and lengths != {self.rope_dim // 2}:
                raise ConfigError(f"longrope short_factor and long_factor need one value per rotated frequency, "
                                  f"{self.rope_dim // 2} each (rotary dimension {self.rope_dim}), got "
                                  f"{len(spec.short_factor)} and {len(spec.long_factor)}; {FIX}")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise ConfigError(
                f"unsupported layer types {sorted(unknown)}; supported: {FULL_ATTENTION}, {SLIDING_ATTENTION}"
            )
        if self.sliding_window is not None and not 1 <= self.sliding_window <= MAX_SIZE:
            raise ConfigError(f"sliding_window must be in 1..{MAX_SIZE} or null, got {self.sliding_window}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def has_biases(self) -> bool:
        """Whether any map of this model is affine rather than linear (a nonzero constant c)."""
        return bool(self.biases)

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


# --------------------------------------------------------------------------------------------------
# Reading HF config.json values: every value is type- and range-checked, and every key is accounted for.

def _reasons(*groups: tuple[str, tuple[str, ...]]) -> Mapping[str, str]:
    """{key: why it leaves the forward pass unchanged} from (reason, keys) groups."""
    return MappingProxyType({key: reason for reason, keys in groups for key in keys})


# Keys of transformers' configs (as save_pretrained writes them, 4.4x to 5.x, and as hub checkpoints carry them)
# that never change a decoder's forward pass at inference, each with the reason. `docs/config_keys.md` lists them.
HARMLESS_KEYS: Mapping[str, str] = _reasons(
    ("bookkeeping: which classes, code and library wrote the file",
     ("architectures", "auto_map", "transformers_version", "tokenizer_class", "model_name", "custom_pipelines")),
    ("storage dtype of the weights: eqlin reads each tensor's own dtype from the weight files and computes in the "
     "dtype asked for", ("torch_dtype", "dtype", "use_bfloat16")),
    ("how transformers caches keys and values between generation steps: the same numbers either way",
     ("use_cache", "cache_implementation")),
    ("training only: weight initialisation, dropout (off at inference), losses, gradient checkpointing",
     ("initializer_range", "attention_dropout", "tf_legacy_loss", "gradient_checkpointing")),
    ("how transformers runs the same math: feed-forward chunking, TorchScript tracing",
     ("chunk_size_feed_forward", "torchscript")),
    ("what transformers returns, not what it computes", ("output_attentions", "output_hidden_states", "return_dict",
                                                         "return_dict_in_generate", "output_scores")),
    ("labels and task of a classification or fine-tuning head: eqlin runs the language-model head",
     ("id2label", "label2id", "num_labels", "problem_type", "finetuning_task")),
    ("encoder-decoder settings: a decoder-only forward pass has no encoder states, so none of them applies",
     ("is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
      "tie_encoder_decoder")),
    ("generation settings (sampling, beams, lengths, penalties): eqlin computes the forward pass; its own generation "
     "is greedy", ("task_specific_params", "prefix", "max_length", "min_length", "do_sample", "early_stopping",
                   "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
                   "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                   "bad_words_ids", "num_return_sequences", "remove_invalid_values",
                   "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")),
)
# Key patterns with the same guarantee: transformers' private bookkeeping (`_name_or_path`, `_commit_hash`,
# `_attn_implementation`, `_model_name_or_path` ... : where the file came from, which attention kernel ran, all
# the same math), and special-token ids (`pad_token_id`, `unk_token_id`, `forced_eos_token_id`, ...): eqlin takes
# special tokens from the tokenizer, and no id enters the decoder's arithmetic (bos/eos are still checked).
HARMLESS_PREFIX, HARMLESS_PREFIX_REASON = "_", "transformers' private bookkeeping: where the file came from, which " \
    "attention kernel ran (the same math)"
HARMLESS_SUFFIXES, HARMLESS_SUFFIX_REASON = ("_token_id", "_token_ids"), "a special token's id: eqlin takes special " \
    "tokens from the tokenizer and no id enters the decoder's arithmetic"


def harmless_reason(key: str) -> str | None:
    """Why `key` never changes a decoder's forward pass (HARMLESS_KEYS or a harmless pattern), or None."""
    if key in HARMLESS_KEYS:
        return HARMLESS_KEYS[key]
    if key.startswith(HARMLESS_PREFIX):
        return HARMLESS_PREFIX_REASON
    if key.endswith(HARMLESS_SUFFIXES):
        return HARMLESS_SUFFIX_REASON
    return None


# Keys eqlin supports only at transformers' default value, for every family.
DEFAULT_ONLY_KEYS: Mapping[str, Any] = MappingProxyType({"pruned_heads": {}})
# The RoPE parameters each supported type takes (transformers' required and optional keys).
_ROPE_KEYS = MappingProxyType({
    "default": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"}),
    "linear": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"}),
    "llama3": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
                         "high_freq_factor", "original_max_position_embeddings"}),
    "longrope": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                           "factor", "attention_factor", "original_max_position_embeddings"}),
    # attn_factor: the original YaRN code's name, which DeepSeek-R1-0528-Qwen3-8B's config carries (0.878...,
    # 1 / its default attention factor). transformers does not read it (only attention_factor), so neither does
    # eqlin, whose model is transformers' (docs/config_keys.md: vLLM multiplies it in).
    "yarn": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "attention_factor",
                       "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings",
                       "truncate", "attn_factor"}),
})


def _show(value: Any) -> str:
    """A short JSON-like rendering of a config value for messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(hf: dict[str, Any], key: str, default: Any) -> Any:
    if key in hf:
        return hf[key]
    if default is _REQUIRED:
        raise ConfigError(f"config.json lacks {key!r}; add it (transformers requires it for this model type)")
    return default


def config_int(hf: dict[str, Any], key: str, default: Any = _REQUIRED, *, low: int = 1, high: int = MAX_SIZE,
               optional: bool = False) -> int | None:
    """The integer `hf[key]` in low..high (`default` when absent; None allowed if `optional`)."""
    value = _value(hf, key, default)
    if value is None and optional:
        return None
    return check_int(f"config.json {key!r}", value, low, high, FIX, error=ConfigError)


def config_float(hf: dict[str, Any], key: str, default: Any = _REQUIRED, *, optional: bool = False) -> float | None:
    """The finite number `hf[key]` > 0 (`default` when absent; None allowed if `optional`)."""
    value = _value(hf, key, default)
    if value is None and optional:
        return None
    return check_real(f"config.json {key!r}", value, FIX, positive=True, error=ConfigError)


def config_bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    """The boolean `hf[key]` (`default` when absent); 0, 1 and strings are refused."""
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json {key!r} must be true or false, got {_show(value)}; {FIX}")
    return value


def config_object(hf: dict[str, Any], key: str, where: str = "") -> dict[str, Any] | None:
    """The JSON object `hf[key]` (inside `where`, for messages), or None when absent or null."""
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"config.json {where + '.' if where else ''}{key!r} must be a JSON object {{...}} or "
                          f"null, got {_show(value)}; {FIX}")
    return value


def config_layer_types(hf: dict[str, Any]) -> tuple[str, ...] | None:
    """`layer_types` as a tuple of strings, or None when absent or null (the family's default pattern)."""
    value = hf.get("layer_types")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"config.json 'layer_types' must be a list of strings such as {FULL_ATTENTION!r}, got "
                          f"{_show(value)}; {FIX}")
    return tuple(value)


def check_keys(hf: dict[str, Any], family: str, handled: frozenset[str], ignored: frozenset[str] = frozenset(),
               defaults: Mapping[str, Any] | None = None, allowed: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Refuse keys eqlin neither handles nor knowingly ignores for `family` (nor finds harmless: `harmless_reason`),
    and keys it supports only at transformers' default (`defaults`, plus DEFAULT_ONLY_KEYS) set to anything else:
    a key that changes the computation must never be dropped silently. Keys in `allowed` (the user's word that
    they are harmless, `eqlin.load(..., allow_keys=...)`) pass; returns those that would have been refused."""
    defaults = {**DEFAULT_ONLY_KEYS, **(defaults or {})}
    known = handled | ignored | set(defaults)
    unknown = sorted(k for k in hf if k not in known and harmless_reason(k) is None)
    changed = sorted(k for k, v in defaults.items() if k in hf and not _same(hf[k], v))
    overridden = tuple(sorted(k for k in unknown + changed if k in allowed))
    unknown, changed = [k for k in unknown if k not in allowed], [k for k in changed if k not in allowed]
    problems = []
    if unknown:
        problems.append(f"keys eqlin does not know for {family}: "
                        + name_list([f"{k}={_show(hf[k])}" for k in unknown])
                        + " (if you know each leaves the computation unchanged, say so with --allow-key KEY, or "
                          "eqlin.load(..., allow_keys=[...]))")
    if changed:
        problems.append("options eqlin supports only at transformers' default: "
                        + ", ".join(f"{k}={_show(hf[k])} (default {_show(defaults[k])})" for k in changed))
    if problems:
        raise ConfigError(f"config.json has {'; and '.join(problems)}; eqlin refuses rather than compute a "
                          "different model")
    return overridden


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


# What a refusal of a missing RoPE parameter shows as an example.
_ROPE_EXAMPLES = {"yarn": "DeepSeek-R1-0528-Qwen3-8B uses factor 4.0, original_max_position_embeddings 32768",
                  "llama3": "Llama 3.1 uses factor 8.0, low_freq_factor 1.0, high_freq_factor 4.0",
                  "linear": "Gemma 3 4B's global layers use factor 8.0"}
# RoPE types whose pretraining context a top-level original_max_position_embeddings sets (transformers'
# standardize_rope_params).
_ORIGINAL_FROM_TOP = ("llama3", "longrope", "yarn")


def rope_specs_from_hf(hf: dict[str, Any], *, default_theta: float, local_theta: float | None = None) -> tuple[
    RopeSpec, RopeSpec
]:
    """(full, sliding) RopeSpecs from an HF config, old format (rope_theta, rope_scaling,
    rope_local_base_freq) or transformers 5 format (rope_parameters, flat or nested by layer type)."""
    params = config_object(hf, "rope_parameters")
    if params and (FULL_ATTENTION in params or SLIDING_ATTENTION in params):
        extra = sorted(set(params) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if extra:
            raise ConfigError(f"config.json 'rope_parameters' is nested by layer type but also has {extra}; "
                              f"keep only {FULL_ATTENTION!r} and {SLIDING_ATTENTION!r}")
        if any(isinstance(v, dict) and v.get("truncate", True) is not True for v in params.values()):
            raise ConfigError("config.json 'rope_parameters' nested by layer type sets yarn's 'truncate': "
                              "transformers reads it only from un-nested rope_parameters (and truncates here), "
                              "so remove it")
        full = _rope_spec(config_object(params, FULL_ATTENTION, "rope_parameters") or {}, default_theta, hf)
        sliding = _rope_spec(config_object(params, SLIDING_ATTENTION, "rope_parameters") or {},
                             local_theta or default_theta, hf)
        return full, sliding
    merged = dict(params or {})
    merged.update(config_object(hf, "rope_scaling") or {})
    merged.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if "original_max_position_embeddings" in hf and merged.get("rope_type", merged.get("type")) in _ORIGINAL_FROM_TOP:
        # transformers' standardize_rope_params: a top-level value (Phi-3 writes one) takes precedence.
        merged["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    full = _rope_spec(merged, default_theta, hf)
    if local_theta is None:
        return full, full
    return full, RopeSpec(theta=config_float(hf, "rope_local_base_freq", local_theta))


def _rope_spec(p: dict[str, Any], default_theta: float, hf: dict[str, Any]) -> RopeSpec:
    kind = p.get("rope_type", p.get("type", "default"))
    if not isinstance(kind, str) or kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported RoPE type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    unknown = sorted(set(p) - _ROPE_KEYS[kind])
    if unknown:
        raise ConfigError(f"RoPE parameters of type {kind!r} do not take {', '.join(unknown)}; eqlin does not know "
                          "what they change, so it refuses this config")

    def number(key: str, default: Any = _REQUIRED) -> float:
        if key not in p and default is _REQUIRED:
            raise ConfigError(f"RoPE parameters of type {kind!r} need {key!r} (e.g. {_ROPE_EXAMPLES.get(kind, '')}); "
                              "add it to config.json")
        return check_real(f"RoPE parameter {key!r}", p.get(key, default), FIX, positive=True, error=ConfigError)

    theta = number("rope_theta", default_theta)
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind=kind, factor=number("factor"))

    def original() -> int:
        return check_int("RoPE parameter 'original_max_position_embeddings'",
                         p.get("original_max_position_embeddings", hf.get("max_position_embeddings")), 1, MAX_SIZE,
                         FIX, error=ConfigError)

    if kind == "longrope":
        return _longrope_spec(p, theta, original(), hf, number)
    if kind == "yarn":
        return _yarn_spec(p, theta, original(), hf, number)
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if high <= low:
        raise ConfigError(f"RoPE high_freq_factor ({high}) must be greater than low_freq_factor ({low}); {FIX}")
    return RopeSpec(theta=theta, kind=kind, factor=number("factor"), low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original())


def _longrope_spec(p: dict[str, Any], theta: float, original: int, hf: dict[str, Any],
                   number: Callable[[str], float]) -> RopeSpec:
    """longrope as transformers computes it (`_compute_longrope_parameters`): `factor` defaults to
    max_position_embeddings / original_max_position_embeddings, and the cos/sin scale `attention_factor`
    to sqrt(1 + ln(factor) / ln(original)) (1 where factor <= 1)."""
    def factors(key: str) -> tuple[float, ...]:
        value = p.get(key)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"longrope RoPE parameters need {key!r}, a list of positive numbers (one per rotated "
                              f"frequency), got {_show(value)}; {FIX}")
        return tuple(check_real(f"longrope {key} entries", v, FIX, positive=True, error=ConfigError) for v in value)

    if "factor" in p:
        factor = number("factor")
    else:
        factor = config_int(hf, "max_position_embeddings") / original
    if "attention_factor" in p:
        attention = number("attention_factor")
    elif factor <= 1.0:
        attention = 1.0
    elif original < 2:
        raise ConfigError(f"longrope with factor {factor} needs original_max_position_embeddings >= 2 (its attention "
                          f"factor divides by log(original)), got {original}; {FIX}")
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeSpec(theta=theta, kind="longrope", factor=factor, original_max_position_embeddings=original,
                    short_factor=factors("short_factor"), long_factor=factors("long_factor"),
                    attention_factor=attention)


def _yarn_spec(p: dict[str, Any], theta: float, original: int, hf: dict[str, Any],
               number: Callable[..., float]) -> RopeSpec:
    """YaRN as transformers computes it (`_compute_yarn_parameters`): `factor` required (null: max_position_embeddings
    / original_max_position_embeddings); beta_fast 32 and beta_slow 1 where absent or null; `truncate` true by
    default; the cos/sin scale `attention_factor` if given, else m(factor, mscale) / m(factor, mscale_all_dim)
    when both are set, else m(factor, 1), with m(s, μ) = 0.1·μ·ln(s) + 1 (1 where s <= 1)."""
    if theta == 1.0:
        raise ConfigError(f"yarn needs rope_theta != 1 (its ramp divides by ln(rope_theta)); {FIX}")
    if "factor" in p and p["factor"] is None:
        factor = config_int(hf, "max_position_embeddings") / original
    else:
        factor = number("factor")
    truncate = p.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"RoPE parameter 'truncate' must be true or false, got {_show(truncate)}; {FIX}")

    def given(key: str, default: float | None = None) -> float | None:
        return default if p.get(key) is None else number(key)

    def m(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention, mscale, mscale_all_dim = given("attention_factor"), given("mscale"), given("mscale_all_dim")
    if attention is None:
        both = mscale is not None and mscale_all_dim is not None
        attention = m(factor, mscale) / m(factor, mscale_all_dim) if both else m(factor)
    return RopeSpec(theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=original,
                    attention_factor=attention, beta_fast=given("beta_fast", 32.0),
                    beta_slow=given("beta_slow", 1.0), truncate=truncate)


def rotary_fraction(hf: dict[str, Any]) -> float:
    """`partial_rotary_factor` (the fraction of head_dim RoPE rotates) from rope_parameters (flat or per layer
    type) or the top level; 1.0 where absent."""
    params = config_object(hf, "rope_parameters") or {}
    nested = [v for k, v in params.items() if k in (FULL_ATTENTION, SLIDING_ATTENTION) and isinstance(v, dict)]
    values = {check_real("partial_rotary_factor", v["partial_rotary_factor"], FIX, positive=True, error=ConfigError)
              for v in [params, *nested, hf] if "partial_rotary_factor" in v}
    if len(values) > 1:
        raise ConfigError(f"config.json gives different partial_rotary_factor values {sorted(values)}; {FIX}")
    fraction = values.pop() if values else 1.0
    if fraction > 1:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {fraction}; {FIX}")
    return fraction


# Where eqlin handles biases exactly (an affine map y = Σ_t J_t x_t + c): what a refusal points to.
BIAS_FAMILIES = ("qwen2 (biases on q, k and v: Qwen 2 / 2.5, DeepSeek-R1-Distill-Qwen) and gpt2 (biases on every "
                 "projection and LayerNorm)")


def refuse_biases(hf: dict[str, Any], keys: tuple[str, ...] = ("attention_bias", "mlp_bias")) -> None:
    """Refuse bias flags early where a family's layout has no biases eqlin handles."""
    on = [k for k in keys if config_bool(hf, k, False)]
    if on:
        raise ConfigError(
            f"config sets {', '.join(f'{k}=true' for k in on)}: biases on the linear path make the map affine, "
            f"y = Σ_t J_t x_t + c, which eqlin computes exactly only for the bias layouts of {BIAS_FAMILIES}; "
            f"a {hf.get('model_type')} model with these biases is not supported (a checkpoint with Qwen 2's layout "
            "loads as model_type qwen2)"
        )


def activation_from_hf(hf: dict[str, Any], key: str, supported: dict[str, Activation]) -> Activation:
    """Map the HF activation name under `key` to eqlin's, or refuse it naming the supported ones."""
    name = hf.get(key, next(iter(supported)))
    if not isinstance(name, str) or name not in supported:
        raise ConfigError(f"unsupported {key} {_show(name)}; supported: {', '.join(supported)}")
    return supported[name]


def check_token_ids(hf: dict[str, Any]) -> None:
    """Refuse a malformed bos_token_id or eos_token_id (an id, a list of ids, or null). eqlin takes its
    special tokens from the tokenizer, so the values are only checked."""
    for key in ("bos_token_id", "eos_token_id"):
        value = hf.get(key)
        if isinstance(value, list):
            for v in value:
                check_int(f"config.json {key!r} entries", v, 0, MAX_SIZE, FIX, error=ConfigError)
        elif value is not None:
            check_int(f"config.json {key!r}", value, 0, MAX_SIZE, FIX, error=ConfigError)

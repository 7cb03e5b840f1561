"""Per-family differences: how an HF config.json maps to `ModelConfig`, which of its keys each family
handles or knowingly ignores, and what the norms are called.

Everything else (projection names, the forward pass) is shared. `spec_for(hf_config)` picks the family
from `model_type`; an unknown type raises a `ConfigError` listing what is supported. `config_from_hf`
refuses any config key its family does not account for (`eqlin.config.check_keys`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from eqlin.config import ModelConfig, check_keys
from eqlin.errors import ConfigError, InputError
from eqlin.families import gemma3, gpt2, llama, mistral, olmo2, phi3, qwen2, qwen3


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What differs between families.

    `norm_names` maps eqlin's per-layer norm fields to the HF module names under `layers.{i}.`.
    `fused` maps an HF tensor holding several projections stacked by rows (Phi-3's qkv_proj.weight) to
    the LayerParams fields it splits into, in row order.
    `text_config` picks the language-model part of a (possibly multimodal) config.json, checking the keys
    around it (with the user's allowed keys; it returns those it let through).
    `handled_keys` are the config keys `config_from_hf` reads, `ignored_keys` those known not to change
    the computation, `default_only_keys` those supported only at transformers' default value.
    Tensor names where a family differs from Llama's layout (GPT-2): `layers_name` (the per-layer
    modules are `{layers_name}.{i}.`), `layer_tensors` (field -> tensor name under it), `top_tensors`
    (Params field -> tensor name under the model prefix), `prefixes` ((model prefix, lm_head prefix)
    candidates), `transposed` (tensors stored (in, out), Conv1D), `buffers` (per-layer tensors that are
    not weights, left out).
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    norm_names: Mapping[str, str]
    handled_keys: frozenset[str]
    ignored_keys: frozenset[str] = frozenset()
    default_only_keys: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    text_config: Callable[..., tuple[dict[str, Any], tuple[str, ...]]] = lambda hf, allowed=frozenset(): (hf, ())
    layers_name: str = "layers"
    layer_tensors: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    top_tensors: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType(
        {"embed": "embed_tokens.weight", "final_norm": "norm.weight"}))
    # Where the text decoder's tensors live: text-only checkpoints, then multimodal ones (transformers 5, 4).
    prefixes: tuple[tuple[str, str], ...] = (("model.", "lm_head."), ("model.language_model.", "lm_head."),
                                             ("language_model.model.", "language_model.lm_head."))
    transposed: frozenset[str] = frozenset()
    buffers: frozenset[str] = frozenset()


_SPECS = (
    FamilySpec(llama.MODEL_TYPES, llama.config_from_hf, MappingProxyType(llama.NORM_NAMES), llama.HANDLED_KEYS,
               llama.IGNORED_KEYS),
    FamilySpec(qwen2.MODEL_TYPES, qwen2.config_from_hf, MappingProxyType(qwen2.NORM_NAMES), qwen2.HANDLED_KEYS,
               qwen2.IGNORED_KEYS, MappingProxyType(qwen2.DEFAULT_ONLY_KEYS)),
    FamilySpec(qwen3.MODEL_TYPES, qwen3.config_from_hf, MappingProxyType(qwen3.NORM_NAMES), qwen3.HANDLED_KEYS,
               qwen3.IGNORED_KEYS),
    FamilySpec(gemma3.MODEL_TYPES, gemma3.config_from_hf, MappingProxyType(gemma3.NORM_NAMES), gemma3.HANDLED_KEYS,
               gemma3.IGNORED_KEYS, MappingProxyType(gemma3.DEFAULT_ONLY_KEYS), text_config=gemma3.text_config),
    FamilySpec(mistral.MODEL_TYPES, mistral.config_from_hf, MappingProxyType(mistral.NORM_NAMES),
               mistral.HANDLED_KEYS, mistral.IGNORED_KEYS),
    FamilySpec(phi3.MODEL_TYPES, phi3.config_from_hf, MappingProxyType(phi3.NORM_NAMES), phi3.HANDLED_KEYS,
               phi3.IGNORED_KEYS, MappingProxyType(phi3.DEFAULT_ONLY_KEYS), fused=MappingProxyType(phi3.FUSED)),
    FamilySpec(olmo2.MODEL_TYPES, olmo2.config_from_hf, MappingProxyType(olmo2.NORM_NAMES), olmo2.HANDLED_KEYS,
               olmo2.IGNORED_KEYS),
    FamilySpec(gpt2.MODEL_TYPES, gpt2.config_from_hf, MappingProxyType(gpt2.NORM_NAMES), gpt2.HANDLED_KEYS,
               gpt2.IGNORED_KEYS, MappingProxyType(gpt2.DEFAULT_ONLY_KEYS), fused=MappingProxyType(gpt2.FUSED),
               layers_name="h", layer_tensors=MappingProxyType(gpt2.LAYER_TENSORS),
               top_tensors=MappingProxyType(gpt2.TOP_TENSORS), prefixes=gpt2.PREFIXES, transposed=gpt2.TRANSPOSED,
               buffers=gpt2.BUFFERS),
)
SUPPORTED_MODEL_TYPES = tuple(t for s in _SPECS for t in s.model_types)


def spec_for(hf: dict[str, Any]) -> FamilySpec:
    """The family spec for an HF config dict, or a ConfigError naming the supported model types."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object {{...}}, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    for spec in _SPECS:
        if isinstance(model_type, str) and model_type in spec.model_types:
            return spec
    raise ConfigError(
        f"unsupported model_type {model_type!r}; eqlin supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def config_from_hf(hf: dict[str, Any], allow_keys: Iterable[str] = ()) -> ModelConfig:
    """`ModelConfig` for an HF config.json dict (multimodal Gemma 3: its text_config), after refusing
    every key the family does not account for, except those in `allow_keys` (`read_hf_config`)."""
    return read_hf_config(hf, allow_keys)[0]


def read_hf_config(hf: dict[str, Any], allow_keys: Iterable[str] = ()) -> tuple[ModelConfig, tuple[str, ...]]:
    """(`ModelConfig`, the keys `allow_keys` let through). `allow_keys` names config.json keys (top level, or of
    a multimodal config's text_config) that eqlin would refuse and that the user knows leave the computation
    unchanged; naming a key config.json lacks, or one eqlin already accepts, is refused (a typo would otherwise
    pass unnoticed)."""
    allowed = _allowed(allow_keys)
    spec = spec_for(hf)
    text, outer = spec.text_config(hf, allowed)
    inner = check_keys(text, text.get("model_type", "this model"), spec.handled_keys, spec.ignored_keys,
                       spec.default_only_keys, allowed)
    overridden = tuple(sorted({*outer, *inner}))
    idle = sorted(allowed - set(overridden))
    if idle:
        absent = [k for k in idle if k not in hf and k not in text]
        accepted = [k for k in idle if k not in absent]
        raise InputError("allow_keys is for keys config.json has and eqlin refuses (its message names them); "
                         + "; ".join(([f"config.json has no {', '.join(absent)}"] if absent else [])
                                     + ([f"eqlin accepts {', '.join(accepted)} already"] if accepted else [])))
    return spec.config_from_hf(text), overridden


def _allowed(allow_keys: Iterable[str]) -> frozenset[str]:
    keys = None if isinstance(allow_keys, (str, bytes)) else list(allow_keys)
    if keys is None or not all(isinstance(k, str) and k for k in keys):
        raise InputError(f"allow_keys must be a list of config.json key names, e.g. ['full_attn_mod'], got "
                         f"{allow_keys!r}")
    return frozenset(keys)

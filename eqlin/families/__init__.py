"""Per-family differences: how an HF config.json maps to `ModelConfig` and what the norms are called.

Everything else (projection names, the forward pass) is shared. `spec_for(hf_config)` picks the family
from `model_type`; an unknown type raises a `ConfigError` listing what is supported.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Mapping

from eqlin.config import ModelConfig
from eqlin.errors import ConfigError
from eqlin.families import gemma3, llama, mistral, olmo2, phi3, qwen3


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What differs between families.

    `norm_names` maps eqlin's per-layer norm fields to the HF module names under `layers.{i}.`.
    `fused` maps an HF module holding several projections stacked by rows (Phi-3's qkv_proj) to the
    LayerParams fields it splits into, in row order.
    `text_config` picks the language-model part of a (possibly multimodal) config.json.
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    norm_names: Mapping[str, str]
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    text_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: hf


_SPECS = (
    FamilySpec(llama.MODEL_TYPES, llama.config_from_hf, MappingProxyType(llama.NORM_NAMES)),
    FamilySpec(qwen3.MODEL_TYPES, qwen3.config_from_hf, MappingProxyType(qwen3.NORM_NAMES)),
    FamilySpec(gemma3.MODEL_TYPES, gemma3.config_from_hf, MappingProxyType(gemma3.NORM_NAMES),
               text_config=gemma3.text_config),
    FamilySpec(mistral.MODEL_TYPES, mistral.config_from_hf, MappingProxyType(mistral.NORM_NAMES)),
    FamilySpec(phi3.MODEL_TYPES, phi3.config_from_hf, MappingProxyType(phi3.NORM_NAMES), MappingProxyType(phi3.FUSED)),
    FamilySpec(olmo2.MODEL_TYPES, olmo2.config_from_hf, MappingProxyType(olmo2.NORM_NAMES)),
)
SUPPORTED_MODEL_TYPES = tuple(t for s in _SPECS for t in s.model_types)


def spec_for(hf: dict[str, Any]) -> FamilySpec:
    """The family spec for an HF config dict, or a ConfigError naming the supported model types."""
    model_type = hf.get("model_type")
    for spec in _SPECS:
        if model_type in spec.model_types:
            return spec
    raise ConfigError(
        f"unsupported model_type {model_type!r}; eqlin supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """`ModelConfig` for an HF config.json dict (multimodal Gemma 3: its text_config)."""
    spec = spec_for(hf)
    return spec.config_from_hf(spec.text_config(hf))

"""Config mapping from HF config.json, old and transformers-5 formats, and the RoPE frequencies."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import eqlin
from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, RopeSpec
from eqlin.families import config_from_hf, spec_for


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
    ({"mlp_bias": True}, "mlp_bias=true: biases on the linear path make the map affine, y = Σ_t J_t x_t + c, which "
                         "eqlin computes exactly only for the bias layouts of qwen2"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
])
def test_unsupported_options_are_named(change, message):
    hf = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 64, "vocab_size": 10, **change}
    with pytest.raises(eqlin.ConfigError, match=re.escape(message)):
        config_from_hf(hf)


def test_phi3_partial_rotary():
    hf = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 128, "vocab_size": 10, "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": 1e4,
                                                                          "partial_rotary_factor": 0.75}}
    assert config_from_hf(hf).rope_dim == 12


_SHORT, _LONG = [1.0, 1.25, 1.5, 2.0, 3.0, 5.0], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("extra", [{}, {"factor": 2.0}, {"attention_factor": 1.3}])
def test_longrope_matches_transformers(extra):
    """Short and long inverse frequencies and the cos/sin scale, as transformers computes them (its
    float32 frequencies to float32 rounding): the factor from the context lengths, or given, and the
    attention factor from the factor, or given."""
    params = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75, "short_factor": _SHORT,
              "long_factor": _LONG, **extra}
    hf = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                                 original_max_position_embeddings=512, rope_parameters=dict(params))
    spec = config_from_hf(json.loads(hf.to_json_string())).rope_full
    assert spec.kind == "longrope" and spec.original_max_position_embeddings == 512
    for long, length in ((False, 512), (True, 513)):
        expected, scale = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"), seq_len=length)
        assert spec.uses_long(length) == long
        np.testing.assert_allclose(spec.inv_freq(12, long=long), expected.double().numpy(), rtol=1e-6)
        assert spec.attention_factor == pytest.approx(scale, rel=1e-15)
    assert spec.attention_factor != 1.0


def test_phi3_longrope_as_hub_configs_write_it():
    """Phi-3.5-mini's layout: rope_scaling of type 'longrope' (older files: 'su'), the pretraining context at
    the top level (taking precedence, as in transformers; Phi3Config's default 4096 where absent)."""
    base = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 128, "vocab_size": 10, "max_position_embeddings": 131072, "rope_theta": 1e4,
            "partial_rotary_factor": 0.75}
    for kind in ("longrope", "su"):
        config = config_from_hf({**base, "original_max_position_embeddings": 4096,
                                 "rope_scaling": {"type": kind, "short_factor": _SHORT, "long_factor": _LONG}})
        spec = config.rope_full
        assert (spec.kind, spec.original_max_position_embeddings, spec.factor) == ("longrope", 4096, 32.0)
        assert spec.short_factor == tuple(_SHORT) and config.rope_dim == 12
    nested = {"rope_type": "longrope", "short_factor": _SHORT, "long_factor": _LONG,
              "original_max_position_embeddings": 1024}
    assert config_from_hf({**base, "rope_parameters": nested}).rope_full.original_max_position_embeddings == 4096
    assert config_from_hf({**base, "original_max_position_embeddings": 2048, "rope_parameters": nested}
                          ).rope_full.original_max_position_embeddings == 2048


@pytest.mark.parametrize("change, message", [
    ({"short_factor": [1.0]}, "need one value per rotated frequency, 6 each .*got 1 and 6"),
    ({"long_factor": None}, "longrope RoPE parameters need 'long_factor', a list of positive numbers"),
    ({"short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, -1.0]}, "longrope short_factor entries must be a finite number > 0"),
    ({"attention_factor": "1"}, "RoPE parameter 'attention_factor' must be a finite number > 0"),
    ({"mscale": 1.0}, "RoPE parameters of type 'longrope' do not take mscale"),
])
def test_bad_longrope_is_refused(change, message):
    hf = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 128, "vocab_size": 10, "rope_parameters": {
              "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75, "short_factor": _SHORT,
              "long_factor": _LONG, **change}}
    with pytest.raises(eqlin.ConfigError, match=message):
        config_from_hf(hf)


@pytest.mark.parametrize("cls, extra", [
    (transformers.Qwen3Config, {}),  # DeepSeek-R1-0528-Qwen3-8B: defaults, attention factor 0.1·ln 4 + 1
    (transformers.LlamaConfig, {"mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 0.5}),
    (transformers.Qwen2Config, {"attention_factor": 1.3, "truncate": False}),
    (transformers.MistralConfig, {"beta_fast": None, "beta_slow": None, "rope_theta": 1e4}),
])
def test_yarn_matches_transformers(cls, extra):
    """YaRN's inverse frequencies (transformers': float32, so to float32 rounding) and its cos/sin scale (to
    float64 rounding), from every optional parameter, in each family transformers gives it; the ramp leaves
    frequencies kept, blended and divided by the factor."""
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16, **extra}
    hf = cls(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
             rope_parameters=dict(params))
    expected, scale = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    spec = config_from_hf(json.loads(hf.to_json_string())).rope_full
    got = spec.inv_freq(32)
    assert spec.kind == "yarn" and spec.original_max_position_embeddings == 16
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-6)
    assert spec.attention_factor == pytest.approx(scale, rel=1e-15) and spec.attention_factor != 1.0
    ratio = RopeSpec(theta=params["rope_theta"]).inv_freq(32) / got
    assert ratio[0] == 1.0 and ((ratio > 1.0) & (ratio < 4.0)).any() and ratio[-1] == pytest.approx(4.0, rel=1e-15)


def test_yarn_as_the_hub_writes_it():
    """DeepSeek-R1-0528-Qwen3-8B's config (transformers 4.51): rope_scaling with attn_factor, which
    transformers does not read (its YaRN takes attention_factor), so the scale is YaRN's default; a top-level
    original_max_position_embeddings takes precedence, as in transformers."""
    base = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 10, "rope_theta": 1000000,
            "max_position_embeddings": 131072, "rope_scaling": {
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                "attn_factor": 0.8782488562869419}}
    spec = config_from_hf(base).rope_full
    assert (spec.kind, spec.factor, spec.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert spec.attention_factor == 0.1 * np.log(4.0) + 1
    assert config_from_hf({**base, "original_max_position_embeddings": 4096}
                          ).rope_full.original_max_position_embeddings == 4096
    implicit = {**base, "rope_scaling": {**base["rope_scaling"], "factor": None}}
    assert config_from_hf(implicit).rope_full == spec  # factor null: 131072 / 32768


@pytest.mark.parametrize("change, message", [
    ({"factor": "4"}, "RoPE parameter 'factor' must be a finite number > 0"),
    ({"truncate": "no"}, "RoPE parameter 'truncate' must be true or false, got 'no'"),
    ({"beta_fast": 0}, "RoPE parameter 'beta_fast' must be a finite number > 0"),
    ({"rope_theta": 1}, r"yarn needs rope_theta != 1 \(its ramp divides by ln\(rope_theta\)\)"),
    ({"short_factor": [1.0]}, "RoPE parameters of type 'yarn' do not take short_factor"),
    ({"factor": "absent"}, r"RoPE parameters of type 'yarn' need 'factor' \(e.g. DeepSeek-R1-0528-Qwen3-8B uses "
                           r"factor 4.0, original_max_position_embeddings 32768\); add it to config.json"),
])
def test_bad_yarn_is_refused(change, message):
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 16, **change}
    hf = {"model_type": "qwen3", **_SIZES, "head_dim": 8,
          "rope_parameters": {k: v for k, v in rope.items() if v != "absent"}}
    with pytest.raises(eqlin.ConfigError, match=message):
        config_from_hf(hf)
    nested = {"model_type": "gemma3_text", "rope_parameters": {
        FULL_ATTENTION: {"rope_type": "yarn", "factor": 4.0, "truncate": False}, SLIDING_ATTENTION: {}}}
    with pytest.raises(eqlin.ConfigError, match="nested by layer type sets yarn's 'truncate'"):
        config_from_hf(nested)


def test_qwen2_has_qkv_biases_whatever_its_flags_say():
    """transformers' Qwen2 always has q/k/v biases (and none elsewhere): attention_bias and mlp_bias do not
    change it; Llama-layout families refuse bias flags, naming the layout eqlin supports."""
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 64, "vocab_size": 10}
    qwen2 = config_from_hf({**base, "model_type": "qwen2"})
    assert qwen2.family == "qwen2" and qwen2.biases == ("q_bias", "k_bias", "v_bias") and qwen2.has_biases
    assert config_from_hf({**base, "model_type": "qwen2", "attention_bias": False, "mlp_bias": True}) == qwen2
    assert not config_from_hf({**base, "model_type": "qwen3"}).has_biases
    with pytest.raises(eqlin.ConfigError, match=r"use_mrope=True \(default False\)"):
        config_from_hf({**base, "model_type": "qwen2", "use_mrope": True})
    with pytest.raises(eqlin.ConfigError, match="attention_bias=true: .* only for the bias layouts of qwen2 .*a qwen3 "
                                                "model with these biases is not supported"):
        config_from_hf({**base, "model_type": "qwen3", "attention_bias": True})


def test_ministral_layer_types_and_olmo2_full_qk_norm():
    base = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
            "vocab_size": 10}
    ministral = config_from_hf({**base, "model_type": "ministral", "sliding_window": 8, "num_key_value_heads": 4,
                                "layer_types": [SLIDING_ATTENTION, FULL_ATTENTION]})  # transformers' default is 8
    np.testing.assert_array_equal(ministral.layer_windows(), [8, 0])
    olmo = config_from_hf({**base, "model_type": "olmo2"})
    assert olmo.qk_norm == "full" and set(spec_for(base | {"model_type": "olmo2"}).norm_names) == {
        "attn_out_norm", "mlp_out_norm"}  # post-norm only


# --- every key accounted for, every value checked ---------------------------------------------------------

_SIZES = {"vocab_size": 64, "hidden_size": 256, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 32}


@pytest.mark.parametrize("cls, model_type", [
    (transformers.LlamaConfig, "llama"), (transformers.Qwen3Config, "qwen3"), (transformers.Qwen2Config, "qwen2"),
    (transformers.MistralConfig, "mistral"),
    (transformers.MinistralConfig, "ministral"), (transformers.Phi3Config, "phi3"), (transformers.Olmo2Config, "olmo2"),
    (transformers.Gemma3TextConfig, "gemma3_text"), (transformers.Gemma3Config, "gemma3"),
    (transformers.GPT2Config, "gpt2"),
])
def test_transformers_defaults_are_accepted_and_are_eqlins(cls, model_type):
    """Every key transformers writes is handled or knowingly ignored, and where config.json leaves a key
    out, eqlin assumes transformers' default for it (rms_norm_eps, windows, positions, RoPE, ...)."""
    sizes = {} if model_type.startswith("gemma3") else _SIZES
    if model_type == "gpt2":  # GPT-2's own names for the sizes
        sizes = {"vocab_size": 64, "n_embd": 256, "n_inner": 48, "n_layer": 2, "n_head": 32}
    full = json.loads(cls(**sizes).to_json_string(use_diff=False))
    assert config_from_hf(full) == config_from_hf({"model_type": model_type, **sizes})


def test_qwen3_sliding_window_defaults_are_transformers():
    hf = {"model_type": "qwen3", **_SIZES, "num_hidden_layers": 30, "use_sliding_window": True}
    expected = transformers.Qwen3Config(**{k: v for k, v in hf.items() if k != "model_type"})
    config = config_from_hf(hf)
    assert config.sliding_window == expected.sliding_window == 4096
    assert config.layer_types == tuple(expected.layer_types)  # sliding from max_window_layers = 28 on


@pytest.mark.parametrize("change, message", [
    ({"foo": 1}, r"keys eqlin does not know for llama: foo=1 \(if you know each leaves the computation unchanged, say so "
                r"with --allow-key KEY, or eqlin.load\(..., allow_keys=\[...\]\)\)"),
    ({"quantization_config": {"bits": 4}}, "keys eqlin does not know for llama: quantization_config="),
    ({"pruned_heads": {"0": [1]}}, r"supports only at transformers' default: pruned_heads=\{'0': \[1\]\} \(default \{\}\)"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5: a llama model rotates the whole head"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1]}},
     "RoPE parameters of type 'default' do not take mrope_section"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number > 0 .*got nan"),
    ({"rope_theta": 0}, "RoPE parameter 'rope_theta' must be a finite number > 0"),
    ({"num_hidden_layers": "3"}, "'num_hidden_layers' must be an integer in 1..10000 .*got '3'"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be an integer"),
    ({"max_position_embeddings": "64"}, "'max_position_embeddings' must be an integer"),
    ({"rope_parameters": "linear"}, "'rope_parameters' must be a JSON object"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     "RoPE parameters of type 'llama3' need 'low_freq_factor'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     r"high_freq_factor \(4.0\) must be greater than low_freq_factor \(4.0\)"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false, got 'false'"),
    ({"attention_bias": 0}, "'attention_bias' must be true or false, got 0"),
    ({"hidden_act": ["silu"]}, r"unsupported hidden_act \['silu'\]; supported: silu"),
    ({"eos_token_id": [1, -2]}, "'eos_token_id' entries must be an integer in 0..2147483647"),
    ({"vocab_size": 2**40}, "'vocab_size' must be an integer in 1..2147483647"),
    ({"hidden_size": 16}, "hidden_size 16 over 32 attention heads leaves no head_dim"),
    ({"hidden_size": 32}, r"RoPE rotates 1 features of each head, which must be even"),
])
def test_bad_config_values_and_keys_are_refused(change, message):
    hf = {"model_type": "llama", **_SIZES, **change}
    with pytest.raises(eqlin.ConfigError, match=message):
        config_from_hf(hf)


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True},
     "use_bidirectional_attention=True \\(default False\\)"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": False}, None),
    ({"model_type": "gemma3", "text_config": "x"}, "'text_config' must be a JSON object"),
    ({"model_type": "gemma3", "text_config": {}, "vision_config": {}, "audio_config": {}},
     "keys eqlin does not know for a multimodal gemma3 config: audio_config"),
    ({"model_type": "gemma3_text", "rope_parameters": {FULL_ATTENTION: {"rope_type": "default", "rope_theta": -1.0}}},
     "'rope_theta' must be a finite number > 0"),
    ({"model_type": "mistral", **_SIZES, "sliding_window": 4, "layer_types": [SLIDING_ATTENTION, FULL_ATTENTION]},
     "model_type 'mistral' applies sliding_window to every layer .*'ministral'"),
    ({"model_type": ["llama"]}, r"unsupported model_type \['llama'\]"),
])
def test_family_specific_keys(hf, message):
    if message is None:
        config_from_hf(hf)
        return
    with pytest.raises(eqlin.ConfigError, match=message):
        config_from_hf(hf)


def test_what_save_pretrained_writes_is_harmless_and_says_why():
    """transformers' private keys, special-token ids, labels and dtype fields, written by 4.4x to 5.x, load, each
    with the reason the code gives; a key of neither kind still has none."""
    from eqlin.config import harmless_reason

    base = {"model_type": "qwen3", **_SIZES, "head_dim": 8}
    written = {"_model_name_or_path": "Gemma 3 270m", "_commit_hash": None, "_attn_implementation_autoset": True,
               "unk_token_id": 3, "cls_token_id": None, "image_token_id": 5, "id2label": {"0": "LABEL_0"},
               "label2id": {"LABEL_0": 0}, "torch_dtype": "bfloat16", "dtype": "float32", "num_labels": 1,
               "transformers_version": "5.24.0", "_sliding_window_pattern": 6, "gradient_checkpointing": False}
    assert config_from_hf({**base, **written}) == config_from_hf(base)
    for key in written:
        assert harmless_reason(key), key
    assert harmless_reason("rope_skew") is None and harmless_reason("quantization_config") is None


@pytest.mark.slow
def test_the_config_transformers_writes_for_the_embedded_model_loads(tmp_path):
    """The embedded GGUF's config as the installed transformers reads it and save_pretrained writes it (5.23:
    _model_name_or_path, unk_token_id, _sliding_window_pattern, ...; CI runs this on the newest release too) is
    the model eqlin reads from the GGUF header (whose float32 epsilon eqlin reads as the 1e-6 it rounds from)."""
    from eqlin.gguf import default_model_path, header_config

    path = pathlib.Path(default_model_path())
    transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["transformers_version"] == transformers.__version__
    theirs, ours = config_from_hf(hf), config_from_hf(header_config(path))
    assert theirs == dataclasses.replace(ours, rms_norm_eps=theirs.rms_norm_eps)
    assert theirs.rms_norm_eps == float(np.float32(ours.rms_norm_eps))


def _table(page: str, heading: str) -> list[list[str]]:
    """The rows (cells, backticks stripped) of the first table under `## heading` in a Markdown page."""
    section = page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("\n|"):].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # the header left out
    return [[cell.strip().replace("`", "") for cell in row.strip("|").split(" | ")] for row in rows]


def test_config_keys_page_matches_the_code():
    """docs/config_keys.md lists exactly the keys each family handles, ignores and supports at one value (with
    that value), the harmless keys with the code's reasons, and each RoPE type's parameters."""
    from eqlin.config import _ROPE_KEYS, DEFAULT_ONLY_KEYS, HARMLESS_KEYS
    from eqlin.families import _SPECS, gemma3

    page = (pathlib.Path(__file__).parents[1] / "docs" / "config_keys.md").read_text()
    names = {s.model_types[0].removesuffix("_text"): s for s in _SPECS}

    def families(cell: str) -> set[str]:
        return set(names) if cell == "all" else set(cell.split(", "))

    def listed(heading: str) -> dict[str, set[str]]:
        return {row[0]: families(row[1]) for row in _table(page, heading)}

    def in_code(keys_of) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name, spec in names.items():
            for key in keys_of(spec):
                out.setdefault(key, set()).add(name)
        return out

    assert listed("Handled keys") == in_code(lambda s: s.handled_keys)
    assert listed("Ignored keys, per family") == in_code(lambda s: s.ignored_keys)
    one_value = {row[0]: (families(row[1]), json.loads(row[2])) for row in _table(page, "Keys supported at one value")}
    expected = {k: (fams, next(s.default_only_keys[k] for s in names.values() if k in s.default_only_keys))
                for k, fams in in_code(lambda s: s.default_only_keys).items()}
    assert one_value == {**expected, **{k: (set(names), v) for k, v in DEFAULT_ONLY_KEYS.items()}}
    harmless = {key: row[1] for row in _table(page, "Keys no family's forward pass reads")[:-2]
                for key in row[0].split(", ")}
    assert harmless == dict(HARMLESS_KEYS)
    image = page.split("at its top level:", 1)[1].split("\n## ", 1)[0]
    assert {line.split("`")[1] for line in image.splitlines() if line.startswith("| `")} == gemma3.IMAGE_KEYS
    assert {row[0]: set(row[1].split(", ")) for row in _table(page, "RoPE types and their parameters")} == {
        kind: set(keys) for kind, keys in _ROPE_KEYS.items()}

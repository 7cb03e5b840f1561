"""The Model wrapper: tokenization with the family's BOS convention, and bad inputs refused early."""

from __future__ import annotations

import json
import shutil

import chex
import numpy as np
import pytest
import torch

import eqlin
from eqlin import reference as ref
from eqlin.families import config_from_hf
from tests.conftest import TEXT, relative
from tests.fixtures import HUB_CONFIGS, hub_config, shrink, write_hub_checkpoint

HUB = {"Qwen--Qwen3-0.6B": "qwen3", "Qwen--Qwen3-32B": "qwen3", "Qwen--Qwen2.5-7B-Instruct": "qwen2",
       "deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B": "qwen2", "deepseek-ai--DeepSeek-R1-0528-Qwen3-8B": "qwen3",
       "meta-llama--Llama-3.1-8B-Instruct": "llama", "meta-llama--Llama-3.2-1B-Instruct": "llama",
       "google--gemma-3-1b-it": "gemma3", "google--gemma-3-4b-it": "gemma3", "microsoft--phi-4": "phi3",
       "microsoft--Phi-4-mini-instruct": "phi3", "mistralai--Mistral-7B-Instruct-v0.3": "mistral",
       "mistralai--Ministral-8B-Instruct-2410": "mistral", "allenai--OLMo-2-1124-7B": "olmo2",
       "openai-community--gpt2": "gpt2"}


@pytest.mark.parametrize("variant, adds_bos", [("llama_mha", True), ("gemma3", True), ("qwen3", False)])
def test_bos_follows_the_tokenizer(variant, adds_bos, loaded):
    model = loaded(variant)
    ids = model.encode(TEXT)
    assert (ids[0] == model.tokenizer.inner.token_to_id("<bos>")) == adds_bos
    assert len(ids) == len(TEXT.split()) + adds_bos
    assert model.decode(ids[adds_bos:]) == TEXT


def test_embed_is_scaled_for_gemma(loaded):
    model = loaded("gemma3")
    ids = model.encode(TEXT)
    np.testing.assert_allclose(model.embed(ids), np.asarray(model.params.embed)[ids] * np.sqrt(48), rtol=1e-15)
    llama = loaded("llama_mha")
    np.testing.assert_array_equal(llama.embed(llama.encode(TEXT)), np.asarray(llama.params.embed)[llama.encode(TEXT)])


def test_logits_shape(loaded):
    model = loaded("llama_gqa")
    chex.assert_shape(model.logits(TEXT), (len(model.encode(TEXT)), model.config.vocab_size))


def test_empty_text(loaded):
    with pytest.raises(eqlin.InputError, match="empty text: give at least one character"):
        loaded("llama_mha").encode("")


def test_empty_ids(loaded):
    with pytest.raises(eqlin.InputError, match="empty input: give at least one token"):
        loaded("llama_mha").logits(np.array([], dtype=np.int32))


def test_ids_outside_the_vocabulary(loaded):
    with pytest.raises(eqlin.InputError, match=r"token ids outside the vocabulary \[0, 96\): \[-1, 96\]"):
        loaded("llama_mha").logits([1, 96, -1])


def test_ids_must_be_one_dimensional_integers(loaded):
    with pytest.raises(eqlin.InputError, match=r"token ids must be a 1-D integer sequence, got shape \(1, 2\)"):
        loaded("llama_mha").logits([[1, 2]])
    with pytest.raises(eqlin.InputError,
                       match=r"token ids must be a 1-D integer sequence, got shape \(2,\) dtype float"):
        loaded("llama_mha").logits([1.5, 2.0])


def test_too_long_for_the_context(loaded):
    model = loaded("llama_mha")
    with pytest.raises(eqlin.InputError,
                       match=r"65 tokens, more than the model's max_position_embeddings \(64\); shorten the text"):
        model.logits(np.ones(65, dtype=np.int32))


def test_every_hub_config_is_a_fixture():
    assert sorted(p.stem for p in HUB_CONFIGS.glob("*.json")) == sorted(HUB)


@pytest.mark.parametrize("name", sorted(HUB))
def test_real_hub_configs_load(name, tmp_path):
    """config.json of real checkpoints, every key as the hub has it: read at full size; with the sizes shrunk,
    tiny random weights written by transformers load too, with nothing overridden."""
    hf = hub_config(name)
    assert config_from_hf(hf).family == HUB[name]
    tiny = shrink(hf)
    model = eqlin.load(write_hub_checkpoint(tmp_path, tiny))
    assert model.config == config_from_hf(tiny) and model.config.family == HUB[name]
    assert model.allowed_keys == ()


@pytest.mark.parametrize("name", ["deepseek-ai--DeepSeek-R1-0528-Qwen3-8B", "microsoft--Phi-4-mini-instruct",
                                  "google--gemma-3-4b-it"])
def test_hub_layouts_compute_what_transformers_computes(name, tmp_path):
    """YaRN with the hub's attn_factor (which transformers does not read), longrope with Phi-4-mini's remote-code
    keys and window, a multimodal Gemma 3 whose text_config leaves most sizes to defaults: eqlin's logits are
    transformers' (stock: float32 RoPE and norms), 20 tokens past the shrunk original context where it has one."""
    tiny = shrink(hub_config(name))
    for where in (tiny, tiny.get("rope_scaling") or {}):
        if "original_max_position_embeddings" in where:
            where["original_max_position_embeddings"] = 16
    folder = write_hub_checkpoint(tmp_path, tiny)
    model = eqlin.load(folder)
    ids = np.arange(4, 24)
    with torch.no_grad():
        stock = ref.load_transformers(folder)(input_ids=torch.tensor(ids)[None], use_cache=False).logits[0]
    assert relative(model.logits(ids), stock.numpy()) < 2e-6


def test_allow_keys_loads_refused_keys_and_records_them(checkpoint, tmp_path):
    """A made-up key, and an option at a value eqlin supports only at its default, load on the user's word and
    are recorded; naming a key config.json lacks, or one eqlin accepts anyway, is refused, naming it."""
    folder = shutil.copytree(checkpoint("phi3"), tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "shift": 1, "full_attn_mod": 2}))
    with pytest.raises(eqlin.ConfigError, match=r"keys eqlin does not know for phi3: shift=1 .*; and options eqlin "
                                                r"supports only at transformers' default: full_attn_mod=2 \(default 1\)"):
        eqlin.load(folder)
    with pytest.raises(eqlin.ConfigError, match="options eqlin supports only at transformers' default: full_attn_mod"):
        eqlin.load(folder, allow_keys=["shift"])
    model = eqlin.load(folder, allow_keys=("full_attn_mod", "shift"))
    assert model.allowed_keys == ("full_attn_mod", "shift") and model.config == config_from_hf(hf)
    with pytest.raises(eqlin.InputError, match="config.json has no bias_shift; eqlin accepts dtype already"):
        eqlin.load(folder, allow_keys=["shift", "full_attn_mod", "bias_shift", "dtype"])
    with pytest.raises(eqlin.InputError, match=r"allow_keys must be a list of config.json key names, e.g. "
                                               r"\['full_attn_mod'\], got 'shift'"):
        eqlin.load(folder, allow_keys="shift")

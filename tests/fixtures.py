"""Tiny random Hugging Face checkpoints written by transformers itself, for parity and exactness tests.

`make_checkpoint(folder, variant)` writes `config.json`, a single `model.safetensors`, `tokenizer.json` and
`tokenizer_config.json`. Besides one checkpoint per family, variants switch on what the base ones leave off:
`phi3_sliding` (a sliding window on every layer), `qwen3_sliding` (`use_sliding_window` with
`max_window_layers`, and no `layer_types` in config.json, as Qwen 3 checkpoints written before transformers 5
have it, so the layer pattern must be derived from those two fields), `gemma3_softcap` (attention and final
logit softcapping set; transformers' Gemma 3, and so eqlin, applies only the final one) and `llama_tied_head`
(tied embeddings, yet `lm_head.weight` stored too, a copy of the embedding table, as some exporters write it).
`phi3_longrope` has original_max_position_embeddings 16, so short inputs take longrope's short factors and
inputs of more than 16 tokens its long ones. `qwen3_yarn` is DeepSeek-R1-0528-Qwen3-8B's layout (Qwen 3 with
YaRN factor 4, its rope_scaling keys and values, `attn_factor` included) with the pretraining context shrunk from
32768 to 16 positions, so inputs of more than 16 tokens are past it. Weights are random (normal, std 0.2) and so are every RMSNorm
weight (`1 + 0.3·randn`, Gemma's `(1 + w)` norms `0.3·randn`), so no norm is the identity, and every bias
(`0.5·randn`: Qwen 2's q/k/v biases are far from zero, so the affine maps' constants are large).

Tokenizers are word-level over a fixed English word list (whitespace pre-tokenizer). BOS follows the family:
Llama, Mistral and Gemma add one through a `TemplateProcessing` post-processor; Qwen 3, Phi-3 (Phi-4-mini
style) and OLMo 2 add none.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import subprocess
from typing import Any, Iterator

import pytest
import safetensors.torch
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

VARIANTS: tuple[str, ...] = (
    "llama_mha",
    "llama_gqa",
    "qwen3",
    "gemma3",
    "gemma3_multimodal",
    "mistral",
    "phi3",
    "olmo2",
    "phi3_sliding",
    "qwen3_sliding",
    "gemma3_softcap",
    "llama_tied_head",
    "qwen2",
    "phi3_longrope",
    "gpt2",
    "qwen3_yarn",
)
# DeepSeek-R1-0528-Qwen3-8B's rope_scaling with original_max_position_embeddings shrunk from 32768 (head_dim 32,
# theta 1e6: YaRN's ramp keeps frequency 0, blends 1 and divides the rest by the factor).
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "attn_factor": 0.8782488562869419}
# Softcaps small enough to bend the tiny models' attention scores (std ~1) and logits (std ~1.5).
ATTN_SOFTCAP, FINAL_SOFTCAP = 1.0, 2.0
# longrope factors of the phi3_longrope variant: one per rotated frequency (rotary dim 12: six).
LONGROPE_SHORT = [1.0, 1.1, 1.3, 1.7, 2.2, 3.0]
LONGROPE_LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]

VOCAB_SIZE = 96
MAX_POSITIONS = 64

WORDS: tuple[str, ...] = tuple(
    """
    the The a A of and to in is was it that on for with as by at from out into over under
    bridge Marin Golden Gate State San Francisco bay city river road north south east west
    red blue green small large old new long short cold warm fog wind water light
    cat dog bird fish tree house car boat ship train
    he she they we you I
    runs goes sees made built crossed opened
    . , ! ?
    """.split()
)

# Special tokens per tokenizer style, in id order from 0; the word list follows them.
_LLAMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")


def _gemma3_text_config(softcap: bool = False, **ids: int) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
        final_logit_softcapping=FINAL_SOFTCAP if softcap else None,
        attn_logit_softcapping=ATTN_SOFTCAP if softcap else None,
        tie_word_embeddings=True,
        **ids,
    )


def _spec(variant: str) -> tuple[type[transformers.PreTrainedModel], Any, tuple[str, ...], dict[str, Any]]:
    """(model class, config, special tokens, tokenizer roles) of a variant."""
    llama_ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    llama_tok = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "add_bos": True}
    if variant in ("llama_mha", "llama_tied_head"):
        config = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            tie_word_embeddings=True, **llama_ids,
        )
        return transformers.LlamaForCausalLM, config, _LLAMA_SPECIALS, llama_tok
    if variant == "llama_gqa":
        # head_dim 16, theta 5e5, original 48: wavelengths 6.3 (< 48/4: kept), 32.5 (between: smoothed),
        # >= 168 (> 48/1: divided by 8), so all three llama3 regimes occur.
        config = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 48,
            },
            tie_word_embeddings=False, **llama_ids,
        )
        return transformers.LlamaForCausalLM, config, _LLAMA_SPECIALS, llama_tok
    if variant == "qwen3_yarn":
        config = transformers.Qwen3Config(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1_000_000.0, **YARN},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        )
        qwen_tok = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.Qwen3ForCausalLM, config, _QWEN_SPECIALS, qwen_tok
    if variant in ("qwen3", "qwen3_sliding"):
        # qwen3_sliding: window 4 from layer max_window_layers = 1 on, so layer 0 full, layer 1 sliding.
        sliding = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
        config = transformers.Qwen3Config(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
            **(sliding if variant == "qwen3_sliding" else {}),
        )
        qwen_tok = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.Qwen3ForCausalLM, config, _QWEN_SPECIALS, qwen_tok
    gemma_ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    if variant in ("gemma3", "gemma3_softcap"):
        config = _gemma3_text_config(softcap=variant == "gemma3_softcap", **gemma_ids)
        return transformers.Gemma3ForCausalLM, config, _GEMMA_SPECIALS, llama_tok
    if variant == "gemma3_multimodal":
        vision = transformers.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8, vision_use_head=False,
        )
        config = transformers.Gemma3Config(
            text_config=_gemma3_text_config(**gemma_ids).to_dict(), vision_config=vision.to_dict(),
            mm_tokens_per_image=4, boi_token_index=4, eoi_token_index=5, image_token_index=6,
            tie_word_embeddings=True, **gemma_ids,
        )
        return transformers.Gemma3ForConditionalGeneration, config, _GEMMA_SPECIALS, llama_tok
    if variant == "mistral":
        config = transformers.MistralConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-5, sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=False, **llama_ids,
        )
        return transformers.MistralForCausalLM, config, _LLAMA_SPECIALS, llama_tok
    if variant in ("phi3", "phi3_sliding"):
        # Phi-4-mini style: fused qkv/gate_up, GQA, partial rotary 0.75, tied, no BOS; phi3_sliding adds a
        # window of 4 on every layer (Phi-3-mini's layout).
        config = transformers.Phi3Config(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            original_max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75},
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            sliding_window=4 if variant == "phi3_sliding" else None,
        )
        phi_tok = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.Phi3ForCausalLM, config, _QWEN_SPECIALS, phi_tok
    if variant == "qwen2":
        # Qwen 2.5-0.5B style: q/k/v biases, tied embeddings, no BOS.
        config = transformers.Qwen2Config(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        )
        qwen_tok = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.Qwen2ForCausalLM, config, _QWEN_SPECIALS, qwen_tok
    if variant == "phi3_longrope":
        # Phi-3.5-mini / Phi-4-mini style longrope, with a pretraining context of 16 and 64 positions (factor 4,
        # attention factor sqrt(1 + ln 4 / ln 16)); untied.
        config = transformers.Phi3Config(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
            original_max_position_embeddings=16, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
                             "short_factor": LONGROPE_SHORT, "long_factor": LONGROPE_LONG},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        phi_tok = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.Phi3ForCausalLM, config, _QWEN_SPECIALS, phi_tok
    if variant == "gpt2":
        # Learned positions, LayerNorm with bias, Conv1D projections with biases, gelu_new MLP, tied, no BOS.
        config = transformers.GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=48, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
            activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
            pad_token_id=0,
        )
        gpt_tok = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "add_bos": False}
        return transformers.GPT2LMHeadModel, config, _QWEN_SPECIALS, gpt_tok
    if variant == "olmo2":
        config = transformers.Olmo2Config(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
        olmo_tok = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|im_start|>", "add_bos": False}
        return transformers.Olmo2ForCausalLM, config, _QWEN_SPECIALS, olmo_tok
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter deterministically: norms random around their identity, the rest N(0, 0.2²)."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            norm_weights[id(module.weight)] = 0.0 if name.startswith("Gemma") else 1.0
        elif isinstance(module, torch.nn.LayerNorm):
            norm_weights[id(module.weight)] = 1.0
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if id(param) in norm_weights:
            param.copy_(norm_weights[id(param)] + 0.3 * noise)
        elif name.endswith(".bias"):
            param.copy_(0.5 * noise)
        elif param.ndim >= 2:
            param.copy_(0.2 * noise)
        else:
            param.copy_(0.02 * noise)


def _write_tokenizer(folder: pathlib.Path, specials: tuple[str, ...], roles: dict[str, Any]) -> None:
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if roles["add_bos"]:
        bos = roles["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": roles["add_bos"],
        "add_eos_token": False,
        "bos_token": roles["bos"],
        "eos_token": roles["eos"],
        "pad_token": roles["pad"],
        "unk_token": "<unk>",
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_checkpoint(
    folder: pathlib.Path, variant: str, *, torch_dtype: torch.dtype = torch.float32, seed: int = 0
) -> pathlib.Path:
    """Write a tiny random `variant` checkpoint (weights stored in `torch_dtype`) plus tokenizer into `folder`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cls, config, specials, roles = _spec(variant)
    model = model_cls(config)
    _randomise(model, seed)
    model.to(torch_dtype).save_pretrained(folder)
    _write_tokenizer(folder, specials, roles)
    if variant == "qwen3_sliding":  # the pre-transformers-5 config: the layer pattern is implied, not listed
        config_path = folder / "config.json"
        written = json.loads(config_path.read_text())
        del written["layer_types"]
        config_path.write_text(json.dumps(written, indent=2) + "\n")
    if variant == "llama_tied_head":  # transformers drops a tied lm_head on saving; store the copy anyway
        tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@contextlib.contextmanager
def small_filesystem(folder: pathlib.Path, size: str = "64k") -> Iterator[pathlib.Path]:
    """A real filesystem of `size` (a tmpfs) mounted at the new folder `folder` for the block: writing more than
    fits fails as on a full disk (ENOSPC). Mounting needs root (CI runs as root); elsewhere the test is skipped."""
    folder.mkdir()
    mount = shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                      str(folder)], capture_output=True, text=True)
    if not mount or mount.returncode != 0:
        pytest.skip(f"a full disk is a small tmpfs, and mounting one is not permitted here "
                    f"({mount.stderr.strip() if mount else 'no mount command'}); "
                    "run as root, as CI does")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# --- real hub config.json files (tests/hub_configs), shapes shrunk for tiny weights --------------------------------

HUB_CONFIGS = pathlib.Path(__file__).parent / "hub_configs"
_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": VOCAB_SIZE}
_TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 16, "patch_size": 8}


def hub_config(name: str) -> dict[str, Any]:
    """The config.json of hub checkpoint `name` (owner--repo), as stored in tests/hub_configs."""
    return json.loads((HUB_CONFIGS / f"{name}.json").read_text())


def shrink(hf: dict[str, Any]) -> dict[str, Any]:
    """`hf` with every size tiny and every other key and value kept: hidden 32, 2 layers, 4 heads (2 kv heads,
    or 4 for multi-head attention), head_dim 8, vocabulary 96 (GPT-2: its own names for these); Qwen's
    max_window_layers 1; longrope factors cut to the rotated frequencies; token ids taken modulo the vocabulary;
    a multimodal Gemma 3's text and vision parts both."""
    hf = json.loads(json.dumps(hf))
    for key, value in hf.items():
        if key.endswith(("_token_id", "_token_index")) and value is not None:
            hf[key] = [v % VOCAB_SIZE for v in value] if isinstance(value, list) else value % VOCAB_SIZE
    if hf["model_type"] == "gpt2":
        return {**hf, "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB_SIZE, "n_positions": MAX_POSITIONS,
                "n_ctx": MAX_POSITIONS}
    if hf["model_type"] == "gemma3":
        hf["vision_config"] = {**hf["vision_config"], **_TINY_VISION}
        hf["mm_tokens_per_image"] = 4
        hf["text_config"] = shrink(hf["text_config"])
        return hf
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    hf.update(_TINY, num_key_value_heads=4 if kv is not None and kv == heads else 2, head_dim=8)
    if "max_window_layers" in hf:
        hf["max_window_layers"] = 1
    rope = hf.get("rope_scaling") or {}
    rotated = int(8 * hf.get("partial_rotary_factor", 1.0)) // 2
    for key in ("short_factor", "long_factor"):
        if key in rope:
            rope[key] = rope[key][:rotated]
    return hf


def write_hub_checkpoint(folder: pathlib.Path, hf: dict[str, Any], seed: int = 0) -> pathlib.Path:
    """A tiny random checkpoint of the (shrunk) hub config `hf`: transformers builds the model class its
    `architectures` names and saves the weights, and config.json is then `hf` itself, with the hub's keys."""
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.AutoConfig.for_model(**hf)
    model = getattr(transformers, hf["architectures"][0])(config)
    _randomise(model, seed)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_tokenizer(folder, _QWEN_SPECIALS, {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
                                              "add_bos": False})
    return folder

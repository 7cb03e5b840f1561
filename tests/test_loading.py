"""Loading checkpoints: sharded indexes, bf16 upcast, the HF cache, multimodal Gemma 3, and every way a
checkpoint can be wrong, each with a message that names the problem."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from jax.sharding import AxisType

import eqlin
from eqlin.convert import convert
from eqlin.loading import HOST_ALIGNMENT, aligned_empty, place
from eqlin.memory import format_bytes
from eqlin.model import checkpoint_identity, count_parameters, read_config
from eqlin.params import widen
from eqlin.safetensors_io import SafetensorsFile, write_safetensors
from eqlin.tokenizer import Tokenizer
from eqlin import reference as ref
from tests.conftest import TEXT
from tests.fixtures import make_checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _tensors(folder) -> dict[str, np.ndarray]:
    f = SafetensorsFile(folder / "model.safetensors")
    return {name: np.array(f.read(name)) for name in f.header}


def _shard(folder):
    """Split `folder`'s model.safetensors into two shards and an index, in place."""
    tensors = _tensors(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        write_safetensors(folder / shard, {n: tensors[n] for n in members})
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_index_loads_the_same_model(checkpoint, loaded, tmp_path):
    folder = _shard(_copy(checkpoint("qwen3"), tmp_path / "sharded"))
    ids = loaded("qwen3").encode(TEXT)
    np.testing.assert_array_equal(eqlin.load(folder).logits(ids), loaded("qwen3").logits(ids))


def _nbytes(model) -> int:
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(model.params))


@pytest.mark.parametrize("variant, stored, at_most", [
    *((v, torch.bfloat16, 0.3) for v in ("llama_gqa", "qwen3", "gemma3", "mistral", "phi3", "olmo2", "qwen2", "gpt2")),
    ("gemma3", torch.float32, 0.55), ("qwen2", torch.float32, 0.55)])
def test_stored_weights_give_the_float64_maps_bit_for_bit(tmp_path, variant, stored, at_most):
    """Weights kept at the checkpoint's dtype (bfloat16 as bit patterns) and widened inside the layer body
    give every value and map of a float64 copy of the same weights exactly (the folded MLP too, on
    Gemma 3), in a fraction of its bytes (other engines: tests/test_decoder.py)."""
    folder = make_checkpoint(tmp_path / "ckpt", variant, torch_dtype=stored)
    kept, cast = eqlin.load(folder), eqlin.load(folder, weights="cast")
    name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[stored]
    assert kept.params.weights == "stored" and cast.params.weights == "cast"
    assert kept.dtype == cast.dtype == jnp.float64 and f"weights stored as {name}" in repr(kept)
    assert "weights cast at load" in repr(cast)
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(cast.params)} == {"float64"}
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(kept.params.layers)} >= {
        "uint16" if stored == torch.bfloat16 else "float32"}
    assert _nbytes(kept) <= at_most * _nbytes(cast), (_nbytes(kept), _nbytes(cast))
    ids = kept.encode(TEXT)
    np.testing.assert_array_equal(kept.forward(ids, collect=True).logits, cast.forward(ids, collect=True).logits)
    for fold in (False, True) if variant == "gemma3" else (False,):
        a, b = eqlin.detached_jacobian(kept, ids, fold=fold), eqlin.detached_jacobian(cast, ids, fold=fold)
        np.testing.assert_array_equal(a.jacobian, b.jacobian)
        np.testing.assert_array_equal(a.relative_error, b.relative_error)
        assert float(a.relative_error) <= 1e-14


def test_a_host_array_from_aligned_empty_is_placed_without_a_copy():
    """The load holds each weight once: a CPU device adopts an `aligned_empty` array (JAX's zero-copy rule,
    which numpy's own 16-byte-aligned arrays miss)."""
    host = aligned_empty((3, 40, 24), np.dtype(np.uint16))
    host[...] = np.arange(host.size).reshape(host.shape)
    placed = place(host, None)
    assert host.ctypes.data % HOST_ALIGNMENT == 0 and placed.unsafe_buffer_pointer() == host.ctypes.data
    np.testing.assert_array_equal(placed, host)


def test_bf16_checkpoint_is_widened_exactly(tmp_path, loaded):
    folder = make_checkpoint(tmp_path / "bf16", "gemma3", torch_dtype=torch.bfloat16)
    header = SafetensorsFile(folder / "model.safetensors").header
    assert {str(dtype) for dtype, _ in header.values()} == {"bfloat16"}
    model = eqlin.load(folder)
    assert model.dtype == jnp.float64 and model.params.embed.dtype == np.uint16  # bfloat16 bit patterns
    reference = loaded("gemma3")  # the same seed in float32: bf16 rounding only
    expected = np.asarray(torch.tensor(np.asarray(reference.params.embed)).to(torch.bfloat16).double())
    np.testing.assert_array_equal(widen(model.params.embed, jnp.float64), expected)
    np.testing.assert_array_equal(eqlin.load(folder, weights="cast").params.embed, expected)


def test_a_load_that_cannot_fit_is_refused_before_reading_naming_what_fits(tmp_path, monkeypatch):
    from eqlin.memory import widened_layer_bytes
    from eqlin.safetensors_io import SafetensorsFile as File

    folder = make_checkpoint(tmp_path / "bf16", "llama_gqa", torch_dtype=torch.bfloat16)
    config = eqlin.load(folder).config
    stored = _nbytes(eqlin.load(folder)) + widened_layer_bytes(config, 8, 1)
    cast = _nbytes(eqlin.load(folder, weights="cast")) + widened_layer_bytes(config, 8, 1)

    def no_reads(*args):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(File, "read", no_reads)
    with pytest.raises(eqlin.MemoryBudgetError, match=rf"loading {folder} in float64 \(weights='cast'\) needs about "
                       rf"{format_bytes(cast)} per device .* more than the {format_bytes(stored)} one device holds; "
                       rf"nothing was read. Use weights=\"stored\" \({format_bytes(stored)}\) or dtype=\"float32\" .* "
                       r"or a mesh of (\d+) or more devices \(mesh=eqlin.device_mesh\(model=\1\)\)"):
        eqlin.load(folder, weights="cast", memory_limit=stored)
    with pytest.raises(eqlin.MemoryBudgetError, match=r"\(weights='stored'\) needs about .* Use dtype=\"float32\""):
        eqlin.load(folder, memory_limit=stored - 1)


def test_wider_weights_than_the_compute_dtype_are_cast_at_load(checkpoint):
    """float32 weights of a float32 model stay as they are; float64 ones of a float32 model are rounded once,
    at load (the model computes in float32 throughout), as weights="cast" does."""
    model = eqlin.load(checkpoint("llama_mha"), dtype="float32")
    assert model.dtype == jnp.float32 and model.params.weights == "cast"
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(model.params)} == {"float32"}


def test_repo_id_from_local_hf_cache(checkpoint, loaded, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef"
    _copy(checkpoint("llama_mha"), snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    model = eqlin.load("tiny-org/tiny-llama", cache_dir=cache)
    ids = loaded("llama_mha").encode(TEXT)
    np.testing.assert_array_equal(model.logits(ids), loaded("llama_mha").logits(ids))


@pytest.mark.parametrize("sharded", [True, False])
def test_download_fetches_only_the_weights_eqlin_reads(checkpoint, loaded, tmp_path, monkeypatch, sharded):
    """download=True takes the JSON files, then only the shards the index lists (or model.safetensors),
    never a repo's other weight files (Mistral's consolidated.safetensors), at one pinned commit. The hub
    here is a local folder; which files a call takes is decided by huggingface_hub's own pattern filter."""
    remote = _copy(checkpoint("llama_mha"), tmp_path / "remote")
    shutil.copy(_shard(_copy(remote, tmp_path / "s")) / "model-00001-of-00002.safetensors", tmp_path / "first")
    if sharded:
        _shard(remote)
    shutil.copy(tmp_path / "first", remote / "consolidated.safetensors")
    shutil.copy(tmp_path / "first", remote / "model-00001-of-00003.safetensors")  # listed by no index
    calls = []

    def snapshot_download(repo, *, cache_dir, allow_patterns, revision=None, local_files_only=False):
        calls.append((revision, allow_patterns))
        snapshot = cache_dir / repo.replace("/", "--") / (revision or "c0ffee")
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(sorted(p.name for p in remote.iterdir()), allow_patterns=allow_patterns):
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = eqlin.load("tiny-org/tiny-llama", cache_dir=tmp_path / "hub", download=True)
    ids = loaded("llama_mha").encode(TEXT)
    np.testing.assert_array_equal(model.logits(ids), loaded("llama_mha").logits(ids))
    weights = (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] if sharded
               else ["model.safetensors"])
    json_files = [p.name for p in remote.glob("*.json")]
    assert "config.json" in json_files and ("model.safetensors.index.json" in json_files) == sharded
    snapshot = tmp_path / "hub" / "tiny-org--tiny-llama" / "c0ffee"
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(json_files + weights)
    assert [revision for revision, _ in calls] == [None, "c0ffee"]


@pytest.mark.parametrize("error, message", [
    (LocalEntryNotFoundError("offline"),
     "cannot download 'tiny-org/tiny-llama': the Hugging Face Hub cannot be reached and the repo is not in the local "
     "cache; connect, or pass a checkpoint folder"),
    (OSError(28, "No space left on device"),
     "cannot get 'tiny-org/tiny-llama' from the Hugging Face Hub or its cache: .*No space left on device"),
])
def test_a_failed_download_says_why(tmp_path, monkeypatch, error, message):
    def snapshot_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(eqlin.WeightsError, match=message):
        eqlin.load("tiny-org/tiny-llama", cache_dir=tmp_path, download=True)


def test_repo_id_missing_from_cache_is_not_downloaded(tmp_path):
    """Nothing is downloaded without download=True; the fix named also works for a CLI user, who cannot
    pass download=True."""
    with pytest.raises(eqlin.WeightsError, match="not in the local Hugging Face cache; download it first with "
                                                 "`hf download tiny-org/not-there`") as err:
        eqlin.load("tiny-org/not-there", cache_dir=tmp_path)
    assert "download=True" not in str(err.value)


def test_multimodal_gemma3_loads_its_text_part(checkpoint, loaded):
    """transformers 5.23 saves the text decoder under language_model.model.*; the vision tower is left out."""
    tensors = _tensors(checkpoint("gemma3_multimodal"))
    assert any(n.startswith("vision_tower.") for n in tensors)
    model = loaded("gemma3_multimodal")
    assert model.config.family == "gemma3"
    np.testing.assert_array_equal(model.params.layers.q_proj[1],
                                  tensors["language_model.model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(model.params.embed, tensors["language_model.model.embed_tokens.weight"])


@pytest.mark.parametrize("variant, family", [("llama_gqa", "llama"), ("qwen3", "qwen3"), ("gemma3", "gemma3"),
                                             ("mistral", "mistral"), ("phi3", "phi3"), ("olmo2", "olmo2"),
                                             ("llama_tied_head", "llama")])
def test_family_and_tied_embeddings(variant, family, loaded):
    model = loaded(variant)
    assert model.config.family == family
    assert (model.params.lm_head is None) == model.config.tie_word_embeddings


def test_tied_checkpoint_with_a_stored_copy_of_lm_head(loaded, reference):
    """llama_tied_head stores lm_head.weight equal to the embedding table: eqlin ties, as transformers does."""
    model = loaded("llama_tied_head")
    assert model.config.tie_word_embeddings and model.params.lm_head is None
    torch_model = reference("llama_tied_head", detached=False)
    assert torch_model.lm_head.weight is ref.decoder(torch_model).embed_tokens.weight  # tied there too
    np.testing.assert_array_equal(model.logits(TEXT), loaded("llama_mha").logits(TEXT))  # the same weights


def test_tied_checkpoint_whose_stored_lm_head_differs_is_refused(checkpoint, tmp_path):
    """transformers (5.23) then unties and uses the stored lm_head, older versions the embedding: eqlin refuses
    rather than pick one silently, naming both fixes, in load and in convert alike."""
    folder = _copy(checkpoint("llama_tied_head"), tmp_path / "two_heads")
    tensors = _tensors(folder)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + np.float32(0.5)
    write_safetensors(folder / "model.safetensors", tensors)
    message = (r"tie_word_embeddings is true but .*model\.safetensors also stores a different lm_head\.weight; set "
               r"tie_word_embeddings to false in config\.json to use it, or delete lm_head\.weight to tie")
    with pytest.raises(eqlin.WeightsError, match=message):
        eqlin.load(folder)
    with pytest.raises(eqlin.WeightsError, match=message):
        convert(folder, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_missing_and_misshaped_tensors_are_listed_together(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "broken")
    tensors = _tensors(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:-1]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError) as err:
        eqlin.load(folder)
    message = str(err.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1): model.extra.weight" in message
    assert "model.layers.0.self_attn.q_proj.weight: (31, 32) (expected (32, 32))" in message


def test_truncated_safetensors_file(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(eqlin.WeightsError,
                       match=r"model\.safetensors is truncated: tensor .*; re-download or re-convert it"):
        eqlin.load(folder)


def test_garbage_safetensors_file(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(eqlin.WeightsError, match=r"not a valid safetensors file \(.*\); re-download or re-convert it"):
        eqlin.load(folder)


def test_no_weights_at_all(checkpoint, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(checkpoint("llama_mha") / "config.json", folder)
    with pytest.raises(eqlin.WeightsError,
                       match=r"no weights in .*model\.safetensors or model\.safetensors\.index\.json "
                       r"\(pickled \.bin checkpoints are never loaded; convert them to safetensors\)"):
        eqlin.load(folder)


def test_bias_tensors_are_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint("qwen3"), tmp_path / "biased")
    tensors = _tensors(folder)
    tensors["model.layers.0.self_attn.v_proj.bias"] = np.zeros(32, np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"biases on the linear path \(model.layers.0.self_attn.v_proj.bias\) "
                                                 r"that a qwen3 model does not have; .* bias layouts of qwen2"):
        eqlin.load(folder)


def test_qwen2_biases_are_loaded_and_checked(checkpoint, loaded, tmp_path):
    model = loaded("qwen2")
    tensors = _tensors(checkpoint("qwen2"))
    np.testing.assert_array_equal(model.params.layers.v_bias[1], tensors["model.layers.1.self_attn.v_proj.bias"])
    chex.assert_shape([model.params.layers.q_bias, model.params.layers.k_bias], [(2, 48), (2, 24)])
    folder = _copy(checkpoint("qwen2"), tmp_path / "no_bias")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(48, np.float32)
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"biases on the linear path \(model.layers.0.self_attn.o_proj.bias\) "
                                                 "that a qwen2 model does not have"):
        eqlin.load(folder)
    del tensors["model.layers.0.self_attn.o_proj.bias"]
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"missing \(1\): model.layers.1.self_attn.k_proj.bias"):
        eqlin.load(folder)


def test_bias_flags_in_config_are_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_gqa"), tmp_path / "biased_config")
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(eqlin.ConfigError, match="attention_bias=true: biases on the linear path make the map affine, "
                                                ".* only for the bias layouts of qwen2 "):
        eqlin.load(folder)


def test_gpt2_as_openai_wrote_it(checkpoint, loaded, tmp_path):
    """GPT-2's original files: no "transformer." prefix, causal-mask buffers h.{i}.attn.bias (left out, as
    transformers leaves them out); Conv1D weights (in, out) transposed on loading, c_attn split into q, k, v."""
    tensors = {name.removeprefix("transformer."): a for name, a in _tensors(checkpoint("gpt2")).items()}
    model = loaded("gpt2")
    d = model.config.hidden_size
    np.testing.assert_array_equal(model.params.layers.k_proj[1], tensors["h.1.attn.c_attn.weight"][:, d:2 * d].T)
    np.testing.assert_array_equal(model.params.layers.v_bias[0], tensors["h.0.attn.c_attn.bias"][2 * d:])
    np.testing.assert_array_equal(model.params.layers.down_proj[0], tensors["h.0.mlp.c_proj.weight"].T)
    folder = _copy(checkpoint("gpt2"), tmp_path / "openai")
    tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)})
    (folder / "model.safetensors").unlink()
    write_safetensors(folder / "model.safetensors", tensors)
    assert np.array_equal(eqlin.load(folder).logits(TEXT), model.logits(TEXT))
    tensors["h.0.attn.c_proj.weight"] = tensors["h.0.attn.c_proj.weight"][:, :40]
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"wrong shape \(1\): h.0.attn.c_proj.weight: \(48, 40\) "
                                                 r"\(expected \(48, 48\)\)"):
        eqlin.load(folder)


def test_unknown_model_type(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "gpt_neox")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(eqlin.ConfigError, match="unsupported model_type 'gpt_neox'; eqlin supports: llama, qwen2, qwen3"):
        eqlin.load(folder)


def test_unsupported_rope_type(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "dynamic")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(eqlin.ConfigError, match="unsupported RoPE type 'dynamic'; supported: default, linear, llama3, "
                                                "longrope, yarn"):
        eqlin.load(folder)


def test_corrupt_config_json(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "badjson")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(eqlin.WeightsError, match="config.json is not valid JSON"):
        eqlin.load(folder)


def test_a_file_is_not_a_folder(checkpoint):
    with pytest.raises(eqlin.WeightsError,
                       match="is a file, not a checkpoint folder; pass the folder holding config.json"):
        eqlin.load(checkpoint("llama_mha") / "config.json")


def test_float64_without_x64_is_refused(checkpoint):
    code = (
        "import eqlin, sys\n"
        "try:\n"
        f"    eqlin.load({str(checkpoint('llama_mha'))!r})\n"
        "except eqlin.PrecisionError as e:\n"
        "    print(e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_ENABLE_X64": "0", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "float64 needs JAX's x64 mode" in out.stdout and "jax_enable_x64" in out.stdout
    assert jax.config.jax_enable_x64  # this process is untouched


def test_fused_phi3_projections_are_split_in_order(checkpoint, loaded):
    """qkv_proj rows are q, k, v; gate_up_proj rows are gate then up (transformers' chunk order)."""
    tensors = _tensors(checkpoint("phi3"))
    model = loaded("phi3")
    qkv = tensors["model.layers.1.self_attn.qkv_proj.weight"]
    q, kv = model.config.q_size, model.config.kv_size
    np.testing.assert_array_equal(model.params.layers.k_proj[1], qkv[q:q + kv])
    gate_up = tensors["model.layers.0.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(model.params.layers.up_proj[0], gate_up[model.config.intermediate_size:])


def _with_index(folder, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _hub_layout(source, cache, repo):
    """Lay out the checkpoint folder `source` as huggingface_hub stores a download of `repo` in `cache`:
    blobs/<sha256 of the file>, snapshots/<revision>/<name> -> ../../blobs/<sha256>, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = "a" * 40
    snapshot = root / "snapshots" / revision
    for folder in (root / "blobs", root / "refs", snapshot):
        folder.mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    for file in sorted(source.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, root / "blobs" / blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


def test_a_sharded_checkpoint_in_the_hub_cache_loads_by_repo_id(checkpoint, loaded, tmp_path):
    """Every file of a hub snapshot is a symlink into blobs/, outside the snapshot folder: shards are inside
    by the names the index gives, not by where the hub's links point (they were all refused). Run as a user
    runs it: `eqlin analyze --model me/tiny` in a fresh process with HF_HUB_CACHE set, saving the map."""
    snapshot = _hub_layout(_shard(_copy(checkpoint("llama_mha"), tmp_path / "sharded")), tmp_path / "hub", "me/tiny")
    assert (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    out = tmp_path / "o"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "eqlin.cli", "analyze", TEXT, "--model", "me/tiny", "--layers", "none",
                          "--save-jacobian", "--out", str(out), "-q", "--no-compile-cache"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    saved = eqlin.Linearization.load(out / "jacobian.safetensors")
    unsharded = eqlin.detached_jacobian(loaded("llama_mha"), TEXT)
    for name in ("jacobian", "inputs", "output", "contributions", "relative_error", "ids"):
        np.testing.assert_array_equal(getattr(saved, name), getattr(unsharded, name), err_msg=name)


@pytest.mark.parametrize("call", [
    lambda folder: eqlin.load(folder),
    lambda folder: checkpoint_identity(str(folder), folder),  # analyze and prompt sets: hashed before loading
    lambda folder: count_parameters(*read_config(folder), folder),  # eqlin info
])
def test_index_names_are_checked_before_any_file_is_opened(checkpoint, tmp_path, call):
    """Shard names outside the folder once were hashed (opened and read to the end: a 200 GB file named by an
    absolute path hung `analyze`) before loading refused them; every reader now refuses them first."""
    folder = _copy(checkpoint("llama_mha"), tmp_path / "indexed")
    names = SafetensorsFile(folder / "model.safetensors").header
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(folder / "model.safetensors", outside)
    for name in (str(outside), "../outside.safetensors", "sub/../../outside.safetensors"):
        _with_index(folder, dict.fromkeys(names, name))
        with pytest.raises(eqlin.WeightsError, match=f"names shard files outside its folder: {re.escape(name)}; "
                                                     "shards must be plain file names relative to the checkpoint "
                                                     r"folder \(no '..', no absolute path\)"):
            call(folder)
    os.mkfifo(folder / "pipe.safetensors")  # inside, but opening it would block
    _with_index(folder, dict.fromkeys(names, "pipe.safetensors"))
    with pytest.raises(eqlin.WeightsError, match=r"names shards that are not regular files: pipe.safetensors \(a FIFO "
                                                 r"\(named pipe\)\); replace them with the safetensors files"):
        call(folder)
    _with_index(folder, dict.fromkeys(names, "gone.safetensors"))
    with pytest.raises(eqlin.WeightsError, match=r"names shard files that are missing: gone.safetensors; download them "
                                                 r"again \(`hf download REPO`\) or replace the index"):
        call(folder)


def test_index_weight_map_must_be_an_object_inside_the_folder(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "indexed")
    _with_index(folder, ["model.safetensors"])
    with pytest.raises(eqlin.WeightsError, match="needs a weight_map object mapping tensor names to shard file names, "
                                                 "got list"):
        eqlin.load(folder)
    names = SafetensorsFile(folder / "model.safetensors").header
    for outside in ("../elsewhere.safetensors", str(tmp_path / "other" / "model.safetensors")):
        _with_index(folder, dict.fromkeys(names, outside))
        with pytest.raises(eqlin.WeightsError, match="names shard files outside its folder"):
            eqlin.load(folder)
    (folder / "model.safetensors.index.json").write_text("[" * 100_000)
    with pytest.raises(eqlin.WeightsError, match="nested too deeply"):
        eqlin.load(folder)


def test_non_finite_and_integer_weights_are_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "nan")
    tensors = _tensors(folder)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = np.nan
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"tensors hold NaN or infinite values \(as float32\): "
                                                 r"model.layers.1.mlp.down_proj.weight; the checkpoint is corrupt"):
        eqlin.load(folder)
    tensors = {k: v.astype(np.float64) for k, v in tensors.items()}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = 1e300  # finite in float64, inf in float32
    write_safetensors(folder / "model.safetensors", tensors)
    assert np.isfinite(np.asarray(eqlin.load(folder).params.layers.down_proj)).all()
    with pytest.raises(eqlin.WeightsError, match=r"as float32"):
        eqlin.load(folder, dtype="float32")
    tensors["model.layers.1.mlp.down_proj.weight"] = np.ones((32, 80), np.int8)
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(eqlin.WeightsError, match=r"not floating point \(quantized checkpoints are not supported\) "
                                                 r"\(1\): model.layers.1.mlp.down_proj.weight: int8"):
        eqlin.load(folder)


@pytest.mark.parametrize("call, message", [
    (lambda folder: eqlin.load(None), "source must be a checkpoint folder, .*got None"),
    (lambda folder: eqlin.load(""), "source must be a checkpoint folder"),
    (lambda folder: eqlin.load(folder, mesh="2x4"), "mesh must be a jax.sharding.Mesh with axes"),
    (lambda folder: eqlin.load(folder, mesh=jax.make_mesh((1, 1), ("basis", "model"), (AxisType.Explicit,) * 2)),
     "of type AxisType.Auto, got Mesh.*Explicit.*eqlin.device_mesh"),
    (lambda folder: eqlin.load(folder, dtype="float16"), "unsupported dtype 'float16'; choose one of float64"),
    (lambda folder: eqlin.load(folder, dtype=object()), "unsupported dtype"),
    (lambda folder: eqlin.load(folder, weights="bf16"),
     "weights must be 'stored' .*, 'cast' .* or 'quantized' .*, got 'bf16'"),
])
def test_bad_load_arguments(checkpoint, call, message):
    with pytest.raises(eqlin.InputError, match=message):
        call(checkpoint("llama_mha"))


def test_not_found_and_unreadable_name_what_to_pass(checkpoint, tmp_path, monkeypatch):
    folder = _copy(checkpoint("llama_mha"), tmp_path / "ck")
    (folder / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(eqlin.WeightsError, match=re.escape(
            f"missing config.json in {folder}; pass a checkpoint folder that holds it (as `hf download ORG/NAME` writes "
            "one), a .gguf file or a repo id in the local Hugging Face cache")):
        eqlin.load(folder)
    (tmp_path / "config.json").rename(folder / "config.json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(eqlin.WeightsError, match=re.escape(
            f"missing tokenizer.json in {folder}; copy the model's tokenizer.json there (`hf download ORG/NAME "
            "tokenizer.json`), or pass token ids instead of text")):
        Tokenizer.from_folder(folder)

    def denied(path):  # root reads any file whatever its mode: the error as an unprivileged user gets it
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(eqlin.WeightsError, match=re.escape(
            f"cannot read {folder / 'config.json'}: Permission denied; make it readable, or pass another checkpoint "
            "folder, .gguf file or repo id")):
        eqlin.load(folder)

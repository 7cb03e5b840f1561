"""Self-check of the tiny checkpoints (tests/fixtures.py) and the PyTorch reference (eqlin/reference.py)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer
from torch.overrides import TorchFunctionMode

from eqlin import reference as ref
from tests.fixtures import VARIANTS, make_checkpoint

TEXT = "The bridge out of Marin is the Golden Gate"  # 9 words; 10 tokens with BOS
ADDS_BOS = {"llama_mha", "llama_gqa", "gemma3", "gemma3_multimodal", "mistral", "gemma3_softcap", "llama_tied_head"}
SLIDING = ("gemma3", "gemma3_multimodal", "mistral", "phi3_sliding", "qwen3_sliding", "gemma3_softcap")
BIASED = {"qwen2", "gpt2"}  # biases: the detached map is affine, y = Σ_t J_t x_t + c
ROPE = tuple(v for v in VARIANTS if v != "gpt2")  # GPT-2: learned positions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {v: make_checkpoint(root / v, v) for v in VARIANTS}


def _ids(folder: pathlib.Path, length: int = 10) -> torch.Tensor:
    """Token ids `(length,)`: the tokenized TEXT, padded with more words if the family adds no BOS."""
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT + " . it runs").ids[:length]
    return torch.tensor(ids)


def _logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], use_cache=False).logits[0]


def _rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm()).item()


class _DtypeRecorder(TorchFunctionMode):
    """Records the dtypes of every floating-point tensor produced by torch functions and methods."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_faithful_matches_stock_and_is_deterministic(checkpoints, variant):
    folder = checkpoints[variant]
    ids = _ids(folder)
    stock = _logits(ref.load_transformers(folder), ids)
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    faithful = _logits(model, ids)
    err = _rel(faithful, stock)
    print(f"{variant}: faithful vs stock logits rel {err:.2e}")
    assert 0 < err < 1e-5  # they differ only by transformers' float32 intermediates
    assert torch.equal(faithful, _logits(model, ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_faithful_forward_has_no_float32(checkpoints, variant):
    folder, ids = checkpoints[variant], _ids(checkpoints[variant])
    stock, faithful = _DtypeRecorder(), _DtypeRecorder()
    with stock:
        _logits(ref.load_transformers(folder), ids)
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    with faithful:
        _logits(model, ids)
    if variant != "gpt2":  # GPT-2 has no float32 upcasts to see
        assert torch.float32 in stock.dtypes  # the recorder does see transformers' upcasts
    assert faithful.dtypes == {torch.float64}


@pytest.mark.parametrize("variant", ROPE)
def test_rope_buffers_are_float64_versions_of_transformers(checkpoints, variant):
    folder = checkpoints[variant]
    stock = ref.decoder(ref.load_transformers(folder)).rotary_emb
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    rotary = ref.decoder(model).rotary_emb
    names = [n for n, _ in stock.named_buffers() if n.endswith("inv_freq")]
    assert names
    for name in names:
        exact, rounded = rotary.get_buffer(name), stock.get_buffer(name)
        assert exact.dtype == torch.float64 and rounded.dtype == torch.float32
        assert _rel(exact, rounded.double()) < 1e-6
    if variant == "gemma3":
        assert ref.decoder(model).embed_tokens.embed_scale.item() == 48**0.5


def test_llama3_rope_scaling_changes_frequencies(checkpoints):
    config = ref.load_transformers(checkpoints["llama_gqa"]).config
    scaled, _ = ref.rope_inv_freq(config)
    plain = 1.0 / 500_000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ratio = plain / scaled
    assert ratio[0] == 1.0  # high frequency: kept
    assert 1.0 < ratio[1] < 8.0  # medium: smoothed
    assert torch.allclose(ratio[2:], torch.tensor(8.0, dtype=torch.float64))  # low: divided by factor


@pytest.mark.parametrize("variant", VARIANTS)
def test_detached_equals_faithful_values(checkpoints, variant):
    folder = checkpoints[variant]
    ids = _ids(folder)
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    x = ref.embed(model, ids).detach()
    faithful_logits, faithful_y = _logits(model, ids), ref.final_hidden(model, x).detach()
    ref.make_detached(model)
    assert torch.equal(_logits(model, ids), faithful_logits)
    assert torch.equal(ref.final_hidden(model, x).detach(), faithful_y)


@pytest.mark.parametrize("variant", VARIANTS)
def test_detached_jacobian_reconstructs_and_plain_does_not(checkpoints, variant):
    folder = checkpoints[variant]
    ids = _ids(folder)
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    x = ref.embed(model, ids).detach()
    y = ref.final_hidden(model, x).detach()
    plain = torch.autograd.functional.jacobian(lambda e: ref.final_hidden(model, e), x, vectorize=True)
    with pytest.raises(ValueError):
        ref.detached_jacobian(model, ids)
    jac = ref.detached_jacobian(ref.make_detached(model), ids)
    d, length = y.shape[0], ids.shape[0]
    assert jac.shape == (d, length, d) and jac.dtype == np.float64
    detached_err = _rel(np.einsum("itj,tj->i", jac, x.numpy()), y)
    plain_err = _rel(torch.einsum("itj,tj->i", plain, x), y)
    print(f"{variant}: reconstruction rel error detached {detached_err:.2e}, plain {plain_err:.2f}")
    assert plain_err > 1e-3
    if variant not in BIASED:
        assert detached_err <= 1e-12
        return
    assert detached_err > 0.1  # the biases' constant c is far from zero (eqlin's c is graded against it)
    with torch.no_grad():  # without its biases, the same reference is linear again
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
        y = ref.final_hidden(model, x)
    assert _rel(np.einsum("itj,tj->i", ref.detached_jacobian(model, ids), x.numpy()), y) <= 1e-12


@pytest.mark.parametrize("variant", SLIDING)
def test_sliding_window_mask_matters(checkpoints, variant):
    folder = checkpoints[variant]
    ids = _ids(folder)
    config = ref.decoder(ref.load_transformers(folder)).config
    assert ids.shape[0] > config.sliding_window
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    windowed = _logits(model, ids)
    for module in ref.decoder(model).modules():
        if type(module).__name__.endswith("Attention"):
            module.sliding_window = None  # Mistral's modules read it from the config otherwise
    unwindowed = _logits(model, ids)
    assert _rel(unwindowed[-1], windowed[-1]) > 1e-3
    head = ids[: config.sliding_window]  # positions inside the window are unaffected
    assert torch.allclose(unwindowed[: head.shape[0]], windowed[: head.shape[0]], rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hooked_branches_add_up_to_each_layer(checkpoints, variant):
    """The hooks read what each layer adds: its input + attention branch + MLP branch is its output, every layer;
    the last layer's output through the final norm is the final hidden state."""
    folder = checkpoints[variant]
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    with torch.no_grad():
        x = ref.embed(model, _ids(folder))
        out = ref.layer_outputs(model, x)
        assert _rel(out["input"][0], x) <= 1e-16  # GPT-2: (x − positions) + positions, a rounding of x
        assert torch.equal(out["input"][1:], out["residual"][:-1])
        assert _rel(out["input"] + out["attn"] + out["mlp"], out["residual"]) < 1e-15
        assert _rel(ref.final_norm(ref.decoder(model))(out["residual"][-1, -1]), ref.final_hidden(model, x)) < 1e-15
        assert all(_rel(out[p], 0 * out[p]) > 0.1 for p in ("attn", "mlp"))  # neither branch is zero


def test_layer_maps_of_the_last_layer_are_the_final_map(checkpoints):
    """The cumulative residual map of the last layer is the Jacobian of the final hidden state; the single-layer
    map of layer 0 is the cumulative one (its input is the input embeddings)."""
    folder = checkpoints["gemma3"]
    model = ref.make_detached(ref.load_transformers(folder))
    ids = _ids(folder)
    L = ref.decoder(model).config.num_hidden_layers
    J, x, y = ref.layer_maps(model, ids, [0, L - 1])
    assert J.shape == (3, 2, 48, len(ids), 48) and y.shape == (3, 2, 48)
    np.testing.assert_array_equal(J[0, 1], ref.final_jacobian(model, ids))
    single, inputs, single_y = ref.layer_maps(model, ids, [0], scope="single")
    np.testing.assert_array_equal(inputs[0], x)
    assert _rel(single[:, 0], J[:, 0]) < 1e-15 and _rel(single_y[:, 0], y[:, 0]) < 1e-15
    for part in range(3):  # each map reconstructs its output
        assert _rel(np.einsum("lotd,td->lo", J[part], x), y[part]) < 1e-13


def test_single_pass_only(checkpoints):
    folder = checkpoints["llama_gqa"]
    model = ref.make_float64_faithful(ref.load_transformers(folder))
    ids = _ids(folder)
    with torch.no_grad():
        cache = model(input_ids=ids[None], use_cache=True).past_key_values
        with pytest.raises(NotImplementedError):
            model(input_ids=ids[None, :1], past_key_values=cache, use_cache=True)


def test_unsupported_family_is_refused(tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=16, max_position_embeddings=8)
    model = transformers.GPTNeoXForCausalLM(config)
    model.model = model.gpt_neox  # shaped like the decoders above, but GPT-NeoX is not supported
    with pytest.raises(ValueError, match="not supported"):
        ref.make_detached(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_bos_follows_family(checkpoints, variant):
    folder = checkpoints[variant]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if variant == "qwen2":  # transformers forces its byte-level Qwen2Tokenizer on model_type qwen2, whatever
        # tokenizer_config.json says (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS); it cannot hold a word-level vocabulary
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    else:
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config", config)
    ids = tok.encode(TEXT).ids
    assert hf_tok(TEXT).input_ids == ids
    assert max(ids) < text_config["vocab_size"] and tok.get_vocab_size() <= text_config["vocab_size"]
    assert tok.token_to_id("<unk>") not in ids
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] == (variant in ADDS_BOS)
    if variant in ADDS_BOS:
        assert ids[0] == text_config["bos_token_id"] == tok.token_to_id(tok_config["bos_token"])
        assert len(ids) == len(TEXT.split()) + 1
    else:
        assert len(ids) == len(TEXT.split())
    assert tok.token_to_id(tok_config["eos_token"]) == text_config["eos_token_id"]
    assert tok.token_to_id(tok_config["pad_token"]) == text_config["pad_token_id"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_norm_weight_is_random(checkpoints, variant):
    with safe_open(str(checkpoints[variant] / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if ("norm" in n or ".ln_" in n) and not n.startswith("vision_tower")]
        assert names
        for name in names:
            w = f.get_tensor(name)
            assert w.std() > 0.1, name
            assert not torch.any(w == 0) and not torch.any(w == 1), name


def test_make_checkpoint_is_deterministic(tmp_path, checkpoints):
    again = make_checkpoint(tmp_path / "again", "qwen3")
    other = make_checkpoint(tmp_path / "other", "qwen3", seed=1)
    files = [str(p / "model.safetensors") for p in (checkpoints["qwen3"], again, other)]
    with safe_open(files[0], "pt") as a, safe_open(files[1], "pt") as b, safe_open(files[2], "pt") as c:
        assert all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.keys())
        assert not torch.equal(a.get_tensor("model.norm.weight"), c.get_tensor("model.norm.weight"))


def test_multimodal_names_its_text_weights_language_model(checkpoints):
    with safe_open(str(checkpoints["gemma3_multimodal"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(checkpoints["gemma3"] / "model.safetensors"), "pt") as f:
        text_names = set(f.keys())
    assert {"language_model." + n for n in text_names} <= names
    assert not any(n.startswith("model.") or n.startswith("lm_head") for n in names)


@pytest.mark.parametrize("variant", ["llama_gqa", "gemma3_multimodal"])
def test_bf16_checkpoint_writes_and_reloads(tmp_path, checkpoints, variant):
    folder = make_checkpoint(tmp_path / variant, variant, torch_dtype=torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    upcast = ref.load_transformers(folder)
    full = ref.load_transformers(checkpoints[variant])
    for (name, p), (_, q) in zip(upcast.named_parameters(), full.named_parameters(), strict=True):
        assert p.dtype == torch.float64
        assert torch.equal(p, q.to(torch.bfloat16).to(torch.float64)), name
    logits = _logits(ref.load_transformers(folder, dtype=torch.bfloat16), _ids(folder))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()

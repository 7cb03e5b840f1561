"""Saved results: a Linearization (affine, several layers, or the plain one) and a Spectrum (dense and
decoded, or matrix-free) come back from their safetensors file bit for bit, dtypes, shapes and what they
describe included, with the model, checkpoint and token strings recorded; files of another schema, model
checkpoints and files that are not safetensors are refused with an InputError naming what to do; a
file is written whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from eqlin.errors import InputError, OutputError, PrecisionError
from eqlin.linear_maps import Linearization, detached_jacobian, jacobian
from eqlin.model import checkpoint_identity
from eqlin.safetensors_io import SafetensorsFile, write_safetensors
from eqlin.persistence import LINEARIZATION_SCHEMA, SPECTRUM_SCHEMA, eqlin_version, saved_metadata
from eqlin.spectral import Spectrum, decode_spectrum, spectrum, top_singular
from tests.conftest import TEXT


def assert_same_arrays(a, b) -> None:
    """Equal bit for bit: dtype, shape and every bit of every value (-0.0 is not 0.0 here)."""
    chex.assert_trees_all_equal(a, b, strict=True)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def assert_same_linearization(saved: Linearization, loaded: Linearization) -> None:
    """The same pytree (what the map is: layer, part, scope, detach, tap), every array bit for bit."""
    chex.assert_trees_all_equal(saved, loaded, strict=True)
    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(loaded), strict=True):
        assert_same_arrays(a, b)


@pytest.mark.parametrize("variant, kwargs", [
    ("qwen2", dict(layer=[0, 1], part="attn")),  # affine: the constant is stored too
    ("gemma3", dict(layer=2, scope="single", tap="pre")),
    ("llama_gqa", dict()),
])
def test_a_linearization_round_trips_bit_for_bit(variant, kwargs, loaded, checkpoint, tmp_path):
    model = loaded(variant)
    lin = detached_jacobian(model, TEXT, **kwargs)
    path = lin.save(tmp_path / "map.safetensors", model)
    back = Linearization.load(path)
    assert_same_linearization(lin, back)
    assert float(back.relative_error.max()) <= 1e-14  # still the exact map
    meta = saved_metadata(path)
    assert meta["schema"] == LINEARIZATION_SCHEMA and meta["eqlin_version"] == eqlin_version()
    assert meta["dtype"] == "float64" and meta["tokens"] == model.token_strings(model.encode(TEXT))
    assert meta["model"] == {"source": model.source, "family": model.config.family,
                             "checkpoint": checkpoint_identity(model.source, checkpoint(variant))}
    assert meta["map"]["part"] == lin.part and meta["map"]["scope"] == lin.scope
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.safetensors"]  # no temporary file left


def test_the_plain_map_and_a_map_saved_without_a_model(loaded, tmp_path):
    plain = jacobian(loaded("olmo2"), TEXT)
    back = Linearization.load(plain.save(tmp_path / "plain.safetensors", checkpoint="sha256:given"))
    assert_same_linearization(plain, back)
    assert not back.detach
    meta = saved_metadata(tmp_path / "plain.safetensors")
    assert meta["model"] is None and meta["tokens"] is None


def test_a_spectrum_round_trips_with_its_decoded_tokens(loaded, tmp_path):
    model = loaded("gemma3")
    lin = detached_jacobian(model, TEXT, layer=[1, 3])
    for spec in (decode_spectrum(model, spectrum(lin, 3), top=2),
                 spectrum(lin.select(0), 2, per_token=False),
                 top_singular(model, TEXT, 2)):  # matrix-free: no Frobenius norm, no effective dimension
        back = Spectrum.load(spec.save(tmp_path / "spec.safetensors", model, checkpoint="sha256:given"))
        for field in dataclasses.fields(Spectrum):
            a, b = getattr(spec, field.name), getattr(back, field.name)
            if field.name == "effective":
                assert (a is None) == (b is None)
                for name in ("stable_rank", "participation_ratio", "rank_90", "rank_99") if a else ():
                    assert_same_arrays(getattr(a, name), getattr(b, name))
            elif field.name in ("left_tokens", "right_tokens"):
                assert (a is None) == (b is None)
                if a is not None:
                    assert_same_arrays(a.ids, b.ids)
                    assert_same_arrays(a.scores, b.scores)
                    assert a.tokens == b.tokens
            elif field.name in ("per_token", "method", "layer", "part", "scope", "detach"):
                assert a == b and type(a) is type(b), field.name
            elif a is None:
                assert b is None, field.name
            else:
                assert_same_arrays(a, b)
        assert saved_metadata(tmp_path / "spec.safetensors")["schema"] == SPECTRUM_SCHEMA


def test_other_files_are_refused_naming_what_to_do(loaded, checkpoint, tmp_path):
    model = loaded("llama_mha")
    lin = detached_jacobian(model, TEXT)
    spec_path = spectrum(lin, 2).save(tmp_path / "spec.safetensors")
    with pytest.raises(InputError, match="it holds a eqlin.spectrum/1: load it with eqlin.Spectrum.load"):
        Linearization.load(spec_path)
    with pytest.raises(InputError, match="it holds a eqlin.linearization/1: load it with eqlin.Linearization.load"):
        Spectrum.load(lin.save(tmp_path / "lin.safetensors"))
    weights = checkpoint("llama_mha") / "model.safetensors"
    with pytest.raises(InputError, match="its schema is None, not 'eqlin.linearization/1': it was not written by "
                                         "eqlin.Linearization.save"):
        Linearization.load(weights)
    (tmp_path / "notes.txt").write_text("not a tensor file")
    with pytest.raises(InputError, match="cannot load .*notes.txt as a saved eqlin result: .* is not a valid "
                                         "safetensors file"):
        Linearization.load(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="cannot load .*missing.safetensors as a saved eqlin result: cannot read"):
        Linearization.load(tmp_path / "missing.safetensors")
    data = (tmp_path / "lin.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(InputError, match="is truncated"):
        Linearization.load(tmp_path / "cut.safetensors")


def test_float64_is_never_rounded_silently(loaded, tmp_path):
    path = detached_jacobian(loaded("llama_mha"), TEXT).save(tmp_path / "lin.safetensors")
    with jax.enable_x64(False):
        with pytest.raises(PrecisionError, match="holds float64 arrays, which JAX narrows to 32 bits while its x64 mode is off"):
            Linearization.load(path)


def test_an_unwritable_path_is_an_output_error_and_writes_nothing(loaded, tmp_path):
    lin = detached_jacobian(loaded("llama_mha"), TEXT)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write .*file/lin.safetensors: .*; nothing was written there"):
        lin.save(tmp_path / "file" / "lin.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_saved_files_follow_the_umask(loaded, tmp_path):
    lin = detached_jacobian(loaded("llama_mha"), TEXT)
    old = os.umask(0o027)
    try:
        path = lin.save(tmp_path / "lin.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    assert json.loads(json.dumps(saved_metadata(path)))["map"]["tap"] == "post"


def _tampered(good, tmp_path, name, tensors=None, edit=None, eqlin_json=None):
    """A copy of the saved file `good` with some tensors replaced (None: removed) and/or its eqlin metadata
    edited (a function of the parsed JSON) or replaced (raw text)."""
    f = SafetensorsFile(good)
    arrays = {n: np.array(f.read(n)) for n in f.header}
    for n, a in (tensors or {}).items():
        arrays.pop(n) if a is None else arrays.__setitem__(n, a)
    meta = json.loads(f.metadata["eqlin"])
    text = eqlin_json if eqlin_json is not None else json.dumps(edit(meta) if edit else meta)
    write_safetensors(tmp_path / name, arrays, metadata={"schema": f.metadata["schema"], "eqlin": text})
    return tmp_path / name


def _map(**changes):
    return lambda meta: {**meta, "map": {**meta["map"], **changes}}


@pytest.mark.parametrize("tensors, edit, eqlin_json, message", [
    (None, None, "[]", "the eqlin metadata must be a JSON object, got list"),
    (None, None, "[" * 100_000 + "]" * 100_000, "its eqlin metadata is missing, not JSON or nested too deeply"),
    (None, lambda m: {"dtype": "float64"}, None, "the eqlin metadata field 'map' must be a JSON object, got NoneType"),
    (None, _map(scope="sideways"), None, r"map field 'scope' must be one of \('cumulative', 'single'\), got 'sideways'; "
                                   "it was changed after saving or not written by eqlin: save the result again"),
    (None, _map(layer={"x": 1}), None, r"map field 'layer' must be null, a layer index or a list of distinct ones, "
                                       r"got \{'x': 1\}"),
    (None, _map(detach="yes"), None, "map field 'detach' must be true or false, got 'yes'"),
    (None, _map(tap=None), None, r"map field 'tap' must be one of \('post', 'pre'\), got None"),
    (None, lambda m: {**m, "dtype": "float16"}, None, "the eqlin metadata field 'dtype' must be 'float32' or 'float64', got 'float16'"),
    (None, lambda m: {**m, "tokens": ["a"]}, None,
     "the eqlin metadata field 'tokens' must be null or one string per input token"),
    ({"jacobian": np.zeros((32, 7, 32))}, None, None,
     r"tensor 'contributions' has shape \(\d+, 32\), but the file's other arrays and map imply \(7, 32\)"),
    ({"jacobian": np.zeros((32, 4))}, None, None, r"tensor 'jacobian' has shape \(32, 4\), not \('d_out', 'T', 'd_in'\)"),
    ({"jacobian": np.ones((32, 4, 32), np.int8)}, None, None, "tensor 'jacobian' has dtype int8, not float64"),
    ({"output": np.zeros(32, np.float32)}, None, None, "tensor 'output' has dtype float32, not float64"),
    ({"ids": np.zeros(3)}, None, None, "tensor 'ids' has dtype float64, not integer"),
    ({"extra": np.zeros(3)}, None, None, "tensors extra are not part of this kind of result"),
])
def test_a_tampered_linearization_is_refused_naming_the_field(loaded, tmp_path, tensors, edit, eqlin_json, message):
    """Each once loaded silently as an inconsistent map, or failed with a TypeError, KeyError or RecursionError."""
    good = detached_jacobian(loaded("llama_mha"), TEXT).save(tmp_path / "good.safetensors", loaded("llama_mha"))
    path = _tampered(good, tmp_path, "bad.safetensors", tensors, edit, eqlin_json)
    with pytest.raises(InputError, match=f"cannot load {path}: {message}"):
        Linearization.load(path)
    if eqlin_json == "[]":  # saved_metadata reads the header alone, and refuses it too
        with pytest.raises(InputError, match=f"cannot load {path}: {message}"):
            saved_metadata(path)
    Linearization.load(good)


def test_a_tampered_spectrum_is_refused_naming_the_field(loaded, tmp_path):
    model = loaded("llama_mha")
    good = decode_spectrum(model, spectrum(detached_jacobian(model, TEXT, layer=[0, 1]), 3), top=2).save(
        tmp_path / "good.safetensors", model)
    f = SafetensorsFile(good)
    ids = np.array(f.read("left_tokens.ids"))
    for name, tensors, edit, message in [
        ("method", None, _map(method="magic"), "map field 'method' must be one of"),
        ("per_token", None, _map(per_token=False), r"tensor 'U' has shape \(2, \d+, 32, 3\), but the file's other "
                                                   r"arrays and map imply \(2, 32, 3\)"),
        ("layers", None, _map(layer=[0, 1, 2]), r"tensor 'V' has shape \(2, \d+, 32, 3\), not \(3, 'T', 'd_in', 'k'\)"),
        ("decoded", None, lambda m: {**m, "decoded": {**m["decoded"], "left_tokens": [["a"]]}},
         "the eqlin metadata field 'decoded.left_tokens' must hold one token string per id of left_tokens.ids"),
        ("pair", {"left_tokens.scores": None}, None, "tensors hold left_tokens.ids without its pair"),
        ("top", {"left_tokens.ids": ids[..., :1]}, None, "tensor 'left_tokens.scores' has shape"),
        ("effective", {"effective.rank_90": None}, None, "tensors hold only some fields of the effective dimension"),
    ]:
        path = _tampered(good, tmp_path, f"{name}.safetensors", tensors, edit)
        with pytest.raises(InputError, match=f"cannot load {path}: {message}"):
            Spectrum.load(path)
    Spectrum.load(good)

"""The storage of weights (eqlin.params): widening is exact, a derivative keeps the stored weights and never
float64 copies of them, and every engine computes from stored weights the maps of a float64 copy, bit for bit."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

import eqlin
from eqlin.linear_maps import cumulative_fn
from eqlin.params import BF16_BITS, storage_dtype, to_storage, widen
from tests.conftest import TEXT, relative
from tests.fixtures import make_checkpoint


@pytest.mark.parametrize("narrow", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_widening_is_exact_for_every_value(narrow):
    """Every 16-bit pattern, and float32's subnormals, infinities and a sample of normals (XLA's CPU convert
    flushes float32 subnormals to zero: `widen` must not), widen to float64 and float32 as numpy widens them."""
    if narrow == np.float32:
        bits = np.concatenate([np.arange(2**16), 0x7FFFFF - np.arange(2**10), [0x7F800000, 0xFF800000, 0x80000001],
                               np.random.default_rng(0).integers(0, 2**32, 2**16)]).astype(np.uint32)
    else:
        bits = np.arange(2**16, dtype=np.uint16)
    values = bits.view(narrow)
    held = to_storage(values)
    assert held.dtype == (BF16_BITS if narrow == ml_dtypes.bfloat16 else narrow)
    assert storage_dtype(held) == np.dtype(narrow)
    for dtype in (np.float64, np.float32):
        wide = np.asarray(jax.jit(lambda a: widen(a, dtype))(jnp.asarray(held)))
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(wide, values.astype(dtype))  # NaNs where the bits are NaNs
        np.testing.assert_array_equal(np.signbit(wide), np.signbit(values))  # −0 stays −0


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """(stored, cast) Models of one tiny bf16 Qwen 2 checkpoint (biases: every map has a constant)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("bf16") / "qwen2", "qwen2", torch_dtype=torch.bfloat16)
    return eqlin.load(folder), eqlin.load(folder, weights="cast")


def test_a_derivative_keeps_the_stored_weights_not_float64_copies(bf16_pair):
    """With the checkpointed layer body, the residuals of the linearized map are the bit-pattern stacks, the
    frozen coefficients (named) and small float64 vectors: no float64 array shaped like a weight matrix."""
    model = bf16_pair[0]
    x = model.embed(model.encode(TEXT))
    for fold in (False, True):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(cumulative_fn(model.params, model.config, None, "residual", True, fold=fold), x)
        lines = out.getvalue().splitlines()
        matrices = {a.shape[1:] for a in jax.tree_util.tree_leaves(model.params.layers) if a.ndim == 3}
        assert any(line.startswith("u16[") for line in lines), lines
        assert not [line for line in lines if "widen" in line], lines
        wide = [line for line in lines if line.startswith("f64[")]
        shapes = {tuple(int(n) for n in line[4:line.index("]")].split(",") if n) for line in wide
                  if "eqlin_fold" not in line}
        L = model.config.num_layers  # a copy is one layer's matrix or a stack; M_t (.., T, d, d) is not
        assert not [s for s in shapes if s[-2:] in matrices and (len(s) == 2 or len(s) == 3 and s[0] == L)], lines
        assert any("eqlin_frozen" in line for line in wide) and fold == any("eqlin_fold" in line for line in wide)


def test_every_engine_gives_the_maps_of_cast_weights_bit_for_bit(bf16_pair):
    kept, cast = bf16_pair
    ids = kept.encode(TEXT)

    def same(a, b, exact=True):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            if exact:
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
            else:
                assert relative(u, v) <= 1e-14

    # JAX 0.8 (the floor) compiles the vmapped batch and the generation loop of the two differently: last-bit
    # differences there (1.8e-15 absolute measured), so the same maps to float64 rounding; bit for bit on 0.10.
    newer = jax.__version_info__ >= (0, 10)

    for kwargs in ({"layer": [0, 1], "scope": "single", "mode": "rev"}, {"layer": "all", "part": "mlp", "mode": "fwd"}):
        a, b = eqlin.detached_jacobian(kept, ids, **kwargs), eqlin.detached_jacobian(cast, ids, **kwargs)
        same((a.jacobian, a.constant, a.relative_error), (b.jacobian, b.constant, b.relative_error))
    a, b = (eqlin.layer_spectra(m, ids, k=3, engine="rev") for m in (kept, cast))
    same([(s.singular_values, s.relative_error) for scope in a.maps.values() for s in scope.values()],
         [(s.singular_values, s.relative_error) for scope in b.maps.values() for s in scope.values()])
    same(eqlin.top_singular(kept, ids, 3).singular_values, eqlin.top_singular(cast, ids, 3).singular_values)
    prompts = [TEXT, TEXT.split()[0]]
    a, b = eqlin.detached_jacobians(kept, prompts), eqlin.detached_jacobians(cast, prompts)
    same((a.jacobian, a.constant), (b.jacobian, b.constant), exact=newer)
    a, b = (eqlin.steer(m, "Paris", TEXT, layer=1, strength=4.0, max_new_tokens=4) for m in (kept, cast))
    same((a.steered_logits, a.baseline_logits), (b.steered_logits, b.baseline_logits), exact=newer)

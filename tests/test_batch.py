"""Batched detached Jacobians: each prompt's map, equal or ragged lengths, equals its unbatched one and the
PyTorch reference's, and reconstructs its own output exactly (with its constant, for models with biases;
with its own longrope factors, for Phi's longrope)."""

from __future__ import annotations

import chex
import numpy as np
import pytest
import torch

from eqlin.batch import detached_jacobians
from eqlin.linear_maps import detached_jacobian
from eqlin import reference as ref
from tests.conftest import LONGROPE_TEXTS, TEXT, VS_TORCH, relative

EXACT = 1e-14  # measured at most 1.1e-15
EQUAL = ["The bridge out of Marin is the", "A small red boat crossed the"]
RAGGED = [TEXT, "The cat runs", "A small red boat crossed the bay"]


@pytest.mark.parametrize("prompts", [EQUAL, RAGGED], ids=["equal", "ragged"])
def test_each_prompt_equals_its_unbatched_map_and_pytorchs(prompts, loaded, reference):
    model = loaded("gemma3")
    batch = detached_jacobians(model, prompts)
    lengths = [len(model.encode(p)) for p in prompts]
    assert list(np.asarray(batch.lengths)) == lengths
    chex.assert_shape(batch.jacobian, (len(prompts), model.config.hidden_size, max(lengths), model.config.hidden_size))
    assert float(np.max(batch.relative_error)) <= EXACT
    for b, text in enumerate(prompts):
        single = detached_jacobian(model, text)
        J, x = batch.prompt(b)
        assert relative(J, single.jacobian) <= EXACT
        assert relative(batch.output[b], single.output) <= EXACT
        assert relative(np.einsum("otd,td->o", J, x), single.output) <= EXACT
        assert not np.any(np.asarray(batch.jacobian[b, :, lengths[b]:]))  # padding never reaches y_b
        expected = ref.final_jacobian(reference("gemma3"), torch.tensor(model.encode(text)))
        assert relative(J, expected) <= VS_TORCH


@pytest.mark.parametrize("variant, prompts", [("qwen2", RAGGED[:2]), ("phi3_longrope", list(LONGROPE_TEXTS))])
def test_ragged_prompts_keep_their_constants_and_their_rope(variant, prompts, loaded):
    """Qwen 2: each prompt's reconstruction is exact with its own constant c_b. phi3_longrope: padded to 20
    tokens, the 9-token prompt still takes the short factors (its own length picks them, as unbatched)."""
    model = loaded(variant)
    batch = detached_jacobians(model, prompts)
    assert float(np.max(batch.relative_error)) <= EXACT  # with each prompt's constant
    if variant == "qwen2":
        assert float(np.min(np.linalg.norm(batch.constant, axis=-1) / np.linalg.norm(batch.output, axis=-1))) > 0.1
        return
    b = int(np.argmin(np.asarray(batch.lengths)))  # the padded prompt
    single = detached_jacobian(model, prompts[b])
    assert relative(batch.output[b], single.output) <= EXACT
    assert relative(batch.prompt(b)[0], single.jacobian) <= EXACT
    np.testing.assert_allclose(batch.constant[b], single.constant, rtol=0,
                               atol=1e-13 * float(np.linalg.norm(single.output)))

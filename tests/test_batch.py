"""Batched detached Jacobians: each prompt's map, equal or ragged lengths, equals its unbatched one and the
PyTorch reference's, and reconstructs its own output exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqlin.batch import detached_jacobians
from eqlin.linear_maps import detached_jacobian
from tests import torch_reference as ref
from tests.conftest import TEXT, VS_TORCH, relative

EXACT = 1e-14  # measured at most 1.1e-15
EQUAL = ["The bridge out of Marin is the", "A small red boat crossed the"]
RAGGED = [TEXT, "The cat runs", "A small red boat crossed the bay"]


@pytest.mark.parametrize("prompts", [EQUAL, RAGGED], ids=["equal", "ragged"])
def test_each_prompt_equals_its_unbatched_map_and_pytorchs(prompts, loaded, reference):
    model = loaded("gemma3")
    batch = detached_jacobians(model, prompts)
    lengths = [len(model.encode(p)) for p in prompts]
    assert list(np.asarray(batch.lengths)) == lengths
    assert batch.jacobian.shape == (len(prompts), model.config.hidden_size, max(lengths), model.config.hidden_size)
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

"""Steered, KV-cached greedy generation: one step of it, in every family, against transformers' forward with the
vector added by a hook to the residual stream entering the layer (and against a hand-written forward doing the
same), and whole bucketed generations against naive recompute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqlin
from eqlin import steering
from eqlin.decoder import embed, final_norm, layer_slice, run_layers, unembed
from eqlin.generation import bucket, generate
from eqlin.steering import concept_maps, steer
from eqlin import reference as ref
from tests.conftest import VS_TORCH, relative
from tests.test_steering import CONCEPT, TEXT


def hand_directions(J: np.ndarray, x: np.ndarray) -> np.ndarray:
    """S_k / ‖S_k‖ with S_k = Σ_{j≤k} J[:, j mod T_c, :] x_j, written as a loop."""
    S, out = np.zeros(J.shape[0]), []
    for k in range(x.shape[0]):
        S = S + J[:, k % J.shape[1], :] @ x[k]
        n = np.linalg.norm(S)
        out.append(S / n if n > 0 else 0 * S)
    return np.stack(out)


def hand_logits(model: eqlin.Model, ids: np.ndarray, J: np.ndarray, layer: int, strength: float) -> np.ndarray:
    """run_layers(first `layer` layers) + v + run_layers(the rest) + final norm + unembed, last position."""
    p, c = model.params, model.config
    x = embed(p, c, jnp.asarray(ids))
    h = run_layers(layer_slice(p.layers, 0, layer), c, x, detach=False)[0] if layer else x
    h = h + strength / 2 * jnp.linalg.norm(h, axis=-1, keepdims=True) * hand_directions(J, np.asarray(x))
    h, _ = run_layers(layer_slice(p.layers, layer, c.num_layers), c, h, detach=False, first_layer=layer)
    return np.asarray(unembed(p, c, final_norm(p, c, h[-1], detach=False)))


def concept_map(model: eqlin.Model, layer: int) -> np.ndarray:
    """J_c (d, T_c, d) of CONCEPT at `layer`."""
    x = embed(model.params, model.config, jnp.asarray(model.encode(CONCEPT)))
    return np.asarray(concept_maps(model.params, model.config, x, layers=(layer,))[0][0])


@pytest.mark.parametrize("variant, layer", [("gemma3", 0), ("gemma3", 2), ("gemma3", 3), ("qwen3", 1),
                                            ("mistral", 1), ("phi3", 1), ("olmo2", 1), ("qwen2", 1),
                                            ("gpt2", 1)])
def test_injection_equals_pytorch_and_the_hand_written_forward(loaded, reference, variant, layer):
    """One step of the KV-cached generation (every family's attention details) against transformers' forward with
    the vector added by a hook to the residual stream entering `layer`, the vector built from PyTorch's own
    concept map and text embeddings; and against eqlin's hand-written forward doing the same."""
    model = loaded(variant)
    J = concept_map(model, layer)
    ids = model.encode(TEXT)
    buf = np.zeros(bucket(len(ids) + 1), np.int32)
    buf[:len(ids)] = ids
    _, logits = generate(model.params, model.config, jnp.asarray(buf), jnp.int32(len(ids)), jnp.asarray(J),
                         jnp.int32(layer), jnp.asarray(3.0), max_new_tokens=1)
    got = logits[0]  # one step of the KV-cached, steered generation
    want = hand_logits(model, ids, J, layer, 3.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-14)  # logits of size ~1: measured at most 5.6e-15
    assert np.abs(want - hand_logits(model, ids, J, layer, 0.0)).max() > 1e-3  # the injection does something
    if model.config.has_biases:  # the concept's map is affine, exact with its constant; J_c alone is applied
        assert float(steering._maps(model, model.encode(CONCEPT), (layer,))[1][0]) <= 1e-13
    torch_model = reference(variant)
    J_torch, _ = ref.stream_entering(torch_model, torch.tensor(model.encode(CONCEPT)), layer)
    directions = torch.tensor(hand_directions(J_torch, ref.embed(torch_model, torch.tensor(ids)).detach().numpy()))

    def added(h: torch.Tensor) -> torch.Tensor:  # h (T, d): the stream entering the layer
        return 3.0 / 2 * h.norm(dim=-1, keepdim=True) * directions

    assert relative(got, ref.logits_with_added(torch_model, torch.tensor(ids), layer, added)) <= VS_TORCH


def test_cached_generation_equals_naive_recompute(loaded):
    model = loaded("gemma3")
    layer, strength, n = 2, 4.0, 6
    r = steer(model, CONCEPT, TEXT, layer=layer, strength=strength, max_new_tokens=n)
    J = concept_map(model, layer)
    ids = list(model.encode(TEXT))
    for step in range(n):  # full recompute on the unpadded sequence, one length at a time
        logits = hand_logits(model, np.asarray(ids), J, layer, strength)
        np.testing.assert_allclose(r.steered_logits[step], logits, rtol=0, atol=5e-14)  # measured <= 3.6e-15
        ids.append(int(np.argmax(logits)))
    np.testing.assert_array_equal(r.steered_ids, ids[-n:])
    assert r.steered_text == model.decode(ids[-n:]) and r.map_relative_error <= 1e-14
    lp = jax.nn.log_softmax(jnp.asarray(r.steered_logits))[:, r.concept_tokens]
    np.testing.assert_allclose(r.steered_logprobs, lp)
    assert r.concept_tokens.tolist() == model.encode(CONCEPT)[-1:].tolist()

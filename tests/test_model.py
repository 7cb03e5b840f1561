"""The Model wrapper: tokenization with the family's BOS convention, and bad inputs refused early."""

from __future__ import annotations

import chex
import numpy as np
import pytest

import eqlin
from tests.conftest import TEXT


@pytest.mark.parametrize("variant, adds_bos", [("llama_mha", True), ("gemma3", True), ("qwen3", False)])
def test_bos_follows_the_tokenizer(variant, adds_bos, loaded):
    model = loaded(variant)
    ids = model.encode(TEXT)
    assert (ids[0] == model.tokenizer.inner.token_to_id("<bos>")) == adds_bos
    assert len(ids) == len(TEXT.split()) + adds_bos
    assert model.decode(ids[adds_bos:]) == TEXT


def test_embed_is_scaled_for_gemma(loaded):
    model = loaded("gemma3")
    ids = model.encode(TEXT)
    np.testing.assert_allclose(model.embed(ids), np.asarray(model.params.embed)[ids] * np.sqrt(48), rtol=1e-15)
    llama = loaded("llama_mha")
    np.testing.assert_array_equal(llama.embed(llama.encode(TEXT)), np.asarray(llama.params.embed)[llama.encode(TEXT)])


def test_logits_shape(loaded):
    model = loaded("llama_gqa")
    chex.assert_shape(model.logits(TEXT), (len(model.encode(TEXT)), model.config.vocab_size))


def test_empty_text(loaded):
    with pytest.raises(eqlin.InputError, match="empty text: give at least one character"):
        loaded("llama_mha").encode("")


def test_empty_ids(loaded):
    with pytest.raises(eqlin.InputError, match="empty input: give at least one token"):
        loaded("llama_mha").logits(np.array([], dtype=np.int32))


def test_ids_outside_the_vocabulary(loaded):
    with pytest.raises(eqlin.InputError, match=r"token ids outside the vocabulary \[0, 96\): \[-1, 96\]"):
        loaded("llama_mha").logits([1, 96, -1])


def test_ids_must_be_one_dimensional_integers(loaded):
    with pytest.raises(eqlin.InputError, match=r"token ids must be a 1-D integer sequence, got shape \(1, 2\)"):
        loaded("llama_mha").logits([[1, 2]])
    with pytest.raises(eqlin.InputError,
                       match=r"token ids must be a 1-D integer sequence, got shape \(2,\) dtype float"):
        loaded("llama_mha").logits([1.5, 2.0])


def test_too_long_for_the_context(loaded):
    model = loaded("llama_mha")
    with pytest.raises(eqlin.InputError,
                       match=r"65 tokens, more than the model's max_position_embeddings \(64\); shorten the text"):
        model.logits(np.ones(65, dtype=np.int32))

"""Tokenizer files: malformed special tokens and flags are refused (never a silently missing BOS), and
text that is not valid Unicode is refused with a message."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from eqlin.errors import InputError, WeightsError
from eqlin.tokenizer import NORMALIZATION_SHRINK, Tokenizer, check_text


@pytest.mark.parametrize("change, message", [
    ({"bos_token": 2}, "bos_token must be a token string .*got 2; fix tokenizer_config.json"),
    ({"bos_token": ["<bos>"]}, r"bos_token must be a token string .*got \['<bos>'\]"),
    ({"bos_token": {"content": 7}}, "bos_token must be a token string"),
    ({"add_bos_token": "yes"}, "add_bos_token must be true or false, got 'yes'"),
    ({"bos_token": "<nowhere>"}, "sets add_bos_token but its bos_token '<nowhere>' is not in tokenizer.json's"),
])
def test_bad_tokenizer_config(checkpoint, tmp_path, change, message):
    folder = shutil.copytree(checkpoint("llama_mha"), tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(WeightsError, match=message):
        Tokenizer.from_folder(folder)


def test_tokenizer_config_must_be_an_object_and_tokenizer_json_readable(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint("llama_mha"), tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="tokenizer_config.json must hold a JSON object .*got a list"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(WeightsError, match="tokenizer.json could not be read as a tokenizer"):
        Tokenizer.from_folder(folder)


def test_text_that_is_not_unicode():
    assert check_text("naïve café") == "naïve café"
    with pytest.raises(InputError, match="TEXT is not valid UTF-8 \\(an undecodable byte at character 3\\)"):
        check_text("abc\udcff", "TEXT")  # how Python hands over the command-line byte 0xff
    with pytest.raises(InputError, match="text must be a string, got bytes"):
        check_text(b"abc")


class _Counting:
    """The real tokenizer, counting its encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def get_vocab(self, **kwargs):
        return self.inner.get_vocab(**kwargs)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_a_text_too_long_to_fit_is_refused_by_its_length_before_tokenizing(checkpoint, family):
    """Issue 29, item 12: a prompt was tokenized whole before its length was checked, at ~100 bytes of memory per
    character (a 200 MB line was OOM-killed). The bound never refuses a text that fits: no token decodes to more
    characters than the longest vocabulary entry."""
    tok = Tokenizer.from_folder(checkpoint(family))
    vocab = tok.inner.get_vocab(with_added_tokens=True)
    limit, longest = tok.text_limit(64)
    assert longest == max(map(len, vocab)) and limit == 64 * longest * NORMALIZATION_SHRINK
    assert max(len(t) for t in tok.token_strings(range(tok.inner.get_vocab_size()))) <= longest
    counting = dataclasses.replace(tok, inner=_Counting(tok.inner))
    with pytest.raises(InputError, match=rf"the text has {limit + 1:,} characters, more than any text that fits the "
                                         rf"model's 64 positions can have \(this tokenizer's longest token is {longest} "
                                         rf"characters, so at most {limit:,}\); shorten it"):
        counting.encode("a" * (limit + 1), 64)
    assert counting.inner.calls == 0
    assert len(counting.encode("a" * limit, 64)) >= 1 and counting.inner.calls == 1  # tokenized: the tokens decide
    assert len(counting.encode("a" * (limit + 1))) >= 1  # no bound without a context length

"""Tokenizer files: malformed special tokens and flags are refused (never a silently missing BOS), and
text that is not valid Unicode is refused with a message."""

from __future__ import annotations

import json
import shutil

import pytest

from eqlin.errors import InputError, WeightsError
from eqlin.tokenizer import Tokenizer, check_text


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

"""Tokenizer from a checkpoint's tokenizer.json, with BOS as the tokenizer's own config says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tokenizers

from eqlin.errors import InputError, WeightsError
from eqlin.loading import read_json

NORMALIZATION_SHRINK = 4  # Unicode normalization (NFC, NFKC) composes at most this many characters into one (ᾯ: 4)


def check_text(text: object, what: str = "text") -> str:
    """`text` as a non-empty string of valid Unicode (command-line bytes that are not UTF-8 arrive as
    lone surrogates), else an InputError naming the offending position."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if not text:
        raise InputError(f"empty {what}: give at least one character to tokenize")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 (an undecodable byte at character {e.start}); pass UTF-8 "
                         "text") from None
    return text


def _token(cfg: dict, key: str, path: Path) -> str | None:
    """A special token of tokenizer_config.json: a string, {"content": string} or null."""
    value = cfg.get(key)
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise WeightsError(f"{path}: {key} must be a token string (or {{\"content\": string}}), got {value!r:.60}; "
                           "fix tokenizer_config.json")
    return content


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Wraps `tokenizers.Tokenizer`. The post-processor in tokenizer.json adds BOS where the model
    expects it (Gemma, Llama); `add_bos_token` in tokenizer_config.json is honoured if it does not."""

    inner: tokenizers.Tokenizer
    bos_token_id: int | None
    add_bos: bool

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"missing tokenizer.json in {folder}; copy the model's tokenizer.json there (`hf "
                               "download ORG/NAME tokenizer.json`), or pass token ids instead of text")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for unreadable files
            raise WeightsError(f"{path} could not be read as a tokenizer ({e}); replace it") from None
        config_path = folder / "tokenizer_config.json"
        return cls.from_parts(inner, read_json(config_path) if config_path.is_file() else {}, config_path)

    @classmethod
    def from_parts(cls, inner: tokenizers.Tokenizer, cfg: dict, config_path: Path) -> Tokenizer:
        """A Tokenizer from the library's tokenizer and tokenizer_config.json's content `cfg` (read from
        `config_path`, named in errors)."""
        bos = _token(cfg, "bos_token", config_path)
        add_bos = cfg.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise WeightsError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r:.60}; fix "
                               "tokenizer_config.json")
        bos_id = inner.token_to_id(bos) if bos else None
        if add_bos and bos_id is None:
            raise WeightsError(f"{config_path} sets add_bos_token but its bos_token {bos!r} is not in tokenizer.json's "
                               "vocabulary; fix bos_token (or add_bos_token) in tokenizer_config.json")
        return cls(inner, bos_id, add_bos)

    def text_limit(self, max_tokens: int) -> tuple[int, int]:
        """(the most characters a text that makes at most `max_tokens` tokens can have, the longest vocabulary
        entry's characters L): max_tokens · L · NORMALIZATION_SHRINK. A token covers at most L characters of
        the normalized text (a byte-level vocabulary's entries are bytes, at least as many as the characters
        they spell; added tokens are matched literally), and normalization shrinks a text at most
        NORMALIZATION_SHRINK-fold. (A vocabulary fusing unknown characters into one token would break the
        bound; none of the supported families has one.)"""
        longest = max(map(len, self.inner.get_vocab(with_added_tokens=True)), default=1)
        return max_tokens * longest * NORMALIZATION_SHRINK, longest

    def check_size(self, text: str, max_tokens: int) -> None:
        """InputError if `text` is too long to make at most `max_tokens` tokens (`text_limit`), decided from
        its length alone: tokenizing takes about 100 bytes of memory per character."""
        if len(text) <= NORMALIZATION_SHRINK * max_tokens:  # within the limit whatever the vocabulary
            return
        limit, longest = self.text_limit(max_tokens)
        if len(text) > limit:
            raise InputError(f"the text has {len(text):,} characters, more than any text that fits the model's "
                             f"{max_tokens:,} positions can have (this tokenizer's longest token is {longest} "
                             f"characters, so at most {limit:,}); shorten it")

    def encode(self, text: str, max_tokens: int | None = None) -> np.ndarray:
        """Token ids (T,) for `text`, BOS included where the tokenizer adds one; with `max_tokens`, a text
        too long to fit is refused by its length before it is tokenized (`check_size`)."""
        check_text(text)
        if max_tokens is not None:
            self.check_size(text, max_tokens)
        ids = self.inner.encode(text, add_special_tokens=True).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        if not ids:
            raise InputError(f"text {text!r} produced no tokens")
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.inner.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        """Each id decoded on its own (for labelling per-token results)."""
        return [self.inner.decode([int(i)], skip_special_tokens=False) for i in np.asarray(ids).reshape(-1)]

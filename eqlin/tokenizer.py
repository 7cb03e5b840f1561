"""Tokenizer from a checkpoint's tokenizer.json, with BOS as the tokenizer's own config says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tokenizers

from eqlin.errors import InputError, WeightsError
from eqlin.loading import read_json


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
            raise WeightsError(f"missing tokenizer.json in {folder}")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for unreadable files
            raise WeightsError(f"{path} could not be read as a tokenizer ({e})") from None
        cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = inner.token_to_id(bos) if bos else None
        return cls(inner, bos_id, bool(cfg.get("add_bos_token", False)) and bos_id is not None)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) for `text`, BOS included where the tokenizer adds one."""
        if not isinstance(text, str) or not text:
            raise InputError("empty text: give at least one character to tokenize")
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

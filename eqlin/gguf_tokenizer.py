"""The tokenizer of a GGUF file, rebuilt from the vocabulary in its metadata the way transformers' GGUF
loader rebuilds it: Gemma's sentencepiece vocabulary as a byte-fallback BPE (merges regenerated from the
vocabulary), byte-level BPEs (Llama 3, Qwen 2, Qwen 3) from their tokens, merges and pre-tokenizer name.
`eqlin.gguf` writes the result as tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from eqlin.errors import ConfigError, WeightsError

# Pre-tokenizer splits of the byte-level vocabularies eqlin's families use (as transformers spells them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                      "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_from_metadata(arch: str, meta: dict[str, Any], path: Path
                            ) -> tuple[tokenizers.Tokenizer, dict[str, Any]] | None:
    """The tokenizer described by the metadata of the GGUF file `path` (architecture `arch`) and its
    tokenizer_config.json; None if the file carries no vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    if kind == "llama" and arch == "gemma3":
        tok, vocab = _gemma_tokenizer(tokens)
        byte_level = False
    elif kind == "gpt2":
        tok, vocab = _byte_level_tokenizer(meta, path)
        byte_level = True
    else:
        raise ConfigError(
            f"{path.name}: tokenizer model {kind!r} for architecture {arch!r} is not supported; eqlin rebuilds "
            "'llama' (sentencepiece) vocabularies for gemma3 and 'gpt2' (byte-level BPE) ones for llama, qwen2 and "
            "qwen3"
        )

    # Control tokens are special; user-defined ones are matched whole but are not special.
    alphabet = set(_bytes_to_unicode().values())
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, token_types)
               if k == _CONTROL and (not byte_level or set(t) <= alphabet)]
    tok.add_special_tokens(control)
    known = set(vocab) | {t.content for t in control}
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, token_types)
                    if k == _USER_DEFINED and t in known])

    def role(id_key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{id_key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    bos, eos = role("bos_token_id"), role("eos_token_id")
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(bos, meta["tokenizer.ggml.bos_token_id"])] if add_bos else []
    special += [(eos, meta["tokenizer.ggml.eos_token_id"])] if add_eos else []
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": role("unknown_token_id"),
        "pad_token": role("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": meta.get(f"{arch}.context_length"),
        "clean_up_tokenization_spaces": False,
    }
    return tok, tokenizer_config


def _gemma_tokenizer(tokens: list[str]) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """Gemma's sentencepiece vocabulary as a BPE with byte fallback (transformers' GemmaTokenizer).

    Two repairs, as transformers makes them: tokens made of 2+ spaces are stored as real spaces but
    looked up as "▁▁…", so they are respelled; and the file has no merges, so they are rebuilt from
    the vocabulary with the file order (not the scores) as the merge priority.
    """
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    priority = {t: -i for i, t in enumerate(tokens)}
    model = models.BPE(vocab=vocab, merges=_merges_from_vocab(vocab, priority), fuse_unk=True, unk_token="<unk>",
                       dropout=None, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok, vocab


def _merges_from_vocab(vocab: dict[str, int], priority: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best first: by the token's priority (higher first), then
    longer left part, then longer right part (transformers' `generate_merges`, same tie order)."""
    merges = []
    for token, score in priority.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_tokenizer(meta: dict[str, Any], path: Path) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """A byte-level BPE (Llama 3, Qwen 2, Qwen 3) from the file's tokens and merges, with the pre-tokenizer
    split its `tokenizer.ggml.pre` names."""
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _BYTE_LEVEL_SPLITS:
        raise ConfigError(
            f"{path.name}: byte-level pre-tokenizer {pre!r} is not supported; "
            f"supported: {', '.join(_BYTE_LEVEL_SPLITS)}"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise WeightsError(f"{path.name}: a byte-level (gpt2) vocabulary without tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                          end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


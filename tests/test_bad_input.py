"""Fuzzing the checkpoint files: malformed config.json, tokenizer files and safetensors headers, generated
from a fixed seed (a bounded number of cases, a few seconds), must each end in exit code 2 with an
`eqlin: error:` message, never a traceback (in-process, any other exception fails the test) and never a
silent success.

Every mutation is chosen to be invalid whatever it hits: poison values that no config key accepts (NaN,
-1, a string, nested lists, an object with an unknown key), unknown keys, required keys removed,
truncated files, and safetensors headers whose layout can no longer tile the data section.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time

import pytest

from eqlin.cli import EXIT_BAD_INPUT, main
from eqlin.families import spec_for

CASES = 40  # per file kind
POISON = (float("nan"), float("inf"), -1, "x", [[]], {"__fuzz__": [1]})
REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")


def _config_cases(config: dict, rng: random.Random) -> list[str]:
    """config.json texts, each invalid."""
    handled = sorted(k for k in config if k in spec_for(config).handled_keys)
    cases = []
    for _ in range(CASES):
        c = json.loads(json.dumps(config))
        kind = rng.choice(["poison", "poison", "nested", "unknown", "remove", "truncate", "wrap"])
        if kind == "poison":
            c[rng.choice(handled)] = rng.choice(POISON)
        elif kind == "nested":
            c["rope_parameters"][rng.choice(sorted(c["rope_parameters"]))] = rng.choice(POISON)
        elif kind == "unknown":
            c[f"fuzz_{rng.randrange(10**6)}"] = rng.choice(POISON + (0, True, None, "default"))
        elif kind == "remove":
            del c[rng.choice(REQUIRED)]
        text = json.dumps(c)
        if kind == "truncate":
            text = text[:rng.randrange(1, len(text) - 1)]
        elif kind == "wrap":
            depth = rng.choice([1, 2, 50_000])
            text = "[" * depth + text + "]" * depth
        cases.append(text)
    return cases


def _tokenizer_cases(tokenizer_config: dict, tokenizer_json: str, rng: random.Random) -> list[tuple[str, str]]:
    """(tokenizer_config.json, tokenizer.json) texts, each pair invalid."""
    cases = []
    for _ in range(CASES):
        cfg, tok = dict(tokenizer_config), tokenizer_json
        kind = rng.choice(["bos", "add_bos", "config_text", "tokenizer_text"])
        if kind == "bos":
            cfg["bos_token"] = rng.choice([2, [cfg["bos_token"]], {"content": 7}, float("nan"), "<not-a-token>"])
        elif kind == "add_bos":
            cfg["add_bos_token"] = rng.choice(["true", 1, None, [True]])
        cfg_text = json.dumps(cfg)
        if kind == "config_text":
            cfg_text = rng.choice([cfg_text[:rng.randrange(1, len(cfg_text) - 1)], "[" + cfg_text + "]", "null"])
        elif kind == "tokenizer_text":
            tok = rng.choice([tok[:rng.randrange(1, len(tok) - 1)], "{}", '{"model": 5}'])
        cases.append((cfg_text, tok))
    return cases


def _header_cases(data: bytes, rng: random.Random) -> list[bytes]:
    """model.safetensors files with the same data section and a damaged header, each invalid."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    cases = []
    for _ in range(CASES):
        h = json.loads(json.dumps(header))
        entry = h[rng.choice(names)]
        begin, end = entry["data_offsets"]
        kind = rng.choice(["negative", "length", "shift", "shape", "dtype", "drop_key", "not_object", "list",
                           "length_field", "garbage"])
        if kind == "negative":
            entry["data_offsets"] = [-rng.randrange(1, 10**6), end]
        elif kind == "length":
            entry["data_offsets"] = [begin, end + rng.choice([-4, 4, 8])]
        elif kind == "shift":
            entry["data_offsets"] = [begin + 4, end + 4]
        elif kind == "shape":
            entry["shape"] = rng.choice([[entry["shape"][0] + 1, *entry["shape"][1:]], [-1], ["2"], 5, [1.5]])
        elif kind == "dtype":
            entry["dtype"] = rng.choice(["F16" if entry["dtype"] != "F16" else "F64", "Q4_K", 3, None])
        elif kind == "drop_key":
            del entry[rng.choice(["dtype", "shape", "data_offsets"])]
        elif kind == "not_object":
            h[rng.choice(names)] = rng.choice([[1, 2], "x", None])
        raw = json.dumps(list(h.values()) if kind == "list" else h).encode()
        length = len(raw) + (rng.choice([1, 10**9, 2**63]) if kind == "length_field" else 0)
        if kind == "garbage":
            raw = bytes(rng.randrange(256) for _ in range(64))
            length = len(raw)
        cases.append(struct.pack("<Q", length) + raw + body)
    return cases


def _refused(folder, capsys) -> str:
    code = main(["info", str(folder), "-q", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("eqlin: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("variant", ["llama_gqa", "gemma3"])
def test_fuzzed_checkpoint_files_exit_2_with_a_message(checkpoint, tmp_path, capsys, variant):
    rng = random.Random(f"eqlin-{variant}")
    folder = shutil.copytree(checkpoint(variant), tmp_path / "m")
    original = {name: (folder / name).read_bytes() for name in
                ("config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors")}
    capsys.readouterr()  # the fixture's own output
    start = time.perf_counter()
    for text in _config_cases(json.loads(original["config.json"]), rng):
        (folder / "config.json").write_text(text)
        _refused(folder, capsys)
    (folder / "config.json").write_bytes(original["config.json"])
    for cfg, tok in _tokenizer_cases(json.loads(original["tokenizer_config.json"]),
                                     original["tokenizer.json"].decode(), rng):
        (folder / "tokenizer_config.json").write_text(cfg)
        (folder / "tokenizer.json").write_text(tok)
        _refused(folder, capsys)
    (folder / "tokenizer_config.json").write_bytes(original["tokenizer_config.json"])
    (folder / "tokenizer.json").write_bytes(original["tokenizer.json"])
    for data in _header_cases(original["model.safetensors"], rng):
        (folder / "model.safetensors").write_bytes(data)
        assert "model.safetensors" in _refused(folder, capsys)
    assert time.perf_counter() - start < 60  # bounded: 3 × 40 cases take a few seconds

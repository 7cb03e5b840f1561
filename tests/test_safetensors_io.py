"""Safetensors headers are checked as strictly as the `safetensors` library checks them: a crafted or
damaged header never turns header bytes or garbage into weights."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from eqlin.errors import WeightsError
from eqlin.safetensors_io import SafetensorsFile, write_safetensors


def _file(tmp_path, header, data: bytes = b"") -> object:
    """A safetensors file with this header (a dict, or any JSON) and data section."""
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good() -> dict:
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("change, message", [
    (lambda h: h["a"].update(data_offsets=[-8, 0]), r"'a' has data_offsets \[-8, 0\], not \[begin, end\]"),
    (lambda h: h["a"].update(data_offsets=[8, 0]), r"'a' has data_offsets \[8, 0\]"),
    (lambda h: h["a"].update(data_offsets=[0, 4]), r"'a' has 4 bytes for shape \(2,\) of F32, which needs 8"),
    (lambda h: h["b"].update(data_offsets=[4, 8]), "starts at data byte 4, but the previous tensor ends at 8"),
    (lambda h: h["a"].update(shape=[2.0]), "not a list of non-negative integers"),
    (lambda h: h["a"].update(shape=[-2]), "not a list of non-negative integers"),
    (lambda h: h["a"].pop("dtype"), "'a' must be an object with dtype, shape and data_offsets"),
    (lambda h: h.update(a=[1, 2]), "'a' must be an object with dtype, shape and data_offsets"),
    (lambda h: h["a"].update(dtype="F8_E9"), "unsupported dtype 'F8_E9'"),
    (lambda h: h.update(__metadata__=[1]), "__metadata__ must map names to strings"),
    (lambda h: h.pop("b"), "4 bytes after the last tensor"),
])
def test_malformed_headers_are_refused_as_safetensors_refuses_them(tmp_path, change, message):
    header = _good()
    change(header)
    path = _file(tmp_path, header, bytes(12))
    with pytest.raises(WeightsError, match=message):
        SafetensorsFile(path)
    with pytest.raises(Exception):  # the reference library refuses the same file
        with safe_open(str(path), "np") as f:
            [f.get_tensor(k) for k in f.keys()]


@pytest.mark.parametrize("header, data, message", [
    ([1, 2], b"", "its header is a JSON list, not an object"),
    ("[[[[" * 2000, b"", "its header is not valid JSON"),
    (_good(), bytes(11), r"is truncated: tensor 'b' ends at byte"),
])
def test_unusable_headers_and_truncation(tmp_path, header, data, message):
    path = _file(tmp_path, header, data)
    if isinstance(header, str):  # raw text, not JSON-encoded
        raw = header.encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(WeightsError, match=message):
        SafetensorsFile(path)


def test_a_short_file_and_a_huge_header_length(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="less than the 8-byte header length"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(WeightsError, match="header length 1152921504606846976 exceeds the file size 10"):
        SafetensorsFile(path)


def test_round_trip_with_an_empty_tensor_and_no_debris(tmp_path):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(f.read("w"), tensors["w"])
    assert f.read("empty").shape == (0, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]

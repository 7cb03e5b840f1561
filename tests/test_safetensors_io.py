"""Safetensors headers are checked as strictly as the `safetensors` library checks them: a crafted or
damaged header never turns header bytes or garbage into weights."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
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
    for n, why in ((2**60, f"header length {2**60} exceeds the file size 10"),
                   (2**62, f"header length {2**62} exceeds the file size 10")):  # once wrapped in "not valid JSON"
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        with pytest.raises(WeightsError) as refused:
            SafetensorsFile(path)
        assert str(refused.value) == f"{path} is not a valid safetensors file ({why}); re-download or re-convert it"
    path.write_bytes(struct.pack("<Q", 100_000_001))
    os.truncate(path, 8 + 100_000_001)  # sparse: takes no disk
    with pytest.raises(WeightsError, match=r"\(header length 100000001 exceeds the limit of 100000000 bytes\)"):
        SafetensorsFile(path)


def test_a_fifo_or_a_missing_file_is_refused_before_it_is_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening it would block until a writer came
    with pytest.raises(WeightsError, match="pipe.safetensors: it is a FIFO \\(named pipe\\), not a safetensors file; "
                                           "pass the path of an existing .safetensors file"):
        SafetensorsFile(tmp_path / "pipe.safetensors")
    with pytest.raises(WeightsError, match="gone.safetensors: no such file; pass the path of an existing"):
        SafetensorsFile(tmp_path / "gone.safetensors")


def test_written_files_are_read_by_the_safetensors_library(tmp_path):
    """write_safetensors writes the format itself (so that a full disk is an OSError, see test_convert.py):
    every dtype eqlin writes, big-endian input, 0-d and empty tensors and metadata come back from the
    reference library as given; the file gets the umask's mode and the header is padded to 8 bytes."""
    tensors = {"f64": np.arange(6.0).reshape(2, 3).T, "big": np.arange(3, dtype=">f4"), "scalar": np.float64(2.5),
               "bf16": np.arange(4).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 4), np.float32),
               "i64": np.arange(3, dtype=np.int64)}
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        for name, value in tensors.items():
            back = f.get_tensor(name)
            assert back.shape == np.shape(value) and back.dtype == np.asarray(value).dtype.newbyteorder("=")
            np.testing.assert_array_equal(back.astype(np.float64), np.asarray(value).astype(np.float64))
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_round_trip_with_an_empty_tensor_and_no_debris(tmp_path):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "m.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(f.read("w"), tensors["w"])
    assert f.read("empty").shape == (0, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    into = np.full((2, 3), 7, np.uint32)  # read_into: plain reads into an array of the same item size
    f.read_into("w", into)
    np.testing.assert_array_equal(into.view(np.float32), tensors["w"])
    f.read_into("empty", np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match=r"'w' is float32 \(2, 3\), got an array float64 \(2, 3\)"):
        f.read_into("w", np.zeros((2, 3)))

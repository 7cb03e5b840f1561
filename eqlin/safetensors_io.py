"""Reading safetensors files without unpickling anything, with clear errors for corrupt files.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then raw little-endian tensor bytes. Reading it directly (memory-mapped)
gives bfloat16 through `ml_dtypes`. The header is checked as strictly as the `safetensors` library
checks it: every entry well-formed, offsets non-negative and increasing, each tensor's byte length equal
to shape × item size, and the tensors covering the data section exactly, so that neither a truncated
download nor a crafted header can turn header bytes or garbage into weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NoReturn

import ml_dtypes
import numpy as np

from eqlin.errors import WeightsError
from eqlin.outputs import temp_path
from eqlin.paths import file_kind

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header size


class SafetensorsFile:
    """Lazily read tensors of one .safetensors file. `header` maps name -> (dtype, shape); `metadata` is the
    header's `__metadata__` (names to strings; {} where absent)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():  # never open a FIFO or a device: the open or the read could block forever
            kind = file_kind(self.path)
            raise WeightsError(f"cannot read {self.path}: " + ("no such file" if kind == "missing" else
                                                                f"it is {kind}, not a safetensors file")
                               + "; pass the path of an existing .safetensors file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    self._corrupt(f"{size} bytes, less than the 8-byte header length")
                (n,) = struct.unpack("<Q", prefix)
                text = f.read(n) if n <= min(size - 8, _MAX_HEADER) else None
        except OSError as e:
            raise WeightsError(f"cannot read {self.path}: {e.strerror or e} (make it readable); re-download or "
                               "re-convert it") from None
        if text is None:
            self._corrupt(f"header length {n} exceeds the file size {size}" if n > size - 8
                          else f"header length {n} exceeds the limit of {_MAX_HEADER} bytes")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
            self._corrupt(f"its header is not valid JSON: {e}")
        if not isinstance(raw, dict):
            self._corrupt(f"its header is a JSON {type(raw).__name__}, not an object")
        self._data_start = 8 + n
        metadata = raw.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            self._corrupt("__metadata__ must map names to strings")
        self.metadata: dict[str, str] = metadata or {}
        self._entries = {name: self._entry(name, info) for name, info in raw.items()}
        self._check_layout(size - self._data_start)

    def _corrupt(self, why: str) -> NoReturn:
        raise WeightsError(f"{self.path} is not a valid safetensors file ({why}); re-download or re-convert it")

    def _entry(self, name: str, info: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, each field checked."""
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            self._corrupt(f"entry {name!r} must be an object with dtype, shape and data_offsets, got {info!r:.80}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                               f"supported: {', '.join(_DTYPES)}")

        def naturals(value: object) -> bool:
            return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)

        if not naturals(shape):
            self._corrupt(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            self._corrupt(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        expected = _DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != expected:
            self._corrupt(f"tensor {name!r} has {end - begin} bytes for shape {tuple(shape)} of {dtype}, "
                          f"which needs {expected}")
        return _DTYPES[dtype], tuple(shape), begin, end

    def _check_layout(self, data_size: int) -> None:
        """The tensors must tile the data section [0, data_size) exactly, in offset order."""
        spans = sorted((e[2], e[3], name) for name, e in self._entries.items())
        last_end = max((end for _, end, _ in spans), default=0)
        if last_end > data_size:
            name = next(n for _, end, n in spans if end == last_end)
            raise WeightsError(
                f"{self.path} is truncated: tensor {name!r} ends at byte {self._data_start + last_end} but the "
                f"file has {self._data_start + data_size} bytes; re-download or re-convert it"
            )
        position = 0
        for begin, end, name in spans:
            if begin != position:
                self._corrupt(f"tensor {name!r} starts at data byte {begin}, but the previous tensor ends at "
                              f"{position} (tensors must follow each other without gaps or overlaps)")
            position = end
        if position != data_size:
            self._corrupt(f"{data_size - position} bytes after the last tensor")

    @property
    def header(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {name: (e[0], e[1]) for name, e in self._entries.items()}

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only memory-mapped array."""
        dtype, shape, begin, end = self._entries[name]
        if begin == end:  # numpy cannot map zero bytes
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read the tensor `name` into `out` (C-contiguous, its shape, its dtype or one of the same item size)
        with plain reads, no memory map: nothing of the file stays mapped into this process."""
        dtype, shape, begin, end = self._entries[name]
        if out.shape != shape or out.dtype.itemsize != dtype.itemsize or not out.flags.c_contiguous:
            raise ValueError(f"read_into: {name!r} is {dtype} {shape}, got an array {out.dtype} {out.shape}")
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            while done < end - begin:
                n = f.readinto(view[done:])
                if not n:
                    raise WeightsError(f"{self.path} ended while reading {name!r}; re-download or re-convert it")
                done += n


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` atomically and durably (a temporary file in the same folder, fsynced, then
    renamed), in the format above: tensors in name order, the header padded with spaces to a multiple of 8
    bytes (as the `safetensors` library writes it, so every tensor stays aligned). Written here rather than
    with `safetensors.numpy.save_file`, whose errors (a full disk among them) are not OSErrors: here every
    write failure is an OSError carrying its errno, for the caller to name the fix. The file gets the mode
    the umask gives any new file."""
    path = Path(path)
    codes = {dtype: code for code, dtype in _DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        code = codes.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
        if code is None:
            raise TypeError(f"cannot store {name!r} of dtype {array.dtype} in safetensors")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in sorted(tensors):
                array = np.asarray(tensors[name])
                little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                f.write(little.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

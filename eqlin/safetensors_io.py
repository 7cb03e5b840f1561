"""Reading safetensors files without unpickling anything, with clear errors for corrupt files.

The format is an 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets}, then raw little-endian tensor bytes. Reading it directly (memory-mapped)
gives bfloat16 through `ml_dtypes` and lets every offset be checked against the file size first, so a
truncated download is reported as such instead of surfacing as garbage or a crash.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from eqlin.errors import WeightsError

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


class SafetensorsFile:
    """Lazily read tensors of one .safetensors file. `header` maps name -> (dtype, shape)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise WeightsError(f"{self.path}: header length {n} exceeds the file size {size}")
                raw = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(
                f"{self.path} is not a valid safetensors file ({e}); re-download or re-convert it"
            ) from None
        self._data_start = 8 + n
        raw.pop("__metadata__", None)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in raw.items():
            if info["dtype"] not in _DTYPES:
                raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != dtype.itemsize * int(np.prod(shape)):
                raise WeightsError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
            if self._data_start + end > size:
                raise WeightsError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {self._data_start + end} but the "
                    f"file has {size} bytes; re-download or re-convert it"
                )
            self._entries[name] = (dtype, shape, begin, end)

    @property
    def header(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {name: (e[0], e[1]) for name, e in self._entries.items()}

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only memory-mapped array."""
        dtype, shape, begin, _ = self._entries[name]
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to `path` atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)

"""`Model`: a loaded checkpoint (config, params, tokenizer) with convenience methods over the pure
functions in `eqlin.decoder`, and `load`, the entry point."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eqlin import decoder
from eqlin import display
from eqlin.config import ModelConfig
from eqlin.errors import InputError
from eqlin.families import FamilySpec, config_from_hf, read_hf_config, spec_for
from eqlin.loading import (INDEX_FILE, SINGLE_FILE, check_tensors, check_weights, expected_tensors, held_bytes,
                           is_gguf, load_params, open_weight_files, read_index, read_json, resolve_dtype,
                           resolve_folder)
from eqlin.params import Params, check_mesh
from eqlin.tokenizer import Tokenizer

Array = jax.Array

forward_jit = jax.jit(decoder.forward, static_argnames=("config", "detach", "collect"))
_embed_jit = jax.jit(decoder.embed, static_argnames=("config",))


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded decoder. `params` is a pytree; `config` is static and hashable. `allowed_keys`: the config.json
    keys eqlin would have refused and loaded because the user declared them harmless (`load`'s allow_keys)."""

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str
    allowed_keys: tuple[str, ...] = ()

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype the model computes in (its weights may be stored narrower: `eqlin.params`)."""
        return self.params.dtype

    def __repr__(self) -> str:  # one line: the weights are in .params
        return display.model_repr(self)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (T,) with BOS as the tokenizer adds it."""
        if self.tokenizer is None:
            raise InputError(f"{self.source} has no tokenizer.json; pass token ids instead of text")
        return self.check_ids(self.tokenizer.encode(text, self.config.max_position_embeddings))

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise InputError(f"{self.source} has no tokenizer.json; cannot decode ids")
        return self.tokenizer.decode(ids)

    def token_strings(self, ids) -> list[str]:
        """One string per id; `<id>` where there is no tokenizer."""
        if self.tokenizer is None:
            return [f"<{int(i)}>" for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.token_strings(ids)

    def check_ids(self, ids) -> np.ndarray:
        """Validate token ids (`check_ids`); returns them as int32 (T,)."""
        return check_ids(ids, self.config)

    def ids(self, inputs) -> np.ndarray:
        """Token ids for text or ids, validated."""
        return self.encode(inputs) if isinstance(inputs, str) else self.check_ids(inputs)

    def embed(self, inputs) -> Array:
        """Input embeddings (T, d) for text or ids: the input space of every linear map
        (Gemma: table rows × √d)."""
        return _embed_jit(self.params, self.config, jnp.asarray(self.ids(inputs)))

    def forward(self, inputs, *, detach: bool = False, collect: bool = False) -> decoder.ForwardOutput:
        """The ordinary (or detached) forward pass on text or ids; see `eqlin.decoder.forward`."""
        return forward_jit(self.params, self.config, self.embed(inputs), detach=detach, collect=collect)

    def logits(self, inputs) -> Array:
        """Logits (T, V) at every position."""
        return self.forward(inputs).logits


def check_ids(ids, config: ModelConfig) -> np.ndarray:
    """Validate token ids: a non-empty 1-D integer sequence, inside the vocabulary, no longer than the
    model's maximum positions (config.json alone: checked before any weight is read). Returns them as
    int32 (T,)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) and arr.size:
        raise InputError(f"token ids must be a 1-D integer sequence, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError("empty input: give at least one token")
    bad = arr[(arr < 0) | (arr >= config.vocab_size)]
    if bad.size:
        raise InputError(
            f"token ids outside the vocabulary [0, {config.vocab_size}): {sorted(set(bad.tolist()))[:10]}"
        )
    if arr.size > config.max_position_embeddings:
        raise InputError(
            f"input has {arr.size} tokens, more than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); shorten the text"
        )
    return arr.astype(np.int32)


def checkpoint_folder(source: str | os.PathLike, *, cache_dir: str | Path | None = None, download: bool = False
                      ) -> Path:
    """The local folder holding `source`'s checkpoint: the folder itself, a repo id's snapshot in the local HF
    cache, or a .gguf file's eqlin-ready conversion (converted on first use, see `eqlin.gguf`)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise InputError(f"source must be a checkpoint folder, a repo id in the local Hugging Face cache or a .gguf "
                         f"file (a str or Path), got {source!r}")
    if is_gguf(source):
        from eqlin.gguf import converted_folder

        return converted_folder(Path(source))
    return resolve_folder(source, cache_dir=cache_dir, download=download)


CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", SINGLE_FILE, INDEX_FILE)


def checkpoint_identity(source: str | os.PathLike, folder: Path) -> str:
    """What a checkpoint is, by content, for telling whether results came from the same model.

    A GGUF file's conversion folder is already named by the file's sha256 and the converter version
    (`eqlin.gguf.converted_folder`): "gguf:<that name>", at no cost. Any other folder: "sha256:<hex>" over
    the names and bytes of the files eqlin reads from it (config, tokenizer, weights and shards), about
    1 s per GB."""
    if is_gguf(source):
        return f"gguf:{folder.name}"
    names = [n for n in CHECKPOINT_FILES if (folder / n).is_file()]
    if INDEX_FILE in names:  # shard names are checked (inside the folder, regular files) before any is opened
        names += sorted(set(read_index(folder).values()))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{(folder / name).stat().st_size}\0".encode())
        with open(folder / name, "rb") as f:
            while block := f.read(1 << 23):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:32]}"


def read_config(folder: Path, allow_keys: Iterable[str] = ()) -> tuple[FamilySpec, ModelConfig]:
    """The family and the checked `ModelConfig` of the checkpoint in `folder` (config.json only: cheap), with
    the config keys in `allow_keys` declared harmless (see `load`)."""
    hf = read_json(folder / "config.json")
    return spec_for(hf), config_from_hf(hf, allow_keys)


def source_config(source: str | os.PathLike, *, cache_dir: str | Path | None = None, allow_keys: Iterable[str] = ()
                  ) -> tuple[FamilySpec, ModelConfig, Path | None]:
    """(family, checked config, checkpoint folder) of `source` from its config.json alone, or for a GGUF file
    from its header (memory-mapped: nothing converted or dequantized; folder None); `allow_keys` as `load`'s."""
    if is_gguf(source):
        from eqlin.gguf import header_config

        hf = header_config(Path(source))
        return spec_for(hf), config_from_hf(hf, allow_keys), None
    folder = checkpoint_folder(source, cache_dir=cache_dir)
    return *read_config(folder, allow_keys), folder


def count_parameters(spec: FamilySpec, config: ModelConfig, folder: Path | None) -> int:
    """The checkpoint's number of parameters without reading any weight: a folder's tokenizer files and tensor
    headers are checked as `load` checks them (names, shapes, dtypes, layout); with no folder (a GGUF header),
    from the config alone."""
    if folder is None:
        expected = expected_tensors(config, spec, *spec.prefixes[0])
    else:
        if (folder / "tokenizer.json").is_file():
            Tokenizer.from_folder(folder)
        expected = check_tensors(open_weight_files(folder), config, spec, folder)
    return sum(math.prod(e.shape) for e in expected.values())


def held_weight_bytes(spec: FamilySpec, config: ModelConfig, folder: Path | None, dtype: str,
                      weights: str = "stored") -> int:
    """Bytes `load(..., dtype=dtype, weights=weights)` would hold, from the tensor headers alone (a GGUF
    header, no folder: every weight at `dtype`)."""
    jdtype = resolve_dtype(dtype)
    if folder is None:
        return count_parameters(spec, config, None) * jdtype.itemsize
    files = open_weight_files(folder)
    return held_bytes(files, check_tensors(files, config, spec, folder), jdtype, check_weights(weights))


def load(
    source: str | Path,
    *,
    dtype: str = "float64",
    cache_dir: str | Path | None = None,
    download: bool = False,
    mesh: Mesh | None = None,
    weights: str = "stored",
    memory_limit: int | None = None,
    allow_keys: Iterable[str] = (),
) -> Model:
    """Load a checkpoint: a local folder (config.json, model.safetensors or a sharded index,
    tokenizer.json), a repo id already in the local HF cache, or a .gguf file (dequantized once into
    an eqlin-ready folder under the user cache, see `eqlin.gguf`). The model computes in `dtype`
    ("float64" needs JAX's x64 mode). `weights="stored"` keeps each weight at the checkpoint's dtype where
    that widens to `dtype` exactly (bfloat16, float16, float32 to float64), widened one layer at a time
    where it is used: the same maps bit for bit, in a quarter (bfloat16) or half (float32) of the float64
    bytes; `weights="cast"` casts every weight to `dtype` at load; `weights="quantized"` (a .gguf file only)
    keeps the file's quantized matrices in their blocks, dequantized to gguf-py's float32 values one layer at
    a time where they are used (`eqlin.quantized`): the same maps bit for bit, in the file's bytes. Nothing
    is downloaded unless `download=True`. With a `mesh` (`eqlin.sharding.device_mesh(model=n)`), the weights
    are split tensor-parallel over its "model" axis as they load, for models whose weights do not fit one
    device.
    Everything cheap (config, tokenizer, tensor names and shapes) is checked before any weight is read, and
    so is memory: a load whose weights and widened layers do not fit one device (`memory_limit` bytes,
    default its capacity: 80 % of physical memory on a CPU) is refused with a MemoryBudgetError naming
    what would fit. `allow_keys`: config.json keys eqlin refuses (a key it does not know, or an option at a
    value it does not support) that you know leave the computation unchanged, e.g. ["full_attn_mod"]; they are
    loaded, and recorded in `Model.allowed_keys` and every report's model section (docs/config_keys.md)."""
    jdtype = resolve_dtype(dtype)
    check_weights(weights)
    if mesh is not None:
        check_mesh(mesh)
    if weights == "quantized":
        return _load_quantized(source, jdtype, mesh, memory_limit, allow_keys)
    folder = checkpoint_folder(source, cache_dir=cache_dir, download=download)
    hf = read_json(folder / "config.json")
    spec, (config, allowed) = spec_for(hf), read_hf_config(hf, allow_keys)
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    params = load_params(folder, config, spec, jdtype, mesh=mesh, weights=weights, memory_limit=memory_limit)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(source), allowed_keys=allowed)


def _load_quantized(source: str | Path, dtype: jnp.dtype, mesh: Mesh | None, memory_limit: int | None,
                    allow_keys: Iterable[str]) -> Model:
    """`load(source, weights="quantized")`: a GGUF file read directly, no float32 conversion written."""
    if not isinstance(source, (str, os.PathLike)) or not is_gguf(source):
        raise InputError(f'weights="quantized" keeps a GGUF file\'s quantized blocks; {source!r} is not a .gguf '
                         'file: pass one, or weights="stored"')
    if mesh is not None:
        raise InputError('weights="quantized" does not split weights over a mesh yet; pass mesh=None, or '
                         'weights="stored" with a mesh')
    from eqlin.gguf import read_quantized

    hf, tokenizer, params = read_quantized(Path(source), dtype, memory_limit)
    config, allowed = read_hf_config(hf, allow_keys)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(source), allowed_keys=allowed)

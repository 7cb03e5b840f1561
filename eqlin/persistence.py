"""Saving and loading results: a `Linearization` or a `Spectrum` as one safetensors file, bit for bit.

`Linearization.save(path, model)` / `Linearization.load(path)` (and the same for `Spectrum`) go through
here. Every array is stored at its own dtype and shape (float64 stays float64: the round trip is
lossless, bit for bit); what the arrays cannot say is in the header's `__metadata__`:

    schema          "eqlin.linearization/1" or "eqlin.spectrum/1"; loading refuses any other
    eqlin           JSON: {eqlin_version, dtype (of J or the singular values), map: {layer (null, an int or a
                    list), part, scope, detach, tap (Linearization) or per_token, method (Spectrum)},
                    model: {source, family, checkpoint (`eqlin.model.checkpoint_identity`)} or null,
                    tokens: the input token strings or null, plus Spectrum's decoded token strings}

Tensors: a Linearization's `jacobian`, `inputs`, `output`, `contributions`, `relative_error`, and `ids` and
`constant` where set; a Spectrum's `singular_values`, `U`, `V`, `output`, `relative_error`, and where
present `ids`, `frobenius_sq`, `effective.<field>`, `left_tokens.ids|scores`, `right_tokens.ids|scores`.
Files are written atomically (a temporary sibling, fsynced, renamed into place) and read with eqlin's
strict safetensors reader (`eqlin.safetensors_io`), never unpickled; loading checks everything it reads
against everything else (map fields, the recorded dtype, every shape implied by the others and the map's
layers, token strings per id) and names the file and the field of the first thing that disagrees.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from eqlin.errors import InputError, OutputError, PrecisionError, WeightsError
from eqlin.linear_maps import Linearization
from eqlin.model import Model, checkpoint_folder, checkpoint_identity
from eqlin.outputs import write_bytes_atomic
from eqlin.safetensors_io import SafetensorsFile
from eqlin.selection import PARTS, SCOPES, TAPS
from eqlin.spectral import EffectiveDimension, Spectrum, TokenMatches

LINEARIZATION_SCHEMA = "eqlin.linearization/1"
SPECTRUM_SCHEMA = "eqlin.spectrum/1"
_LOADERS = {LINEARIZATION_SCHEMA: "eqlin.Linearization.load", SPECTRUM_SCHEMA: "eqlin.Spectrum.load"}


def eqlin_version() -> str:
    """The installed eqlin's version ("unknown" when run from a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eqlin")
    except PackageNotFoundError:
        return "unknown"


def model_metadata(model: Model | None, ids: Any, checkpoint: str | None
                   ) -> tuple[dict[str, Any] | None, list[str] | None]:
    """({source, family, checkpoint}, input token strings) of `model` (None: (None, None)). `checkpoint`
    None is computed from the model's source (`eqlin.model.checkpoint_identity`: about 1 s per GB)."""
    if model is None:
        return None, None
    if checkpoint is None:
        checkpoint = checkpoint_identity(model.source, checkpoint_folder(model.source))
    return ({"source": model.source, "family": model.config.family, "checkpoint": checkpoint},
            None if ids is None else model.token_strings(np.asarray(ids)))


def _layer_json(layer: int | tuple[int, ...] | None) -> int | list[int] | None:
    return list(layer) if isinstance(layer, tuple) else layer


def _layer_from_json(layer: int | list[int] | None) -> int | tuple[int, ...] | None:
    return tuple(layer) if isinstance(layer, list) else layer


def to_bytes(schema: str, tensors: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """One safetensors file's bytes: `tensors` at their own dtypes, `meta` (plus the eqlin version) as JSON."""
    from safetensors.numpy import save

    arrays = {name: np.array(a, order="C") for name, a in tensors.items() if a is not None}  # 0-d stays 0-d
    header = {"eqlin_version": eqlin_version(), **meta}
    return save(arrays, metadata={"schema": schema, "eqlin": json.dumps(header)})  # ASCII: any token string fits


def write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; OutputError (naming the fix) if it cannot be written."""
    path = Path(path)
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; nothing was written there; free space on that "
                          "disk or choose another path") from None
    return path


def open_result(path: str | Path) -> SafetensorsFile:
    """The safetensors file at `path` (header checked, nothing read yet); InputError if it is none."""
    try:
        return SafetensorsFile(Path(path))
    except WeightsError as e:
        reason = str(e).removesuffix("; re-download or re-convert it")
        raise InputError(f"cannot load {path} as a saved eqlin result: {reason}; give a file written by "
                         "eqlin's save") from None


def read(path: str | Path, schema: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors as host arrays, the `eqlin` metadata) of a file written with `schema`; InputError for a file
    that is unreadable, not safetensors, not eqlin's or of another schema, and PrecisionError for 64-bit
    arrays while JAX's x64 mode is off (they would be narrowed to 32 bits)."""
    f = open_result(path)
    found = f.metadata.get("schema")
    if found != schema:
        hint = (f"it holds a {found}: load it with {_LOADERS[found]}" if found in _LOADERS
                else f"its schema is {found!r}, not {schema!r}: it was not written by "
                     f"{_LOADERS[schema].replace('.load', '.save')}")
        raise InputError(f"cannot load {path}: {hint}")
    try:
        meta = json.loads(f.metadata["eqlin"])
    except (KeyError, ValueError, RecursionError):
        raise InputError(f"cannot load {path}: its eqlin metadata is missing, not JSON or nested too deeply; save "
                         "the result again") from None
    if not isinstance(meta, dict):
        invalid(path, "the eqlin metadata", f"must be a JSON object, got {type(meta).__name__}")
    tensors = {name: np.array(f.read(name)) for name in f.header}
    wide = sorted({str(a.dtype) for a in tensors.values() if a.dtype.itemsize == 8})
    if wide and not jax.config.jax_enable_x64:
        raise PrecisionError(f"{path} holds {' and '.join(wide)} arrays, which JAX narrows to 32 bits while its x64 "
                             "mode is off: call jax.config.update('jax_enable_x64', True) at start-up (or set "
                             "JAX_ENABLE_X64=1)")
    return tensors, meta


def invalid(path: str | Path, field: str, why: str) -> NoReturn:
    """InputError: the saved file at `path` holds something no eqlin save writes, in `field`."""
    raise InputError(f"cannot load {path}: {field} {why}; it was changed after saving or not written by eqlin: "
                     "save the result again")


def require(tensors: dict[str, np.ndarray], names: tuple[str, ...], optional: tuple[str, ...], path: str | Path
            ) -> None:
    """InputError naming the tensors a file of this schema must hold but does not, or holds but never writes."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"cannot load {path}: tensors missing: {', '.join(missing)}; save the result again")
    unknown = sorted(set(tensors) - set(names) - set(optional))
    if unknown:
        invalid(path, "tensors", f"{', '.join(unknown[:5])} are not part of this kind of result")


def map_fields(meta: dict[str, Any], path: str | Path, extra: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """The checked `map` of a file's metadata: layer (None, an index, or a non-empty list of distinct
    indices), part, scope, detach, and the `extra` fields (name -> (allowed values, in words))."""
    m = meta.get("map")
    if not isinstance(m, dict):
        invalid(path, "the eqlin metadata field 'map'", f"must be a JSON object, got {type(m).__name__}")
    allowed = {"part": (PARTS, f"one of {PARTS}"), "scope": (SCOPES, f"one of {SCOPES}"),
               "detach": ((True, False), "true or false"), **extra}
    for name, (values, words) in allowed.items():
        value = m.get(name)
        if not any(value is v if isinstance(v, bool) else value == v and type(value) is type(v) for v in values):
            invalid(path, f"map field {name!r}", f"must be {words}, got {value!r:.60}")

    def index(v: Any) -> bool:
        return type(v) is int and v >= 0

    layer = m.get("layer")
    if not (layer is None or index(layer) or isinstance(layer, list) and layer and all(map(index, layer))
            and len(set(layer)) == len(layer)):
        invalid(path, "map field 'layer'", f"must be null, a layer index or a list of distinct ones, got {layer!r:.60}")
    return m


def check_arrays(tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], kinds: dict[str, str],
                 path: str | Path) -> None:
    """Every tensor present must have its shape in `shapes` (implied by the file's other arrays and map) and
    a dtype of its kind in `kinds` (a dtype name, or "float" / "integer")."""
    for name, array in tensors.items():
        kind = kinds[name]
        ok = (array.dtype.name == kind if kind not in ("float", "integer", "real")
              else array.dtype.kind in {"float": "f", "integer": "iu", "real": "iuf"}[kind])
        if not ok:
            invalid(path, f"tensor {name!r}", f"has dtype {array.dtype.name}, not {kind}")
    for name, array in tensors.items():
        if array.shape != shapes[name]:
            invalid(path, f"tensor {name!r}", f"has shape {array.shape}, but the file's other arrays and map imply "
                                             f"{shapes[name]}")


def leading_axis(m: dict[str, Any]) -> tuple[int, ...]:
    """The layer axis every array of a multi-layer map has in front: (n,) for a list of n layers, else ()."""
    return (len(m["layer"]),) if isinstance(m["layer"], list) else ()


def check_dtype_name(meta: dict[str, Any], path: str | Path) -> str:
    """The metadata's `dtype`: "float32" or "float64" (the arrays are checked against it)."""
    dtype = meta.get("dtype")
    if dtype not in ("float32", "float64"):
        invalid(path, "the eqlin metadata field 'dtype'", f"must be 'float32' or 'float64', got {dtype!r:.60}")
    return dtype


def check_tokens(meta: dict[str, Any], T: int, path: str | Path) -> None:
    """`tokens` (the input's token strings) is null or one string per input token (T of them)."""
    tokens = meta.get("tokens")
    if tokens is not None and not nested_strings(tokens, (T,)):
        invalid(path, "the eqlin metadata field 'tokens'", "must be null or one string per input token")


def nested_strings(value: Any, shape: tuple[int, ...]) -> bool:
    """Whether `value` is strings in nested lists of exactly `shape`."""
    if not shape:
        return isinstance(value, str)
    return isinstance(value, list) and len(value) == shape[0] and all(nested_strings(v, shape[1:]) for v in value)


# --------------------------------------------------------------------------------------------------
# Linearization.


_LIN_ARRAYS = ("jacobian", "inputs", "output", "contributions", "relative_error")


def linearization_bytes(lin: Linearization, model: Model | None = None, *, checkpoint: str | None = None) -> bytes:
    """The file `save_linearization` writes, as bytes (`eqlin analyze --save-jacobian` puts it into its
    output folder with the report)."""
    model_meta, tokens = model_metadata(model, lin.ids, checkpoint)
    meta = {"dtype": str(lin.jacobian.dtype),
            "map": {"layer": _layer_json(lin.layer), "part": lin.part, "scope": lin.scope, "detach": lin.detach,
                    "tap": lin.tap},
            "model": model_meta, "tokens": tokens}
    tensors = {name: getattr(lin, name) for name in (*_LIN_ARRAYS, "ids", "constant")}
    return to_bytes(LINEARIZATION_SCHEMA, tensors, meta)


def save_linearization(lin: Linearization, path: str | Path, model: Model | None = None, *,
                       checkpoint: str | None = None) -> Path:
    """Write `lin` to `path` (module docstring); with `model`, its source, family, checkpoint identity and
    the input's token strings are recorded too."""
    return write(path, linearization_bytes(lin, model, checkpoint=checkpoint))


def load_linearization(path: str | Path) -> Linearization:
    """The Linearization saved at `path`, bit for bit."""
    tensors, meta = read(path, LINEARIZATION_SCHEMA)
    require(tensors, _LIN_ARRAYS, ("ids", "constant"), path)
    m = map_fields(meta, path, {"tap": (TAPS, f"one of {TAPS}")})
    dtype, lead = check_dtype_name(meta, path), leading_axis(m)
    J = tensors["jacobian"]
    if J.ndim != len(lead) + 3 or J.shape[:len(lead)] != lead:
        invalid(path, "tensor 'jacobian'", f"has shape {J.shape}, not {lead + ('d_out', 'T', 'd_in')} for the map's "
                                          f"layer {m['layer']}")
    d_out, T, d_in = J.shape[-3:]
    each = lead if m["scope"] == "single" else ()  # cumulative maps share the input embeddings
    shapes = {"jacobian": J.shape, "inputs": (*each, T, d_in), "output": (*lead, d_out), "constant": (*lead, d_out),
              "contributions": (*lead, T, d_out), "relative_error": lead, "ids": (T,)}
    check_arrays(tensors, shapes, {**dict.fromkeys(shapes, dtype), "ids": "integer"}, path)
    check_tokens(meta, T, path)
    arrays = {name: jnp.asarray(tensors[name]) for name in (*_LIN_ARRAYS, "ids", "constant") if name in tensors}
    return Linearization(**{"ids": None, **arrays}, layer=_layer_from_json(m["layer"]), part=m["part"],
                         scope=m["scope"], detach=m["detach"], tap=m["tap"])


def saved_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved Linearization or Spectrum (the header alone: no array is read), with its
    "schema": which map, the model and checkpoint, the token strings, the dtype and eqlin version."""
    f = open_result(path)
    try:
        meta = json.loads(f.metadata.get("eqlin", "{}"))
    except (ValueError, RecursionError):
        raise InputError(f"cannot load {path}: its eqlin metadata is not JSON or nested too deeply; save the result "
                         "again") from None
    if not isinstance(meta, dict):
        invalid(path, "the eqlin metadata", f"must be a JSON object, got {type(meta).__name__}")
    return {"schema": f.metadata.get("schema"), **meta}


# --------------------------------------------------------------------------------------------------
# Spectrum.


_SPEC_ARRAYS = ("singular_values", "U", "V", "output", "relative_error")
_MATCHES = ("left_tokens", "right_tokens")


def spectrum_bytes(spec: Spectrum, model: Model | None = None, *, checkpoint: str | None = None) -> bytes:
    """The file `save_spectrum` writes, as bytes."""
    model_meta, tokens = model_metadata(model, spec.ids, checkpoint)
    tensors = {name: getattr(spec, name) for name in (*_SPEC_ARRAYS, "ids", "frobenius_sq")}
    if spec.effective is not None:
        tensors.update({f"effective.{f.name}": getattr(spec.effective, f.name)
                        for f in dataclasses.fields(spec.effective)})
    decoded = {}
    for name in _MATCHES:
        matches = getattr(spec, name)
        if matches is not None:
            tensors.update({f"{name}.ids": matches.ids, f"{name}.scores": matches.scores})
            decoded[name] = matches.tokens
    meta = {"dtype": str(spec.singular_values.dtype),
            "map": {"layer": _layer_json(spec.layer), "part": spec.part, "scope": spec.scope, "detach": spec.detach,
                    "per_token": spec.per_token, "method": spec.method},
            "model": model_meta, "tokens": tokens, "decoded": decoded}
    return to_bytes(SPECTRUM_SCHEMA, tensors, meta)


def save_spectrum(spec: Spectrum, path: str | Path, model: Model | None = None, *,
                  checkpoint: str | None = None) -> Path:
    """Write `spec` to `path` (module docstring), with `model` as in `save_linearization`."""
    return write(path, spectrum_bytes(spec, model, checkpoint=checkpoint))


_METHODS = ("dense", "lanczos", "randomized")


def check_spectrum_arrays(tensors: dict[str, np.ndarray], meta: dict[str, Any], m: dict[str, Any],
                          path: str | Path) -> None:
    """Shapes and dtypes of a saved Spectrum's arrays against each other and its map (`Spectrum`'s
    docstring), and its decoded token strings against their ids."""
    dtype, lead, per = check_dtype_name(meta, path), leading_axis(m), m["per_token"]
    V = tensors["V"]
    if V.ndim != len(lead) + 3 or V.shape[:len(lead)] != lead:
        invalid(path, "tensor 'V'", f"has shape {V.shape}, not {lead + ('T', 'd_in', 'k')} for the map's layer "
                                   f"{m['layer']}")
    T, d_in, k = V.shape[-3:]
    d_out = tensors["output"].shape[-1] if tensors["output"].ndim else 0
    tok = (T,) if per else ()  # per-token spectra have a token axis where combined ones have none
    top = {name: (tensors[f"{name}.ids"].shape or (0,))[-1] if f"{name}.ids" in tensors else 0 for name in _MATCHES}
    shapes = {"singular_values": (*lead, *tok, k), "U": (*lead, *tok, d_out, k), "V": V.shape,
              "output": (*lead, d_out), "relative_error": lead, "ids": (T,), "frobenius_sq": (*lead, *tok),
              **{f"effective.{f.name}": (*lead, *tok) for f in dataclasses.fields(EffectiveDimension)},
              **{f"left_tokens.{p}": (*lead, *tok, k, top["left_tokens"]) for p in ("ids", "scores")},
              **{f"right_tokens.{p}": (*lead, T, k, top["right_tokens"]) for p in ("ids", "scores")}}
    kinds = {**dict.fromkeys(("singular_values", "U", "V", "output", "relative_error", "frobenius_sq"), dtype),
             "ids": "integer", **{f"effective.{f.name}": "real" for f in dataclasses.fields(EffectiveDimension)},
             **{f"{name}.ids": "integer" for name in _MATCHES}, **{f"{name}.scores": "float" for name in _MATCHES}}
    check_arrays(tensors, shapes, kinds, path)
    effective = [name for name in kinds if name.startswith("effective.") and name in tensors]
    if effective and len(effective) != len(dataclasses.fields(EffectiveDimension)):
        invalid(path, "tensors", f"hold only some fields of the effective dimension ({', '.join(effective)})")
    decoded = meta.get("decoded", {})
    for name in _MATCHES:
        present = [f"{name}.{p}" for p in ("ids", "scores") if f"{name}.{p}" in tensors]
        if len(present) == 1:
            invalid(path, "tensors", f"hold {present[0]} without its pair")
        if present and not (isinstance(decoded, dict) and nested_strings(decoded.get(name),
                                                                          tensors[f"{name}.ids"].shape)):
            invalid(path, f"the eqlin metadata field 'decoded.{name}'", "must hold one token string per id of "
                                                                        f"{name}.ids")
    check_tokens(meta, T, path)


def load_spectrum(path: str | Path) -> Spectrum:
    """The Spectrum saved at `path`, bit for bit (decoded tokens included)."""
    tensors, meta = read(path, SPECTRUM_SCHEMA)
    effective_names = tuple(f"effective.{f.name}" for f in dataclasses.fields(EffectiveDimension))
    match_names = tuple(f"{name}.{part}" for name in _MATCHES for part in ("ids", "scores"))
    require(tensors, _SPEC_ARRAYS, ("ids", "frobenius_sq", *effective_names, *match_names), path)
    m = map_fields(meta, path, {"per_token": ((True, False), "true or false"),
                                "method": (_METHODS, f"one of {_METHODS}")})
    check_spectrum_arrays(tensors, meta, m, path)
    effective = None
    if "effective.stable_rank" in tensors:
        effective = EffectiveDimension(**{f.name: jnp.asarray(tensors[f"effective.{f.name}"])
                                          for f in dataclasses.fields(EffectiveDimension)})
    matches = {name: TokenMatches(tensors[f"{name}.ids"], tensors[f"{name}.scores"], meta["decoded"][name])
               for name in _MATCHES if f"{name}.ids" in tensors}
    optional = {name: jnp.asarray(tensors[name]) if name in tensors else None for name in ("ids", "frobenius_sq")}
    return Spectrum(**{name: jnp.asarray(tensors[name]) for name in _SPEC_ARRAYS}, **optional, effective=effective,
                    per_token=m["per_token"], method=m["method"], layer=_layer_from_json(m["layer"]), part=m["part"],
                    scope=m["scope"], detach=m["detach"], **matches)

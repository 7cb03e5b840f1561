"""Loading HF checkpoints: resolve a folder or cached repo id, read config.json and safetensors
(single file or sharded index), check every tensor name and shape, stack layers into `Params`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from eqlin.config import BIAS_FAMILIES, ModelConfig
from eqlin.errors import InputError, MemoryBudgetError, PrecisionError, WeightsError, name_list
from eqlin.memory import device_capacity_bytes, format_bytes, widened_layer_bytes
from eqlin.families import FamilySpec
from eqlin.params import EXACT_WIDENING, MODEL_AXIS, LayerParams, Params, expected_shapes, param_shardings, to_storage
from eqlin.paths import file_kind
from eqlin.safetensors_io import SafetensorsFile

DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Multimodal parts eqlin deliberately leaves out (the vision tower and its projector).
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
_PROJ_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
_BIAS_NAMES = {"q_bias": "self_attn.q_proj", "k_bias": "self_attn.k_proj", "v_bias": "self_attn.v_proj"}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """The JAX dtype for a name; float64 requires x64 mode and is refused loudly without it."""
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise PrecisionError(
            "float64 needs JAX's x64 mode, which is off: call jax.config.update('jax_enable_x64', True) "
            "at start-up (or set JAX_ENABLE_X64=1), or ask for dtype='float32'"
        )
    return jnp.dtype(DTYPES[name])


def is_gguf(source: str | Path) -> bool:
    """Whether `source` names a GGUF file: a `.gguf` name in any letter case, or a file with GGUF's magic."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():  # never open a FIFO or a device: opening or reading one can block forever
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_folder(source: str | Path, *, cache_dir: str | Path | None = None, download: bool = False) -> Path:
    """A local checkpoint folder for `source`: the folder itself, or a repo id's snapshot in the local
    HF cache. Nothing is downloaded unless `download=True` is passed explicitly."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise WeightsError(f"{source} is a file, not a checkpoint folder; pass the folder holding config.json "
                           "(or a .gguf file)")
    if path.exists():
        raise WeightsError(f"{source} is {file_kind(path)}, not a checkpoint folder or a .gguf file; pass the folder "
                           "holding config.json, a .gguf file or a repo id in the local Hugging Face cache")
    if path.is_absolute() or str(source).startswith((".", "~")):
        raise WeightsError(f"{source} does not exist; pass a checkpoint folder, a .gguf file or a repo id that is "
                           "in the local Hugging Face cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        if download:
            return _download(str(source), cache_dir)
        return Path(snapshot_download(str(source), cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except HFValidationError:
        raise WeightsError(f"{source!r} is neither a folder nor a valid Hugging Face repo id") from None
    except LocalEntryNotFoundError:
        if download:  # the hub could not be reached, and nothing of it is cached
            raise WeightsError(f"cannot download {source!r}: the Hugging Face Hub cannot be reached and the repo is "
                               "not in the local cache; connect, or pass a checkpoint folder") from None
        raise WeightsError(
            f"{source!r} is not a folder and is not in the local Hugging Face cache; download it first with "
            f"`hf download {source}`, or pass a checkpoint folder"
        ) from None
    except OSError as e:  # the hub's HTTP errors (a missing, gated or private repo) and disk errors
        raise WeightsError(f"cannot get {source!r} from the Hugging Face Hub or its cache: {e}") from None


def _download(repo: str, cache_dir: str | Path | None) -> Path:
    """Download what eqlin reads of `repo` into the HF cache and return its snapshot folder: first the JSON
    files (config, tokenizer, shard index), then only the weight files the index lists, or the single
    `model.safetensors` without one; never other weights a repo also holds (Mistral's
    `consolidated.safetensors`, a second copy of every weight). Both calls pin the first one's commit."""
    from huggingface_hub import snapshot_download

    meta = Path(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=["*.json"]))
    weight_map = read_json(meta / INDEX_FILE).get("weight_map") if (meta / INDEX_FILE).is_file() else None
    shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else [SINGLE_FILE]
    literal = [re.sub(r"([*?[])", r"[\1]", str(name)) for name in shards]  # names, not glob patterns
    return Path(snapshot_download(repo, cache_dir=cache_dir, revision=meta.name, allow_patterns=["*.json", *literal]))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, with a clear error if it is missing, unreadable or malformed."""
    if not path.is_file():
        raise WeightsError(f"missing {path.name} in {path.parent}; pass a checkpoint folder that holds it (as "
                           "`hf download ORG/NAME` writes one), a .gguf file or a repo id in the local Hugging Face "
                           "cache")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}; make it readable, or pass another checkpoint "
                           "folder, .gguf file or repo id") from None
    except RecursionError:
        raise WeightsError(f"{path} is nested too deeply to be a checkpoint file; replace it") from None
    except ValueError as e:  # JSON syntax, UTF-8, oversized numbers
        raise WeightsError(f"{path} is not valid JSON ({e}); replace it") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else "a list" if isinstance(data, list) else f"the value {data!r:.40}"
        raise WeightsError(f"{path} must hold a JSON object {{...}}, got {kind}; replace it")
    return data


def read_index(folder: Path) -> dict[str, str]:
    """The weight map (tensor name -> shard file name) of `folder`'s model.safetensors.index.json, every
    shard name checked before any shard is opened: a name must stay inside the folder by its letters
    (relative, no `..`, not absolute; where the file is a symlink, as in the Hugging Face cache's snapshots
    into blobs/, its target does not matter) and name a regular file there. Every reader of shards
    (loading, `info`, `convert`, the checkpoint identity of `analyze` and prompt sets) goes through here."""
    index = folder / INDEX_FILE
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index} needs a weight_map object mapping tensor names to shard file names, got "
                           f"{type(weight_map).__name__}; replace the index")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if not _inside(n)]
    if outside:
        raise WeightsError(f"{index} names shard files outside its folder: {name_list(outside, 5)}; shards must be "
                           "plain file names relative to the checkpoint folder (no '..', no absolute path)")
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise WeightsError(f"{index} names shard files that are missing: {name_list(missing)}; download them "
                           "again (`hf download REPO`) or replace the index")
    irregular = [f"{n} ({file_kind(folder / n)})" for n in names if not (folder / n).is_file()]
    if irregular:
        raise WeightsError(f"{index} names shards that are not regular files: {name_list(irregular)}; replace them "
                           "with the safetensors files")
    return weight_map


def _inside(name: str) -> bool:
    """Whether the shard name `name` stays inside its folder by its letters alone: relative, no `..` part,
    not empty or the folder itself, no NUL byte."""
    parts = Path(name).parts
    return bool(parts) and "\0" not in name and not Path(name).is_absolute() and ".." not in parts


def open_weight_files(folder: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the open safetensors file holding it (single file or sharded index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_index(folder)
        shards = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
        files = {}
        for name, shard in weight_map.items():
            if name not in shards[shard].header:
                raise WeightsError(f"{index} puts {name!r} in {shard}, which does not hold it")
            files[name] = shards[shard]
        return files
    if (folder / SINGLE_FILE).is_file():
        f = SafetensorsFile(folder / SINGLE_FILE)
        return dict.fromkeys(f.header, f)
    raise WeightsError(
        f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} (pickled .bin checkpoints are "
        "never loaded; convert them to safetensors)"
    )


def layer_modules(spec: FamilySpec) -> dict[str, str]:
    """eqlin's per-layer weight fields -> HF module names under `layers.{i}.` (Llama's layout)."""
    return _PROJ_NAMES | dict(spec.norm_names)


def refuse_bias_tensors(biases: Sequence[str], family: str, source: str) -> None:
    """Refuse `biases`, bias tensors in `source` (a checkpoint, a file) that a `family` model does not have:
    on the linear path they would make the map affine, which eqlin computes only for BIAS_FAMILIES."""
    if biases:
        raise WeightsError(
            f"{source} has biases on the linear path ({name_list(biases, 5)}) that a {family} model does not have; "
            f"eqlin computes the exact affine map y = Σ_t J_t x_t + c only for the bias layouts of {BIAS_FAMILIES}; "
            "this checkpoint is not supported"
        )


def mismatch_text(groups: Mapping[str, Sequence[str]]) -> str:
    """'label (n): names; …' for each non-empty group of tensor names (missing, unexpected, …)."""
    return "; ".join(f"{label} ({len(items)}): {name_list(items)}" for label, items in groups.items() if items)


def _rows(config: ModelConfig, spec: FamilySpec, fields: tuple[str, ...]) -> list[int]:
    """Rows each field takes in a (possibly fused) tensor."""
    shapes = expected_shapes(config, tuple(spec.norm_names))
    return [shapes[f][0] for f in fields]


def text_prefixes(names: set[str], spec: FamilySpec) -> tuple[str, str]:
    """(model prefix, lm_head prefix) of the checkpoint's text decoder, found by its embedding's name."""
    embed = spec.top_tensors["embed"]
    for prefix, head in spec.prefixes:
        if f"{prefix}{embed}" in names:
            return prefix, head
    places = ", ".join(p or "the top level" for p, _ in spec.prefixes)
    raise WeightsError(f"missing tensor: no {embed} under {places}")


class Expected(NamedTuple):
    """One tensor a config implies: the eqlin fields it holds (several for a fused tensor, stacked by rows
    in that order), its layer (None: not per layer), its shape as stored, and whether it is stored
    transposed, (in, out) (GPT-2's Conv1D)."""

    fields: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    transposed: bool = False


def expected_tensors(config: ModelConfig, spec: FamilySpec, prefix: str, head: str) -> dict[str, Expected]:
    """HF tensor name -> `Expected` for every tensor the config implies."""
    d, V = config.hidden_size, config.vocab_size
    top_shapes = {"embed": (V, d), "final_norm": (d,), "position_embed": (config.max_position_embeddings, d),
                  "final_norm_bias": (d,)}
    out = {f"{prefix}{name}": Expected((field,), None, top_shapes[field])
           for field, name in spec.top_tensors.items()}
    if not config.tie_word_embeddings:
        out[f"{head}weight"] = Expected(("lm_head",), None, (V, d))
    shapes = expected_shapes(config, tuple(spec.norm_names))
    names = {**{f: f"{m}.weight" for f, m in layer_modules(spec).items()},
             **{f: f"{m}.bias" for f, m in _BIAS_NAMES.items()}, **spec.layer_tensors}
    groups = dict(spec.fused)
    fused_fields = {f for members in groups.values() for f in members}
    groups.update({names[field]: (field,) for field in shapes if field not in fused_fields})
    for tensor, members in groups.items():
        shape = (sum(shapes[f][0] for f in members), *shapes[members[0]][1:])
        transposed = tensor in spec.transposed
        stored = shape[::-1] if transposed else shape
        for i in range(config.num_layers):
            out[f"{prefix}{spec.layers_name}.{i}.{tensor}"] = Expected(members, i, stored, transposed)
    return out


def check_tied_head(files: dict[str, SafetensorsFile], config: ModelConfig, prefix: str, head: str) -> None:
    """A tied checkpoint may store lm_head.weight too, as a copy of the embedding; a different one is refused
    (transformers 5 then uses it, older versions the embedding): eqlin does not pick one silently."""
    name = f"{head}weight"
    if not config.tie_word_embeddings or name not in files:
        return
    embedding = files[f"{prefix}embed_tokens.weight"]
    if not np.array_equal(files[name].read(name), embedding.read(f"{prefix}embed_tokens.weight")):
        raise WeightsError(
            f"tie_word_embeddings is true but {files[name].path} also stores a different {name}; set "
            f"tie_word_embeddings to false in config.json to use it, or delete {name} to tie it to the embedding")


def check_tensors(files: dict[str, SafetensorsFile], config: ModelConfig, spec: FamilySpec, folder: Path
                  ) -> dict[str, Expected]:
    """Every check of the checkpoint's tensors against its config, shared by loading and `eqlin convert`:
    one WeightsError lists all missing, unexpected, mis-shaped and non-float tensors; biases the family does
    not have are named as such; a stored head that a tied config would ignore must equal the embedding.
    Returns `expected_tensors` for the checkpoint's name prefix."""
    names = set(files)
    prefix, head = text_prefixes(names, spec)
    expected = expected_tensors(config, spec, prefix, head)
    ignorable = {f"{head}weight"} if config.tie_word_embeddings else set()
    ignorable |= {f"{prefix}{spec.layers_name}.{i}.{b}" for i in range(config.num_layers) for b in spec.buffers}
    unexpected = sorted(n for n in names - set(expected) - ignorable
                        if not n.startswith(_VISION_PREFIXES) and not n.endswith("rotary_emb.inv_freq"))
    biases = [n for n in unexpected if n.endswith(".bias")]
    missing = sorted(set(expected) - names)
    misshaped = [f"{n}: {files[n].header[n][1]} (expected {expected[n][2]})"
                 for n in sorted(names & set(expected)) if files[n].header[n][1] != expected[n][2]]
    not_float = [f"{n}: {files[n].header[n][0]}" for n in sorted(names & set(expected))
                 if files[n].header[n][0].kind != "f" and files[n].header[n][0] != jnp.bfloat16]
    refuse_bias_tensors(biases, config.family, "checkpoint")
    if missing or unexpected or misshaped or not_float:
        raise WeightsError(f"weights in {folder} do not match config.json: " + mismatch_text({
            "missing": missing, "unexpected": unexpected, "wrong shape": misshaped,
            "not floating point (quantized checkpoints are not supported)": not_float}))
    check_tied_head(files, config, prefix, head)
    return expected


WEIGHTS = ("stored", "cast", "quantized")


def check_weights(weights: object) -> str:
    """`weights` ("stored", "cast" or "quantized") itself, else an InputError naming them."""
    if weights not in WEIGHTS:
        raise InputError(f"weights must be 'stored' (kept at the checkpoint's dtype, widened where used), 'cast' "
                         f"(cast to the compute dtype at load) or 'quantized' (a GGUF file's blocks, dequantized "
                         f"where used), got {weights!r}")
    return weights


def storage_for(stored: np.dtype, shape: tuple[int, ...], dtype: jnp.dtype, weights: str) -> np.dtype:
    """The dtype a tensor stored as `stored` (one layer's `shape`) is held at for a `dtype` model: its own
    where `weights` is "stored", it is a matrix (vectors are held at `dtype`: `eqlin.params`) and it
    widens to `dtype` exactly (`eqlin.params.EXACT_WIDENING`), else `dtype`: cast at load,
    as always for a tensor stored wider than the compute dtype (float32 weights of a bfloat16 model, float64
    ones of a float32 model: rounded once here, the model then computes in `dtype` throughout)."""
    exact = weights == "stored" and len(shape) > 1 and np.dtype(stored).name in EXACT_WIDENING[np.dtype(dtype).name]
    return np.dtype(stored) if exact else np.dtype(dtype)


def read_finite(files: dict[str, SafetensorsFile], names, dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """The tensors `names` as host arrays, each of its dtype in `dtypes`; a WeightsError names every one
    holding NaN or ±inf (after the cast: float64 values beyond float32's range overflow)."""
    arrays, bad = {}, []
    for name in names:
        arrays[name], finite = read_checked(files, name, dtypes[name])
        bad += [] if finite else [name]
    refuse_not_finite(bad, dtypes)
    return arrays


def read_checked(files: dict[str, SafetensorsFile], name: str, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """(the tensor `name` as a host array of `dtype`: memory-mapped where it is stored so, whether every value
    is finite)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflows are found and reported by the caller
        a = np.asarray(files[name].read(name), dtype=dtype)
        fast = dtype.itemsize >= 4 and np.isfinite(a.sum())  # the sum is the fast path (not in 16 bits)
        return a, bool(fast or all_finite(a))


def all_finite(a: np.ndarray) -> bool:
    """Whether every value of `a` is finite, checked 2**24 values at a time (no mask as large as `a`)."""
    flat = a.reshape(-1)
    return all(np.isfinite(flat[i:i + 2**24]).all() for i in range(0, flat.size, 2**24))


def refuse_not_finite(bad: Sequence[str], dtypes: Mapping[str, np.dtype]) -> None:
    """A WeightsError naming the tensors `bad` that hold NaN or ±inf (as their dtypes in `dtypes`), if any."""
    if bad:
        raise WeightsError(f"tensors hold NaN or infinite values (as {', '.join(sorted({dtypes[n].name for n in bad}))}"
                           f"): {name_list(bad)}; the checkpoint is corrupt (or out of this dtype's range): replace it")


def held_bytes(files: dict[str, SafetensorsFile], expected: Mapping[str, Expected], dtype: jnp.dtype,
               weights: str) -> int:
    """Bytes the weights take once loaded (`storage_for` each tensor), from the tensor headers alone."""
    return sum(math.prod(e.shape) * storage_for(files[n].header[n][0], e.shape, dtype, weights).itemsize
               for n, e in expected.items())


def check_load_fits(files: dict[str, SafetensorsFile], expected: Mapping[str, Expected], config: ModelConfig,
                    dtype: jnp.dtype, weights: str, n_model: int, limit: int | None, folder: Path) -> None:
    """Refuse, before reading any weight, a load whose weights (split over `n_model` devices) and widened
    layers (`eqlin.memory.widened_layer_bytes`) exceed one device's capacity (`device_capacity_bytes`), with a
    MemoryBudgetError naming what would fit: weights="stored", float32, a mesh of enough devices."""
    capacity = device_capacity_bytes(limit)

    def need(dt: jnp.dtype, how: str) -> int:
        return held_bytes(files, expected, dt, how) // n_model + widened_layer_bytes(config, np.dtype(dt).itemsize, 1)

    if need(dtype, weights) <= capacity:
        return
    fixes = []
    if weights == "cast" and need(dtype, "stored") <= capacity:
        fixes.append(f'weights="stored" ({format_bytes(need(dtype, "stored"))})')
    if np.dtype(dtype) == np.float64 and need(jnp.float32, "stored") <= capacity:
        fixes.append(f'dtype="float32" ({format_bytes(need(jnp.float32, "stored"))}; maps rounded to float32)')
    room = capacity - widened_layer_bytes(config, np.dtype(dtype).itemsize, 1)
    if room > 0:
        n = -(-held_bytes(files, expected, dtype, weights) // room)
        fixes.append(f"a mesh of {n} or more devices (mesh=eqlin.device_mesh(model={n}))")
    split = f" split {n_model} ways" if n_model > 1 else ""
    raise MemoryBudgetError(
        f"loading {folder} in {np.dtype(dtype).name} (weights={weights!r}) needs about "
        f"{format_bytes(need(dtype, weights))} per device (the weights{split} and one widened layer), more "
        f"than the {format_bytes(capacity)} one device holds; nothing was read. Use "
        + (" or ".join(fixes) if fixes else "a device with more memory") + " (memory_limit sets the capacity)")


HOST_ALIGNMENT = 64  # bytes: JAX's CPU client adopts a host array this aligned without copying it


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised host array whose data start at a multiple of `HOST_ALIGNMENT` bytes, so that placing
    it on a CPU device (`place`) aliases it instead of copying it: the load then holds every weight once
    (numpy's own large arrays are 16-byte aligned, and JAX frees the host array it copied from only at its
    next garbage collection: one more copy of the largest weights until then)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def place(host: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """`host` on this process's devices: whole on the default device, or with `sharding` each device given only
    its own slice, copied from this process's host array. No cross-process traffic: `jax.device_put` of a host
    array onto devices of several processes all-gathers it to check that every process holds the same value."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, host.__getitem__)


def load_params(folder: Path, config: ModelConfig, spec: FamilySpec, dtype: jnp.dtype, *, mesh: Mesh | None = None,
                weights: str = "stored", memory_limit: int | None = None) -> Params:
    """Read, check (`check_tensors`, `read_finite`) and stack every weight for a model computing in `dtype`.
    `weights="stored"`: each tensor stays at the checkpoint's dtype where it widens to `dtype` exactly
    (`storage_for`; bfloat16 as bit patterns, `eqlin.params.to_storage`); "cast": every tensor cast to
    `dtype` here. A field whose layers are stored at different dtypes is cast. Each field is stacked
    one layer at a time into a host array that a CPU device adopts without a copy (`aligned_empty`) and goes
    to its devices as soon as it is stacked, so the host never holds more than one field beyond the placed
    weights, and one tensor's memory map. With `mesh`, weights are placed tensor-parallel over its "model" axis
    (`eqlin.params.partition_specs`), never whole on one device. A load that cannot fit is refused before
    any weight is read (`check_load_fits`; `memory_limit`: one device's capacity in bytes)."""
    files = open_weight_files(folder)
    expected = check_tensors(files, config, spec, folder)
    n_model = 1 if mesh is None else dict(mesh.shape).get(MODEL_AXIS, 1)
    check_load_fits(files, expected, config, dtype, weights, n_model, memory_limit, folder)
    dtypes = {name: storage_for(files[name].header[name][0], e.shape, dtype, weights) for name, e in expected.items()}

    by_field: dict[str, list[str]] = {}
    top: dict[str, str] = {}
    for name, (fields, layer, _, _) in expected.items():
        if layer is None:
            top[fields[0]] = name
        for field in fields if layer is not None else ():
            by_field.setdefault(field, [None] * config.num_layers)[layer] = name

    def host_field(field: str, names: list[str]) -> np.ndarray:
        """The field's layers stacked (L, ...) at their common storage dtype, read one layer at a time: the
        memory map of one layer's tensor is released before the next is read."""
        common = {dtypes[n] for n in names}
        field_dtype = common.pop() if len(common) == 1 else np.dtype(dtype)
        stacked, bad = None, []
        for layer, name in enumerate(names):
            fields, _, _, transposed = expected[name]
            tensor, finite = read_checked(files, name, field_dtype)
            bad += [] if finite else [name]
            rows = np.cumsum(_rows(config, spec, fields))[:-1]
            part = to_storage(np.split(tensor.T if transposed else tensor, rows)[fields.index(field)])
            if stacked is None:
                stacked = aligned_empty((len(names), *part.shape), part.dtype)
            stacked[layer] = part
        refuse_not_finite(bad, dict.fromkeys(bad, field_dtype))
        return stacked

    def host_top(name: str) -> np.ndarray:
        """A top-level tensor (the embedding, the final norm...), read into a fresh host array: not mapped
        (a memory-mapped embedding and its copy would both be resident)."""
        stored, shape = files[name].header[name]
        if dtypes[name] != stored:  # cast at load
            return to_storage(read_finite(files, [name], dtypes)[name])
        out = aligned_empty(shape, stored)
        files[name].read_into(name, out)
        refuse_not_finite([] if all_finite(out) else [name], dtypes)
        return to_storage(out)

    skeleton = Params(layers=LayerParams(**dict.fromkeys(by_field, 0)), **dict.fromkeys(top, 0))
    placement = None if mesh is None else param_shardings(skeleton, config, mesh)
    layers = LayerParams(**{f: place(host_field(f, names), placement and getattr(placement.layers, f))
                            for f, names in by_field.items()})
    tops = {f: place(host_top(name), placement and getattr(placement, f))
            for f, name in top.items()}
    return Params(layers=layers, **tops, compute_dtype=np.dtype(dtype).name)

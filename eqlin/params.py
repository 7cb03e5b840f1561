"""Parameter pytrees. Linear weights keep the HF layout (out_features, in_features); every per-layer
array is stacked on a leading layer axis L so the forward pass can `lax.scan` over layers.

Storage and compute dtypes. A leaf holds a weight at its *storage* dtype, which may be narrower than
the dtype the model computes in (`Params.dtype`): bfloat16, float16 and float32 widen to float64
exactly (and bfloat16, float16 to float32), so a weight kept as the checkpoint stored it and widened
where it is used gives the same bits as one cast at load. `widen` is the one place this happens, and
every use of a weight goes through it: `eqlin.decoder.decoder_layer` widens one layer's slice inside
the scanned layer body, the embedding widens the rows it gathers, the unembedding a chunk of the
vocabulary at a time. Only matrices are held narrower (the projections, the embeddings): vectors
(norm scales, biases) are few bytes and held at the compute dtype, because XLA's CPU backend fuses a
conversion into the elementwise code that reads it, which can then round a product-sum differently
(a fused multiply-add), whereas a matrix product reads its widened operand as it reads any other. A
uint16 leaf is bfloat16 held as its bit patterns (`to_storage`): XLA's CPU
backend converts a bfloat16 array that a scan reads to a float32 copy of the whole stack before the
loop (4 bytes per weight more), which bit patterns never are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from eqlin.config import ModelConfig
from eqlin.errors import InputError
from eqlin.quantized import QuantizedTensor

Array = jax.Array
BASIS_AXIS = "basis"  # the mesh axis that the rows of J (the output's basis vectors) are split over
MODEL_AXIS = "model"  # the mesh axis that tensor-parallel weights are split over
BF16_BITS = np.dtype(np.uint16)  # the storage of a bfloat16 weight: its bit patterns
# Storage dtypes that widen exactly to each compute dtype (every value, so every product, the same).
EXACT_WIDENING = {"float64": ("bfloat16", "float16", "float32", "float64"),
                  "float32": ("bfloat16", "float16", "float32"), "bfloat16": ("bfloat16",)}


def storage_dtype(a) -> np.dtype:
    """The dtype a leaf's values have: bfloat16 for bit patterns (uint16), else its own."""
    return np.dtype(jnp.bfloat16) if a.dtype == BF16_BITS else np.dtype(a.dtype)


def to_storage(a: np.ndarray) -> np.ndarray:
    """A host array as a leaf holds it: bfloat16 as its bit patterns (a view, no copy), else itself."""
    return a.view(BF16_BITS) if a.dtype == jnp.bfloat16 else a


def widen(a: Array | None, dtype) -> Array | None:
    """The value of a stored leaf `a` (any shape) at the compute `dtype`, exactly for every pair in
    EXACT_WIDENING (a no-op at the same dtype). None stays None.

    Bit patterns become float32 by a shift (a bfloat16 is the top half of a float32). float32 becomes
    float64 in integer arithmetic on the bits (`_float32_bits_to_float64`): XLA's CPU backend flushes
    float32 subnormals (|w| < 2⁻¹²⁶, bfloat16's too) to zero when it converts them. A `QuantizedTensor`
    (GGUF blocks) is dequantized to gguf-py's float32 values first (`eqlin.quantized`)."""
    if a is None:
        return None
    if isinstance(a, QuantizedTensor):
        a = a.dequantize()
    dtype = np.dtype(dtype)
    bits = None
    if a.dtype == BF16_BITS:
        bits = a.astype(jnp.uint32) << 16
    elif a.dtype == jnp.float32 and dtype == jnp.float64:
        bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    if bits is None:
        return a.astype(dtype)
    if dtype == jnp.float64:
        return _float32_bits_to_float64(bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _float32_bits_to_float64(bits: Array) -> Array:
    """float64 values of float32 bit patterns (uint32, any shape), exactly, subnormals and NaN payloads
    included: sign kept; exponent rebiased (+1023 − 127), or all ones for inf/NaN; fraction shifted up 29
    bits; a subnormal m·2⁻¹⁴⁹ normalised by its leading bit p (exponent p + 874, fraction m·2^(52−p))."""
    wide = bits.astype(jnp.uint64)
    exponent, fraction = (wide >> 23) & 0xFF, wide & 0x7FFFFF
    lead = 31 - jax.lax.clz(jnp.maximum(bits & 0x7FFFFF, 1)).astype(jnp.uint64)  # top bit of a subnormal's m
    normal = ((exponent + 896) << 52) | (fraction << 29)
    special = (jnp.uint64(0x7FF) << 52) | (fraction << 29)
    subnormal = ((lead + 874) << 52) | ((fraction << (52 - lead)) & ((1 << 52) - 1))
    magnitude = jnp.where(exponent == 0xFF, special, jnp.where(exponent > 0, normal,
                                                               jnp.where(fraction > 0, subnormal, 0)))
    return jax.lax.bitcast_convert_type(((wide >> 31) << 63) | magnitude, jnp.float64)


def widen_tree(tree, dtype):
    """`widen` on every leaf of a pytree (one layer's LayerParams slice, say)."""
    return jax.tree_util.tree_map(lambda a: widen(a, dtype), tree, is_leaf=is_quantized)


def is_quantized(a) -> bool:
    """Whether `a` is a `QuantizedTensor` (a weight as a pytree's leaf, though it holds two arrays)."""
    return isinstance(a, QuantizedTensor)


def weight_leaves(tree) -> list:
    """The weights of a pytree, a `QuantizedTensor` as one (its `shape` the dequantized shape)."""
    return jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """Weights of all decoder layers, stacked: every field has a leading axis of size L.

    Shapes (after the L axis): q_proj (H·hd, d), k_proj/v_proj (K·hd, d), o_proj (d, H·hd),
    gate_proj/up_proj (F, d), down_proj (d, F), norms (d,), q_norm/k_norm (hd,) per head or
    (H·hd,)/(K·hd,) over the full projection (OLMo 2), biases q_bias (H·hd,), k_bias/v_bias (K·hd,)
    (Qwen 2, GPT-2), o_bias (d,), up_bias (F,), down_bias (d,), attn_in_norm_bias/mlp_in_norm_bias
    (d,) (GPT-2's LayerNorms).
    A norm, bias or gate projection (GPT-2's MLP has none) the family does not have is None.
    """

    q_proj: Array
    k_proj: Array
    v_proj: Array
    o_proj: Array
    up_proj: Array
    down_proj: Array
    gate_proj: Array | None = None
    attn_in_norm: Array | None = None
    attn_out_norm: Array | None = None
    mlp_in_norm: Array | None = None
    mlp_out_norm: Array | None = None
    q_norm: Array | None = None
    k_norm: Array | None = None
    q_bias: Array | None = None
    k_bias: Array | None = None
    v_bias: Array | None = None
    o_bias: Array | None = None
    up_bias: Array | None = None
    down_bias: Array | None = None
    attn_in_norm_bias: Array | None = None
    mlp_in_norm_bias: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """All weights of one decoder. `lm_head` is None when the unembedding is tied to `embed`;
    `position_embed` and `final_norm_bias` are GPT-2's (learned positions, LayerNorm bias), else None.

    Every leaf is at its storage dtype (module docstring): a uint16 leaf holds bfloat16 bit patterns,
    any other leaf its values at its own dtype; `widen(leaf, params.dtype)` is its value as computed.
    `compute_dtype` (static) names the dtype the model computes in; None: the leaves' own (weights
    cast at load)."""

    embed: Array  # (V, d)
    layers: LayerParams
    final_norm: Array  # (d,)
    lm_head: Array | None = None  # (V, d)
    position_embed: Array | None = None  # (max_position_embeddings, d)
    final_norm_bias: Array | None = None  # (d,)
    compute_dtype: str | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def dtype(self) -> np.dtype:
        """The dtype the model computes in (and of its input embeddings)."""
        return np.dtype(self.compute_dtype) if self.compute_dtype else storage_dtype(self.embed)

    @property
    def weights(self) -> str:
        """"quantized" when some weight is held in GGUF blocks (`eqlin.quantized`), "stored" when some leaf is
        held narrower than the compute dtype (widened where used), else "cast"."""
        if any(map(is_quantized, weight_leaves(self))):
            return "quantized"
        narrower = {storage_dtype(a) for a in jax.tree_util.tree_leaves(self)} - {self.dtype}
        return "stored" if narrower else "cast"

    @property
    def unembedding(self) -> Array:
        """W_U, shape (V, d), stored (`widen` it, or use `eqlin.decoder.unembed`): logits = W_U · y."""
        return self.embed if self.lm_head is None else self.lm_head


def expected_shapes(config: ModelConfig, norm_fields: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's slice of every LayerParams field the family has (norms `norm_fields`, biases
    `config.biases`), keyed by field name."""
    d, hd, F = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {
        "q_proj": (config.q_size, d),
        "k_proj": (config.kv_size, d),
        "v_proj": (config.kv_size, d),
        "o_proj": (d, config.q_size),
        **({"gate_proj": (F, d)} if config.gated_mlp else {}),
        "up_proj": (F, d),
        "down_proj": (d, F),
    }
    shapes.update({name: (d,) for name in norm_fields})
    if config.qk_norm == "head":
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    elif config.qk_norm == "full":
        shapes.update(q_norm=(config.q_size,), k_norm=(config.kv_size,))
    bias_shapes = {"q_bias": (config.q_size,), "k_bias": (config.kv_size,), "v_bias": (config.kv_size,),
                   "o_bias": (d,), "up_bias": (F,), "down_bias": (d,), "attn_in_norm_bias": (d,),
                   "mlp_in_norm_bias": (d,)}
    shapes.update({name: bias_shapes[name] for name in config.biases if name in bias_shapes})
    return shapes


def partition_specs(params: Params, config: ModelConfig, n_model: int) -> Params:
    """Tensor-parallel layout (Megatron style) over a mesh axis "model" of size `n_model`, as a Params
    tree of PartitionSpecs (None where `params` has None).

    Column-parallel: q_proj by query heads, k/v_proj by kv heads, gate/up_proj by rows of F (their biases
    alike); row-parallel:
    o_proj and down_proj on their input axis, so each device's heads and F-slice stay local and one
    all-reduce per block joins them. The embedding and lm_head split the vocabulary. A weight whose split
    axis does not divide by `n_model` (e.g. one kv head over 2 devices) is replicated; norms, the biases of
    row-parallel products and position embeddings are replicated, and so are GGUF weights held quantized
    (`eqlin.quantized.QuantizedTensor`).
    """
    def split(ok: bool, axis: int, ndim: int) -> P:
        return P(*(MODEL_AXIS if i == axis else None for i in range(ndim))) if ok and n_model > 1 else P()

    heads = config.num_heads % n_model == 0
    kv = config.num_kv_heads % n_model == 0
    ff = config.intermediate_size % n_model == 0
    vocab = config.vocab_size % n_model == 0
    replicated = jax.tree_util.tree_map(lambda _: P(), params)
    splits = {"q_proj": (heads, 1, 3), "k_proj": (kv, 1, 3), "v_proj": (kv, 1, 3), "o_proj": (heads, 2, 3),
              "gate_proj": (ff, 1, 3), "up_proj": (ff, 1, 3), "down_proj": (ff, 2, 3), "q_bias": (heads, 1, 2),
              "k_bias": (kv, 1, 2), "v_bias": (kv, 1, 2), "up_bias": (ff, 1, 2)}

    def splittable(a) -> bool:
        return a is not None and not is_quantized(a)

    layers = dataclasses.replace(replicated.layers, **{name: split(*how) for name, how in splits.items()
                                                       if splittable(getattr(params.layers, name))})
    return dataclasses.replace(replicated, layers=layers, **{name: split(vocab, 0, 2) for name in ("embed", "lm_head")
                                                             if splittable(getattr(params, name))})


def check_mesh(mesh: object) -> Mesh:
    """`mesh` itself if it is a `Mesh` with axes ("basis", "model"), both `AxisType.Auto` (eqlin leaves the
    "model" axis to XLA's partitioner and makes "basis" manual itself); else an InputError naming the fix."""
    if not (isinstance(mesh, Mesh) and set(mesh.axis_names) == {BASIS_AXIS, MODEL_AXIS}
            and all(t == AxisType.Auto for t in mesh.axis_types)):
        raise InputError(f"mesh must be a jax.sharding.Mesh with axes ('basis', 'model') of type AxisType.Auto, got "
                         f"{mesh!r:.120}; build it with eqlin.device_mesh(model=k) (jax.make_mesh types its axes "
                         "Explicit unless given axis_types=(AxisType.Auto,) * 2)")
    return mesh


def param_shardings(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """`partition_specs` as NamedShardings on `mesh` (axis "model" if it has one, else all replicated)."""
    specs = partition_specs(params, config, dict(mesh.shape).get(MODEL_AXIS, 1))
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)

"""GGUF (llama.cpp) weight matrices held in their quantized blocks and dequantized where they are used.

A GGUF matrix (out, in) is stored row by row; each row is a run of blocks of `in / block_size` weights,
each block `type_size` bytes: a float16 scale (and for the K types, 6-bit sub-block scales and minimums
and a float16 `dmin`), then packed integer codes. `QuantizedTensor` keeps those bytes as a uint8 array
(..., out, row_bytes) and `dequantize` turns them into the float32 values gguf-py's
`gguf.quants.dequantize` gives (what `eqlin.gguf`'s float32 conversion and transformers' GGUF loader
hold), in the same float32 operations in the same order:

- Q8_0 (34 bytes per 32): d·q, q int8;           Q4_0 (18 per 32): d·(q − 8), q 4-bit;
- Q5_0 (22 per 32): d·(q − 16), q 5-bit (4 low bits packed by halves, the fifth from a 32-bit mask);
- Q4_K (144 per 256): (d·sc)·q − (dmin·m), q 4-bit, sc and m 6-bit per 32 weights;
- Q5_K (176 per 256): as Q4_K with a fifth bit per weight;
- Q6_K (210 per 256): (d·sc)·(q − 32), q 6-bit, sc int8 per 16 weights.

Every product of a float16 scale (11 significant bits) and integers of at most 8 + 6 bits is exact in
float32, so each value is rounded once: Q4_K/Q5_K's subtraction of two exact products (a fused
multiply-add rounds it the same), Q6_K's product of three factors (in any order); the others are exact.
So XLA's contraction or reordering cannot change a bit, and float32 widens exactly to the compute dtype
(`eqlin.params.widen`). A field whose layers use different types (Q4_K_M puts attn_v in Q5_0 or Q8_0,
ffn_down in Q4_K or Q6_K) holds every layer's rows padded to the longest and the layer's type as data
(`QuantizedTensor.kind`), and `lax.switch` picks the dequantizer inside the scanned layer body.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
QK_K = 256  # weights per K-type super-block


def _f16(lo: Array, hi: Array) -> Array:
    """float32 values of little-endian float16 bytes (uint8 arrays of one shape): exact, subnormals included."""
    bits = lo.astype(jnp.uint16) | (hi.astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _nibbles(qs: Array) -> Array:
    """(..., n) bytes -> (..., 2, n): the low 4 bits of every byte, then the high 4 bits."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _q8_0(b: Array) -> Array:  # b (..., 34)
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return q * _f16(b[..., 0], b[..., 1])[..., None]


def _q4_0(b: Array) -> Array:  # b (..., 18)
    q = _nibbles(b[..., 2:]).reshape(*b.shape[:-1], 32).astype(jnp.int8) - 8
    return _f16(b[..., 0], b[..., 1])[..., None] * q.astype(jnp.float32)


def _q5_0(b: Array) -> Array:  # b (..., 22)
    mask = sum(b[..., 2 + k].astype(jnp.uint32) << (8 * k) for k in range(4))  # little-endian uint32
    high = ((mask[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.uint8)
    low = _nibbles(b[..., 6:]).reshape(*b.shape[:-1], 32)
    q = (low | (high << 4)).astype(jnp.int8) - 16
    return _f16(b[..., 0], b[..., 1])[..., None] * q.astype(jnp.float32)


def _k_scales(s: Array) -> tuple[Array, Array]:
    """The 8 six-bit scales and minimums packed in the 12 bytes s (..., 12) of a Q4_K/Q5_K block."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scale = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    minimum = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale, minimum


def _k_affine(b: Array, q: Array) -> Array:
    """(d·sc)·q − dmin·m for a Q4_K/Q5_K block b (..., bytes) with codes q (..., 8, 32) float32."""
    scale, minimum = _k_scales(b[..., 4:16])
    d = (_f16(b[..., 0], b[..., 1])[..., None] * scale.astype(jnp.float32))[..., None]
    dm = (_f16(b[..., 2], b[..., 3])[..., None] * minimum.astype(jnp.float32))[..., None]
    return (d * q - dm).reshape(*b.shape[:-1], QK_K)


def _q4_k(b: Array) -> Array:  # b (..., 144)
    low = _nibbles(b[..., 16:].reshape(*b.shape[:-1], 4, 32)).reshape(*b.shape[:-1], 8, 32)
    return _k_affine(b, low.astype(jnp.float32))


def _q5_k(b: Array) -> Array:  # b (..., 176)
    low = _nibbles(b[..., 48:].reshape(*b.shape[:-1], 4, 32)).reshape(*b.shape[:-1], 8, 32)
    high = (b[..., None, 16:48] >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1  # (..., 8, 32)
    return _k_affine(b, (low | (high << 4)).astype(jnp.float32))


def _q6_k(b: Array) -> Array:  # b (..., 210)
    lead = b.shape[:-1]
    low = _nibbles(b[..., :128].reshape(*lead, 2, 64)).reshape(*lead, 8, 32)
    high = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3
    q = ((low | (high.reshape(*lead, 8, 32) << 4)).astype(jnp.int8) - 32).reshape(*lead, 16, 16)
    scale = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[..., 208], b[..., 209])[..., None] * scale)[..., None]
    return (d * q.astype(jnp.float32)).reshape(*lead, QK_K)


# GGML type name -> (weights per block, bytes per block, the block's float32 values).
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[Array], Array]]] = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q5_0": (32, 22, _q5_0),
    "Q4_K": (QK_K, 144, _q4_k), "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
}


def row_bytes(qtype: str, columns: int) -> int:
    """Bytes of one row of `columns` weights quantized as `qtype`."""
    size, nbytes, _ = DEQUANTIZERS[qtype]
    return columns // size * nbytes


def dequantize_rows(rows: Array, qtype: str, columns: int) -> Array:
    """float32 values (..., columns) of rows (..., ≥ row_bytes) of `qtype` blocks (bytes past a row's own
    are padding, ignored)."""
    size, nbytes, blocks = DEQUANTIZERS[qtype]
    n = columns // size
    return blocks(rows[..., :n * nbytes].reshape(*rows.shape[:-1], n, nbytes)).reshape(*rows.shape[:-1], columns)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized matrix, or a stack of them (one per layer), held as GGUF block bytes.

    blocks: uint8 (*stack, rows, row_bytes), every row padded to the longest of `qtypes`;
    kind: int32 (*stack,), the index in `qtypes` of each stacked matrix's type (shape () for one matrix).
    `qtypes` (static) names the GGML types, `columns` (static) the number of weights per row.
    Indexing (`t[i]`, `t[a:b]`, `t[ids]`) applies to the leading axis: a layer of a stack, or rows of one
    matrix. `jax.tree_util.tree_map(lambda a: a[i], layers)` slices both leaves alike."""

    blocks: Array
    kind: Array
    qtypes: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    columns: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized shape (*stack, rows, columns)."""
        return (*self.blocks.shape[:-1], self.columns)

    @property
    def nbytes(self) -> int:
        """Bytes held (the blocks and the types)."""
        return int(self.blocks.nbytes + self.kind.nbytes)

    def __getitem__(self, index) -> QuantizedTensor:
        kind = self.kind[index] if self.kind.ndim else self.kind
        return QuantizedTensor(self.blocks[index], kind, self.qtypes, self.columns)

    def dequantize(self) -> Array:
        """The float32 values, shape `self.shape`, exactly as gguf-py dequantizes them. A stack of
        several types dequantizes each matrix by its own (`lax.switch` on a scalar kind, `lax.map` over
        a stack)."""
        if len(self.qtypes) == 1:
            return dequantize_rows(self.blocks, self.qtypes[0], self.columns)
        branches = [lambda b, q=q: dequantize_rows(b, q, self.columns) for q in self.qtypes]
        if self.kind.ndim == 0:
            return jax.lax.switch(self.kind, branches, self.blocks)
        return jax.lax.map(lambda bk: jax.lax.switch(bk[1], branches, bk[0]),
                           (self.blocks.reshape(-1, *self.blocks.shape[-2:]), self.kind.reshape(-1))
                           ).reshape(self.shape)


def stack_quantized(matrices: list[tuple[str, np.ndarray]], columns: int) -> QuantizedTensor:
    """One QuantizedTensor (host arrays) from matrices given as (GGML type, block bytes (rows, row_bytes)),
    stacked on a new leading axis, each padded with zero bytes to the longest row."""
    qtypes = tuple(sorted({q for q, _ in matrices}))
    width = max(b.shape[-1] for _, b in matrices)
    blocks = np.stack([np.pad(b, [(0, 0), (0, width - b.shape[-1])]) for _, b in matrices])
    return QuantizedTensor(blocks, np.array([qtypes.index(q) for q, _ in matrices], np.int32), qtypes, columns)

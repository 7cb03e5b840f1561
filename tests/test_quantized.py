"""eqlin.quantized: GGUF blocks dequantized in JAX to exactly gguf-py's float32 values (random blocks of every
type, float16 scales normal and subnormal); stacks of mixed types dequantize each matrix by its own type.
Real tensors of the embedded model and whole maps from quantized weights: tests/test_gguf.py."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqlin.params import widen
from eqlin.quantized import DEQUANTIZERS, QuantizedTensor, dequantize_rows, row_bytes, stack_quantized

# Byte offsets of each type's float16 scales in its block (random bytes there could be inf or NaN).
_SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(qtype: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) random blocks of `qtype`: every code random, scales random finite float16 of either
    sign (a quarter of them subnormal)."""
    rng = np.random.default_rng(seed)
    size, nbytes, _ = DEQUANTIZERS[qtype]
    blocks = rng.integers(0, 256, (rows * (columns // size), nbytes), dtype=np.uint8)
    for at in _SCALES[qtype]:
        magnitude = np.where(rng.random(len(blocks)) < 0.25, rng.integers(0, 0x0400, len(blocks)),
                             rng.integers(0x0400, 0x7C00, len(blocks)))
        bits = (magnitude | (rng.integers(0, 2, len(blocks)) << 15)).astype(np.uint16)
        blocks[:, at:at + 2] = bits.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def same_bits(a, b) -> None:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS))
def test_every_type_dequantizes_as_gguf_py_bit_for_bit(qtype):
    columns = 2 * DEQUANTIZERS[qtype][0]
    rows = random_rows(qtype, 512, columns)
    assert rows.shape[1] == row_bytes(qtype, columns)
    ours = jax.jit(dequantize_rows, static_argnums=(1, 2))(rows, qtype, columns)
    same_bits(ours, gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[qtype]))


def test_a_stack_of_mixed_types_dequantizes_each_matrix_by_its_own():
    """Rows padded to the longest type; the type as data: a traced layer index picks the dequantizer."""
    columns = 256
    matrices = [(q, random_rows(q, 8, columns, seed)) for seed, q in enumerate(["Q6_K", "Q4_K", "Q8_0", "Q4_K"])]
    stack = stack_quantized(matrices, columns)
    assert stack.qtypes == ("Q4_K", "Q6_K", "Q8_0") and stack.shape == (4, 8, columns)
    assert stack.blocks.shape[-1] == max(row_bytes(q, columns) for q, _ in matrices)
    expected = [gguf.quants.dequantize(b, gguf.GGMLQuantizationType[q]) for q, b in matrices]
    same_bits(jax.jit(QuantizedTensor.dequantize)(stack), np.stack(expected))
    layer = jax.jit(lambda s, i: s[i].dequantize())
    for i, values in enumerate(expected):
        same_bits(layer(stack, jnp.asarray(i)), values)
    rows = jax.jit(lambda s, ids: widen(s[2][ids], jnp.float64))(stack, jnp.asarray([5, 0, 5]))  # gathered rows
    np.testing.assert_array_equal(rows, expected[2][[5, 0, 5]].astype(np.float64))

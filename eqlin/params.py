"""Parameter pytrees. Linear weights keep the HF layout (out_features, in_features); every per-layer
array is stacked on a leading layer axis L so the forward pass can `lax.scan` over layers."""

from __future__ import annotations

import dataclasses

import jax

from eqlin.config import ModelConfig

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """Weights of all decoder layers, stacked: every field has a leading axis of size L.

    Shapes (after the L axis): q_proj (H·hd, d), k_proj/v_proj (K·hd, d), o_proj (d, H·hd),
    gate_proj/up_proj (F, d), down_proj (d, F), norms (d,), q_norm/k_norm (hd,) per head or
    (H·hd,)/(K·hd,) over the full projection (OLMo 2).
    A norm the family does not have is None.
    """

    q_proj: Array
    k_proj: Array
    v_proj: Array
    o_proj: Array
    gate_proj: Array
    up_proj: Array
    down_proj: Array
    attn_in_norm: Array | None = None
    attn_out_norm: Array | None = None
    mlp_in_norm: Array | None = None
    mlp_out_norm: Array | None = None
    q_norm: Array | None = None
    k_norm: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """All weights of one decoder. `lm_head` is None when the unembedding is tied to `embed`."""

    embed: Array  # (V, d)
    layers: LayerParams
    final_norm: Array  # (d,)
    lm_head: Array | None = None  # (V, d)

    @property
    def unembedding(self) -> Array:
        """W_U, shape (V, d): logits = W_U · y."""
        return self.embed if self.lm_head is None else self.lm_head


def expected_shapes(config: ModelConfig, norm_fields: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shape of one layer's slice of every LayerParams field the family has, keyed by field name."""
    d, hd = config.hidden_size, config.head_dim
    shapes = {
        "q_proj": (config.q_size, d),
        "k_proj": (config.kv_size, d),
        "v_proj": (config.kv_size, d),
        "o_proj": (d, config.q_size),
        "gate_proj": (config.intermediate_size, d),
        "up_proj": (config.intermediate_size, d),
        "down_proj": (d, config.intermediate_size),
    }
    shapes.update({name: (d,) for name in norm_fields})
    if config.qk_norm == "head":
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    elif config.qk_norm == "full":
        shapes.update(q_norm=(config.q_size,), k_norm=(config.kv_size,))
    return shapes

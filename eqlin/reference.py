"""The PyTorch reference: a transformers model made float64-faithful, and detached, at run time and in memory.

Needs the torch extra (`pip install "eqlin[torch]"`: torch and transformers, from the tested floors up). `eqlin validate`
(`eqlin.validate`) and the tests grade eqlin against it; `load_transformers` loads a checkpoint folder as
they do.

transformers computes RMSNorm, the RoPE tables (inv_freq and cos/sin) and softmax in float32 even for a
float64 model, and keeps float32-rounded buffers (inv_freq, Gemma's embed_scale). Here the `forward` of the
model's own RMSNorm, rotary-embedding, attention and MLP *instances* is replaced (no library function is
touched) by the same math with every op at the model's dtype, and the buffers are recomputed in float64.

Detached additionally stops the gradient through every nonlinear coefficient (docs/method.md §1): the RMSNorm factor
`rsqrt(mean(x²)+eps)` (all norms, q/k norms and the final norm included), the activated gate `act(gate(x))` of
the GLU MLP, and the attention probabilities. The decoder is then linear in its input embeddings along the
gradient path, so `final_hidden(x) = Σ_t J_t x_t`.

Layer maps (`layer_maps`) are read off the model's own modules with forward hooks: a layer's residual output is
the decoder layer's output; its attention and MLP branches are what the layer adds to the residual stream, the
outputs of `self_attn` and `mlp`, or, where the family norms the branch before adding it (Gemma 3's sandwich,
OLMo 2's post-norm), of `post_attention_layernorm` and `post_feedforward_layernorm`. Every map is read at the last
position through the decoder's own final norm. Single-layer maps replace the input of one layer (a forward
pre-hook) and differentiate with respect to it.

Supported decoders: Llama, Mistral, Qwen 3, Gemma 3 (text, and the language model inside
Gemma3ForConditionalGeneration), Phi-3 (fused qkv/gate_up, partial rotary, longrope), OLMo 2 (post-norm, q/k
norm over the full projection width), Qwen 2 (q/k/v biases: the modules' own biases are kept, so the detached
map is affine and `final_hidden(x) − Σ_t J_t x_t` is its constant), GPT-2 (learned positions: the input
embeddings are token plus position embeddings, as eqlin's; LayerNorm with its scale detached; Conv1D
projections; GELU(z) = z·s(z) with s detached; biases everywhere). The replaced forwards handle one sequence
in a single pass (no incremental decoding); masks are built from positions `0..T-1` exactly as transformers'
masking_utils defines them.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen3", "gemma3_text", "phi3", "olmo2", "qwen2", "gpt2"})
# Families whose attention and MLP outputs go through a norm before the residual add.
BRANCH_NORM_MODEL_TYPES = frozenset({"gemma3_text", "olmo2"})
PARTS = ("residual", "attn", "mlp")


def load_transformers(folder, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The checkpoint in `folder` as transformers loads it: the class named in its config.json, eager
    attention, `dtype`, eval mode (stock: apply `make_float64_faithful` / `make_detached` for the reference)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, config.architectures[0])
    return model_cls.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def decoder(model: nn.Module) -> nn.Module:
    """The text decoder (embed_tokens, layers, norm, rotary_emb) of a causal LM or a Gemma 3 multimodal model
    (GPT-2: its transformer, with wte, wpe, h, ln_f)."""
    inner = model.model if hasattr(model, "model") else model.transformer
    return getattr(inner, "language_model", inner)


def rope_inv_freq(config, layer_type: str | None = None, long: bool = False) -> tuple[torch.Tensor, float]:
    """float64 inverse frequencies `(rotary_dim/2,)` and the cos/sin scale, by transformers' RoPE formulas.

    Covers rope_type "default", "linear", "llama3", "longrope" (its short factors, or with `long` its long
    ones; the scale is its attention factor) and "yarn" (the scale is its attention factor), and `partial_rotary_factor`; `layer_type` selects Gemma 3's
    per-layer-type parameters.
    """
    params = config.rope_parameters[layer_type] if layer_type else config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = params["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "longrope":
        original = params["original_max_position_embeddings"]
        factor = params.get("factor") or config.max_position_embeddings / original
        scale = params.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float64)
        return inv_freq / ext, scale
    elif kind == "yarn":
        return _yarn_inv_freq(config, params, inv_freq, dim)
    elif kind != "default":
        raise NotImplementedError(f"rope_type {kind!r} is not supported by the reference")
    return inv_freq, 1.0


def _yarn_inv_freq(config, params: dict, inv_freq: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN's float64 inverse frequencies and attention factor, transformers' `_compute_yarn_parameters` with
    its float32 frequencies and ramp taken in float64 (`truncate` read where transformers reads it: the
    un-nested config.rope_parameters)."""
    base, original = params["rope_theta"], params["original_max_position_embeddings"]
    factor = params["factor"] or config.max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    scale = params.get("attention_factor")
    if scale is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        scale = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim \
            else get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if config.rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / factor) * inv_freq * (1 - extrapolation) + inv_freq * extrapolation, float(scale)


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x · rsqrt(mean(x²)+eps) · (offset + w)` at x's dtype; the factor is detached when detaching."""
    factor = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eqlin_eps)
    if self.eqlin_detach:
        factor = factor.detach()
    return x * factor * (self.eqlin_offset + self.weight)


def _layer_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm `(x − mean) · rsqrt(var + eps) · w + b` at x's dtype; the factor is detached when detaching
    (the mean subtraction is linear and stays)."""
    centered = x - x.mean(-1, keepdim=True)
    factor = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps)
    if self.eqlin_detach:
        factor = factor.detach()
    return centered * factor * self.weight + self.bias


def _rotary_forward(
    self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `(B, T, rotary_dim)` computed in float64 from the float64 inv_freq, cast to x's dtype."""
    prefix = f"{layer_type}_" if layer_type else ""
    inv_freq = getattr(self, f"{prefix}inv_freq")
    scale = getattr(self, f"{prefix}attention_scaling")
    original = getattr(self, f"{prefix}eqlin_longrope_original", None)  # longrope: factors by sequence length
    if original is not None and int(position_ids.max()) + 1 > original:
        inv_freq = getattr(self, f"{prefix}eqlin_long_inv_freq")
    freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `rotary_dim` features of `x (B, H, T, head_dim)`; the rest pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((rot * cos) + (_rotate_half(rot) * sin), rest), dim=-1)


def _allowed(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """`(T, T)` bool: causal `kv <= q`, and `kv > q - window` on sliding layers (masking_utils' definitions)."""
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    allowed = kv <= q
    if window is not None:
        allowed &= kv > q - window
    return allowed


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | dict | None = None,
    past_key_values=None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention `(B, T, d) -> (B, T, d)` and probabilities `(B, H, T, T)`, at the input dtype.

    transformers' `attention_mask` is ignored: the causal/sliding mask is rebuilt from positions. The KV cache
    comes as `past_key_values` (transformers 5.23) or `cache` (5.25: the old name deprecated).
    """
    past_key_values = past_key_values if past_key_values is not None else cache
    batch, length, _ = hidden_states.shape
    config, head_dim = self.config, self.head_dim
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", n_heads)  # GPT-2's config has none
    if hasattr(self, "qkv_proj"):  # Phi-3
        q, k, v = self.qkv_proj(hidden_states).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
    elif hasattr(self, "c_attn"):  # GPT-2: Conv1D, q, k, v side by side
        q, k, v = self.c_attn(hidden_states).split(n_heads * head_dim, -1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    qk_norm = hasattr(self, "q_norm")
    full_width_norm = qk_norm and self.q_norm.weight.numel() != head_dim  # OLMo 2
    if full_width_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.view(batch, length, -1, head_dim) for t in (q, k, v))
    if qk_norm and not full_width_norm:  # Qwen 3, Gemma 3: per head
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if position_embeddings is not None:  # GPT-2: learned positions, no RoPE
        cos, sin = position_embeddings
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)

    if past_key_values is not None:
        if past_key_values.get_seq_length(self.layer_idx) > 0:
            raise NotImplementedError("the reference attention runs a single pass; incremental decoding is unsupported")
        past_key_values.update(k, v, self.layer_idx)

    groups = n_heads // n_kv
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # No attention-logit softcap: the supported families' attention never applies one (Gemma 3's modules keep
    # `attn_logit_softcapping` from the config but do not pass it on), so a config that sets it runs uncapped.
    scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
    window = self.sliding_window if hasattr(self, "sliding_window") else getattr(config, "sliding_window", None)
    scores = scores.masked_fill(~_allowed(length, window, scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if self.eqlin_detach:
        probs = probs.detach()
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, n_heads * head_dim)
    return (self.c_proj(out) if hasattr(self, "c_proj") else self.o_proj(out)), probs


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GLU MLP `down(act(gate(x)) ⊙ up(x))`; the activated gate is detached when detaching. GPT-2's
    `c_proj(GELU(c_fc(x)))` as `c_proj(s(z) · z)`, z = c_fc(x), s = GELU(z)/z detached."""
    if hasattr(self, "c_fc"):  # GPT-2
        z = self.c_fc(x)
        if type(self.act).__name__ == "GELUActivation":  # exact GELU: s = Φ
            coefficient = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
        else:  # gelu_new / GELUTanh: the tanh approximation
            coefficient = 0.5 * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))
        if self.eqlin_detach:
            coefficient = coefficient.detach()
        return self.c_proj(coefficient * z)
    if hasattr(self, "gate_up_proj"):  # Phi-3
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    act = self.act_fn if hasattr(self, "act_fn") else self.activation_fn
    activated = act(gate)
    if self.eqlin_detach:
        activated = activated.detach()
    return self.down_proj(activated * up)


def _set_rope_buffers(rotary: nn.Module) -> None:
    """Replace the float32-computed inv_freq buffers by float64 ones (one set per layer type for Gemma 3)."""
    layer_types = list(rotary.rope_type) if isinstance(rotary.rope_type, dict) else [None]
    for layer_type in layer_types:
        prefix = f"{layer_type}_" if layer_type else ""
        inv_freq, scale = rope_inv_freq(rotary.config, layer_type)
        device = getattr(rotary, f"{prefix}inv_freq").device
        setattr(rotary, f"{prefix}inv_freq", inv_freq.to(device))
        setattr(rotary, f"{prefix}original_inv_freq", inv_freq.clone().to(device))
        setattr(rotary, f"{prefix}attention_scaling", scale)
        params = rotary.config.rope_parameters[layer_type] if layer_type else rotary.config.rope_parameters
        if params["rope_type"] == "longrope":
            setattr(rotary, f"{prefix}eqlin_long_inv_freq", rope_inv_freq(rotary.config, layer_type, long=True)[0])
            setattr(rotary, f"{prefix}eqlin_longrope_original", params["original_max_position_embeddings"])


def _patch(model: nn.Module, detach: bool) -> nn.Module:
    dec = decoder(model)
    model_type = dec.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not supported; expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
    if getattr(dec.config, "use_bidirectional_attention", False):
        raise NotImplementedError("bidirectional Gemma attention is not supported")
    found = set()
    for module in dec.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.eqlin_eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
            module.eqlin_offset = 1.0 if name.startswith("Gemma") else 0.0
            module.forward = types.MethodType(_rms_norm_forward, module)
            found.add("norm")
        elif isinstance(module, nn.LayerNorm):  # GPT-2
            module.forward = types.MethodType(_layer_norm_forward, module)
            found.add("norm")
        elif name.endswith("RotaryEmbedding"):
            _set_rope_buffers(module)
            module.forward = types.MethodType(_rotary_forward, module)
            found.add("rotary")
        elif name.endswith("Attention"):
            module.forward = types.MethodType(_attention_forward, module)
            found.add("attention")
        elif name.endswith("MLP"):
            module.forward = types.MethodType(_mlp_forward, module)
            found.add("mlp")
        else:
            continue
        module.eqlin_detach = detach
    if found | {"rotary"} != {"norm", "rotary", "attention", "mlp"} or ("rotary" in found) == (model_type == "gpt2"):
        raise RuntimeError(f"expected norm, rotary (not for GPT-2), attention and MLP modules in "
                           f"{type(dec).__name__}, found {found}")
    embedding = _token_embedding(dec)
    if hasattr(embedding, "scalar_embed_scale"):  # Gemma: sqrt(d) exactly, not its float32 rounding
        embedding.embed_scale = torch.tensor(embedding.scalar_embed_scale, dtype=torch.float64)
    return model


def make_float64_faithful(model: nn.Module) -> nn.Module:
    """In place: every op at the model's own dtype, buffers exact in float64. Returns `model`."""
    return _patch(model, detach=False)


def make_detached(model: nn.Module) -> nn.Module:
    """In place: float64-faithful, plus stop-gradient on every nonlinear coefficient. Returns `model`."""
    return _patch(model, detach=True)


def is_detached(model: nn.Module) -> bool:
    dec = decoder(model)
    return getattr(final_norm(dec), "eqlin_detach", False)


def _token_embedding(dec: nn.Module) -> nn.Module:
    return dec.wte if hasattr(dec, "wte") else dec.embed_tokens


def _position_embeddings(dec: nn.Module, length: int) -> torch.Tensor | None:
    """GPT-2's learned position embeddings of positions 0 … T−1 `(T, d)`, or None (RoPE families)."""
    return dec.wpe(torch.arange(length)) if hasattr(dec, "wpe") else None


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings `(T, d)` for `input_ids (T,)` as the decoder consumes them (Gemma: scaled by √d;
    GPT-2: token plus position embeddings, what its first block reads)."""
    dec = decoder(model)
    ids = torch.as_tensor(input_ids).reshape(-1)
    positions = _position_embeddings(dec, ids.shape[0])
    tokens = _token_embedding(dec)(ids)
    return tokens if positions is None else tokens + positions


def final_hidden(model: nn.Module, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """`(d,)`: the last position after the final norm, for `inputs_embeds (T, d)` (`embed`'s space: GPT-2 adds
    its position embeddings itself, so they are taken off first)."""
    out = decoder(model)(inputs_embeds=_token_part(model, inputs_embeds)[None], use_cache=False)
    return out.last_hidden_state[0, -1]


def _token_part(model: nn.Module, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """What the decoder takes as `inputs_embeds` for `embed`'s `(T, d)`: GPT-2 adds its position embeddings
    itself, so they are taken off; the others take it as it is."""
    positions = _position_embeddings(decoder(model), inputs_embeds.shape[0])
    return inputs_embeds if positions is None else inputs_embeds - positions


def detached_jacobian(model: nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """Detached Jacobian `(d, T, d)` of `final_hidden` w.r.t. the input embeddings, at the model's dtype.

    `model` must have gone through `make_detached`; load it in float64 for exactness.
    """
    if not is_detached(model):
        raise ValueError("call make_detached(model) first")
    x = embed(model, input_ids).detach()
    jac = torch.autograd.functional.jacobian(lambda e: final_hidden(model, e), x, vectorize=True)
    return jac.numpy()


def final_norm(dec: nn.Module) -> nn.Module:
    """The decoder's final norm (GPT-2: `ln_f`)."""
    return dec.ln_f if hasattr(dec, "ln_f") else dec.norm


def blocks(dec: nn.Module) -> nn.ModuleList:
    """The decoder's layers (GPT-2 calls them `h`)."""
    return dec.h if hasattr(dec, "h") else dec.layers


def branch_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Per layer, (attention branch, MLP branch): the modules whose outputs the layer adds to its residual stream."""
    dec = decoder(model)
    if dec.config.model_type in BRANCH_NORM_MODEL_TYPES:
        return [(layer.post_attention_layernorm, layer.post_feedforward_layernorm) for layer in blocks(dec)]
    return [(getattr(layer, "self_attn", None) or layer.attn, layer.mlp) for layer in blocks(dec)]


@contextlib.contextmanager
def _recorded(model: nn.Module, replace: tuple[int, torch.Tensor] | None = None) -> Iterator[dict[str, list]]:
    """Hooks on every layer while inside: a dict with, per layer in order, its "input", "residual" (output), "attn"
    and "mlp" branch outputs, each `(T, d)`, filled by the next forward pass. `replace=(l, h)` feeds `h (T, d)` to
    layer l in place of what the layers before it computed."""
    dec = decoder(model)
    seen: dict[str, list] = {name: [None] * len(blocks(dec)) for name in ("input",) + PARTS}

    def record(name: str, i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # self_attn returns (out, probs)
            seen[name][i] = out[0]
        return hook

    def feed(i: int):
        def pre_hook(module, args, kwargs):
            args = list(args) if args else []
            if replace is not None and replace[0] == i:
                if args:
                    args[0] = replace[1][None]
                else:
                    kwargs["hidden_states"] = replace[1][None]
            seen["input"][i] = (args[0] if args else kwargs["hidden_states"])[0]
            return tuple(args), kwargs
        return pre_hook

    handles = []
    for i, (layer, (attn, mlp)) in enumerate(zip(blocks(dec), branch_modules(model))):
        handles.append(layer.register_forward_pre_hook(feed(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(record("residual", i)))
        handles.append(attn.register_forward_hook(record("attn", i)))
        handles.append(mlp.register_forward_hook(record("mlp", i)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def layer_outputs(model: nn.Module, inputs_embeds: torch.Tensor, replace: tuple[int, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Every layer's "input", "residual", "attn" and "mlp", each stacked `(L, T, d)`, for `inputs_embeds (T, d)`;
    `replace` as in `_recorded`."""
    with _recorded(model, replace) as seen:
        decoder(model)(inputs_embeds=_token_part(model, inputs_embeds)[None], use_cache=False)
    return {name: torch.stack(values) for name, values in seen.items()}


def layer_maps(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int], *, scope: str = "cumulative",
               parts: Sequence[str] = PARTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(J, inputs, outputs) of each layer's `parts` at the last position through the final norm, at the model's
    dtype: J `(P, n, d, T, d)`, outputs `(P, n, d)` for P parts and n layers; inputs `(T, d)` (cumulative: the input
    embeddings) or `(n, T, d)` (single: what enters each layer). Cumulative maps differentiate with respect to the
    input embeddings, single-layer maps with respect to the layer's own input. Detached if `make_detached` was
    applied, the plain Jacobian if only `make_float64_faithful`."""
    norm = decoder(model).norm
    x = embed(model, input_ids).detach()

    def read(out: dict[str, torch.Tensor], chosen: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.stack([norm(out[p][l, -1]) for l in chosen]) for p in parts])  # (P, n, d)

    if scope == "cumulative":
        jac = torch.autograd.functional.jacobian(lambda e: read(layer_outputs(model, e), layers), x, vectorize=True)
        with torch.no_grad():
            y = read(layer_outputs(model, x), layers)
        return jac.numpy(), x.numpy(), y.numpy()
    if scope != "single":
        raise ValueError(f"scope must be 'cumulative' or 'single', got {scope!r}")
    with torch.no_grad():
        stream = layer_outputs(model, x)["input"]  # (L, T, d): what enters each layer
    jacs, ys = [], []
    for l in layers:
        h = stream[l].detach()
        jac = torch.autograd.functional.jacobian(lambda v: read(layer_outputs(model, x, (l, v)), [l]), h,
                                                 vectorize=True)
        jacs.append(jac[:, 0])
        with torch.no_grad():
            ys.append(read(layer_outputs(model, x, (l, h)), [l])[:, 0])
    return torch.stack(jacs, 1).numpy(), stream[list(layers)].numpy(), torch.stack(ys, 1).numpy()


def final_jacobian(model: nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """Jacobian `(d, T, d)` of `final_hidden` w.r.t. the input embeddings: detached or plain, as the model is."""
    x = embed(model, input_ids).detach()
    return torch.autograd.functional.jacobian(lambda e: final_hidden(model, e), x, vectorize=True).numpy()


def logit_jacobian(model: nn.Module, input_ids: torch.Tensor, token_ids: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(J `(k, T, d)`, logits `(k,)`): the model's own output embedding (`lm_head`, tied or not) applied to the
    final hidden state, before any final logit softcapping, rows `token_ids`."""
    head = model.get_output_embeddings()
    rows = torch.as_tensor(list(token_ids))
    x = embed(model, input_ids).detach()

    def logits(e: torch.Tensor) -> torch.Tensor:
        return head(final_hidden(model, e))[rows]

    with torch.no_grad():
        values = logits(x)
    return torch.autograd.functional.jacobian(logits, x, vectorize=True).numpy(), values.numpy()


def stream_entering(model: nn.Module, input_ids: torch.Tensor, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(J `(d, T, d)`, h `(d,)`): the raw residual stream entering `layer` at the last position (transformers'
    `hidden_states[layer]`: the input embeddings for layer 0), and its Jacobian w.r.t. the input embeddings."""
    x = embed(model, input_ids).detach()

    def entering(e: torch.Tensor) -> torch.Tensor:
        out = decoder(model)(inputs_embeds=_token_part(model, e)[None], use_cache=False, output_hidden_states=True)
        return out.hidden_states[layer][0, -1]

    with torch.no_grad():
        h = entering(x)
    return torch.autograd.functional.jacobian(entering, x, vectorize=True).numpy(), h.numpy()


def logits_with_added(model: nn.Module, input_ids: torch.Tensor, layer: int,
                      added: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Last-position logits `(V,)` of the model with `added(h)` added to the residual stream `h (T, d)` entering
    `layer` (a forward pre-hook on that layer; layer 0's input is the input embeddings)."""
    def pre_hook(module, args, kwargs):
        if args:
            return (args[0] + added(args[0][0])[None], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + added(kwargs["hidden_states"][0])[None]}

    handle = blocks(decoder(model))[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(input_ids)[None], use_cache=False).logits[0, -1].numpy()
    finally:
        handle.remove()

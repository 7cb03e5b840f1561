"""The main job behind `eqlin analyze`: one next-token prediction, its exact linear map, taken apart.

`analyze(model, text)` returns an `Analysis`: `report` is the content of report.json (schema below,
version "eqlin.report/1"; keys are only ever added) and the remaining fields hold the arrays the
figures need.

report.json:
    schema            "eqlin.report/1"
    model             {source, family, num_layers, hidden_size, vocab_size, parameters, checkpoint: the identity of
                        the checkpoint's content (`eqlin.model.checkpoint_identity`; null where not given)}
    dtype             compute dtype, e.g. "float64"
    options           {layers: [l…] analysed, top_k, branch_tap, layer_engine}: the options that shape the report
    text              the input text
    tokens            [{position, id, text}] as the model sees them (BOS included where added)
    next_token        {id, text, probability, logit}: the greedy next token
    top_predictions   [{id, text, probability}] the top_k next tokens
    relative_error    ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ of the detached Jacobian (y: final hidden state, last
                        position; c: the constant, 0 without biases)
    plain_relative_error   the same for the plain (non-detached) Jacobian: it does not reconstruct (computed from
                        one JVP, J·x = Σ_t J_t x_t, without forming the plain J)
    homogeneity_error ‖y − jvp(f, x; x)‖ / ‖y‖, matrix-free
    logit             {id, value, reconstructed, relative_error, constant}: the next token's logit,
                        Σ_t W_U[id] J_t x_t + W_U[id] c, and the constant's share W_U[id] c
    constant          {norm ‖c‖, relative_norm ‖c‖ / ‖y‖, logit W_U[next] c, tokens}: the constant c of the
                        affine map y = Σ_t J_t x_t + c (the frozen network at zero input: the biases carried
                        through; exactly 0 for bias-free models, see `eqlin.linear_maps`), with tokens its top_k
                        tokens through the unembedding (empty when c = 0). The spectra are J's alone
    per_token         [{position, token, contribution_norm ‖J_t x_t‖, logit_contribution W_U[id] J_t x_t,
                        singular_values (top_k), effective_dimension {stable_rank, participation_ratio,
                        rank_90, rank_99}, left_tokens (top_k × top_k strings: tokens of each left
                        singular vector through the unembedding), right_tokens (the same for right
                        singular vectors, nearest input embeddings)}]
    layer_maps        {layers: [l…], scope: "cumulative", input → each layer's output read through the final
                        norm; residual / attn / mlp: {stable_rank, participation_ratio, rank_90, rank_99,
                        relative_error}, one value per layer} (empty layers: not computed); the cumulative
                        half of "layers", kept for readers of earlier reports
    layers            [{layer: l, cumulative: P, single: P}] one entry per analysed layer, ascending (empty:
                        none analysed; see `eqlin.layer_story`). cumulative: input embeddings → layer l's
                        output; single: the residual stream entering layer l → its output; every output at the
                        last position through the final norm. P = {residual: M, attn: M, mlp: M}, where
                        M = {relative_error ‖y − Σ_t J_t x_t‖/‖y‖, stable_rank, participation_ratio, rank_90,
                        rank_99, singular_values (top_k, descending), top_tokens (u_1 through the
                        unembedding, top_k strings, best first), singular_vector_tokens (the same for
                        u_1 … u_k), next_token_rank and next_token_probability (the model's next token in
                        the logit lens of the map's output y: 0 = on top), u1_next_token_rank (the next
                        token's rank in u_1's unembedding scores: 0 = u_1 decodes to it)}
    layer_analysis    {layers, tap ("post" or "pre": attention / MLP branches read after or before the
                        family's branch post-norms), tap_meaning, engines {scope: "fwd" or "rev"},
                        max_relative_error over every layer map}
    timings_s         seconds per stage
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.decoder import num_params
from eqlin.errors import InputError
from eqlin.layer_story import Engine, LayerSpectra, layer_spectra
from eqlin.linear_maps import Linearization, detached_jacobian, logit_map, matrix_free_check
from eqlin.model import Model
from eqlin.progress import shown, stage
from eqlin.selection import Tap, evenly_spaced
from eqlin.spectral import decode_spectrum, match_tokens, spectrum

SCHEMA = "eqlin.report/1"


@dataclasses.dataclass(frozen=True)
class Analysis:
    """report: report.json's content. The arrays feed the figures: output y (d,), reconstruction
    Σ_t J_t x_t (d,), plain_reconstruction J_plain·x (d,), jacobian J (d, T, d), singular_values (T, k).
    linearization: the final detached map itself (`Linearization.save` writes it)."""

    report: dict[str, Any]
    output: np.ndarray
    reconstruction: np.ndarray
    plain_reconstruction: np.ndarray
    jacobian: np.ndarray
    singular_values: np.ndarray
    layer_spectra: LayerSpectra | None = None
    linearization: Linearization | None = None

    def __repr__(self) -> str:
        return display.analysis_repr(self)

    def _repr_html_(self) -> str:
        return display.analysis_html(self)


TAP_MEANING = {
    "post": "attention and MLP branches are read after the family's branch post-norms (exactly what each adds to "
            "the residual stream; Gemma's post_attention_layernorm / post_feedforward_layernorm, OLMo 2's "
            "post-norms; other families have none)",
    "pre": "attention and MLP branches are read before the family's branch post-norms (o_proj and down_proj "
           "outputs, as the paper's code reads Gemma; the same as post where a family has no post-norms)",
}
AUTO_ALL_LAYERS_UP_TO = 16  # tokens: 'auto' analyses every layer up to this length, else six of them


def auto_layers(num_layers: int, length: int) -> tuple[int, ...]:
    """What --layers auto means at `length` tokens: every layer up to `AUTO_ALL_LAYERS_UP_TO` tokens (the
    forward engine's cost grows as T²), else six evenly spaced layers ending at the last."""
    return tuple(range(num_layers)) if length <= AUTO_ALL_LAYERS_UP_TO else evenly_spaced(num_layers, 6)


def _f(a) -> float:
    return float(np.asarray(a))


def analyze(model: Model, text: str, *, layers: tuple[int, ...] = (), top_k: int = 5, tap: Tap = "post",
            engine: Engine = "auto", checkpoint: str | None = None, lin: Linearization | None = None,
            quiet: bool | None = None) -> Analysis:
    """Everything `eqlin analyze` reports, for the next-token prediction after `text`: the final map,
    and for each of `layers` the six layer maps (`eqlin.layer_story`, branches read at `tap`).
    `checkpoint`: the checkpoint's identity, recorded in the report. `lin`: the final detached map of
    `text` if already computed (e.g. by `eqlin.detached_jacobians` for a batch), else it is computed here."""
    quiet = not shown(quiet)
    timings: dict[str, float] = {}
    ids = model.encode(text)
    strings = model.token_strings(ids)
    k = min(top_k, model.config.hidden_size)

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        with stage(name, quiet):
            start = time.perf_counter()
            yield
            timings[name] = round(time.perf_counter() - start, 3)

    with timed("forward"):
        logits = model.logits(ids)[-1]
        probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)[:top_k]
    if lin is None:
        with timed("detached Jacobian (compile + run)"):
            lin = jax.block_until_ready(detached_jacobian(model, ids))
    elif not np.array_equal(np.asarray(lin.ids), ids) or lin.jacobian.ndim != 3:
        raise InputError("lin must be the final detached map of this text's tokens")
    with timed("plain Jacobian's reconstruction (one JVP)"):
        plain = jax.block_until_ready(matrix_free_check(model, ids, detach=False))
    with timed("matrix-free homogeneity check"):
        check = matrix_free_check(model, ids)
    lm = logit_map(model, lin, [int(order[0])])
    with timed("spectra and decoding"):
        spec = decode_spectrum(model, spectrum(lin, k), top=k)

    story = None
    layer_maps: dict[str, Any] = {"layers": list(layers), "scope": "cumulative"}
    if layers:
        with timed("layer maps (both scopes, three parts)"):
            story = layer_spectra(model, ids, layers=list(layers), k=k, top=k, tap=tap, engine=engine, quiet=quiet)
        for part, maps in story.maps["cumulative"].items():
            layer_maps[part] = {**maps.effective.to_dict(), "relative_error": maps.relative_error.tolist()}

    per_token = []
    for t, token in enumerate(strings):
        effective = {name: np.asarray(v)[t].item() for name, v in spec.effective.to_dict().items()}
        per_token.append({
            "position": t, "token": token,
            "contribution_norm": _f(jnp.linalg.norm(lin.contributions[t])),
            "logit_contribution": _f(lm.contributions[t, 0]),
            "singular_values": np.asarray(spec.singular_values[t]).tolist(),
            "effective_dimension": effective,
            "left_tokens": spec.left_tokens.tokens[t],
            "right_tokens": [row[:k] for row in spec.right_tokens.tokens[t]],
        })
    next_id = int(order[0])
    c_norm = _f(jnp.linalg.norm(lin.constant))
    constant = {"norm": c_norm, "relative_norm": c_norm / _f(jnp.linalg.norm(lin.output)),
                "logit": _f(lm.constant[0]),
                "tokens": match_tokens(model, lin.constant, k, "output").tokens if c_norm > 0 else []}
    report = {
        "schema": SCHEMA,
        "model": {"source": model.source, "family": model.config.family, "num_layers": model.config.num_layers,
                  "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
                  "parameters": num_params(model.params), "checkpoint": checkpoint,
                  "allowed_keys": list(model.allowed_keys)},
        "dtype": str(model.dtype),
        "options": {"layers": list(layers), "top_k": top_k, "branch_tap": tap, "layer_engine": engine},
        "text": text,
        "tokens": [{"position": t, "id": int(i), "text": s} for t, (i, s) in enumerate(zip(ids, strings))],
        "next_token": {"id": next_id, "text": model.token_strings([next_id])[0], "probability": float(probs[next_id]),
                       "logit": _f(logits[next_id])},
        "top_predictions": [{"id": int(i), "text": model.token_strings([int(i)])[0], "probability": float(probs[i])}
                            for i in order],
        "relative_error": _f(lin.relative_error),
        "plain_relative_error": _f(plain.homogeneity_error),
        "homogeneity_error": _f(check.homogeneity_error),
        "logit": {"id": next_id, "value": _f(lm.logits[0]),
                  "reconstructed": _f(lm.contributions[:, 0].sum() + lm.constant[0]),
                  "relative_error": _f(lm.relative_error[0]), "constant": _f(lm.constant[0])},
        "constant": constant,
        "per_token": per_token,
        "layer_maps": layer_maps,
        "layers": story.to_list() if story else [],
        "layer_analysis": {"layers": list(layers), "tap": tap, "tap_meaning": TAP_MEANING[tap],
                           "engines": story.engines if story else {},
                           "max_relative_error": story.max_relative_error if story else None},
        "timings_s": timings,
    }
    return Analysis(report, np.asarray(lin.output), np.asarray(lin.reconstruction),
                    np.asarray(plain.homogeneity), np.asarray(lin.jacobian), np.asarray(spec.singular_values),
                    story, lin)
